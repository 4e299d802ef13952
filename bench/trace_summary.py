"""Medians of KVTRANSFER_TRACE=1 lines (csrc/transfer.c prints one per large batch,
at most ten a second), grouped by batch size: where a READ's time goes.

    python3 bench/trace_summary.py LOG [LOG...]
"""
from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(r"kvtransfer trace: (\d+) entries, (\d+) jobs: (.*)")
FIELD = re.compile(r"([a-z ]+) \+?(-?[\d.]+)")


def main(paths: list[str]) -> int:
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for line in open(path, errors="replace"):
            m = LINE.search(line)
            if not m:
                continue
            # -1: not reached (a batch into host memory launches nothing on a GPU)
            fields = {k.strip(): float(v) for k, v in FIELD.findall(m.group(3)) if float(v) >= 0}
            g = groups[path, int(m.group(1))]
            g["jobs"].append(float(m.group(2)))
            for k, v in fields.items():
                g[k].append(v)
    if not groups:
        print("no kvtransfer trace lines (KVTRANSFER_TRACE=1 prints them for batches of 1,000 entries or more)")
    for (path, n), g in sorted(groups.items()):
        parts = [f"{k} {statistics.median(v):.1f}" for k, v in g.items()]
        print(f"{path}: {n} entries, {len(g['jobs'])} batches, medians (us from the C call): " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
