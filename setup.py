"""Builds the C++/CUDA kernels in csrc/ when a toolchain is present.

csrc/cpu/*.cpp -> vllm_quarot/_C_cpu (any compiler; ISA chosen at run time);
csrc/cuda/*.cu -> vllm_quarot/_C_cuda: experimental, nothing calls it yet, so built only
when asked for (VLLM_QUAROT_CUDA_EXT=1, with nvcc and a CUDA build of torch).
Without them (or with VLLM_QUAROT_NO_EXT=1) the package installs pure Python and the
torch reference ops in vllm_quarot/runtime/ops/reference.py serve every layer.
"""

import glob
import os
import shutil

from setuptools import setup

CUDA_ARCHS = ["80", "86", "89", "90a"]  # INT4 tensor cores on sm8x; INT8 MMA on sm90


def _extensions():
    if os.environ.get("VLLM_QUAROT_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    exts = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        exts.append(CppExtension(
            "vllm_quarot._C_cpu",
            cpu_sources,
            depends=sorted(glob.glob("csrc/cpu/*.h")),
            # no -march: each kernel carries its own target attribute, dispatched at run time
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        ))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("VLLM_QUAROT_CUDA_EXT") == "1"
    if want_cuda and cuda_sources and torch.version.cuda and shutil.which("nvcc"):
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        exts.append(CUDAExtension(
            "vllm_quarot._C_cuda",
            cuda_sources,
            include_dirs=[os.path.abspath("csrc/cuda")],
            depends=sorted(glob.glob("csrc/cuda/*.cuh")),
            # no --use_fast_math: the quantizers rely on IEEE division and rounding
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", *gencode]},
        ))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
