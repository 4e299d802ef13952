"""Pictures of bench/transfer_bw.py's --json records (matplotlib, the bench extra).

    .venv/bin/python bench/plot.py --sweep bw.json [--kv kv.json] -o bw.png

Left panel (a block-size sweep): GB/s against block size, one line per system, the
median of the repetitions with min-max as error bars; ``memcpy`` (the ceiling of shm)
dashed. Right panel (a --model-shape run): per system, the time to move one request's
KV (median, min-max bars) and the time to its first layer. transfer_bw.py --plot draws
the panel of its own run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CEILINGS = ("memcpy", "d2d")  # drawn dashed: what a copy in one process reaches


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def sweep_panel(ax, recs: list[dict], title: str) -> None:
    systems = list(dict.fromkeys(r["system"] for r in recs if "unavailable" not in r))
    for system in systems:
        rs = sorted((r for r in recs if r["system"] == system and "unavailable" not in r),
                    key=lambda r: r["block_bytes"])
        x = [r["block_bytes"] for r in rs]
        med = [r.get("bw_median_gbps", r["bw_avg_gbps"]) for r in rs]
        lo = [m - r.get("bw_min_gbps", m) for m, r in zip(med, rs)]
        hi = [r.get("bw_max_gbps", m) - m for m, r in zip(med, rs)]
        ax.errorbar(x, med, yerr=[lo, hi], label=system, marker="o", capsize=3,
                    linestyle="--" if system in CEILINGS else "-")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["block_bytes"] for r in recs})
    ax.set_xticks(sizes, [_human(s) for s in sizes])
    ax.set_xlabel("block size")
    ax.set_ylabel("GB/s (median of repetitions, min-max bars)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def kv_panel(ax, recs: list[dict], title: str) -> None:
    rs = [r for r in recs if "unavailable" not in r]
    names = [r["system"] for r in rs]
    tot = [r["total_us"] / 1e3 for r in rs]
    err = [[t - r["total_min_us"] / 1e3 for t, r in zip(tot, rs)], [r["total_max_us"] / 1e3 - t for t, r in zip(tot, rs)]]
    first = [r["first_layer_us"] / 1e3 for r in rs]
    pos = range(len(rs))
    ax.bar([p - 0.2 for p in pos], tot, 0.4, yerr=err, capsize=3, label="whole request (median, min-max)")
    ax.bar([p + 0.2 for p in pos], first, 0.4, label="first layer (median)")
    ax.set_xticks(list(pos), names, rotation=20, fontsize=8)
    ax.set_ylabel("ms")
    if rs:
        r = rs[0]
        title = f"{title}: {r['model_shape']}, {r['prompt_tokens']} tokens, {r['kv_bytes'] / 2**20:.0f} MiB, " \
                f"{r['layers']} layers"
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def draw(path: str, sweep: list[dict] | None, kv: list[dict] | None, title: str = "") -> None:
    plt = _matplotlib()
    panels = [p for p in (("sweep", sweep), ("kv", kv)) if p[1]]
    if not panels:
        raise ValueError("nothing to plot: no records")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (kind, recs) in zip(axes[0], panels):
        (sweep_panel if kind == "sweep" else kv_panel)(ax, recs, title or "READ between two processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _human(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", help="records of a block-size run (transfer_bw.py --json)")
    ap.add_argument("--kv", help="records of a --model-shape run")
    ap.add_argument("--title", default="")
    ap.add_argument("-o", "--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import out_path_problem

    problem = out_path_problem(args.out, ".png")
    if problem:
        ap.error(problem)
    load = lambda p: json.loads(Path(p).read_text()) if p else None  # noqa: E731
    draw(args.out, load(args.sweep), load(args.kv), args.title)
    print(f"plot: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
