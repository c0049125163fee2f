"""Two checks of device_check.sh, each printing what it found and failing with a message that names
the problem.

    python3 benchmarks/device_probe.py env --json FILE      # versions, GPU, compilers -> FILE
    python3 benchmarks/device_probe.py imports --expect cuda  # sere imports; its op has kernels for cuda

`imports` imports what the GPU check needs (sere, sere.ops, sere.reference, sere.policy) and fails
if that pulled in a package the GPU machine lacks (pydantic, vLLM, Ray, DeepSpeed), or if sere._C
has no kernel for the expected device type. Standard library and torch only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

# Absent on the GPU check machine (/work/shared/ENVIRONMENT.md, section CUDA).
ABSENT_THERE = ("pydantic", "vllm", "ray", "deepspeed")
NEEDED_MODULES = ("sere", "sere.ops", "sere.reference", "sere.policy")


def _command_line(args: list[str]) -> str | None:
    """First line of a tool's output, or None when the tool is not on PATH."""
    if shutil.which(args[0]) is None:
        return None
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if args[0] == "nvcc" and lines else (lines[0] if lines else f"rc={done.returncode}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and hardware as seen by this process (torch imported here)."""
    import torch

    info = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        # setuptools: pyproject.toml's table-form `project.license` is deprecated (a build error
        # once a setuptools release enforces it); ninja: without it torch builds one file at a time
        "setuptools": _version("setuptools"),
        "ninja": _command_line(["ninja", "--version"]),
        "nvcc": _command_line(["nvcc", "--version"]),
        "cxx": _command_line(["c++", "--version"]),
        "nvidia_smi": _command_line(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        ),
        "absent_there_but_installed_here": [
            name for name in ABSENT_THERE if importlib.util.find_spec(name) is not None
        ],
    }
    if info["cuda_available"]:
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = f"sm_{major}{minor}"
    return info


def check_imports(expect: str) -> dict:
    """Import NEEDED_MODULES; fail if one dragged in ABSENT_THERE or sere._C lacks `expect` kernels."""
    for name in NEEDED_MODULES:
        importlib.import_module(name)
    dragged = sorted(name for name in ABSENT_THERE if name in sys.modules)
    if dragged:
        sys.exit(f"importing {', '.join(NEEDED_MODULES)} imported {', '.join(dragged)}, absent on the GPU machine")
    ops = sys.modules["sere.ops"]
    if not ops.HAS_COMPILED_OP:
        sys.exit(f"sere._C did not load: {ops._IMPORT_ERROR}")
    # one frozenset per op family: _COMPILED_DEVICE_TYPES (reroute), _COMPILED_ERR_..., _COMPILED_OEA_...
    found = {name: sorted(getattr(ops, name)) for name in sorted(vars(ops))
             if name.startswith("_COMPILED") and name.endswith("DEVICE_TYPES")}
    missing = [name for name, types in found.items() if expect not in types]
    if not found or missing:
        sys.exit(f"sere._C has no {expect} kernel for {missing or 'any op'} ({found}); see the build step's output")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print versions and hardware; --json writes them")
    env.add_argument("--json", help="write the facts here")
    imports = sub.add_parser("imports", help="import sere as the GPU tests do")
    imports.add_argument("--expect", choices=("cpu", "cuda"), required=True, help="device type sere._C must serve")
    args = parser.parse_args(argv)
    facts = environment() if args.command == "env" else check_imports(args.expect)
    print(json.dumps(facts, indent=2))
    if args.command == "env" and args.json:
        with open(args.json, "w") as out:
            json.dump(facts, out, indent=2)


if __name__ == "__main__":
    main()
