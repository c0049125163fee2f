#!/usr/bin/env bash
# The test command: builds the environment from nothing if needed, then runs the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_reroute_golden.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "${@:-tests}"
