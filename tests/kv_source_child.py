"""KVCacheSources in their own process, over caches from connector_support.make_caches.

argv[1]: JSON ``{name: {"layout", "seed", "model", "lease_s", **make_caches kwargs}}``, one
source each. Prints ``{"endpoints": {name: endpoint}}``, then answers one JSON command per
stdin line: ``{"op": "serve", "source", "request_id", "blocks", "num_tokens"}`` or
``{"op": "stats", "source"}``. Exits at end of stdin.
"""

import contextlib
import json
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from connector_support import make_caches  # noqa: E402

from kvtransfer.connector.core import KVCacheSource  # noqa: E402

SHAPE_KEYS = ("num_layers", "num_blocks", "heads", "block_size", "head_dim", "seed", "device")


def main() -> None:
    sources, done = {}, {}
    with contextlib.ExitStack() as stack:
        for name, cfg in json.loads(sys.argv[1]).items():
            caches = make_caches(cfg["layout"], **{k: cfg[k] for k in SHAPE_KEYS if k in cfg})
            if cfg.get("device", "cpu") != "cpu":
                import torch
                torch.cuda.synchronize()  # the seeded pages are in place before anyone reads them
            sources[name] = stack.enter_context(KVCacheSource(caches, model=cfg["model"],
                                                              lease_s=cfg.get("lease_s", 30.0), name=name))
            done[name] = []
        print(json.dumps({"endpoints": {n: s.endpoint for n, s in sources.items()}}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            src = sources[cmd["source"]]
            try:
                if cmd["op"] == "serve":
                    src.serve(cmd["request_id"], cmd["blocks"], cmd["num_tokens"])
                    reply = {"ok": True}
                else:
                    done[cmd["source"]].extend(sorted(src.take_done()))
                    reply = {"pinned": src.pinned_blocks, "serving": src.serving, "waiting": src.waiting,
                             "done": done[cmd["source"]]}
            except Exception as e:  # the test sees it
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
