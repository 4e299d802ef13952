"""``python -m kvtransfer COMMAND ...``: the ``kvtransfer`` command (``doctor``, ...)."""

import sys

from .doctor import cli

if __name__ == "__main__":
    sys.exit(cli())
