#!/usr/bin/env bash
# Creates (or reuses) build/device-venv: a Python environment with only what the GPU check machine
# has (/work/shared/ENVIRONMENT.md, section CUDA): torch, numpy, pytest, safetensors, transformers,
# setuptools, ninja, and NOT pydantic, vLLM, Ray or DeepSpeed. `device_check.sh --dry-run` runs its
# steps in it, so an import of one of those fails here instead of on the rented machine.
# Differences that remain: torch 2.13 CPU (there: 2.11 CUDA 13) and Python 3.11 (there: 3.12),
# because the only local torch wheel is 2.13 CPU for 3.11.
# Usage: benchmarks/device_env.sh   (prints the venv's python3 path on its last line)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${DEVICE_VENV:-${PWD}/build/device-venv}"
# Versions pinned by requirements/cpu.lock (the same as .venv, so pip finds them cached or local).
packages=(torch==2.13.0 numpy pytest safetensors transformers setuptools ninja)
# typer (a dependency of huggingface_hub here) pulls pydantic in; the GPU machine has none.
absent=(pydantic pydantic_core vllm ray deepspeed)
stamp="${venv}/.device-env.sha256"
mkdir -p "$(dirname "${venv}")"
exec 9> "${venv}.lock"  # one creator at a time (two dry runs may start together)
flock 9
want=$(cat "${BASH_SOURCE[0]}" requirements/cpu.lock | sha256sum | cut -d' ' -f1)

if [[ ! -x "${venv}/bin/python3" || "$(cat "${stamp}" 2>/dev/null)" != "${want}" ]]; then
  echo "[device-env] creating ${venv} (about a minute)" >&2
  rm -rf "${venv}"
  python3 -m venv "${venv}"
  # (the local index mirrors hold some packages only: pip warns about each missing folder)
  set +e
  "${venv}/bin/pip" install -q -c requirements/cpu.lock "${packages[@]}" 2>&1 | grep -v "^WARNING: Location" >&2
  pip_rc=${PIPESTATUS[0]}
  set -e
  if [[ ${pip_rc} -ne 0 ]]; then
    echo "[device-env] pip install ${packages[*]} into ${venv} failed (rc ${pip_rc})" >&2
    exit 1
  fi
  "${venv}/bin/pip" uninstall -q -y pydantic pydantic-core >&2
  echo "${want}" > "${stamp}"
fi

# Fail, naming the module, if the environment drifted (e.g. someone installed into it by hand).
"${venv}/bin/python3" - "${absent[@]}" <<'EOF' >&2
import importlib.util, sys
present = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
if present:
    sys.exit(f"[device-env] {', '.join(present)} installed in {sys.prefix}: the GPU machine has none; "
             "delete the venv to recreate it")
EOF
echo "${venv}/bin/python3"
