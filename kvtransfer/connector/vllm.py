"""vLLM's KV connector on kvtransfer: ``KVTransferConnector`` (a ``KVConnectorBase_V1``).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTransferConnector",
        "kv_connector_module_path": "kvtransfer.connector.vllm", "kv_role": "kv_producer",
        "kv_connector_extra_config": {"port": 15000, "host": "10.0.0.5"}}'

The flow is NixlConnector's, so vLLM's proxies work unchanged: a request sent to the
producer with ``kv_transfer_params={"do_remote_decode": true}`` finishes with params that
carry ``"do_remote_prefill": true``, the control endpoint of every producer rank, the
producer's request id, block ids and token count; a consumer given those params loads the
blocks (asynchronously by default) and computes only what follows them. The producer keeps
the blocks until the consumer released them or the lease expired.

vLLM runs one instance per role: the scheduler side (EngineCore) decides what to load and
serve and tells the worker side through :class:`KVTransferMetadata`; the worker side
(:class:`~kvtransfer.connector.core.KVCacheSource` / ``KVCacheSink`` over the registered
KV caches) moves the pages and reports finished and failed requests.

``kv_connector_extra_config`` (README "vLLM connector"): ``port`` (control port of rank 0;
rank r uses port + r; default ``kv_port``), ``host`` (advertised, default 127.0.0.1),
``bind_host`` (default: host), ``lease_s``, ``timeout_s`` (producer silence), ``load_timeout_s``,
``transport`` (auto|shm|tcp|verbs), ``async_load`` (default true), ``model_id`` (the name both
sides must share; default the model folder's name), CurveZMQ: ``curve_secret_file`` (this side's
``.key_secret``), ``curve_clients_dir`` (producer: accepted consumers' public keys),
``curve_server_public_file`` (consumer: the producer's public key). A request's ``kv_transfer_params``
may carry ``corrupt_loaded_kv: true`` (tests only: its loaded pages are overwritten with noise,
which proves the KV is used).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                              KVConnectorRole, KVConnectorTransferResults)

from .core import KVCacheSink, KVCacheSource, layer_order

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtransfer.connector")

_REMOTE_KEYS = ("remote_request_id", "remote_block_ids", "remote_endpoints", "remote_num_tokens")


@dataclass
class _Load:
    request_id: str          # the consumer's
    endpoints: list[str]     # the producer's, one per rank
    remote_request_id: str
    block_ids: list[int]     # local, from the first block not cached here
    skip_blocks: int         # the producer's blocks cached here already
    report: bool             # False: only releases the producer's blocks (everything was cached here)
    remote: tuple[list[int], int] | None = None  # the producer's block ids and tokens: reads planned early
    corrupt: bool = False    # tests only: overwrite the loaded pages with noise


@dataclass
class KVTransferMetadata(KVConnectorMetadata):
    """One step's work for the workers: requests to serve (producer) and to load (consumer)."""
    serves: list[tuple[str, list[int], int]] = field(default_factory=list)  # request id, block ids, tokens
    loads: list[_Load] = field(default_factory=list)
    sync: bool = False


def _extra(cfg: Any) -> dict[str, Any]:
    return dict(cfg.kv_connector_extra_config or {})


def _curve(extra: dict[str, Any], side: str):
    """CurveZMQ keys from the key files named in the extra config, or None."""
    from ..control.security import CurveClientKeys, CurveServerKeys

    if not extra.get("curve_secret_file"):
        return None
    if side == "server":
        return CurveServerKeys(extra["curve_secret_file"], extra["curve_clients_dir"])
    return CurveClientKeys(extra["curve_secret_file"], extra["curve_server_public_file"])


