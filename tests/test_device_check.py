"""benchmarks/device_check.sh, the one script run on a rented GPU machine, checked here on CPU.

A GPU machine is lent only to some tasks and for 15 minutes, so the script must work the first
time: it is parsed (`bash -n`), its time limits are added up, and its dry run is run, which
emulates that machine (a copy of what the run tool sends, a venv without pydantic/vLLM/Ray/
DeepSpeed, `python3` only, no network) and runs every step that needs no GPU.

Bounded subset: the dry run here sets DEVICE_CHECK_REUSE_BUILD=1, so the emulated machine gets
the checkout's sere/_C*.so (which scripts/test.sh builds from the same sources against the same
torch 2.13 CPU) instead of compiling it again. Measured on this 2-core machine: the dry run's CPU
build took 1.4 min of CPU time (6.5 min of wall time while the machine was shared, load 15-30);
with the build reused this test took 40 s on a quiet machine and 3 min on the loaded one, plus
about a minute once to create build/device-venv. Everything but the CPU build runs: venv,
cuda_compile, imports, GPU test collection, bench_reroute on CPU, bench_moe_layer's CUDA command
up to its refusal, report. `bash benchmarks/device_check.sh --dry-run` runs all of it.
"""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
DEVICE_COMMAND_LIMIT_S = 600  # one run-tool command
RERUN_MARGIN_S = 180  # device time kept for a rerun after a failed call (15 min in all, start included)
STEPS = ["env", "build", "imports", "gpu_tests", "bench_reroute", "bench_moe_layer"]
DRY_RUN_STEPS = ["env", "build", "cuda_compile", "imports", "gpu_tests", "bench_reroute", "bench_moe_layer"]
OUTPUTS = {"device_check.log", "junit.xml", "results.json", "summary.txt"}
GPU_MARK = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark = .*\bpytest\.mark\.gpu\b)", re.M)


def _limits() -> dict[str, int]:
    """The LIMIT array of device_check.sh, read as text."""
    match = re.search(r"declare -A LIMIT=\((.*?)\)\n", SCRIPT.read_text(), re.S)
    assert match, "device_check.sh declares no LIMIT array"
    return {name: int(value) for name, value in re.findall(r"\[(\w+)\]=(\d+)", match.group(1))}


@pytest.mark.parametrize("name", ["device_check.sh", "device_env.sh"])
def test_script_parses(name):
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_step_limits_fit_one_device_command_with_a_rerun_margin():
    limits = _limits()
    assert set(STEPS) | {"report"} <= set(limits)
    assert sum(limits.values()) <= DEVICE_COMMAND_LIMIT_S - RERUN_MARGIN_S, limits
    # each step named in the script has a limit (an unknown name would be an unbound array entry)
    used = set(re.findall(r"^\s*(?:step|record) (\w+)", SCRIPT.read_text(), re.M))
    assert used and used <= set(limits) | {"cuda_compile"}, used - set(limits)  # cuda_compile: dry run only


