"""Build of the C extension ``kvtransfer._C`` (everything else lives in pyproject.toml).

One build serves CPU-only and GPU machines: CUDA is reached through ``libcuda.so.1``
loaded at run time, so neither the CUDA toolkit nor torch is needed to build.
"""
from pathlib import Path

from setuptools import Extension, setup

csrc = Path("csrc")
sources = sorted(str(p) for p in csrc.glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "kvtransfer._C",
            sources=sources,
            depends=sorted(str(p) for p in csrc.glob("*.h")),
            include_dirs=[str(csrc)],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-fvisibility=hidden", "-pthread", "-Wno-missing-field-initializers"],
            extra_link_args=["-pthread"],
            libraries=["dl"],
        )
    ]
)
