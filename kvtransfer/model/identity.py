"""Which model a worker runs, as a short string both sides of a handshake compare.

``model_identity(folder)`` is the architecture plus a digest of ``config.json`` and of
every safetensors file: its header (tensor names, dtypes, shapes, offsets), its size and
``_SAMPLES`` evenly spaced 64 KiB samples of its bytes (the whole file when smaller).
Two folders with the same files agree; another config, another checkpoint or another
random seed does not. Sampling keeps it well under a second for multi-GB checkpoints;
two checkpoints equal in every header and every sampled byte would collide.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ..errors import InvalidArgumentError

_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10


def model_identity(folder: str | Path) -> str:
    folder = Path(folder)
    config = folder / "config.json"
    try:
        raw = config.read_bytes()
        arch = (json.loads(raw).get("architectures") or ["unknown"])[0]
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidArgumentError(f"cannot read {config}: {e}", op="model_identity") from None
    h = hashlib.blake2b(raw, digest_size=12)
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + fh.read(min(n, 100 << 20)))
            if size <= _SAMPLES * _SAMPLE_BYTES:
                h.update(fh.read())
                continue
            for i in range(_SAMPLES):
                fh.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return f"{arch}:{h.hexdigest()}"
