"""The OpenAI completions and chat completions APIs: request validation and response bodies.

``POST /v1/completions`` takes ``model`` (optional; must be the served name),
``prompt`` (a string, or a list of token ids), ``max_tokens`` (default 16),
``temperature`` (default 1.0; 0 is greedy), ``top_p``, ``seed``, ``stop`` (a string or
up to 4), ``stream``; also ``ignore_eos``. Anything else OpenAI defines is accepted
and ignored; a bad value is a :class:`BadRequest` (HTTP 400, or 404 for an unknown
model) with a message naming the field.

``POST /v1/chat/completions`` takes ``messages`` (a list of ``{"role", "content"}``;
``content`` a string or a list of ``{"type": "text", "text"}`` parts) instead of
``prompt``, rendered with the model folder's chat template (tokenized without adding
special tokens: the template writes them), and ``max_completion_tokens`` as a synonym of
``max_tokens``; the other fields are the same.

Responses are OpenAI's, plus two fields a client may ignore: ``choices[i].token_ids``
(the generated ids) and ``kv_transfer`` (where the prompt's KV came from and what
moving it took).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from kvtransfer.errors import InvalidArgumentError
from kvtransfer.model import Tokenizer

#: roles a chat message may have
ROLES = ("system", "user", "assistant", "tool", "developer")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    ignore_eos: bool


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
            or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise BadRequest(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return value


def _check_model(body: Any, served_model: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise BadRequest(f"model {model!r} does not exist here; this server serves {served_model!r}", "model",
                         status=404, code="model_not_found")


def parse_completion(body: Any, *, served_model: str, tokenizer: Tokenizer, vocab_size: int,
                     max_context: int) -> CompletionRequest:
    _check_model(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"'prompt' token ids {bad[:4]} are outside the vocabulary [0, {vocab_size})", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise BadRequest("'prompt' is empty", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    return _options(body, ids, max_context, "max_tokens")


def _text_content(content: Any, i: int) -> str:
    """A message's content: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                     "parts", "messages")


def parse_chat(body: Any, *, served_model: str, tokenizer: Tokenizer, vocab_size: int, max_context: int,
               chat_template: Any) -> CompletionRequest:
    """``chat_template``: the folder's :class:`kvtransfer.model.chat.ChatTemplate`, or an
    InvalidArgumentError saying why there is none (raised here as a 400)."""
    _check_model(body, served_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a 'role' of {', '.join(ROLES)}", "messages")
        rendered.append({"role": m["role"], "content": _text_content(m.get("content"), i)})
    if isinstance(chat_template, Exception):
        raise BadRequest(str(chat_template), "messages", code="no_chat_template")
    try:
        text = chat_template.render(rendered, add_generation_prompt=True)
    except InvalidArgumentError as e:
        raise BadRequest(str(e), "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise BadRequest("the messages render to an empty prompt", "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _options(body, ids, max_context, key)


def _options(body: dict, ids: list[int], max_context: int, max_key: str) -> CompletionRequest:
    """What completions and chat share: the length, sampling, stops and streaming."""
    max_tokens = _number(body, max_key, 16, 1, max_context, integer=True)
    if len(ids) + max_tokens > max_context:
        raise BadRequest(f"the prompt is {len(ids)} tokens and max_tokens {max_tokens}: more than the model's "
                         f"context of {max_context} tokens", "prompt" if len(ids) >= max_context else max_key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        # 64 bits: the prefill request carries it in msgpack, which has no bigger integers
        raise BadRequest(f"'seed' must be a 64-bit signed integer, got {seed!r}", "seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    ignore_eos = body.get("ignore_eos", False)
    for key, value in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(value, bool):
            raise BadRequest(f"'{key}' must be true or false, got {value!r}", key)
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only 'n': 1 is supported", "n")
    return CompletionRequest(ids, max_tokens, float(temperature), float(top_p), seed, stop, stream, ignore_eos)


def response_body(request_id: str, model: str, text: str, token_ids: list[int], finish_reason: str | None,
                  usage: dict | None = None, kv: dict | None = None, *, chat: bool = False, chunk: bool = False,
                  first: bool = False) -> dict:
    """A completion (``chat``: a chat completion), or one streamed chunk of it
    (``usage``/``kv`` only on the last; ``first``: a chat stream's opening chunk, which
    names the role)."""
    if not chat:
        choice: dict = {"index": 0, "text": text, "token_ids": token_ids, "logprobs": None,
                        "finish_reason": finish_reason}
        kind = "text_completion"
    elif chunk:
        delta = {"role": "assistant", "content": ""} if first else {"content": text} if text or token_ids else {}
        choice = {"index": 0, "delta": delta, "token_ids": token_ids, "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "token_ids": token_ids,
                  "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion"
    body: dict = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    if kv is not None:
        body["kv_transfer"] = kv
    return body


def models_body(model: str, model_id: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "kvtransfer",
                                        "root": model_id}]}
