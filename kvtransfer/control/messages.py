"""The control plane's wire schema: every message, its bounds, and how it is framed.

A message travels as two ZeroMQ frames: ``PROTOCOL`` (the protocol name and version)
and the msgpack encoding of one of the structs below, tagged by its ``type`` field.
Both sides decode with the schema (msgspec): unknown fields, wrong types, values out of
bounds, an unknown protocol or a body over ``MAX_MESSAGE_BYTES`` become a
:class:`~kvtransfer.errors.ControlError` with ``code="malformed"`` (or
``"unsupported_version"``, ``"too_large"``), which the receiver answers with an
:class:`Error` message instead of acting on it.

Decode -> prefill: Hello, Submit, Subscribe, Renew, Release, Ping, StatsQuery.
Prefill -> decode: Welcome, Pinned, Manifest, Finished, Failed, Renewed, Released,
Pong, Stats, Error.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Union

import msgspec

from ..errors import ControlError
from ..kv import CompatInfo, KVLayout

PROTOCOL = b"kvtransfer-control/1"
#: Bodies above this are answered with ``too_large`` (a prompt of 256k token ids fits).
MAX_MESSAGE_BYTES = 4 << 20
#: ZeroMQ drops a connection that sends a frame above this (ZMQ_MAXMSGSIZE), before
#: Python ever sees it: a bound on the memory one peer can make us allocate.
HARD_MAX_BYTES = 64 << 20

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def new_request_id(prefix: str = "req") -> str:
    """A request id nobody can guess (128 random bits): where free reader slots are
    open to whoever names the id, the id is what keeps strangers out."""
    return f"{prefix}-{secrets.token_hex(16)}"
BlockId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Layer = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
#: the longest a Subscribe may wait for its request to be opened
MAX_SUBSCRIBE_WAIT_S = 60.0
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]


class _Msg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# --- decode -> prefill ---------------------------------------------------------------

class Hello(_Msg, tag="hello"):
    """Opens a session: who the decode side is and what its KV pool looks like."""
    engine: Annotated[bytes, msgspec.Meta(max_length=4096)]  # EngineDescriptor.to_bytes()
    layout: KVLayout
    compat: CompatInfo
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Submit(_Msg, tag="submit"):
    """Asks the prefill side to compute a request; ``payload`` is the application's
    (e.g. prompt token ids). ``readers``: how many decode ranks will read and release
    the blocks (tensor parallel decode); the blocks stay pinned until all did."""
    request_id: RequestId
    payload: bytes = b""
    readers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class Subscribe(_Msg, tag="subscribe", omit_defaults=True):
    """Follows a request someone else submitted (or the prefill side opened): the
    answer replays everything published so far, then streams the rest. ``wait_s``: if
    the request is not open yet (and was never retired), wait up to this many seconds
    for it to open instead of ``unknown_request`` at once (0: refuse at once). Waits
    beyond the server's bounds are refused ``quota_exceeded``. Left out on the wire when 0."""
    request_id: RequestId
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_SUBSCRIBE_WAIT_S)] = 0.0


class Renew(_Msg, tag="renew"):
    """Extends the leases of these requests by the server's lease time."""
    request_ids: Annotated[list[RequestId], msgspec.Meta(max_length=4096)]


class Release(_Msg, tag="release"):
    """This reader is done with the request's blocks; ``transport`` and ``nbytes`` say
    how it read them (for the prefill side's log: reads are one-sided, it sees none)."""
    request_id: RequestId
    transport: Annotated[str, msgspec.Meta(max_length=16)] = ""
    nbytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class Ping(_Msg, tag="ping"):
    nonce: Count = 0


class StatsQuery(_Msg, tag="stats_query"):
    pass


# --- prefill -> decode ---------------------------------------------------------------

class Welcome(_Msg, tag="welcome"):
    """The handshake's answer: how to read this prefill worker's KV pool."""
    engine: Annotated[bytes, msgspec.Meta(max_length=4096)]
    regions: Annotated[list[Annotated[bytes, msgspec.Meta(max_length=4096)]], msgspec.Meta(max_length=4096)]
    layout: KVLayout
    compat: CompatInfo
    lease_s: Seconds
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""
    #: with CURVE, this session's data plane token: the prefill engine's tcp server
    #: admits only connections that present it (Engine.connect(..., token=...))
    token: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class Pinned(_Msg, tag="pinned"):
    """The request's blocks (token order) are pinned; the lease runs from now."""
    request_id: RequestId
    blocks: Annotated[list[BlockId], msgspec.Meta(max_length=1 << 20)]
    num_tokens: Count


