"""Per-layer re-routing statistics in an engine worker, exported as Prometheus metrics.

The hot path only adds the op's [5] int64 statistics vector (`sere.STAT_FIELDS` order) into a
per-layer accumulator on the device: no host sync. Step and token counts are Python ints (the
number of tokens is a shape). `flush()` reads the accumulators back (one sync for all layers)
and advances the Prometheus series; the routing hook calls it at most once per
`SERE_METRICS_INTERVAL_S` seconds (default 1), and `snapshot()` (the `sere_stats` RPC) on demand.

Prometheus series (labels: layer, policy, rank = the worker's global rank):
    sere_steps_total                      MoE-layer calls that were re-routed (decode steps)
    sere_skipped_steps_total              calls left alone (more than max_decode_tokens tokens)
    sere_tokens_total                     tokens in the re-routed calls
    sere_distinct_experts_before_total    sum over steps of distinct experts the router chose
    sere_distinct_experts_after_total     sum over steps of distinct experts after re-routing
    sere_primary_experts_total            sum over steps of |P|
    sere_rerouted_slots_total             (token, slot) pairs whose expert changed
    sere_critical_slots_total             secondary slots kept on a non-primary expert
    sere_distinct_experts{stage}          gauge: mean distinct experts per step since the
                                          previous flush (stage = before | after)
Mean distinct experts over any window: rate(sere_distinct_experts_after_total) / rate(sere_steps_total).

Worker processes are not scraped by vLLM; with `PROMETHEUS_MULTIPROC_DIR` set before the server
starts (prometheus_client multiprocess mode), the workers write these series into that directory
and the API server's /metrics includes them.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from sere.reference import STAT_FIELDS

__all__ = ["COUNTER_FIELDS", "COUNTER_HELP", "LayerStats", "flush", "layer_stats", "maybe_flush", "reset", "snapshot"]

# Snapshot keys; the last five are STAT_FIELDS renamed as exported.
COUNTER_FIELDS = (
    "steps",
    "skipped_steps",
    "tokens",
    "distinct_experts_before",
    "distinct_experts_after",
    "primary_experts",
    "rerouted_slots",
    "critical_slots",
)
_NUM_HOST = 3  # steps, skipped_steps, tokens: Python ints
assert len(COUNTER_FIELDS) == _NUM_HOST + len(STAT_FIELDS)
# Help text of each exported counter (the workers' sere_* and the Ray Serve ray_sere_* series).
COUNTER_HELP = {
    "steps": "MoE-layer calls re-routed by SERE (decode steps)",
    "skipped_steps": "MoE-layer calls left alone (more than max_decode_tokens tokens)",
    "tokens": "tokens in re-routed MoE-layer calls",
    "distinct_experts_before": "sum over steps of distinct experts chosen by the model's router",
    "distinct_experts_after": "sum over steps of distinct experts executed after re-routing",
    "primary_experts": "sum over steps of the primary-set size |P|",
    "rerouted_slots": "(token, slot) pairs whose expert id was changed",
    "critical_slots": "secondary slots kept on a non-primary (critical) expert",
}
assert tuple(COUNTER_HELP) == COUNTER_FIELDS


class LayerStats:
    """Accumulated statistics of one MoE layer in this process."""

    def __init__(self, layer_name: str, layer: int, policy: str, device: torch.device | str):
        self.layer_name = layer_name
        self.layer = layer
        self.policy = policy
        self.device = torch.device(device)
        self.host = [0] * _NUM_HOST  # steps, skipped_steps, tokens
        self.acc = torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=self.device)  # [5]
        self._exported = [0] * len(COUNTER_FIELDS)  # values already added to the counters

    def add(self, stats: torch.Tensor, num_tokens: int) -> None:
        """One re-routed call: `stats` [5] int64 in STAT_FIELDS order (stays on the device)."""
        self.host[0] += 1
        self.host[2] += num_tokens
        self.acc.add_(stats)

    def skip(self) -> None:
        self.host[1] += 1

    def values(self) -> list[int]:
        """All counters in COUNTER_FIELDS order (syncs with the device)."""
        return self.host + [int(v) for v in self.acc.tolist()]

    def reset(self) -> None:
        self.host = [0] * _NUM_HOST
        self.acc.zero_()
        self._exported = [0] * len(COUNTER_FIELDS)


LAYERS: dict[tuple[str, str], LayerStats] = {}  # (layer name, policy) -> stats, this process
_lock = threading.Lock()
_last_flush = 0.0
_interval_s = float(os.environ.get("SERE_METRICS_INTERVAL_S", "1.0"))
_prom: dict | None = None


def _rank() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except Exception:  # noqa: BLE001 (no process group: a single-process engine)
        pass
    return "0"


def _metrics() -> dict | None:
    """The Prometheus series, created on first use in this process (None without the client)."""
    global _prom
    if _prom is not None:
        return _prom
    try:
        from prometheus_client import Counter, Gauge
    except ImportError:
        _prom = {}
        return _prom
    labels = ["layer", "policy", "rank"]
    _prom = {name: Counter(f"sere_{name}", text, labels) for name, text in COUNTER_HELP.items()}
    _prom["gauge"] = Gauge(
        "sere_distinct_experts",
        "mean distinct experts per step since the previous export",
        labels + ["stage"],
        multiprocess_mode="mostrecent",
    )
    return _prom


def layer_stats(layer_name: str, layer: int, policy: str, device: torch.device | str) -> LayerStats:
    """The accumulator of (layer, policy), created on first use."""
    key = (layer_name, policy)
    with _lock:
        if key not in LAYERS:
            LAYERS[key] = LayerStats(layer_name, layer, policy, device)
        return LAYERS[key]


def flush() -> None:
    """Advance the Prometheus series to the accumulated values (one device sync per layer)."""
    global _last_flush
    with _lock:
        _last_flush = time.monotonic()
        prom = _metrics()
        rank = _rank()
        for stats in LAYERS.values():
            values = stats.values()
            delta = [now - before for now, before in zip(values, stats._exported)]
            stats._exported = values
            if not prom:
                continue
            labels = {"layer": str(stats.layer), "policy": stats.policy, "rank": rank}
            for name, increment in zip(COUNTER_FIELDS, delta):
                if increment > 0:
                    prom[name].labels(**labels).inc(increment)
            steps = delta[0]
            if steps > 0:
                prom["gauge"].labels(**labels, stage="before").set(delta[3] / steps)
                prom["gauge"].labels(**labels, stage="after").set(delta[4] / steps)


def maybe_flush() -> None:
    """Flush when the export interval has passed (a clock read otherwise)."""
    if time.monotonic() - _last_flush >= _interval_s:
        flush()


def snapshot() -> dict:
    """{'rank': str, 'layers': [{'layer_name', 'layer', 'policy', COUNTER_FIELDS...}, ...]}, plain data."""
    flush()
    layers = []
    for stats in LAYERS.values():
        entry = {"layer_name": stats.layer_name, "layer": stats.layer, "policy": stats.policy}
        entry.update(zip(COUNTER_FIELDS, stats.values()))
        layers.append(entry)
    return {"rank": _rank(), "layers": layers}


def reset() -> None:
    """Zero every layer's accumulators (the Prometheus counters keep their totals)."""
    flush()
    with _lock:
        for stats in LAYERS.values():
            stats.reset()
