"""The standalone workers when things go wrong: a prefill worker killed in the middle of
requests (with another prefill worker to retry on, and without), and workers that must
refuse to start (no model folder, a broken config.json, a prefill worker running
another model). Each test starts its own workers: some are killed on purpose.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path

import pytest

from kvtransfer.model.identity import model_identity
from worker_support import (Fleet, PrefillProbe, model_folder, prompt_ids, reference, run_refused, wait_until)

pytestmark = pytest.mark.timeout(240)

#: a model slow enough to prefill that a kill lands mid-request: ~0.4 s for 1500 tokens
#: on one idle core (the default shapes take ~0.1 s)
SLOW = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64)
LONG = 1500
MAX_NEW = 4
KV_BLOCKS = 512  # 1500 + 4 tokens = 94 blocks a request


def slow_folder() -> Path:
    return model_folder("slow-llama", **SLOW)


def send_all(http, prompts: list[list[int]]) -> list[concurrent.futures.Future]:
    """Posts every prompt at once (greedy, ignore_eos); futures of the Responses."""
    ex = concurrent.futures.ThreadPoolExecutor(len(prompts))
    futures = [ex.submit(http.post, "/v1/completions", {"prompt": p, "max_tokens": MAX_NEW, "temperature": 0,
                                                        "ignore_eos": True}) for p in prompts]
    ex.shutdown(wait=False)
    return futures


def kill_when_pinning(probes: dict, timeout: float = 120.0):
    """Waits until one of the prefill workers has a request's blocks pinned (it is in the
    middle of a request: computing it, or the decode side still reading it), then
    SIGKILLs that worker. Returns it."""
    def busy():
        for worker, probe in probes.items():
            if probe.stats().pinned_requests > 0:
                return worker
        return None

    victim = wait_until(busy, timeout, "a prefill worker pinning a request", every=0.005)
    victim.kill()
    return victim


def test_prefill_killed_mid_request_is_retried_on_the_other(tmp_path):
    folder = slow_folder()
    prompts = [prompt_ids(LONG, seed=s) for s in (1, 2)] * 3
    wants = [reference(folder, p, MAX_NEW) for p in prompts[:2]] * 3
    fleet = Fleet(tmp_path)
    try:
        pa, pb = fleet.together(lambda: fleet.prefill(folder, name="prefill-a", kv_blocks=KV_BLOCKS),
                                lambda: fleet.prefill(folder, name="prefill-b", kv_blocks=KV_BLOCKS))
        d = fleet.decode(folder, [pa, pb], name="decode", kv_blocks=KV_BLOCKS)
        probes = {pa: PrefillProbe(pa, folder), pb: PrefillProbe(pb, folder)}
        try:
            futures = send_all(d.http, prompts)
            victim = kill_when_pinning(probes)
            survivor = pb if victim is pa else pa
            responses = [f.result(timeout=180) for f in futures]
            for i, (r, want) in enumerate(zip(responses, wants)):
                assert r.status == 200, f"request {i}: {r.status} {r.body[:500]!r}\n{d.log()}"
                got = r.json()["choices"][0]["token_ids"]
                assert got == want, f"request {i}: {got} != {want}"
            # the killed worker had work: the decode worker moved it to the other one
            assert re.search(rf"prefill worker {re.escape(victim.endpoint)} failed .*trying another", d.log()), \
                d.log()
            health = d.wait_idle()
            assert health["status"] == "ok"
            assert health["prefill_workers"][victim.endpoint] == "lost", health
            assert health["prefill_workers"][survivor.endpoint] != "lost", health
            probes[survivor].wait_idle()
            # and it keeps serving, from the survivor
            prompt = prompt_ids(40, seed=40)
            body = d.http.complete(prompt=prompt, max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
            assert body["choices"][0]["token_ids"] == reference(folder, prompt, MAX_NEW)
            assert body["kv_transfer"]["prefill_worker"] == survivor.endpoint
            d.wait_idle()
            probes[survivor].wait_idle()
        finally:
            for probe in probes.values():
                probe.close()
    finally:
        problems = fleet.close()
    assert not problems, f"workers did not shut down cleanly on SIGTERM: {problems}"


def test_prefill_killed_mid_request_without_another_is_an_error_then_recovers(tmp_path):
    folder = slow_folder()
    prompts = [prompt_ids(LONG, seed=s) for s in (3, 4, 5)]
    wants = [reference(folder, p, MAX_NEW) for p in prompts]
    fleet = Fleet(tmp_path)
    try:
        p = fleet.prefill(folder, name="prefill", kv_blocks=KV_BLOCKS)
        d = fleet.decode(folder, [p], name="decode", kv_blocks=KV_BLOCKS)
        with PrefillProbe(p, folder) as probe:
            futures = send_all(d.http, prompts)
            kill_when_pinning({p: probe})
        responses = [f.result(timeout=180) for f in futures]
        failed = 0
        for i, (r, want) in enumerate(zip(responses, wants)):
            if r.status == 200:  # done before the kill
                assert r.json()["choices"][0]["token_ids"] == want
                continue
            failed += 1
            assert 500 <= r.status < 600, f"request {i}: {r.status} {r.body[:500]!r}"
            message = r.error_message()
            assert r.json()["error"]["type"] == "server_error"
            assert "prefill" in message, message
        assert failed >= 1, f"the kill hit no request: {[r.status for r in responses]}"
        # the decode worker is healthy, its pool whole, and it says no at once while no prefill
        # worker is there
        health = d.wait_idle()
        assert health["status"] == "ok" and health["prefill_workers"] == {p.endpoint: "lost"}, health
        t0 = time.monotonic()
        r = d.http.post("/v1/completions", {"prompt": "anyone?", "max_tokens": 2})
        assert r.status == 503 and r.error_message(), (r.status, r.body)
        assert time.monotonic() - t0 < 5.0
        d.wait_idle()
        # a prefill worker back on the same endpoint is found again, and serves
        back = fleet.prefill(folder, name="prefill-restarted", kv_blocks=KV_BLOCKS, control=p.endpoint)
        assert back.endpoint == p.endpoint
        wait_until(lambda: d.health()["prefill_workers"][p.endpoint] != "lost", 60,
                   "the decode worker reconnecting to the restarted prefill worker", every=0.2)
        body = d.http.complete(prompt=prompts[0], max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        assert body["choices"][0]["token_ids"] == wants[0]
        d.wait_idle()
        with PrefillProbe(back, folder) as probe:
            probe.wait_idle()
    finally:
        problems = fleet.close()
    assert not problems, f"workers did not shut down cleanly on SIGTERM: {problems}"


# --- refusals at startup ---------------------------------------------------------------------

NOBODY = "tcp://127.0.0.1:9"  # never reached: the model folder is refused first

WORKER_ARGS = {
    "prefill_worker": ["--control", "tcp://127.0.0.1:0"],
    "decode_worker": ["--prefill", NOBODY, "--port", "0", "--connect-timeout", "5"],
}


def check_refusal(module: str, status: int, stderr: str) -> str:
    """Exit status 2 and one line ``MODULE: error: ...`` on stderr, last, no traceback;
    returns the message."""
    assert status == 2, f"{module} exited {status}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{module}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line at the end:\n{stderr}"
    return errors[0].removeprefix(f"{module}: error: ")


@pytest.mark.parametrize("module", ["prefill_worker", "decode_worker"])
def test_refuses_a_missing_model_folder(module, tmp_path):
    missing = tmp_path / "no-such-model"
    message = check_refusal(module, *run_refused(module, "--model", str(missing), *WORKER_ARGS[module]))
    assert str(missing) in message and "does not exist" in message, message


@pytest.mark.parametrize("prefill", [[], ["--prefill", NOBODY, "--local-prefill"]], ids=["neither", "both"])
def test_decode_refuses_prefill_and_local_prefill_together_or_neither(prefill):
    message = check_refusal("decode_worker", *run_refused("decode_worker", "--model", str(model_folder("llama")),
                                                          "--port", "0", *prefill))
    assert "--prefill" in message and "--local-prefill" in message, message


BROKEN_CONFIGS = {
    "not-json": ('{"architectures": ["LlamaForCausalLM"], "hidden_size": ', "not valid JSON"),
    "missing-field": (None, "hidden_size"),
}


@pytest.mark.parametrize("broken", list(BROKEN_CONFIGS))
@pytest.mark.parametrize("module", ["prefill_worker", "decode_worker"])
def test_refuses_a_broken_config_json(module, broken, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    source = model_folder("llama")
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    text, expected = BROKEN_CONFIGS[broken]
    if text is None:  # valid JSON without a field every decoder needs
        config = json.loads((source / "config.json").read_text())
        del config["hidden_size"]
        text = json.dumps(config)
    (folder / "config.json").write_text(text)
    message = check_refusal(module, *run_refused(module, "--model", str(folder), *WORKER_ARGS[module]))
    assert "config.json" in message and expected in message, message


def test_decode_refuses_a_prefill_worker_of_another_model(tmp_path):
    """Same shapes, another seed: the handshake refuses it and names the field "model"."""
    ours, theirs = model_folder("llama"), model_folder("llama-seed1", seed=1)
    fleet = Fleet(tmp_path)
    try:
        p = fleet.prefill(ours, name="prefill", kv_blocks=64)
        t0 = time.monotonic()
        status, stderr = run_refused("decode_worker", "--model", str(theirs), "--prefill", p.endpoint, "--port", "0",
                                     "--kv-blocks", "64", "--connect-timeout", "60")
        took = time.monotonic() - t0
        message = check_refusal("decode_worker", status, stderr)
        assert "incompatible" in message, message
        m = re.search(r"\bmodel \(ours '([^']+)', yours '([^']+)'\)", message)
        assert m, f"the message does not name the field 'model': {message}"
        assert m.groups() == (model_identity(ours), model_identity(theirs)), message
        assert m.group(1) == p.hello["model_id"]
        for other in ("dtype", "num_layers", "total_kv_heads", "head_dim", "kind"):
            assert f"{other} (ours" not in message, message
        assert took < 45, f"refused only after {took:.1f} s (a refusal is not retried until --connect-timeout)"
        # the prefill worker is unharmed
        assert p.alive()
        with PrefillProbe(p, ours) as probe:
            probe.wait_idle()
    finally:
        problems = fleet.close()
    assert not problems, f"workers did not shut down cleanly on SIGTERM: {problems}"
