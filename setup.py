"""Builds the C++ extension ``dlmscope._C``: the CPU kernels (``csrc/cpu/*.cpp``, OpenMP) and their binding file.

``DLMSCOPE_MARCH`` sets the target ISA of the CPU kernels (default ``native``: the extension is compiled where it
runs; use e.g. ``x86-64-v3`` for a portable wheel).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension


def _extension():
    march = os.environ.get("DLMSCOPE_MARCH", "native")
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    if march:
        cxx_flags.append(f"-march={march}")
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    return cpp_extension.CppExtension(
        "dlmscope._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": cpp_extension.BuildExtension})