def test_calls_python3_not_python():
    for number, line in enumerate(SCRIPT.read_text().splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("printf") else ""
        assert not re.search(r"(^|[\s;|&(])python(\s|$)", code), f"line {number} calls `python`: {line}"


def test_report_of_a_hand_written_run(tmp_path):
    """Two steps, a JUnit XML with 2 passed, 1 failed, 1 skipped test, one benchmark's JSON."""
    (tmp_path / "steps.tsv").write_text("build\tok\t0\t61\t150\t\ngpu_tests\tfailed\t1\t40\t120\t\n")
    (tmp_path / "env.json").write_text(json.dumps({"python": "3.12.3", "torch": "2.11.0", "gpu": "NVIDIA H200"}))
    (tmp_path / "bench_moe_layer.json").write_text(json.dumps({"rows": [{
        "batch_size": 4, "distinct_topk": 30, "distinct_sere": 12, "topk_ms": 0.05, "sere_ms": 0.025,
        "speedup": 2.0, "ideal_speedup": 2.5, "compute_floor_ms": 0.004}]}))
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_one"/>'
        '<testcase classname="tests.test_a" name="test_two"/>'
        '<testcase classname="tests.test_b" name="test_bad"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import device_report
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    device_report.main(["--work", str(tmp_path), "--junit", str(tmp_path / "junit.xml"), "--mode", "gpu",
                        "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    tests = results["gpu_tests"]
    assert (tests["tests"], tests["passed"], tests["failed"], tests["skipped"]) == (4, 2, 1, 1)
    assert tests["failed_tests"] == ["tests.test_b::test_bad: assert 1 == 2"]
    assert tests["tests_per_module"] == {"tests.test_a": 2, "tests.test_b": 2}
    assert results["bench_reroute"] == {"missing": "bench_reroute.json"}
    summary = (tmp_path / "summary.txt").read_text()
    assert "NVIDIA H200" in summary and "build ok 61s/150s; gpu_tests failed 40s/120s" in summary
    assert "moe layer T=4: distinct 30->12, topk 50.0 us, sere 25.0 us, x2.00 (ideal x2.50)" in summary
    assert "bench_reroute: bench_reroute.json not written" in summary
    assert summary.rstrip().endswith("result: FAIL (gpu_tests)")


def test_gpu_test_files_follow_imports_through_local_modules(tmp_path):
    """A hand-made repository: which files with gpu tests can be collected without pydantic."""
    files = {
        "pkg/__init__.py": "",
        "pkg/light.py": "import torch\n",
        "pkg/heavy.py": "from pydantic import BaseModel\n",
        "pkg/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pydantic\n"
                       "try:\n    import vllm\nexcept ImportError:\n    vllm = None\n"
                       "def later():\n    import ray\n",
        "tests/helper.py": "from pkg import heavy\n",
        "tests/test_ok.py": "import pytest\nfrom pkg import light, lazy\npytestmark = pytest.mark.gpu\n",
        "tests/test_via_helper.py": "import pytest\nimport helper\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n",
        "tests/test_direct.py": "import pytest\nimport pkg.heavy\n\n@pytest.mark.gpu\ndef test_y():\n    pass\n",
        "tests/test_cpu_only.py": "import pydantic\n\ndef test_z():\n    assert 'pytest.mark.gpu'\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_test_files
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    chosen, left_out = gpu_test_files.select(tmp_path)
    assert chosen == ["tests/test_ok.py"]
    # importer -> what it imports, down to the absent package
    assert left_out == {
        "tests/test_direct.py": ["tests/test_direct.py", "pkg.heavy", "pydantic"],
        "tests/test_via_helper.py": ["tests/test_via_helper.py", "helper", "pkg.heavy", "pydantic"],
    }


def test_gpu_route_capture_cases_are_valid_sere_configs():
    """tests/test_gpu_route_capture.py builds its configs without pydantic (absent on the GPU
    machine), from SereConfig's source: each case must be a valid SereConfig with the same values,
    and the cases must cover every policy."""
    import test_gpu_route_capture as capture  # (inside: its gpu tests are not collected here)
    from sere.config import SereConfig
    from sere.policy import POLICIES

    assert {overrides["policy"] for _, overrides in capture.CASES} == set(POLICIES)
    for name, overrides in capture.CASES:
        assert vars(capture.plain_config(**overrides)) == SereConfig(**overrides).model_dump(), name
    with pytest.raises(ValueError, match="not SereConfig fields"):
        capture.plain_config(polcy="sere")


def test_probe_names_a_package_absent_on_the_gpu_machine():
    code = ("import pydantic, sys; sys.path.insert(0, 'benchmarks'); import device_probe; "
            "device_probe.main(['imports', '--expect', 'cpu'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert "imported pydantic, absent on the GPU machine" in done.stderr


def test_dry_run_emulates_the_gpu_machine(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_REUSE_BUILD": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {path.name for path in out.iterdir()} == OUTPUTS

    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "dry-run"
    assert [step["name"] for step in results["steps"]] == DRY_RUN_STEPS
    assert all(step["status"] == "ok" for step in results["steps"]), results["steps"]
    assert results["environment"]["absent_there_but_installed_here"] == []
    assert [row["shape"] for row in results["bench_reroute"]["rows"]] == ["16x4x2", "16x4x2"]

    cases = list(ET.parse(out / "junit.xml").getroot().iter("testcase"))
    modules = {case.get("classname").rsplit(".", 1)[-1] for case in cases}
    gpu_files = {path.stem for path in (REPO / "tests").glob("test_*.py") if GPU_MARK.search(path.read_text())}
    left_out = {name for name in gpu_files if f"tests/{name}.py: gpu tests not run" in (out / "device_check.log").read_text()}
    assert "test_reroute_gpu" in modules and modules == gpu_files - left_out, (modules, gpu_files, left_out)
    assert "test_gpu_route_capture" in modules  # the hook's CUDA-graph capture, needing no vLLM/pydantic
    for case in cases:
        skipped = case.find("skipped")
        assert skipped is not None and "needs a CUDA GPU" in skipped.get("message"), case.get("name")
    summary = (out / "summary.txt").read_text()
    assert "mode dry-run" in summary and summary.rstrip().endswith("result: PASS")

    # the emulation is real: no pydantic in its venv, `python` fails as it does there
    venv_python = (REPO / "build" / "device-venv" / "bin" / "python3")
    assert subprocess.run([str(venv_python), "-c", "import pydantic"], capture_output=True).returncode == 1
    shim = subprocess.run([str(REPO / "build" / "device-dry" / "bin" / "python"), "-V"], capture_output=True, text=True)
    assert shim.returncode == 127 and "call python3" in shim.stderr
