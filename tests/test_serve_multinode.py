"""A replica whose expert-parallel group spans two simulated Ray nodes, and losing one of them.

Its own file so that it starts only after `test_serve.py`'s service is torn down (2 cores).
About 4 minutes: three simulated nodes on 127.0.0.x and a DP=2 + EP engine.
"""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("SERE_TEST_MODEL", os.path.join(REPO, "models", "tiny-moe"))

pytestmark = pytest.mark.slow


def test_ep_group_across_two_simulated_nodes_survives_losing_one():
    """cluster/ep_fault_check.py: DP 2 + EP ranks on node1/node2, both re-route with SERE; node2's
    raylet killed under load -> requests end within the request timeout as successes, 503s or
    the ingress's 408 (never a bare 500), and the DP group returns."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "cluster", "ep_fault_check.py"), "--model", MODEL],
        capture_output=True, text=True, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert lines, f"ep_fault_check.py printed nothing (rc {result.returncode}):\n{result.stderr[-4000:]}"
    report = json.loads(lines[-1])
    print(json.dumps(report))
    assert result.returncode == 0 and all(report["checks"].values()), json.dumps(report)
