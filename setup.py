"""Builds `sere._C`, the compiled SERE ops (schemas in csrc/sere_ops.cpp).

CPU kernels always; the CUDA kernels too when torch is a CUDA build and nvcc is found
(set SERE_FORCE_CPU=1 to skip them). Package metadata lives in pyproject.toml. Install with
`pip install --no-build-isolation -e .` so the extension is built against the installed torch.
"""

import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CPU_SOURCES = [
    "csrc/sere_ops.cpp",
    "csrc/reroute_checks.cpp",
    "csrc/reroute_cpu.cpp",
    "csrc/reroute_err_cpu.cpp",
    "csrc/oea_cpu.cpp",
]
CUDA_SOURCES = [
    "csrc/reroute_cuda.cu",
    "csrc/reroute_err_cuda.cu",
    "csrc/oea_cuda.cu",
    "csrc/reroute_cuda_glue.cpp",
]
# Portable: no -march=native (wheels and CI may run on another CPU). No fused multiply-add
# (-ffp-contract=off): reroute_err must round each float32 step like the PyTorch reference.
CXX_FLAGS = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-ffp-contract=off"]
# sm_90 machine code (H100/H200) and compute_80 PTX that newer GPUs JIT-compile.
NVCC_FLAGS = [
    "-O3",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_80,code=compute_80",
]


def _find_nvcc() -> str | None:
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _build_cuda() -> bool:
    if os.environ.get("SERE_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _find_nvcc() is not None


def _extension():
    if _build_cuda():
        print(f"sere: building CPU + CUDA kernels (torch CUDA {torch.version.cuda}, {_find_nvcc()})")
        return CUDAExtension(
            "sere._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    print("sere: building CPU kernels only (torch without CUDA, nvcc missing or SERE_FORCE_CPU=1)")
    return CppExtension("sere._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS})


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
