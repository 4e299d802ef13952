"""What a decode worker asks a prefill worker, inside the control plane's Submit
payload, and what it gets back in Finished (msgpack, validated like every control
message: a malformed payload fails the request with ``bad_request``). The library owns
this schema so that the two workers meet only through it, never import each other."""

from __future__ import annotations

from typing import Annotated

import msgspec

TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class PrefillPayload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The prompt's token ids and how to pick the first generated token (step 0 of
    :func:`kvtransfer.model.generate.pick_token`)."""
    prompt: Annotated[list[TokenId], msgspec.Meta(min_length=1, max_length=1 << 20)]
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    seed: int | None = None


class PrefillResult(msgspec.Struct, frozen=True, kw_only=True):
    first_token: int
    prompt_tokens: int
    prefill_s: float   # the forward pass, seconds
    worker: str = ""


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(obj)


def decode_payload(data: bytes) -> PrefillPayload:
    return msgspec.msgpack.decode(data, type=PrefillPayload)


def decode_result(data: bytes) -> PrefillResult:
    return msgspec.msgpack.decode(data, type=PrefillResult)
