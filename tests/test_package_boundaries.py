"""The library apart from its tools: ``kvtransfer`` imports no application, and the two
workers meet only through what the library defines (read from the sources' imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPLICATIONS = {"prefill_worker", "decode_worker", "bench", "scripts", "tests"}


def imported_packages(package: str) -> dict[str, set[str]]:
    """file -> the top-level packages its absolute imports name."""
    out: dict[str, set[str]] = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(f.relative_to(ROOT))] = names
    return out


def test_the_library_imports_no_application():
    bad = {f: sorted(n & APPLICATIONS) for f, n in imported_packages("kvtransfer").items() if n & APPLICATIONS}
    assert not bad, f"library modules importing applications: {bad}"


@pytest.mark.parametrize("worker,other", [("prefill_worker", "decode_worker"), ("decode_worker", "prefill_worker")])
def test_the_workers_do_not_import_each_other(worker, other):
    bad = [f for f, n in imported_packages(worker).items() if other in n]
    assert not bad, f"{worker} imports {other} in {bad}; share a schema through kvtransfer instead"
