"""Compile setup.py's CUDA sources as the GPU machine's build would, on a machine without a GPU.

device_check.sh --dry-run runs this. csrc/check_cuda_compile.sh compiles the kernels with the
CUDA toolkit alone; the real build (setup.py on a CUDA torch) adds torch's nvcc flags
(`__CUDA_NO_HALF_CONVERSIONS__` and friends, which remove __half's implicit conversions) and
compiles the torch glue (reroute_cuda_glue.cpp) against torch's c10/cuda headers, which nothing
else compiles before the GPU machine does. Here, with a CPU torch:
  *.cu   nvcc -c with torch's COMMON_NVCC_FLAGS, -fPIC and setup.py's NVCC_FLAGS (sm_90 + PTX 80)
  *.cpp  the host compiler, -fsyntax-only, with setup.py's CXX_FLAGS and torch's + CUDA's headers
-std=c++17 for both (what csrc/check_cuda_compile.sh uses; newer torch builds pass c++20). A CPU
torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h (a CUDA build configures
it); it is written to a temporary include folder with the one macro it defines. Nothing is linked.

    python3 benchmarks/cuda_build_check.py     # from the repository root; NVCC=... to pick nvcc
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
EXTENSION_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


def setup_lists() -> dict[str, list[str]]:
    """CUDA_SOURCES, NVCC_FLAGS and CXX_FLAGS as assigned in setup.py (read, not run)."""
    wanted = {"CUDA_SOURCES", "NVCC_FLAGS", "CXX_FLAGS"}
    found = {}
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in wanted:
            found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = wanted - set(found)
    if missing:
        sys.exit(f"setup.py assigns no literal list {', '.join(sorted(missing))}: update cuda_build_check.py")
    return found


def include_dirs(nvcc: str, scratch: Path) -> list[str]:
    """torch's headers, the CUDA toolkit's, Python's, and the generated header a CPU torch lacks."""
    from torch.utils.cpp_extension import include_paths

    torch_dirs = include_paths()
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates += [Path(os.path.realpath(nvcc)).parents[1] / "include", Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:  # /usr/local/bin/nvcc may be a wrapper script: CUDA_HOME then
        sys.exit(f"no cuda_runtime.h in {', '.join(map(str, candidates))}: set CUDA_HOME")
    dirs = [*torch_dirs, str(cuda_include), sysconfig.get_paths()["include"]]
    if not any(Path(d, "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in torch_dirs):
        header = scratch / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text(CUDA_CMAKE_MACROS)
        dirs.append(str(scratch))
    return [f"-I{d}" for d in dirs]


def commands(nvcc: str, cxx: str, scratch: Path) -> dict[str, list[str]]:
    """{source: the command that compiles it}."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    lists, includes = setup_lists(), include_dirs(nvcc, scratch)
    result = {}
    for source in lists["CUDA_SOURCES"]:
        if source.endswith(".cu"):
            result[source] = [nvcc, "-std=c++17", *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
                              *lists["NVCC_FLAGS"], *includes, *EXTENSION_DEFINES, "-c", source,
                              "-o", str(scratch / (Path(source).stem + ".o"))]
        else:
            result[source] = [cxx, "-std=c++17", "-fsyntax-only", "-fPIC", *lists["CXX_FLAGS"], *includes,
                              *EXTENSION_DEFINES, source]
    return result


def main() -> None:
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if nvcc is None or cxx is None:
        sys.exit(f"needs nvcc and a C++ compiler on PATH (nvcc: {nvcc}, c++: {cxx})")
    with tempfile.TemporaryDirectory() as scratch:
        todo = commands(nvcc, cxx, Path(scratch))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            done = dict(zip(todo, pool.map(
                lambda cmd: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False), todo.values())))
    failed = []
    for source, run in done.items():
        print(f"{'OK' if run.returncode == 0 else 'FAILED'}: {source}\n  {' '.join(todo[source])}")
        if run.returncode != 0:
            failed.append(source)
            print(run.stdout + run.stderr)
    if failed:
        sys.exit(f"{len(failed)} CUDA source(s) do not compile as the GPU build would: {', '.join(failed)}")


if __name__ == "__main__":
    main()