class KVTransferConnector(KVConnectorBase_V1):
    """vLLM's connector interface on kvtransfer (see the module docs)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        extra = _extra(cfg)
        self._extra = extra
        self._producer = cfg.kv_role in ("kv_producer", "kv_both")
        self._consumer = cfg.kv_role in ("kv_consumer", "kv_both")
        self._async = bool(extra.get("async_load", True))
        self._block_size = vllm_config.cache_config.block_size
        self._host = str(extra.get("host", "127.0.0.1"))
        self._port = int(extra.get("port", cfg.kv_port))
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        model = vllm_config.model_config.model
        self._model_id = str(extra.get("model_id") or os.path.basename(os.path.normpath(model)))
        # scheduler side
        self._serves: list[tuple[str, list[int], int]] = []
        self._loads: list[_Load] = []
        # worker side
        self._source: KVCacheSource | None = None
        self._sink: KVCacheSink | None = None
        self._caches: list[torch.Tensor] = []
        self._done_sending: set[str] = set()
        self._recved: set[str] = set()
        self._failed_recv: set[str] = set()
        self._load_blocks: dict[str, list[int]] = {}
        self._unreported: set[str] = set()
        self._bad_blocks: set[int] = set()
        self._corrupt_ids: set[str] = set()

    # --- scheduler side ------------------------------------------------------------------

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        # one page per (layer, block); a backend that needs another layout wins, and the core reads
        # LBNHC too
        return "LBHNC"

    def _remote(self, request: "Request") -> dict[str, Any] | None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and all(k in params for k in _REMOTE_KEYS):
            return params
        return None

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = self._remote(request) if self._consumer else None
        if params is None:
            return 0, False
        have = min(int(params["remote_num_tokens"]), request.num_prompt_tokens)
        if not self._async:
            have = min(have, request.num_prompt_tokens - 1)  # the last token is computed here, for its logits
        count = have - num_computed_tokens
        return (count, self._async) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = self._remote(request) if self._consumer else None
        if params is None:
            return
        params["do_remote_prefill"] = False  # loaded once: the next lookup (after the load) finds nothing
        local = blocks.get_block_ids()[0]
        fresh = blocks.get_unhashed_block_ids() if num_external_tokens else []
        skip = len(local) - len(fresh) if num_external_tokens else len(params["remote_block_ids"])
        self._loads.append(_Load(request.request_id, list(params["remote_endpoints"]), params["remote_request_id"],
                                 list(fresh), skip, report=num_external_tokens > 0,
                                 remote=(list(params["remote_block_ids"]), int(params["remote_num_tokens"])),
                                 corrupt=bool(params.get("corrupt_loaded_kv"))))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVTransferMetadata(serves=self._serves, loads=self._loads, sync=not self._async)
        self._serves, self._loads = [], []
        return meta

    def request_finished(self, request: "Request", block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not (self._producer and params and params.get("do_remote_decode")):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: nothing to hand over
        ids = list(block_ids[0]) if block_ids and isinstance(block_ids[0], (list, tuple)) else list(block_ids)
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        ids = ids[:-(-num_tokens // self._block_size)]
        if not ids:
            return False, None
        self._serves.append((request.request_id, ids, num_tokens))
        endpoints = [f"tcp://{self._host}:{self._port + r}" for r in range(self._tp_size)]
        return True, dict(do_remote_prefill=True, do_remote_decode=False, remote_request_id=request.request_id,
                          remote_block_ids=ids, remote_num_tokens=num_tokens, remote_endpoints=endpoints,
                          remote_host=self._host, remote_port=self._port, tp_size=self._tp_size,
                          remote_engine_id=self._kv_transfer_config.engine_id)

    # --- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        self._caches = [kv_caches[name] for name in layer_order(list(kv_caches))]
        heads = self._caches[0].shape[1] if self._caches[0].dim() == 4 else self._caches[0].shape[3]
        total = self._vllm_config.model_config.get_total_num_kv_heads()
        first = rank * heads if self._tp_size <= total else rank * total // self._tp_size
        common = dict(model=self._model_id, total_kv_heads=total, first_head=first)
        extra = self._extra
        transport = extra.get("transport", "auto")
        if self._producer:
            bind = extra.get("bind_host", self._host)
            self._source = KVCacheSource(self._caches, endpoint=f"tcp://{bind}:{self._port + rank}",
                                         lease_s=float(extra.get("lease_s", 30.0)), curve=_curve(extra, "server"),
                                         name=f"vllm-producer-{rank}", **common)
        if self._consumer:
            self._sink = KVCacheSink(self._caches, transport=None if transport == "auto" else transport,
                                     timeout=float(extra.get("timeout_s", 10.0)),
                                     load_timeout=float(extra.get("load_timeout_s", 60.0)),
                                     curve=_curve(extra, "client"), name=f"vllm-consumer-{rank}",
                                     engine=self._source._reg.engine if self._source else None, **common)
        self._rank = rank
        log.info("KVTransferConnector rank %d: %s KV cache, %d layers%s", rank,
                 (self._source or self._sink).layout_name, len(self._caches),
                 f", control plane on {self._source.endpoint}" if self._source else "")

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTransferMetadata)
        for rid, ids, num_tokens in meta.serves:
            try:
                self._source.serve(rid, ids, num_tokens)
            except Exception as e:  # a request we cannot serve is done: its blocks must not leak
                log.error("KVTransferConnector: cannot serve %r: %s", rid, e)
                self._done_sending.add(rid)
        if not meta.loads:
            return
        for load in meta.loads:
            self._load_blocks[load.request_id] = load.block_ids
            if not load.report:
                self._unreported.add(load.request_id)
            if load.corrupt:
                self._corrupt_ids.add(load.request_id)
            if len(load.endpoints) != self._tp_size:
                # equal tensor parallel sizes only: rank r reads producer rank r
                self._sink.fail(load.request_id, f"producer has {len(load.endpoints)} ranks, this engine "
                                f"{self._tp_size}: equal tensor parallel sizes are needed")
                continue
            self._sink.start(load.request_id, load.endpoints[self._rank], load.remote_request_id, load.block_ids,
                             skip_blocks=load.skip_blocks, remote=load.remote)
        if meta.sync:
            ids = [x.request_id for x in meta.loads]
            self._sink.wait(ids, self._sink.load_timeout + self._sink.timeout)
            self._collect()
            for rid in ids:
                if rid in self._failed_recv:
                    self._failed_recv.discard(rid)
                    self._bad_blocks.update(self._load_blocks.pop(rid, ()))
                else:
                    self._recved.discard(rid)
                    self._load_blocks.pop(rid, None)

    def _collect(self) -> None:
        finished, failed = self._sink.take_done()
        for rid, err in failed.items():
            log.warning("KVTransferConnector: load of %r failed: %s", rid, err)
        for rid in finished & self._corrupt_ids:
            self._corrupt(self._load_blocks.get(rid, []))
        self._corrupt_ids -= finished | set(failed)
        for rid in finished | set(failed):
            if rid in self._unreported:
                self._unreported.discard(rid)
                self._load_blocks.pop(rid, None)
                finished.discard(rid)
                failed.pop(rid, None)
        self._recved |= finished
        self._failed_recv |= set(failed)

    def _corrupt(self, ids: list[int]) -> None:
        index = torch.tensor(ids, dtype=torch.long, device=self._caches[0].device)
        for t in self._caches:
            pages = t.index_select(1 if t.dim() == 5 else 0, index)
            t.index_copy_(1 if t.dim() == 5 else 0, index, torch.randn_like(pages) * 4)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # sync loads are complete when start_load_kv returns; async ones before the request runs

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # the consumer reads the producer's cache in place: nothing to save

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving = self.get_finished(finished_req_ids)
        failed, self._failed_recv = self._failed_recv, set()
        for rid in failed:
            self._load_blocks.pop(rid, None)
        # a failed receive is also a finished one: the scheduler then stops waiting for it
        return KVConnectorTransferResults(finished_sending=set(sending or ()),
                                          finished_recving=set(recving or ()) | failed, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._source is not None:
            self._done_sending |= self._source.take_done()
        if self._sink is not None:
            self._collect()
        sending, self._done_sending = self._done_sending, set()
        recving, self._recved = self._recved, set()
        for rid in recving:
            self._load_blocks.pop(rid, None)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    def shutdown(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._source is not None:
            self._source.close()
            self._source = None
