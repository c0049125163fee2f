#!/usr/bin/env bash
# The GPU check of sere, as one command on the rented GPU machine: one H200, torch 2.11 (CUDA 13),
# Python 3.12 as `python3` (no `python`), no pydantic/vLLM/Ray/DeepSpeed, no network; the repo's
# tracked files are copied there and only a few files come back from $OUT
# (/work/shared/ENVIRONMENT.md, section CUDA). Steps, in this order, each with its own time limit:
#   env              versions, GPU, compilers                            (device_probe.py env)
#   build            sere._C against that machine's torch, CUDA kernels included (setup.py build_ext)
#   (cuda_compile    dry run only: the CUDA sources compiled as that build would, cuda_build_check.py)
#   imports          sere, sere.ops, sere.reference, sere.policy import without the absent packages,
#                    and sere._C has cuda kernels                         (device_probe.py imports)
#   gpu_tests        pytest -m gpu over the test files with `gpu` tests that import nothing absent there
#                    (benchmarks/gpu_test_files.py; first of the tests and benchmarks: they matter most)
#   bench_reroute    the op vs the reference, CUDA-graph replay, one MoE layer's expert loop
#   bench_moe_layer  the grouped-GEMM MoE layer under a CUDA graph, topk vs sere, roofline
#   report           device_report.py merges everything into results.json and summary.txt
# The limits (LIMIT below) add up to 420 s, under the 600 s one command may run, so that a failed
# call leaves device time for a rerun. A failing step does not stop the later ones; the exit
# status is 1 if any step failed or ran out of time.
# Writes exactly four files to $OUT (default ./device_check_out): device_check.log (all output),
# junit.xml (the GPU tests), results.json (environment, steps, test counts, both benchmarks'
# figures) and summary.txt. Intermediate files go to a temporary folder.
#
#   On the GPU machine:  bash benchmarks/device_check.sh        (run tool: timeout_s 540)
#   CPU dry run:         bash benchmarks/device_check.sh --dry-run     (or DRY_RUN=1)
# The dry run emulates that machine, then runs this same script there: a copy of what the run tool
# sends (tracked and untracked-not-ignored files, at most 64 MiB) in build/device-dry/repo, a venv
# with only the machine's packages (device_env.sh), `python` failing as it does there, no network
# (unshare -n). Every step that needs no GPU runs: build (CPU kernels), cuda_compile, imports, the
# GPU test files collected (each test skipped "needs a CUDA GPU"), bench_reroute's CPU path with
# tiny sizes; bench_moe_layer runs its CUDA command up to the refusal of a machine without GPU. The dry run
# multiplies every limit by DRY_RUN_LIMIT_SCALE (default 4: 2 shared cores here, 16 there); it
# checks what runs, not the device time, which the limits' sum above bounds.
# DEVICE_CHECK_REUSE_BUILD=1 (dry run only) copies the checkout's sere/_C*.so into the emulated
# machine instead of compiling it there (the CPU build takes minutes on 2 cores; CI's test uses it).
set -euo pipefail

declare -A LIMIT=([env]=30 [build]=150 [imports]=30 [gpu_tests]=120 [bench_reroute]=50 [bench_moe_layer]=30 [report]=10)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=gpu
if [[ "${1:-}" == "--dry-run" || "${DRY_RUN:-0}" == "1" ]]; then
  mode="dry-run"
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry-run]" >&2
  exit 2
fi

