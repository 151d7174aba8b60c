"""Builds the C++/CUDA kernels in csrc/ when a toolchain is present.

Without one (or with VLLM_QUAROT_NO_EXT=1) the package installs pure Python and the
torch reference ops in vllm_quarot/ops.py serve every layer.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("VLLM_QUAROT_NO_EXT") == "1":
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "vllm_quarot._C_cpu",
        cpu_sources,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
