"""Merge what device_check.sh's steps left in its work folder into $OUT/results.json and
$OUT/summary.txt (the GPU machine sends back only a few files, so everything goes into these two
next to the log and the JUnit XML).

    python3 benchmarks/device_report.py --work DIR --junit OUT/junit.xml --mode gpu --out OUT

Reads, in DIR: steps.tsv (one line per step: name, status, rc, seconds, limit_s, note; written by
device_check.sh), env.json (device_probe.py env), bench_reroute.json and bench_moe_layer.json (the
benchmarks' --json). A file a failed step did not write is reported as missing, not invented.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET

BENCHES = ("bench_reroute", "bench_moe_layer")


def read_steps(path: str) -> list[dict]:
    """[{name, status, rc, seconds, limit_s, note}] in the order the steps ran."""
    steps = []
    with open(path) as lines:
        for line in lines:
            name, status, rc, seconds, limit_s, note = line.rstrip("\n").split("\t")
            steps.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                          "limit_s": int(limit_s), "note": note})
    return steps


def read_junit(path: str) -> dict:
    """Counts, failed test ids with the first line of their message, and skip reasons (with counts)."""
    if not os.path.exists(path):
        return {"missing": path}
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons, files = [], {}, {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        module = case.get("classname", "")  # the test module (or module.Class) as pytest names it
        files[module] = files.get(module, 0) + 1
        counts["tests"] += 1
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = outcome.get("message", "")
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = next(iter((outcome.get("message") or "").splitlines()), "")
            failed.append(f"{test_id}: {message}")
    return {**counts, "tests_per_module": files, "failed_tests": failed, "skip_reasons": skip_reasons}


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {"missing": os.path.basename(path)}
    with open(path) as f:
        return json.load(f)


def _bench_lines(results: dict) -> list[str]:
    lines = []
    for row in results.get("bench_reroute", {}).get("rows", []):
        graph = f" graph {row['graph_ms'] * 1e3:.1f} us" if row.get("graph_ms") is not None else ""
        moe = (f", MoE layer topk {row['moe_topk_ms']:.4f} ms sere {row['moe_sere_ms']:.4f} ms"
               if row.get("moe_topk_ms") is not None else "")
        lines.append(f"  reroute {row['shape']} T={row['tokens']}: op {row['op_ms'] * 1e3:.1f} us{graph}, "
                     f"ref {row['ref_ms'] * 1e3:.1f} us{moe}")
    for row in results.get("bench_moe_layer", {}).get("rows", []):
        lines.append(f"  moe layer T={row['batch_size']}: distinct {row['distinct_topk']}->{row['distinct_sere']}, "
                     f"topk {row['topk_ms'] * 1e3:.1f} us, sere {row['sere_ms'] * 1e3:.1f} us, "
                     f"x{row['speedup']:.2f} (ideal x{row['ideal_speedup']:.2f}), "
                     f"floor {row['compute_floor_ms'] * 1e3:.1f} us")
    return lines


def summary_text(results: dict) -> str:
    env, tests = results["environment"], results["gpu_tests"]
    where = env.get("gpu") or f"no GPU ({env.get('cpus', '?')} CPUs)"
    lines = [
        f"sere device check, mode {results['mode']}: {where}; python {env.get('python', '?')}, "
        f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), nvcc {env.get('nvcc')}",
        "steps: " + "; ".join(f"{s['name']} {s['status']} {s['seconds']}s/{s['limit_s']}s" for s in results["steps"]),
    ]
    if "missing" in tests:
        lines.append(f"gpu tests: no JUnit XML ({tests['missing']})")
    else:
        lines.append(f"gpu tests: {tests['tests']} collected: passed {tests['passed']}, failed {tests['failed']}, "
                     f"errors {tests['errors']}, skipped {tests['skipped']}")
        lines += [f"  skipped {count}x: {reason}" for reason, count in tests["skip_reasons"].items()]
        lines += [f"  FAILED {test}" for test in tests["failed_tests"]]
    lines += _bench_lines(results)
    lines += [f"  {name}: {results[name]['missing']} not written" for name in BENCHES if "missing" in results[name]]
    bad = [s["name"] for s in results["steps"] if s["status"] not in ("ok", "dry-run")]
    lines.append(f"result: {'FAIL (' + ', '.join(bad) + ')' if bad else 'PASS'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="device_check.sh's work folder")
    parser.add_argument("--junit", required=True, help="the GPU tests' JUnit XML")
    parser.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    parser.add_argument("--out", required=True, help="folder for results.json and summary.txt")
    args = parser.parse_args(argv)
    results = {
        "mode": args.mode,
        "environment": read_json(os.path.join(args.work, "env.json")),
        "steps": read_steps(os.path.join(args.work, "steps.tsv")),
        "gpu_tests": read_junit(args.junit),
        **{name: read_json(os.path.join(args.work, f"{name}.json")) for name in BENCHES},
    }
    with open(os.path.join(args.out, "results.json"), "w") as out:
        json.dump(results, out, indent=2)
    text = summary_text(results)
    with open(os.path.join(args.out, "summary.txt"), "w") as out:
        out.write(text)
    print(text, end="")
    return results


if __name__ == "__main__":
    main()