class Manifest(_Msg, tag="manifest"):
    """These layers of the pinned blocks hold their final bytes: read them."""
    request_id: RequestId
    layers: Annotated[list[Layer], msgspec.Meta(min_length=1, max_length=65536)]


class Finished(_Msg, tag="finished"):
    """Every layer is published; ``result`` is the application's (e.g. the first token)."""
    request_id: RequestId
    result: bytes = b""


class Failed(_Msg, tag="failed"):
    """The request ended without its KV (prefill error, lease expired, shutting down)."""
    request_id: RequestId
    code: ShortText
    message: ShortText


class Renewed(_Msg, tag="renewed"):
    """Leases extended; ``lost`` are the ids this server no longer holds (expired or
    unknown), ``refused`` those that belong to other sessions (not extended)."""
    lease_s: Seconds
    lost: Annotated[list[RequestId], msgspec.Meta(max_length=4096)] = []
    refused: Annotated[list[RequestId], msgspec.Meta(max_length=4096)] = []


class Released(_Msg, tag="released"):
    """``valid``: the blocks stayed pinned from Pinned until this release, so what was
    read is the request's KV. False: the lease had expired — the blocks may have been
    reused while being read; the reader must discard what it read."""
    request_id: RequestId
    valid: bool
    message: ShortText = ""


class Pong(_Msg, tag="pong"):
    nonce: Count = 0


class Stats(_Msg, tag="stats", omit_defaults=True):
    """The prefill side's pool, leases, refusals and sessions."""
    free_blocks: Count
    used_blocks: Count
    pinned_requests: Count
    leases_expired: Count
    errors: Count
    sessions: Count = 0
    waiting: Count = 0  # Subscribes waiting for their request to open


class Error(_Msg, tag="error"):
    """A refused message: ``code`` (``malformed``, ``too_large``, ``unsupported_version``,
    ``no_handshake``, ``incompatible``, ``unknown_request``, ``duplicate_request``,
    ``lease_expired``, ``not_owner`` (the request belongs to other sessions), ``quota_exceeded``,
    ``too_many_sessions``, ``out_of_order``), a message for people, and for ``incompatible``
    the differing ``fields`` as (name, ours, theirs)."""
    code: ShortText
    message: ShortText
    request_id: Annotated[str, msgspec.Meta(max_length=256)] = ""
    fields: Annotated[list[tuple[str, str, str]], msgspec.Meta(max_length=64)] = []


ToPrefill = Union[Hello, Submit, Subscribe, Renew, Release, Ping, StatsQuery]
ToDecode = Union[Welcome, Pinned, Manifest, Finished, Failed, Renewed, Released, Pong, Stats, Error]

_encoder = msgspec.msgpack.Encoder()
_to_prefill = msgspec.msgpack.Decoder(ToPrefill)
_to_decode = msgspec.msgpack.Decoder(ToDecode)


def encode(msg: _Msg) -> list[bytes]:
    """The frames of one message."""
    return [PROTOCOL, _encoder.encode(msg)]


def decode_to_prefill(frames: list[bytes]) -> ToPrefill:
    return _decode(frames, _to_prefill)


def decode_to_decode(frames: list[bytes]) -> ToDecode:
    return _decode(frames, _to_decode)


def _decode(frames: list[bytes], decoder: msgspec.msgpack.Decoder):
    if len(frames) != 2:
        raise ControlError(f"expected 2 frames (protocol, body), got {len(frames)}", code="malformed", op="decode")
    proto, body = frames
    if proto != PROTOCOL:
        shown = bytes(proto[:64])
        raise ControlError(f"protocol {shown!r} is not spoken here; this side speaks {PROTOCOL.decode()}",
                           code="unsupported_version", op="decode")
    if len(body) > MAX_MESSAGE_BYTES:
        raise ControlError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit",
                           code="too_large", op="decode")
    try:
        return decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ControlError(f"malformed message: {e}", code="malformed", op="decode") from None
    except Exception as e:  # nested structs validate in __post_init__ and may raise anything of ours
        raise ControlError(f"malformed message: {e}", code="malformed", op="decode") from None
