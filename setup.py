"""Build script: the pure-Python package plus the optional C++/CUDA extension ``fastbicot._C``.

The extension is built when torch (and a C++ compiler) are available; CUDA kernels are added
when torch has CUDA and ``nvcc`` is found (or FASTBICOT_FORCE_CUDA=1). Without either, the
package installs anyway and ``fastbicot.vq_decode`` falls back to its pure-torch path.
"""

import glob
import os
import shutil
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup


def _import_torch():
    """torch from the build env, else from the target environment (pip's isolated build hides it).

    We never want pip to install torch for the build: the registry's default wheel is the
    multi-GB CUDA build, so torch stays out of [build-system].requires and we look for the
    copy the user already installed.
    """
    try:
        import torch

        return True
    except ImportError:
        pass
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in sys.path:
            sys.path.append(path)
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def _extensions():
    if os.environ.get("FASTBICOT_NO_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    if not _import_torch():
        warnings.warn("fastbicot: torch not found at build time; fastbicot._C not built (pure-torch fallback).")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("fastbicot: no C++ compiler found; fastbicot._C not built (pure-torch fallback).")
        return [], {}
    # -fopenmp-simd: honour `#pragma omp simd` (vectorised reductions) without the OpenMP runtime;
    # -fno-trapping-math: lets float compares if-convert into vector blends (no value changes)
    cxx = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]  # BuildExtension picks the C++ standard that matches torch (C++20 for torch >= 2.10)
    want_cuda = os.environ.get("FASTBICOT_FORCE_CUDA") == "1" or (
        torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None
    )
    if want_cuda:
        cu = sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension(
            "fastbicot._C",
            sources + cu,
            define_macros=[("FASTBICOT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        ext = CppExtension("fastbicot._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastbicot", "fastbicot.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
