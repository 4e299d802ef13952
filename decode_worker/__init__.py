"""The standalone decode worker: ``python -m decode_worker`` — an OpenAI-compatible
HTTP server that pulls prompts' KV from prefill workers (see :mod:`.worker`)."""

from .worker import DecodeWorker

__all__ = ["DecodeWorker"]
