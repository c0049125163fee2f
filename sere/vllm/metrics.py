"""Per-layer re-routing statistics in an engine worker, exported as Prometheus metrics.

Each hooked layer owns two device int64 accumulators, `LayerStats.acc` [len(ROUTING_FIELDS)] and
`LayerStats.traffic` [len(TRAFFIC_FIELDS)], that the routing op `sere::route_layer` adds into
(inside the compiled forward / CUDA graph: no host sync, no clock). Everything host-side happens
between steps: `flush()` reads the accumulators back (one sync per layer), adds the increments to
the totals of the layer's current policy and to the Prometheus series. The plugin calls
`maybe_flush()` after each `execute_model` of the worker (at most once per
`SERE_METRICS_INTERVAL_S` seconds, default 1); `snapshot()` (the `sere_stats` RPC) flushes on
demand.

Prometheus series (labels: layer, policy, rank = the worker's global rank):
    sere_steps_total                      MoE-layer calls that were re-routed (decode steps)
    sere_skipped_steps_total              calls left alone (more than max_decode_tokens tokens)
    sere_tokens_total                     tokens in the re-routed calls
    sere_distinct_experts_before_total    sum over steps of distinct experts the router chose
    sere_distinct_experts_after_total     sum over steps of distinct experts after re-routing
    sere_primary_experts_total            sum over steps of |P|
    sere_rerouted_slots_total             (token, slot) pairs whose expert changed
    sere_critical_slots_total             secondary slots kept on a non-primary expert
    sere_dropped_slots_total              secondary slots dropped (sere-err)
    sere_distinct_experts{stage}          gauge: mean distinct experts per step since the
                                          previous flush (stage = before | after)
Mean distinct experts over any window: rate(sere_distinct_experts_after_total) / rate(sere_steps_total).

With expert parallelism (ep_size > 1), the live traffic of the re-routed steps (docs/spec.md §19,
`sere.vllm.traffic`), counted for the tokens that live on the rank, as dispatched (merged slots):
    sere_ep_tokens_total                          tokens counted (this rank's own, padding excluded)
    sere_ep_merged_slots_total                    slots naming an expert already named by the token
    sere_ep_token_expert_pairs_total              (token, expert) pairs; _remote_ / _cross_node_ variants
    sere_ep_token_rank_pairs_total                (token, rank) pairs; _remote_ / _cross_node_ variants
    sere_ep_token_node_pairs_total                (token, node) pairs; _cross_node_ variant
    sere_ep_{remote,cross_node}_token_{expert,rank}_bytes_total, sere_ep_cross_node_token_node_bytes_total
                                                  the same pairs x hidden_size x activation bytes
"remote": another EP rank; "cross_node": a rank (node) on another node than the token's own.

How they reach vLLM's /metrics: see `sere.vllm.exporter`.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from sere.policy import STAT_FIELDS

__all__ = [
    "COUNTER_FIELDS", "COUNTER_HELP", "LAYERS", "LayerStats", "NUM_STEP_FIELDS", "ROUTING_FIELDS", "TRAFFIC_FIELDS",
    "flush", "layer_stats", "maybe_flush", "reset", "snapshot",
]

# Counter names, in the order of the accumulator; the last six are sere.policy.STAT_FIELDS renamed.
ROUTING_FIELDS = (
    "steps",
    "skipped_steps",
    "tokens",
    "distinct_experts_before",
    "distinct_experts_after",
    "primary_experts",
    "rerouted_slots",
    "critical_slots",
    "dropped_slots",
)
NUM_STEP_FIELDS = 3  # steps, skipped_steps, tokens; then STAT_FIELDS
assert len(ROUTING_FIELDS) == NUM_STEP_FIELDS + len(STAT_FIELDS)
# The live EP traffic counters, in the order of `LayerStats.traffic` (sere.vllm.traffic.count).
TRAFFIC_FIELDS = (
    "ep_tokens",
    "ep_merged_slots",
    "ep_token_expert_pairs",
    "ep_remote_token_expert_pairs",
    "ep_cross_node_token_expert_pairs",
    "ep_token_rank_pairs",
    "ep_remote_token_rank_pairs",
    "ep_cross_node_token_rank_pairs",
    "ep_token_node_pairs",
    "ep_cross_node_token_node_pairs",
    "ep_remote_token_expert_bytes",
    "ep_cross_node_token_expert_bytes",
    "ep_remote_token_rank_bytes",
    "ep_cross_node_token_rank_bytes",
    "ep_cross_node_token_node_bytes",
)
COUNTER_FIELDS = ROUTING_FIELDS + TRAFFIC_FIELDS  # every exported counter: accumulator, then traffic
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
    "dropped_slots": "secondary slots dropped with weight 0 (sere-err), before any refill",
    "ep_tokens": "EP: tokens of this rank counted in the traffic counters (re-routed steps)",
    "ep_merged_slots": "EP: slots merged into an earlier slot of the same token and expert",
    "ep_token_expert_pairs": "EP: (token, expert) pairs dispatched (merged slots)",
    "ep_remote_token_expert_pairs": "EP: (token, expert) pairs on another rank",
    "ep_cross_node_token_expert_pairs": "EP: (token, expert) pairs on another node",
    "ep_token_rank_pairs": "EP: (token, rank) pairs dispatched",
    "ep_remote_token_rank_pairs": "EP: (token, rank) pairs with another rank",
    "ep_cross_node_token_rank_pairs": "EP: (token, rank) pairs with a rank on another node",
    "ep_token_node_pairs": "EP: (token, node) pairs dispatched",
    "ep_cross_node_token_node_pairs": "EP: (token, node) pairs with another node",
    "ep_remote_token_expert_bytes": "EP: bytes of remote (token, expert) pairs (hidden x dtype bytes each)",
    "ep_cross_node_token_expert_bytes": "EP: bytes of cross-node (token, expert) pairs",
    "ep_remote_token_rank_bytes": "EP: bytes of remote (token, rank) pairs",
    "ep_cross_node_token_rank_bytes": "EP: bytes of cross-node (token, rank) pairs",
    "ep_cross_node_token_node_bytes": "EP: bytes of cross-node (token, node) pairs",
}
assert tuple(COUNTER_HELP) == COUNTER_FIELDS
GAUGE_HELP = "mean distinct experts per step since the previous export"


class LayerStats:
    """Statistics of one MoE layer in this process: the device accumulator and host totals."""

    def __init__(self, layer_name: str, layer: int, policy: str, device: torch.device | str):
        self.layer_name = layer_name
        self.layer = layer
        self.policy = policy
        self.acc = torch.zeros(len(ROUTING_FIELDS), dtype=torch.int64, device=torch.device(device))
        self.traffic = torch.zeros(len(TRAFFIC_FIELDS), dtype=torch.int64, device=torch.device(device))
        self._read = [0] * len(COUNTER_FIELDS)  # acc as of the previous collect
        self.totals: dict[str, list[int]] = {}  # policy -> counters since the last reset
        self.exported: dict[str, list[int]] = {}  # policy -> counters since process start (monotonic)
        self.gauge: dict[str, tuple[float, float]] = {}  # policy -> (before, after) of the last flush

    def collect(self) -> list[int]:
        """The increments since the previous collect (one device sync), booked to `policy`."""
        values = [int(v) for v in torch.cat([self.acc, self.traffic]).tolist()]  # COUNTER_FIELDS
        delta = [now - before for now, before in zip(values, self._read)]
        self._read = values
        if not any(delta):
            return delta
        for book in (self.totals, self.exported):
            book[self.policy] = [a + b for a, b in zip(book.get(self.policy, [0] * len(delta)), delta)]
        if delta[0] > 0:
            self.gauge[self.policy] = (delta[3] / delta[0], delta[4] / delta[0])
        return delta

    def values(self) -> list[int]:
        """The current policy's counters since the last reset, COUNTER_FIELDS order (syncs)."""
        with _lock:
            _flush_layer(self, _metrics(), _rank())
        return list(self.totals.get(self.policy, [0] * len(COUNTER_FIELDS)))

    def switch_policy(self, policy: str) -> None:
        """Book what was counted so far to the old policy, then count for `policy`."""
        with _lock:
            _flush_layer(self, _metrics(), _rank())
            self.policy = policy

    def reset(self) -> None:
        self.collect()
        self.totals = {}


