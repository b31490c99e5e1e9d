"""Builds fastppo and its C++ extension fastppo._C.

Packages are listed explicitly, so that nothing but ``fastppo`` is installed at the top level
(the Triton kernels live in ``fastppo/kernels/``; Hugging Face's ``kernels``, which transformers
imports, owns the top-level name). The benchmarks ship as ``fastppo.bench`` (``fastppo bench``); the
repository's ``bench/`` keeps their committed results and a ``python -m bench`` shim.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fastppo._C",
        sources=["csrc/bindings.cpp", "csrc/layout.cpp", "csrc/planning.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    packages=[
        "fastppo",
        "fastppo.ops",
        "fastppo.reference",
        "fastppo.trainer",
        "fastppo.trainer.sampling",
        "fastppo.integrations",
        "fastppo.kernels",
        "fastppo.bench",
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
