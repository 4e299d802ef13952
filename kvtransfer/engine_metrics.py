"""Prometheus metrics of engines' tcp servers: connections and threads now, refusals
and drops since start (:meth:`kvtransfer.Engine.server_stats`), one series per engine.

    watch_engine(engine)            # the default registry; a worker's /metrics shows it

Values are read from the C core at scrape time; a closed or collected engine drops out.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine

_GAUGES = {"connections": "tcp server connections open",
           "threads": "tcp server threads (acceptor + one per connection)"}
_COUNTERS = {
    "accepted": "tcp connections accepted",
    "refused_busy": "tcp connections refused at the total or per-address cap",
    "refused_token": "tcp connections refused for a missing or unknown token",
    "dropped_idle": "tcp connections dropped after the idle timeout",
    "dropped_deadline": "tcp connections dropped for a hello or request slower than the io timeout",
    "dropped_revoked": "tcp connections dropped when their token was revoked or expired",
    "refused_frames": "tcp requests refused for asking more than the bytes-per-frame limit",
    "accept_backoffs": "accept pauses for want of descriptors or memory",
}


class _EngineCollector:
    def __init__(self) -> None:
        self.engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = []
        for eng in list(self.engines):
            try:
                stats.append((eng.id[:16], eng.server_stats()))
            except Exception:  # closed since: it has nothing to report
                continue
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"kvtransfer_tcp_{name}", doc, labels=["engine"])
            for eid, st in stats:
                g.add_metric([eid], st[name])
            yield g
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"kvtransfer_tcp_{name}", doc, labels=["engine"])
            for eid, st in stats:
                c.add_metric([eid], st[name])
            yield c


_lock = threading.Lock()
_collectors: dict[int, _EngineCollector] = {}


def watch_engine(engine: Engine, registry: CollectorRegistry | None = None) -> None:
    """Adds ``engine``'s tcp server to ``registry`` (default: prometheus_client's)."""
    registry = registry or REGISTRY
    with _lock:
        col = _collectors.get(id(registry))
        if col is None:
            col = _collectors[id(registry)] = _EngineCollector()
            registry.register(col)
        col.engines.add(engine)
