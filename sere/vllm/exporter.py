"""The workers' `sere_*` series on the /metrics of vLLM's OpenAI server.

vLLM 0.32 serves /metrics from the API server process: from its in-process prometheus REGISTRY,
or, when `PROMETHEUS_MULTIPROC_DIR` is set (by the user, or by vLLM itself with
`--api-server-count > 1`), from a fresh registry holding only a `MultiProcessCollector` over that
directory. The MoE layers, and so SERE's counters, live in the worker processes. Both cases:

- multiprocess directory set: the workers' prometheus_client writes their `sere_*` counters into
  it (the client reads the variable at import; the workers inherit it), nothing else to do;
- otherwise: each worker writes its totals, after each flush, to a JSON file in
  `$SERE_METRICS_DIR` (created by the first vLLM process of the tree, i.e. the API server, and
  inherited by its engine and workers), and `SnapshotCollector`, registered in every process's
  REGISTRY, turns the other processes' files into `sere_*` series at scrape time.

Every counter of `metrics.COUNTER_FIELDS` travels this way, the live EP traffic counters
(`sere_ep_*`, docs/spec.md §19) included.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from sere.vllm import metrics

__all__ = ["ENV_METRICS_DIR", "SnapshotCollector", "install"]

ENV_METRICS_DIR = "SERE_METRICS_DIR"
_installed = False


def install() -> None:
    """Set up this process's side (idempotent): the directory, the writer and the collector."""
    global _installed
    if _installed or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = os.environ.get(ENV_METRICS_DIR)
    if not directory:
        directory = tempfile.mkdtemp(prefix="sere-metrics-")
        os.environ[ENV_METRICS_DIR] = directory  # inherited by the engine and its workers
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    metrics._listeners.append(lambda rank: _write_snapshot(Path(directory), rank))
    _installed = True
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    REGISTRY.register(SnapshotCollector(Path(directory)))


def _write_snapshot(directory: Path, rank: str) -> None:
    """This process's monotonic totals, replaced atomically (a scrape never sees half a file)."""
    series = []
    for stats in metrics.LAYERS.values():
        for policy, values in stats.exported.items():
            series.append({"layer": str(stats.layer), "policy": policy, "counters": values,
                           "gauge": stats.gauge.get(policy)})
    if not series or not directory.is_dir():
        return
    path = directory / f"sere-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "series": series}))
    os.replace(tmp, path)


class SnapshotCollector:
    """A prometheus_client collector over the other processes' snapshot files."""

    def __init__(self, directory: Path):
        self.directory = directory

    def describe(self):
        return []  # names are only known at scrape time; no duplicate check against REGISTRY

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["layer", "policy", "rank"]
        counters = {name: CounterMetricFamily(f"sere_{name}", text, labels=labels)
                    for name, text in metrics.COUNTER_HELP.items()}
        gauge = GaugeMetricFamily("sere_distinct_experts", metrics.GAUGE_HELP, labels=labels + ["stage"])
        sums: dict[tuple, list[int]] = {}
        for snapshot in self._snapshots():
            for entry in snapshot["series"]:
                key = (entry["layer"], entry["policy"], snapshot["rank"])
                sums[key] = [a + b for a, b in zip(sums.get(key, [0] * len(entry["counters"])), entry["counters"])]
                if entry["gauge"] is not None:
                    for stage, value in zip(("before", "after"), entry["gauge"]):
                        gauge.add_metric([*key, stage], value)
        for key, values in sums.items():
            for name, value in zip(metrics.COUNTER_FIELDS, values):
                counters[name].add_metric(list(key), value)
        yield from counters.values()
        yield gauge

    def _snapshots(self):
        own = f"sere-{os.getpid()}.json"  # this process's series are in its own Counters
        for path in sorted(self.directory.glob("sere-*.json")):
            if path.name == own:
                continue
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):  # a process that exited and was cleaned up meanwhile
                continue
