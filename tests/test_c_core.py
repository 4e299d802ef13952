"""The C core stands alone: tests/c/test_core.c links csrc/ without Python and runs.
It is built without verbs (verbs_unavailable.c stands in), the configuration of a
machine without libibverbs headers; the verbs transport is tested in the rxe guest."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_c_core_without_python(tmp_path):
    skip = {"pymodule.c", "verbs_device.c", "verbs_mr.c", "verbs_qp.c", "transport_verbs.c"}
    sources = [str(p) for p in sorted((ROOT / "csrc").glob("*.c")) if p.name not in skip]
    exe = tmp_path / "test_core"
    subprocess.run(["cc", "-O1", "-g", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-parameter", "-pthread",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests/c/test_core.c"), *sources, "-o", str(exe), "-ldl"],
                   check=True, timeout=90)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout and " passed" in out.stdout
