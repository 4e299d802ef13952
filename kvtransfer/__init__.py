"""kvtransfer: KV-cache disaggregation for prefill/decode split LLM inference.

The transfer engine (:class:`Engine`) registers host or CUDA memory and reads remote
registered memory one-sidedly over ``verbs``, ``shm`` or ``tcp``, in C threads.
Above it: :mod:`kvtransfer.kv` (KV layouts and read plans), :mod:`kvtransfer.control`
(the ZeroMQ control plane between prefill and decode workers) and
:mod:`kvtransfer.model` (the Llama-family model the workers run).
"""

from .descriptors import EngineDescriptor, RegionDescriptor
from .engine import Engine, Peer, Region, Transfer, TRANSPORTS
from .errors import (InvalidArgumentError, KVTransferError, RemoteAccessError, TransferError,
                     TransferTimeoutError, TransportUnavailableError)
from .memory import alloc_host

__all__ = [
    "Engine", "Peer", "Region", "Transfer", "TRANSPORTS", "EngineDescriptor", "RegionDescriptor",
    "KVTransferError", "InvalidArgumentError", "TransportUnavailableError", "TransferError",
    "RemoteAccessError", "TransferTimeoutError", "alloc_host",
]
__version__ = "0.1.0"
