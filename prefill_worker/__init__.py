"""The standalone prefill worker: ``python -m prefill_worker`` (see :mod:`.worker`)."""

from .worker import PrefillWorker

__all__ = ["PrefillWorker"]
