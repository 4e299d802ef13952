"""kvtransfer: KV-cache disaggregation for prefill/decode split LLM inference.

The transfer engine (:class:`Engine`) registers memory and reads remote registered
memory one-sidedly over ``shm`` or ``tcp`` (``verbs`` to come), in C threads.
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
