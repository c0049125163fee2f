#!/usr/bin/env bash
# GPU check of the SERE re-routing op, in one go (target: under 5 minutes on one H200).
#   1. versions   2. nvcc compile of the kernels alone   3. build sere._C with its CUDA kernels
#   4. pytest -m gpu (the op's file, then all of tests/), the CPU re-routing tests
#   5. bench_reroute.py --device cuda (op vs reference, CUDA-graph replay, one MoE layer)
#   6. bench_moe_layer.py --device cuda (grouped-GEMM MoE layer under a CUDA graph, topk vs sere,
#      next to the roofline; about 10 GB of expert weights)
# Run from the repository root; no network needed. Logs, JUnit XML, JSON and PNG go to $OUT
# (default ./device_check_out). Later steps still run when a test step fails; the exit status
# is non-zero if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-$PWD/device_check_out}"
mkdir -p "${out}"
export python="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
failed=()
summary="${out}/summary.txt"
: > "${summary}"

# step NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, record time and status.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=${SECONDS} rc
  echo "=== ${name} ($(date +%T), limit ${limit}s)"
  set +e
  timeout "${limit}" "$@" 2>&1 | tee "${out}/${name}.log"
  rc=${PIPESTATUS[0]}
  set -e
  local line="${name}: rc=${rc} $((SECONDS - start))s"
  echo "=== ${line}" | tee -a "${summary}"
  if [[ ${rc} -ne 0 ]]; then
    failed+=("${name}")
  fi
  return 0
}

versions() {
  "${python}" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
  command -v nvcc && nvcc --version | tail -n 2
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  c++ --version | head -n 1
}

built_with_cuda() {
  "${python}" - <<'EOF'
import sere.ops
print("HAS_COMPILED_OP", sere.ops.HAS_COMPILED_OP, "| kernels for", sorted(sere.ops._COMPILED_DEVICE_TYPES))
assert "cuda" in sere.ops._COMPILED_DEVICE_TYPES, "sere._C was built without CUDA kernels"
EOF
}

export -f versions built_with_cuda  # so that `timeout bash -c NAME` can run them
step versions 60 bash -c versions
step nvcc_compile 120 csrc/check_cuda_compile.sh
# --force: a sere/_C*.so copied from a CPU-only checkout looks newer than the sources
step build 240 "${python}" setup.py build_ext --inplace --force
step import 60 bash -c built_with_cuda
if [[ " ${failed[*]} " == *" build "* || " ${failed[*]} " == *" import "* ]]; then
  echo "no sere._C with CUDA kernels: see ${out}/build.log and ${out}/import.log" | tee -a "${summary}"
  exit 1
fi
step pytest_reroute_gpu 150 "${python}" -m pytest -m gpu tests/test_reroute_gpu.py -q -rs \
  --junitxml="${out}/pytest_reroute_gpu.xml"
step pytest_gpu_all 150 "${python}" -m pytest -m gpu tests/ -q -rs --junitxml="${out}/pytest_gpu_all.xml"
step pytest_reroute_cpu 150 "${python}" -m pytest tests/test_reroute_golden.py tests/test_reroute_sweep.py \
  tests/test_reroute_errors.py tests/test_reroute_compile.py -q --junitxml="${out}/pytest_reroute_cpu.xml"
step bench_cuda 200 "${python}" benchmarks/bench_reroute.py --device cuda \
  --tokens 1 2 4 8 16 32 64 128 256 512 --shapes 128x8x2 64x6x2 \
  --json "${out}/bench_cuda.json" --png "${out}/bench_cuda.png"
step bench_moe_layer_cuda 90 "${python}" benchmarks/bench_moe_layer.py --device cuda \
  --batch-sizes 1 2 4 8 16 32 64 --repeats 30 --layers 8 \
  --json "${out}/bench_moe_layer_cuda.json" --png "${out}/bench_moe_layer_cuda.png"

echo "--- summary (${out})"
cat "${summary}"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