# copy_sent_files DEST: what the run tool sends (tracked + untracked-not-ignored files that exist).
copy_sent_files() {
  local dest="$1" list="$1.files" size
  (cd "${repo}" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' file; do [[ -f "${file}" || -L "${file}" ]] && printf '%s\0' "${file}"; done) > "${list}"
  tar -C "${repo}" --null -T "${list}" -cf - | tar -C "${dest}" -xf -
  size=$(du -sb "${dest}" | cut -f1)
  if (( size > 64 * 1024 * 1024 )); then
    echo "dry run: the run tool would send $((size >> 20)) MiB, over its 64 MiB limit" >&2
    exit 2
  fi
  echo "dry run: copied $(tr -cd '\0' < "${list}" | wc -c) files, $((size >> 10)) KiB, to ${dest}"
}

# emulate_device: prepare the emulated GPU machine (see the header), then run this script in it.
emulate_device() {
  local dry="${repo}/build/device-dry" py out prebuilt=""
  mkdir -p "${dry}"
  exec 8> "${dry}.lock"  # one dry run at a time; the lock passes to the emulated run below
  flock 8
  py="$(bash "${repo}/benchmarks/device_env.sh" | tail -n 1)"
  rm -rf "${dry:?}/repo" "${dry:?}/bin" "${dry:?}/prebuilt"
  mkdir -p "${dry}/repo" "${dry}/bin"
  copy_sent_files "${dry}/repo"
  if [[ "${DEVICE_CHECK_REUSE_BUILD:-0}" == 1 ]]; then
    prebuilt="sere/_C$("${py}" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    if [[ ! -f "${repo}/${prebuilt}" ]]; then
      echo "dry run: DEVICE_CHECK_REUSE_BUILD=1 but ${repo}/${prebuilt} does not exist; build it with" \
        "pip install --no-build-isolation --no-deps -e ." >&2
      exit 2
    fi
    mkdir -p "${dry}/prebuilt"
    cp "${repo}/${prebuilt}" "${dry}/prebuilt/"
    prebuilt="${dry}/prebuilt/$(basename "${prebuilt}")"
  fi
  printf '#!/bin/sh\nexec "%s" "$@"\n' "${py}" > "${dry}/bin/python3"
  printf '#!/bin/sh\necho "python: not on the GPU machine, call python3" >&2\nexit 127\n' > "${dry}/bin/python"
  chmod +x "${dry}/bin/python3" "${dry}/bin/python"
  out="$(realpath -m "${OUT:-${dry}/out}")"
  [[ -n "${OUT:-}" ]] || rm -rf "${out}"
  mkdir -p "${out}"
  if [[ -n "$(ls -A "${out}")" ]]; then
    echo "dry run: OUT=${out} is not empty (the run tool empties \$OUT before each command)" >&2
    exit 2
  fi
  if ! unshare -n true 2>/dev/null; then
    echo "dry run: unshare -n (no network, as on the GPU machine) is not permitted here; run as root" >&2
    exit 2
  fi
  exec unshare -n -- env -u PYTHONPATH -u VIRTUAL_ENV PATH="${dry}/bin:$(dirname "${py}"):${PATH}" \
    PYTHONNOUSERSITE=1 DEVICE_CHECK_EMULATED=1 DEVICE_CHECK_BUILD_TEMP="${dry}/build-temp" OUT="${out}" \
    DEVICE_CHECK_REUSE_BUILD_FROM="${prebuilt}" \
    bash "${dry}/repo/benchmarks/device_check.sh" --dry-run
}

if [[ "${mode}" == dry-run && "${DEVICE_CHECK_EMULATED:-0}" != 1 ]]; then
  emulate_device
fi

cd "${repo}"
out="$(realpath -m "${OUT:-${repo}/device_check_out}")"
mkdir -p "${out}"
log="${out}/device_check.log"
: > "${log}"
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
: > "${work}/steps.tsv"
PY="${PYTHON:-python3}"
if [[ "${mode}" == dry-run ]]; then
  for name in "${!LIMIT[@]}"; do LIMIT[${name}]=$((LIMIT[${name}] * ${DRY_RUN_LIMIT_SCALE:-4})); done
  LIMIT[cuda_compile]=$((90 * ${DRY_RUN_LIMIT_SCALE:-4}))  # dry run only: the GPU machine builds for real
fi
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

say() { echo "$*" | tee -a "${log}"; }

# record NAME STATUS RC SECONDS NOTE: one line of steps.tsv (read by device_report.py).
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${LIMIT[$1]}" "$5" >> "${work}/steps.tsv"
  say "=== $1: $2 (rc ${3}, ${4}s of ${LIMIT[$1]}s)${5:+: $5}"
}

# step NAME COMMAND...: run under LIMIT[NAME] (SIGINT first: pytest still writes its XML), log it.
step() {
  local name="$1" start=${SECONDS} rc status
  shift
  say "=== ${name} ($(date -u +%T) UTC, limit ${LIMIT[${name}]}s): $*"
  set +e
  timeout -k 10 -s INT "${LIMIT[${name}]}" "$@" 2>&1 | tee -a "${log}"
  rc=${PIPESTATUS[0]}
  set -e
  case ${rc} in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  record "${name}" "${status}" "${rc}" $((SECONDS - start)) "${NOTE:-}"
}

# pytest.main with Python's SIGINT handler restored: a job started in the background may inherit
# SIGINT ignored, and then the step's time limit would kill pytest before it writes junit.xml.
PYTEST='import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; sys.exit(pytest.main(sys.argv[1:]))'
MOE_LAYER_ARGS=(--batch-sizes 1 4 16 64 --repeats 20 --layers 8)

