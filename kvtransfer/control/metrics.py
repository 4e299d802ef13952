"""What the control plane measures: per-request timings, and Prometheus metrics.

Every :class:`~kvtransfer.control.client.Pull` carries a :class:`PullTimings` (seconds
from the submit, monotonic clock). The same numbers feed Prometheus metrics in a
``prometheus_client`` registry (the default one unless given), so a worker exposes them
with ``prometheus_client.start_http_server`` or its own ``/metrics`` route.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10, 30)


@dataclass
class PullTimings:
    """One request's pull, in seconds since it was submitted (None: did not happen).

    ``handshake_s`` is the session's handshake (done once per prefill peer, before any
    request); ``pinned_s`` when the prefill side pinned the blocks; ``first_manifest_s``
    when the first layer was announced; ``first_byte_s`` when the first layer's read
    completed; ``layers_s[i]`` when layer i was in place; ``total_s`` when every layer
    was; ``released_s`` when the prefill side confirmed the release; ``transfer_s`` the
    time reads were in flight (with layer streaming, less than ``total_s``: the rest is
    waiting for the prefill side to compute). ``waited_s``, for a Subscribe that may
    wait for its request to open: when the first message about it came (by then it had
    opened); the Prometheus pull times count from there, the wait has its own histogram.
    """
    request_id: str
    transport: str
    handshake_s: float
    started: float = 0.0  # time.monotonic() at the submit: the origin of every *_s below
    pinned_s: float | None = None
    first_manifest_s: float | None = None
    first_byte_s: float | None = None
    layers_s: dict[int, float] = field(default_factory=dict)
    total_s: float | None = None
    released_s: float | None = None
    transfer_s: float = 0.0  # wall time with reads in flight (what moving the KV took)
    waited_s: float | None = None
    bytes: int = 0
    entries: int = 0

    @property
    def gb_per_s(self) -> float | None:
        """What moving the KV achieved: bytes over the time reads were in flight."""
        return (self.bytes / self.transfer_s / 1e9) if self.transfer_s else None

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["layers_s"] = [self.layers_s[k] for k in sorted(self.layers_s)]
        d["gb_per_s"] = self.gb_per_s
        return d


class ControlMetrics:
    """The Prometheus side; one instance per registry (see :func:`metrics_for`)."""

    def __init__(self, registry: CollectorRegistry):
        self.handshake = Histogram("kvtransfer_handshake_seconds", "Control plane handshake time",
                                   buckets=_LATENCY_BUCKETS, registry=registry)
        self.first_byte = Histogram("kvtransfer_pull_first_byte_seconds",
                                    "Submit (or a waited-for request's open) to the first layer in place",
                                    ["transport"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.layer = Histogram("kvtransfer_pull_layer_seconds", "Layer announced to layer in place",
                               ["transport"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.total = Histogram("kvtransfer_pull_seconds", "Submit (or a waited-for request's open) to every layer "
                               "in place", ["transport"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.wait = Histogram("kvtransfer_pull_wait_seconds", "A Subscribe waiting for its request to open "
                              "(not in the other pull times)", ["transport"], buckets=_LATENCY_BUCKETS,
                              registry=registry)
        self.bytes = Counter("kvtransfer_pull_bytes", "KV bytes pulled", ["transport"], registry=registry)
        self.pulls = Counter("kvtransfer_pulls", "Pulls by outcome", ["transport", "outcome"], registry=registry)
        self.errors = Counter("kvtransfer_control_errors", "Control messages refused, by side and code",
                              ["side", "code"], registry=registry)
        self.pinned_blocks = Gauge("kvtransfer_pinned_blocks", "Blocks pinned for readers (prefill side)",
                                   registry=registry)
        self.leases_expired = Counter("kvtransfer_leases_expired", "Leases that expired (prefill side)",
                                      registry=registry)
        self.limit_refusals = Counter("kvtransfer_control_limit_refusals",
                                      "Requests refused or ended by a per-session limit (prefill side)", ["limit"],
                                      registry=registry)
        self.sessions = Gauge("kvtransfer_control_sessions", "Decode sessions known (prefill side)",
                              registry=registry)
        self.waiting = Gauge("kvtransfer_control_waiting_subscribes",
                             "Subscribes waiting for their request to open (prefill side)", registry=registry)
        self.sessions_expired = Counter("kvtransfer_control_sessions_expired",
                                        "Sessions dropped after a silence (prefill side)", registry=registry)

    def pull_finished(self, t: PullTimings, outcome: str) -> None:
        self.pulls.labels(t.transport, outcome).inc()
        if outcome != "ok":
            return
        self.bytes.labels(t.transport).inc(t.bytes)
        waited = t.waited_s or 0.0
        if t.waited_s is not None:
            self.wait.labels(t.transport).observe(waited)
        if t.first_byte_s is not None:
            self.first_byte.labels(t.transport).observe(t.first_byte_s - waited)
        if t.total_s is not None:
            self.total.labels(t.transport).observe(t.total_s - waited)


_lock = threading.Lock()
_by_registry: dict[int, ControlMetrics] = {}


def metrics_for(registry: CollectorRegistry | None = None) -> ControlMetrics:
    """The metrics of ``registry`` (default: prometheus_client's global one), created once."""
    registry = registry or REGISTRY
    with _lock:
        m = _by_registry.get(id(registry))
        if m is None:
            m = _by_registry[id(registry)] = ControlMetrics(registry)
        return m
