"""python -m kvtransfer.model convert FILE.gguf DIR

Writes the Hugging Face-style folder equivalent of a GGUF file (see
:mod:`kvtransfer.model.convert`); a bad file is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import KVTransferError
from .convert import convert_gguf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtransfer.model", description="model tools")
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="GGUF file -> config.json, model.safetensors, tokenizer.json, "
                                          "tokenizer_config.json, generation_config.json")
    conv.add_argument("gguf", help="the .gguf file")
    conv.add_argument("folder", help="the folder to write (created; must be empty if it exists)")
    args = ap.parse_args(argv)
    try:
        out = convert_gguf(args.gguf, args.folder)
    except (KVTransferError, OSError) as e:
        print(f"kvtransfer.model convert: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
