"""Chat templates: rendered here exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model.chat import ChatTemplate, render_chat

# SmolLM2-Instruct's template (ChatML with a default system prompt).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

# A Llama-3-like template: the BOS string, trim_blocks/lstrip_blocks whitespace, loop
# controls, tojson and raise_exception all take part.
LLAMA3ISH = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['content'] == 'skip me' %}{% continue %}{% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
{{ {'n': messages | length, 'é': 1} | tojson }}"""

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "skip me"},
     {"role": "user", "content": "  List three colours, déjà vu ✓  "}],
]


def _folder(tmp_path: Path, template: object, name: str) -> Path:
    """A tokenizer folder transformers can load: a tiny word-level tokenizer.json and a
    tokenizer_config.json holding ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / name
    folder.mkdir()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}   # the object form of a special token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos,
              "unk_token": "<unk>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("template", [CHATML, LLAMA3ISH], ids=["chatml", "llama3ish"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_matches_transformers(tmp_path: Path, template: str, generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers", reason="the reference renderer")
    folder = _folder(tmp_path, template, "tok")
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    chat = ChatTemplate.from_folder(folder)
    for messages in MESSAGES:
        ours = chat.render(messages, add_generation_prompt=generation_prompt)
        theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs
    assert render_chat(folder, MESSAGES[0]).endswith(
        "<|im_start|>assistant\n" if template is CHATML else '<|end_header_id|>\n\n\n{"n": 1, "é": 1}')


def test_named_templates_and_jinja_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path, [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "{{ messages[0]['content'] }}!"}], "named")
    assert render_chat(folder, MESSAGES[0]) == "What is the capital of France?!"
    # Transformers >= 4.47 saves the template beside tokenizer_config.json.
    folder = _folder(tmp_path, None, "file")
    (folder / "chat_template.jinja").write_text("[{{ messages[-1]['content'] }}]")
    assert render_chat(folder, MESSAGES[0]) == "[What is the capital of France?]"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="has no chat template"):
        render_chat(_folder(tmp_path, None, "none"), MESSAGES[0])
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        render_chat(tmp_path / "nowhere", MESSAGES[0])
    with pytest.raises(InvalidArgumentError, match="does not parse"):
        render_chat(_folder(tmp_path, "{% for %}", "bad"), MESSAGES[0])
    chat = ChatTemplate.from_folder(_folder(tmp_path, LLAMA3ISH, "llama"))
    with pytest.raises(InvalidArgumentError, match="unknown role tool"):
        chat.render([{"role": "tool", "content": "x"}])
    for bad in ([], "hello", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(InvalidArgumentError, match="messages"):
            chat.render(bad)  # type: ignore[arg-type]
    # The sandbox refuses to reach Python internals from a template.
    sneaky = ChatTemplate.from_folder(_folder(tmp_path, "{{ messages.__class__.__mro__ }}", "sneaky"))
    with pytest.raises(InvalidArgumentError, match="refused"):
        sneaky.render(MESSAGES[0])
