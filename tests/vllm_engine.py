"""A real vLLM engine (offline ``LLM``) in its own process, run by .venv-vllm's Python.

argv[1]: JSON ``{"model": folder, "kv_transfer_config": {...} | null, "kv_load_failure_policy": ...,
"kv_cache_bytes": int}``. Prints ``{"ready": true}`` once the engine is up, then answers
one JSON command per stdin line:

- ``{"op": "generate", "prompts": [[ids]], "max_tokens": n, "params": [dict|null]}``:
  greedy generation of every prompt in one batch; answers per prompt its ``tokens``, the
  ``kv_transfer_params`` the engine returned, ``num_cached_tokens`` and ``finish_reason``
  (``"error"``, with no tokens, for a request vLLM failed, e.g. a KV load under
  ``kv_load_failure_policy=fail``).

Exits at end of stdin.
"""

import json
import os
import sys


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from kvtransfer.connector.vllm_cli import patch_version_lookup
    patch_version_lookup()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {}
    if cfg.get("kv_transfer_config"):
        ktc = dict(cfg["kv_transfer_config"])
        if cfg.get("kv_load_failure_policy"):
            ktc["kv_load_failure_policy"] = cfg["kv_load_failure_policy"]
        kwargs["kv_transfer_config"] = ktc
    llm = LLM(model=cfg["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, block_size=32,
              max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=1024, seed=0,
              kv_cache_memory_bytes=cfg.get("kv_cache_bytes", 64 << 20), enable_prefix_caching=False,
              disable_log_stats=False, **kwargs)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            prompts = [TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]]
            params = []
            for extra in cmd.get("params") or [None] * len(prompts):
                sp = SamplingParams(temperature=0.0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                                    detokenize=False)
                if extra is not None:
                    sp.extra_args = {"kv_transfer_params": extra}
                params.append(sp)
            outs = llm.generate(prompts, params, use_tqdm=False)
            reply = {"outputs": [{"tokens": list(o.outputs[0].token_ids), "kv_transfer_params": o.kv_transfer_params,
                                  "num_cached_tokens": o.num_cached_tokens,
                                  "finish_reason": o.outputs[0].finish_reason} for o in outs]}
        except Exception as e:  # the test sees it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    os._exit(0)  # the engine's processes go with it; no slow interpreter teardown


if __name__ == "__main__":
    main()
