"""A model folder's chat template, rendered as Hugging Face renders it.

The template is the Jinja2 source in ``tokenizer_config.json``'s ``chat_template`` (a
string, or a list of ``{"name", "template"}`` of which ``"default"`` is used), or in
``chat_template.jinja`` beside it (where Transformers >= 4.47 saves it). It is rendered
in Jinja2's immutable sandbox with Transformers' settings (``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that keeps non-ASCII,
``raise_exception``, ``strftime_now``, a ``namespace`` that refuses underscore names) and the tokenizer's special-token strings
(``bos_token``, ``eos_token``, ...) as variables, so a prompt rendered here matches
``transformers``' ``apply_chat_template(..., tokenize=False)`` character for character.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidArgumentError

#: ``tokenizer_config.json`` keys whose token strings the template sees as variables.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{str(file)!r} is not valid JSON: {e}", op="chat_template") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{str(file)!r} must hold a JSON object", op="chat_template")
    return data


def _template_source(folder: Path, config: Mapping[str, Any]) -> str:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one serves plain chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    raise InvalidArgumentError(
        f"model folder {str(folder)!r} has no chat template (no 'chat_template' in tokenizer_config.json "
        "and no chat_template.jinja): send a plain prompt to /v1/completions instead", op="chat_template")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken object.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        # namespace(...) that refuses underscore names: no road to CPython internals.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidArgumentError(f"the chat template does not parse: {e} (line {e.lineno})",
                                   op="chat_template") from None


class ChatTemplate:
    """A folder's compiled chat template and the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._template = _compile(source)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTemplate":
        """Reads ``folder``'s template; :class:`InvalidArgumentError` when it has none."""
        path = Path(folder)
        if not path.is_dir():
            raise InvalidArgumentError(f"model folder {str(path)!r} does not exist", op="chat_template")
        config = _read_config(path)
        special = {k: t for k in _SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        return cls(_template_source(path, config), special)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """``messages`` (each ``{"role": str, "content": str}``) -> the prompt text; with
        ``add_generation_prompt`` it ends where the assistant's reply begins."""
        import jinja2

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects",
                                       op="chat_template")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InvalidArgumentError(
                    f"messages[{i}] must be an object with string 'role' and 'content', got {m!r}",
                    op="chat_template")
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
            raise InvalidArgumentError(f"the chat template refused these messages: {e}",
                                       op="chat_template") from None


def render_chat(folder: str | Path, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True) -> str:
    """One-shot :meth:`ChatTemplate.render` for the model in ``folder``."""
    return ChatTemplate.from_folder(folder).render(messages, add_generation_prompt)
