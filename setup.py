"""Builds the C++ extension ``dlmscope._C``.

CPU kernels (``csrc/cpu/*.cpp``, OpenMP) are always built. CUDA sources (``csrc/cuda/*.cu``) are added only
when torch is a CUDA build and ``nvcc`` is found. ``DLMSCOPE_MARCH`` sets the target ISA of the CPU kernels
(default ``native``: the extension is compiled where it runs; use e.g. ``x86-64-v3`` for a portable wheel).
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension


def _extension():
    march = os.environ.get("DLMSCOPE_MARCH", "native")
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    if march:
        cxx_flags.append(f"-march={march}")
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (
        bool(cuda_sources)
        and cpp_extension.CUDA_HOME is not None
        and shutil.which("nvcc") is not None
        and __import__("torch").version.cuda is not None
        and os.environ.get("DLMSCOPE_NO_CUDA", "0") != "1"
    )
    if use_cuda:
        return cpp_extension.CUDAExtension(
            "dlmscope._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DDLMSCOPE_WITH_CUDA"], "nvcc": ["-O3", "-DDLMSCOPE_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "dlmscope._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": cpp_extension.BuildExtension})
