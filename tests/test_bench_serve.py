"""benchmarks/bench_serve.py without an engine: argument parsing, the app args it deploys, and its
statistics against hand-worked numbers (percentiles, a sweep cell, the soak's memory trend)."""

from __future__ import annotations

import math
import os
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_serve  # noqa: E402
from bench_serve_report import portable_command  # noqa: E402
from bench_serve_stats import (  # noqa: E402
    cell_summary,
    linear_slope,
    memory_summary,
    per_minute,
    percentile,
)

MiB = 1 << 20


# ------------------------------------------------------------------------------ arguments


def test_defaults_are_the_full_run():
    args = bench_serve.parse_args([])
    assert args.concurrency == [1, 4, 16, 64]
    assert (args.cell_seconds, args.soak_seconds, args.soak_concurrency) == (60.0, 600.0, 16)
    assert args.json.endswith(os.path.join("benchmarks", "results", "bench_serve.json"))
    assert args.png.endswith(os.path.join("benchmarks", "results", "bench_serve.png"))


def test_quick_shortens_only_what_was_not_given():
    args = bench_serve.parse_args(["--quick", "--cell-seconds", "5"])
    assert args.concurrency == [1, 4]
    assert args.cell_seconds == 5.0  # given: kept
    assert args.soak_seconds == 40.0
    assert args.json.endswith("bench_serve_quick.json")


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "4", "-2"],
                                  ["--cell-seconds", "0"], ["--max-tokens", "-1"],
                                  ["--soak-seconds", "-5"], ["--concurrency", "x"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_serve.parse_args(argv)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # "...: error: <the argument> ..."
    assert "error:" in last_line and argv[0] in last_line


def test_app_args_differ_only_in_sere_and_pin_one_engine():
    spec = {"model_path": "models/tiny-moe", "sere": {"policy": "sere-err", "num_primary": 4},
            "engine": {"enforce_eager": False}, "ingress": {"num_cpus": 0.1},
            "autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    on = bench_serve.app_args(spec, "sere", "/k")
    off = bench_serve.app_args(spec, "off", "/k")
    assert on["sere"] == {"policy": "sere-err", "num_primary": 4}
    assert off["sere"] == {"policy": "topk"}
    assert {k: v for k, v in on.items() if k != "sere"} == {k: v for k, v in off.items() if k != "sere"}
    assert on["autoscaling"] == {"min_replicas": 1, "max_replicas": 1}
    assert on["ingress"] == {"num_cpus": 0.1, "api_key_file": "/k"}
    assert spec["autoscaling"]["max_replicas"] == 2  # the caller's dict is not changed
    with pytest.raises(SystemExit, match="no `sere` block"):
        bench_serve.app_args({**spec, "sere": None}, "sere", "/k")


def test_command_has_no_machine_paths():
    argv = ["--json", os.path.join(REPO, "benchmarks", "results", "x.json"), "--png", "/tmp/a/b.png"]
    assert portable_command(argv, REPO) == (
        "python benchmarks/bench_serve.py --json benchmarks/results/x.json --png '<dir>/b.png'")


# ----------------------------------------------------------------------------- statistics


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank = 3 q / 100
    assert percentile(values, 50) == 2.5  # rank 1.5
    assert percentile(values, 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q=101"):
        percentile(values, 101)


def _ok(tokens, ttft, tpot):
    return {"ok": True, "error": None, "tokens": tokens, "ttft_s": ttft, "tpot_s": tpot}


def _failed(kind):
    return {"ok": False, "error": kind, "tokens": 0, "ttft_s": None, "tpot_s": None}


def test_cell_summary_by_hand():
    results = [_ok(10, 0.1, 0.01), _ok(10, 0.3, 0.03), _ok(10, 0.2, 0.02),
               _failed("http_503"), _failed("http_503"), _failed("ReadTimeout")]
    s = cell_summary(results, elapsed_s=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (6, 3, 3)
    assert s["errors_by_kind"] == {"ReadTimeout": 1, "http_503": 2}
    assert s["requests_per_s"] == 1.5  # 3 ok / 2 s
    assert s["output_tokens_per_s"] == 15.0  # 30 tokens / 2 s
    assert s["ttft_ms_p50"] == 200.0
    assert s["ttft_ms_p99"] == pytest.approx(298.0)  # rank 2 x 0.99 = 1.98: 200 + 0.98 x 100 ms
    assert s["tpot_ms_p50"] == 20.0
    assert s["tpot_ms_p99"] == pytest.approx(29.8)


def test_cell_summary_of_only_failures_and_bad_duration():
    s = cell_summary([_failed("no_done")], elapsed_s=1.0)
    assert (s["ok"], s["errors"], s["requests_per_s"], s["ttft_ms_p50"]) == (0, 1, 0.0, None)
    with pytest.raises(ValueError, match="elapsed_s=0"):
        cell_summary([], elapsed_s=0)


def test_linear_slope_by_hand():
    assert linear_slope([0, 1, 2], [1, 3, 5]) == 2.0
    # mean x 1, mean y 2/3: ((-1)(-2/3) + 0 + 1(1/3)) / 2 = 0.5
    assert linear_slope([0, 1, 2], [0, 1, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        linear_slope([1], [1])
    with pytest.raises(ValueError, match="all xs are equal"):
        linear_slope([1, 1], [1, 2])
    with pytest.raises(ValueError, match="3 values but ys has 2"):
        linear_slope([0, 1, 2], [0, 1])


def test_memory_summary_by_hand():
    # 0, 60, 120, 180 s; 100, 102, 101, 110 MiB. Whole: mean x 1.5 min, mean y 103.25,
    # sum dx dy = (-1.5)(-3.25) + (-0.5)(-1.25) + (0.5)(-2.25) + (1.5)(6.75) = 14.5, sum dx^2 = 5.
    # Second half: 101 -> 110 over 1 min = 9 MiB/min.
    samples = [(0.0, 100 * MiB), (60.0, 102 * MiB), (120.0, 101 * MiB), (180.0, 110 * MiB)]
    m = memory_summary(samples)
    assert (m["rss_mib_start"], m["rss_mib_end"], m["rss_mib_max"]) == (100.0, 110.0, 110.0)
    assert m["slope_mib_per_min"] == 2.9
    assert m["slope_mib_per_min_second_half"] == 9.0
    assert m["samples"] == 4
    with pytest.raises(ValueError, match="at least 4 samples"):
        memory_summary(samples[:3])


def test_per_minute_buckets_by_end_time():
    results = [{**_ok(8, 0.1, 0.01), "end_s": 10.0}, {**_ok(8, 0.1, 0.01), "end_s": 69.0},
               {**_failed("http_503"), "end_s": 71.0}, {**_ok(8, 0.1, 0.01), "end_s": 190.0}]
    assert per_minute(results, start_s=10.0) == [
        {"minute": 0, "ok": 2, "tokens": 16, "errors": 0},
        {"minute": 1, "ok": 0, "tokens": 0, "errors": 1},
        {"minute": 3, "ok": 1, "tokens": 8, "errors": 0},
    ]


# ------------------------------------------------------------------------ process roles


def test_serve_processes_finds_an_apps_replicas_and_what_they_started():
    """Stand-ins for Ray's replica processes (the marker in argv, as Ray's process titles have it)
    under this test process as the 'raylet': the engine replica's child counts as engine, another
    app's replica counts nowhere."""
    import subprocess

    import psutil

    from bench_serve_load import serve_processes

    sleeper = "import subprocess, sys, time\n" \
              "if sys.argv[1] == 'parent': subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" \
              "time.sleep(60)"
    started = [subprocess.Popen([sys.executable, "-c", sleeper, role, marker]) for role, marker in (
        ("parent", "ray::ServeReplica:sere:SereLLMServer:tiny-moe"),
        ("alone", "ray::ServeReplica:sere:SereIngress"),
        ("alone", "ray::ServeReplica:off:SereLLMServer:tiny-moe"))]
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(started[0].pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = psutil.Process(started[0].pid).children()[0].pid
        roles = serve_processes(os.getpid(), "sere")
        assert sorted(p.pid for p in roles["engine"]) == sorted([started[0].pid, grandchild])
        assert [p.pid for p in roles["ingress"]] == [started[1].pid]
        assert [p.pid for p in serve_processes(os.getpid(), "off")["engine"]] == [started[2].pid]
    finally:
        for proc in started:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
