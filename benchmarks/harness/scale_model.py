"""Trace-driven scale model of expert-parallel dispatch (no processes: every rank simulated).

Shape legend:
    N  tokens of one EP-group step     K  top-k     E  routed experts     W  EP ranks

For one step the whole group's routing is re-routed exactly as the distributed path does it (the
primary set P is the OR over all ranks, i.e. over all N tokens, unless scope is "rank"), then
`sere.ep.accounting.unit_counts` counts what each all-to-all backend unit sends across nodes
(docs/ep_backends.md), once for the ids as routed and once with duplicate slots merged
(`merge_duplicate_slots`). Results are averaged over the trace's MoE layers and decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sere import policy as policies
from sere.config import SereConfig
from sere.ep.accounting import CROSS_NODE_FIELD, UNIT_FIELDS, UNITS, merge_duplicate_slots, traffic, unit_counts
from sere.ep.placement import ExpertPlacement, make_placement
from benchmarks.harness.traces import RoutingTrace

__all__ = ["StepSample", "route_step", "simulate_step", "sample_steps", "scale_sweep"]


@dataclass
class StepSample:
    """One EP-group step: tokens with their source rank."""

    src_rank: torch.Tensor  # [N] int64
    topk_ids: torch.Tensor  # [N, K]
    topk_weights: torch.Tensor  # [N, K]
    router_probs: torch.Tensor  # [N, E]


def route_step(step: StepSample, placement: ExpertPlacement, cfg: SereConfig, matrix: torch.Tensor | None):
    """([N, K] ids, [N, K] weights) to dispatch under `cfg`; every step is treated as decode-sized."""
    if cfg.policy == "topk":
        return step.topk_ids, step.topk_weights
    ids, weights = torch.empty_like(step.topk_ids), torch.empty_like(step.topk_weights)
    groups = step.src_rank.unique().tolist() if cfg.scope == "rank" else [None]  # whose tokens share P
    for rank in groups:
        mine = torch.ones_like(step.src_rank, dtype=torch.bool) if rank is None else step.src_rank == rank
        routed = policies.route(cfg, step.topk_ids[mine], step.topk_weights[mine], num_experts=placement.num_experts,
                                matrix=matrix, router_scores=step.router_probs[mine], placement=placement,
                                step_tokens=1)
        ids[mine], weights[mine] = routed.ids.to(ids.dtype), routed.weights.to(weights.dtype)
    return ids, weights


def simulate_step(
    step: StepSample, placement: ExpertPlacement, cfg: SereConfig, matrix: torch.Tensor | None,
) -> dict[str, float]:
    """Counts of one step: every UNIT_FIELDS entry as "<field>" (as routed) and "<field>/merged",
    distinct experts and the max distinct experts on any rank."""
    ids, weights = route_step(step, placement, cfg, matrix)
    out = {}
    for merged in (False, True):
        sent = merge_duplicate_slots(ids, weights)[0] if merged else ids
        counts = unit_counts(sent, placement.expert_to_rank, placement.rank_to_node, step.src_rank).tolist()
        out.update({f"{name}{'/merged' if merged else ''}": float(v) for name, v in zip(UNIT_FIELDS, counts)})
    per_rank = traffic(ids, step.src_rank, placement, 1).distinct_per_rank  # [W]
    out["max_distinct_experts_per_rank"] = float(per_rank.max())
    out["distinct_experts"] = float(ids.unique().numel())
    return out


def sample_steps(trace: RoutingTrace, layer: int, batch: int, world_size: int, num_steps: int) -> list[StepSample]:
    """Lock-step decode steps of one layer: `batch` tokens per EP-group step (the first `batch`
    sequences at one position), sequence s on rank s % W."""
    ids, weights, probs = trace.topk_ids[layer], trace.topk_weights[layer], trace.router_probs[layer]
    num_seqs, num_pos = ids.shape[:2]
    if batch > num_seqs:
        raise ValueError(f"batch={batch} needs {batch} sequences, the trace has {num_seqs}")
    src = torch.arange(batch) % world_size
    return [StepSample(src, ids[:batch, pos], weights[:batch, pos], probs[:batch, pos])
            for pos in range(min(num_steps, num_pos))]


def scale_sweep(
    trace: RoutingTrace, ep_sizes: list[int], batches: list[int], configs: dict[str, SereConfig],
    ranks_per_node: int = 8, placement_kind: str = "linear", dtype_bytes: int = 2, num_steps: int = 4,
) -> list[dict]:
    """One record per (ep_size, batch, label, unit, merged), averaged over layers and steps.

    `configs` maps a label (the records' `policy`) to its SereConfig; a config whose matrix kind
    the trace lacks (`trace.matrices`) is an error. `cross_node_bytes` is one direction
    (dispatch) for the record's `unit`; the combine sends as many back.
    """
    records = []
    row_bytes = trace.hidden_size * dtype_bytes
    for ep_size in ep_sizes:
        placement = make_placement(placement_kind, trace.num_experts, ep_size, min(ranks_per_node, ep_size))
        for batch in batches:
            samples = {layer: sample_steps(trace, layer, batch, ep_size, num_steps) for layer in trace.layers}
            for label, cfg in configs.items():
                kind = policies.matrix_kind(cfg)
                if kind is not None and kind not in trace.matrices:
                    raise ValueError(f"policy {label!r} needs a {kind} matrix; trace {trace.source} has {list(trace.matrices)}")
                rows = [simulate_step(step, placement, cfg, trace.matrices[kind][layer] if kind else None)
                        for layer in trace.layers for step in samples[layer]]
                mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
                base = {
                    "policy": label, "ep_size": ep_size, "ranks_per_node": min(ranks_per_node, ep_size),
                    "num_nodes": placement.num_nodes, "batch": batch, "trace": trace.source, "simulated": True,
                    "similarity": trace.matrix_note if kind else "none (policy reads no matrix)",
                    "num_experts": trace.num_experts, "hidden_size": trace.hidden_size, "dtype_bytes": dtype_bytes,
                    "placement": placement_kind, "steps": len(rows),
                    "max_distinct_experts_per_rank": mean["max_distinct_experts_per_rank"],
                    "distinct_experts": mean["distinct_experts"],
                }
                for unit in UNITS:
                    for merged in (False, True):
                        pairs = mean[CROSS_NODE_FIELD[unit] + ("/merged" if merged else "")]
                        records.append({**base, "unit": unit, "merged": merged, "cross_node_rows": pairs,
                                        "cross_node_bytes": pairs * row_bytes})
    return records
