"""Builds fastppo and its C++ extension fastppo._C.

Packages are listed explicitly: the top-level folder ``kernels/`` is installed as
``fastppo.kernels`` and never as a top-level ``kernels`` (Hugging Face ships a package by
that name).
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
    ],
    package_dir={"fastppo": "fastppo", "fastppo.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
