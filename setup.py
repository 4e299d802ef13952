"""Build of the C extension ``kvtransfer._C`` (everything else lives in pyproject.toml).

One build serves CPU-only and GPU machines: CUDA is reached through ``libcuda.so.1``
loaded at run time, so neither the CUDA toolkit nor torch is needed to build. The
verbs transport is built when libibverbs headers are present (Debian/Ubuntu:
``libibverbs-dev``); otherwise ``verbs_unavailable.c`` stands in and the engine reports
verbs as unavailable, saying why. ``KVTRANSFER_NO_VERBS=1`` builds without it on purpose.
"""
import os
from pathlib import Path

from setuptools import Extension, setup

csrc = Path("csrc")
have_verbs = Path("/usr/include/infiniband/verbs.h").exists() and not os.environ.get("KVTRANSFER_NO_VERBS")
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
            extra_link_args=["-pthread"],
            libraries=["dl"] + (["ibverbs"] if have_verbs else []),
        )
    ]
)