say "sere device check, mode ${mode}, in ${repo}, ${MAX_JOBS} build jobs, output to ${out}"
step env "${PY}" benchmarks/device_probe.py env --json "${work}/env.json"
build=(setup.py build_ext --inplace --force)  # --force: ninja still rebuilds only what changed
[[ -z "${DEVICE_CHECK_BUILD_TEMP:-}" ]] || build+=(--build-temp "${DEVICE_CHECK_BUILD_TEMP}")
if [[ "${mode}" == dry-run && -n "${DEVICE_CHECK_REUSE_BUILD_FROM:-}" ]]; then
  NOTE="dry run: sere/_C copied from ${DEVICE_CHECK_REUSE_BUILD_FROM}, not compiled" \
    step build cp "${DEVICE_CHECK_REUSE_BUILD_FROM}" sere/
else
  step build "${PY}" "${build[@]}"
fi
if [[ "${mode}" == dry-run ]]; then
  step cuda_compile "${PY}" benchmarks/cuda_build_check.py
fi
step imports "${PY}" benchmarks/device_probe.py imports --expect "$([[ ${mode} == gpu ]] && echo cuda || echo cpu)"
# the files with gpu tests whose imports need nothing absent there (benchmarks/gpu_test_files.py)
gpu_files=()
if "${PY}" benchmarks/gpu_test_files.py > "${work}/gpu_files" 2> "${work}/left_out"; then
  mapfile -t gpu_files < <(grep . "${work}/gpu_files")
fi
tee -a "${log}" < "${work}/left_out"
left_out="$(cut -d: -f1 "${work}/left_out" | tr '\n' ' ')"
if [[ ${#gpu_files[@]} -eq 0 ]]; then  # pytest without files would run all of tests/
  record gpu_tests failed 1 0 "no test file to run: $(tail -n 1 "${work}/left_out")"
else
  NOTE="${left_out:+not run (they import a package absent there): ${left_out}}" \
    step gpu_tests "${PY}" -c "${PYTEST}" -m gpu "${gpu_files[@]}" -v -rs --durations=15 -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="${out}/junit.xml"
fi
if [[ "${mode}" == gpu ]]; then
  step bench_reroute "${PY}" benchmarks/bench_reroute.py --device cuda --tokens 1 8 64 512 \
    --shapes 128x8x2 64x6x2 --repeats 30 --warmup 5 --moe-repeats 20 --json "${work}/bench_reroute.json"
  step bench_moe_layer "${PY}" benchmarks/bench_moe_layer.py --device cuda "${MOE_LAYER_ARGS[@]}" \
    --json "${work}/bench_moe_layer.json"
else
  step bench_reroute "${PY}" benchmarks/bench_reroute.py --device cpu --tokens 1 8 --shapes 16x4x2 \
    --repeats 3 --warmup 1 --moe-repeats 1 --json "${work}/bench_reroute.json"
  # its CPU path is vLLM's kernel (absent there): the CUDA command runs up to its refusal instead
  # (arguments parsed, moe_layer_cuda and moe_grouped imported)
  # shellcheck disable=SC2016  # (the single quotes are bash -c's own script)
  NOTE="dry run: the GPU command parsed its arguments, imported its CUDA path and refused the CPU" \
    step bench_moe_layer bash -c 'said=$("${@:2}" 2>&1); rc=$?; echo "${said}"; [[ ${rc} -ne 0 && ${said} == *"$1"* ]]' \
    _ "no CUDA device visible" "${PY}" benchmarks/bench_moe_layer.py --device cuda "${MOE_LAYER_ARGS[@]}" \
    --json "${work}/bench_moe_layer.json"
fi

say "=== report"
set +e
timeout -k 5 "${LIMIT[report]}" "${PY}" benchmarks/device_report.py --work "${work}" --junit "${out}/junit.xml" \
  --mode "${mode}" --out "${out}" 2>&1 | tee -a "${log}"
rc=${PIPESTATUS[0]}
set -e
if [[ ${rc} -ne 0 ]]; then
  { echo "device_report.py failed (rc ${rc}); see device_check.log. Steps:"; cat "${work}/steps.tsv"; } > "${out}/summary.txt"
fi
failed=$(awk -F'\t' '$2 != "ok" { printf "%s ", $1 }' "${work}/steps.tsv")
if [[ -n "${failed}" || ${rc} -ne 0 ]]; then
  say "FAILED: ${failed:-report}"
  exit 1
fi
say "all steps passed (mode ${mode})"
