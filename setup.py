"""Build of the C extension ``kvtransfer._C`` (everything else lives in pyproject.toml).

One build serves CPU-only and GPU machines: CUDA is reached through ``libcuda.so.1``
loaded at run time, so neither the CUDA toolkit nor torch is needed to build. The
verbs transport is built when libibverbs and its headers are present (Debian/Ubuntu:
``libibverbs-dev``); otherwise ``verbs_unavailable.c`` stands in and the engine reports
verbs as unavailable, saying why. ``KVTRANSFER_NO_VERBS=1`` builds without it on purpose.
"""
import os
from pathlib import Path

from setuptools import Extension, setup

csrc = Path("csrc")


def find_libibverbs() -> list[str]:
    """Link arguments for libibverbs: the development symlink when there is one, else
    the runtime library itself (machines with libibverbs1 and headers, but no -dev)."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if Path(d, "libibverbs.so").exists():
            return ["-libverbs"]
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        found = sorted(Path(d).glob("libibverbs.so.*"))
        if found:
            return [str(found[0])]
    return []


verbs_link = find_libibverbs()
have_verbs = (Path("/usr/include/infiniband/verbs.h").exists() and bool(verbs_link)
              and not os.environ.get("KVTRANSFER_NO_VERBS"))
verbs_files = {"verbs_device.c", "verbs_mr.c", "verbs_qp.c", "transport_verbs.c"}
skip = {"verbs_unavailable.c"} if have_verbs else verbs_files
sources = sorted(str(p) for p in csrc.glob("*.c") if p.name not in skip)

setup(
    ext_modules=[
        Extension(
            "kvtransfer._C",
            sources=sources,
            depends=sorted(str(p) for p in csrc.glob("*.h")),
            include_dirs=[str(csrc)],
            define_macros=[("KVT_HAVE_VERBS", "1")] if have_verbs else [],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-fvisibility=hidden", "-pthread", "-Wno-missing-field-initializers"],
            extra_link_args=["-pthread"] + (verbs_link if have_verbs else []),
            libraries=["dl"],
        )
    ]
)