LAYERS: dict[str, LayerStats] = {}  # layer name -> stats, this process
_lock = threading.RLock()
_last_flush = 0.0
_interval_s = float(os.environ.get("SERE_METRICS_INTERVAL_S", "1.0"))
_prom: dict | None = None
_listeners: list = []  # functions called after each flush (the exporter's snapshot file)


def _rank() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except Exception:  # noqa: BLE001 (no process group: a single-process engine)
        pass
    return "0"


def _metrics() -> dict:
    """This process's Prometheus series, created on first use (empty without the client)."""
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
    _prom["gauge"] = Gauge("sere_distinct_experts", GAUGE_HELP, labels + ["stage"], multiprocess_mode="mostrecent")
    return _prom


def layer_stats(layer_name: str, layer: int, policy: str, device: torch.device | str) -> LayerStats:
    """The statistics of a layer, created on first use."""
    with _lock:
        if layer_name not in LAYERS:
            LAYERS[layer_name] = LayerStats(layer_name, layer, policy, device)
        return LAYERS[layer_name]


def _flush_layer(stats: LayerStats, prom: dict, rank: str) -> None:
    delta = stats.collect()
    if not prom:
        return
    labels = {"layer": str(stats.layer), "policy": stats.policy, "rank": rank}
    for name, increment in zip(COUNTER_FIELDS, delta):
        if increment > 0:
            prom[name].labels(**labels).inc(increment)
    if delta[0] > 0:
        before, after = stats.gauge[stats.policy]
        prom["gauge"].labels(**labels, stage="before").set(before)
        prom["gauge"].labels(**labels, stage="after").set(after)


def flush() -> None:
    """Advance the totals and Prometheus series to the accumulators (between steps)."""
    global _last_flush
    with _lock:
        _last_flush = time.monotonic()
        prom, rank = _metrics(), _rank()
        for stats in LAYERS.values():
            _flush_layer(stats, prom, rank)
        for listener in _listeners:
            listener(rank)


def maybe_flush() -> None:
    """Flush when the export interval has passed (the worker's step hook; outside the forward)."""
    if LAYERS and time.monotonic() - _last_flush >= _interval_s:
        flush()


def snapshot() -> dict:
    """{'rank': str, 'layers': [{'layer_name', 'layer', 'policy', COUNTER_FIELDS...}, ...]}, plain data,
    one entry per (layer, policy) counted since the last reset."""
    flush()
    layers = []
    with _lock:
        for stats in LAYERS.values():
            for policy, values in stats.totals.items():
                entry = {"layer_name": stats.layer_name, "layer": stats.layer, "policy": policy}
                entry.update(zip(COUNTER_FIELDS, values))
                layers.append(entry)
    return {"rank": _rank(), "layers": layers}


def reset() -> None:
    """Zero every layer's totals (the Prometheus counters keep theirs)."""
    flush()
    with _lock:
        for stats in LAYERS.values():
            stats.reset()
