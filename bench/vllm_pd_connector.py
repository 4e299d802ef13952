"""KVTransferConnector for bench/vllm_pd.py: the same class, plus the control plane's own
Prometheus metrics (``kvtransfer_pull_seconds``, ``kvtransfer_pull_bytes``, ...) served by
the worker process on ``127.0.0.1:$KVTRANSFER_METRICS_PORT``. vLLM's ``/metrics`` shows only
what a connector reports through vLLM's stats; these live in the engine process's
``prometheus_client`` registry. Loaded with ``"kv_connector_module_path": "vllm_pd_connector"``
and this folder on ``PYTHONPATH``. With ``KVTRANSFER_PULL_TIMINGS=FILE`` each pull's
:class:`~kvtransfer.control.PullTimings` is appended to FILE as a JSON line
(``bench/pull_breakdown.py --summarize FILE`` reads them).
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import start_http_server
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvtransfer.connector.vllm import KVTransferConnector as _Connector
from kvtransfer.control.metrics import metrics_for


class KVTransferConnector(_Connector):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        port = os.environ.get("KVTRANSFER_METRICS_PORT")
        if port and role == KVConnectorRole.WORKER:
            start_http_server(int(port), addr="127.0.0.1")


def _log_pulls(path: str) -> None:
    """Every pull this process finishes (its timings) goes to ``path`` too."""
    metrics = metrics_for()
    finished = metrics.pull_finished

    def log_pull(t: Any, outcome: str) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**t.as_dict(), "outcome": outcome}) + "\n")
        finished(t, outcome)

    metrics.pull_finished = log_pull


if os.environ.get("KVTRANSFER_PULL_TIMINGS"):
    _log_pulls(os.environ["KVTRANSFER_PULL_TIMINGS"])
