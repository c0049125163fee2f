"""Trace-driven scale model of expert-parallel dispatch (no processes: every rank simulated).

Shape legend:
    N  tokens of one EP-group step     K  top-k     E  routed experts     W  EP ranks

For one step the whole group's routing is re-routed exactly as the distributed path does it (the
primary set P is the OR over all ranks, i.e. over all N tokens, unless scope is "rank"), then
`sere.ep.accounting.traffic` counts (token, rank) and (token, node) pairs, bytes and the distinct
experts of every rank. Results are averaged over the trace's MoE layers and decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sere.ep.accounting import traffic
from sere.ep.placement import ExpertPlacement, make_placement
from benchmarks.harness.traces import RoutingTrace
from sere import policy as policies
from sere.config import SereConfig

__all__ = ["StepSample", "simulate_step", "sample_steps", "scale_sweep"]


@dataclass
class StepSample:
    """One EP-group step: tokens with their source rank."""

    src_rank: torch.Tensor  # [N] int64
    topk_ids: torch.Tensor  # [N, K]
    topk_weights: torch.Tensor  # [N, K]
    router_probs: torch.Tensor  # [N, E]


def simulate_step(
    step: StepSample, placement: ExpertPlacement, cfg: SereConfig, matrix: torch.Tensor | None,
    row_bytes: int,
) -> dict[str, float]:
    """Counts of one step under `cfg` (plain floats); every step is treated as decode-sized."""
    ids = step.topk_ids
    groups = step.src_rank.unique().tolist() if cfg.scope == "rank" else [None]  # whose tokens share P
    if cfg.policy != "topk":
        new = torch.empty_like(ids)
        for rank in groups:
            mine = torch.ones_like(step.src_rank, dtype=torch.bool) if rank is None else step.src_rank == rank
            routed = policies.route(cfg, ids[mine], step.topk_weights[mine], num_experts=placement.num_experts,
                                    matrix=matrix, router_scores=step.router_probs[mine], placement=placement,
                                    step_tokens=1)
            new[mine] = routed.ids
        ids = new
    t = traffic(ids, step.src_rank, placement, row_bytes)
    seen = torch.zeros(placement.num_experts, dtype=torch.bool)
    seen[ids.reshape(-1)] = True
    return {
        "token_rank_pairs": float(t.token_rank_pairs),
        "remote_rows": float(t.remote_rows),
        "token_node_pairs": float(t.token_node_pairs),
        "cross_node_rows": float(t.cross_node_rows),
        "cross_node_token_node_pairs": float(t.cross_node_token_node_pairs),
        "cross_node_bytes": float(t.cross_node_bytes),
        "cross_node_bytes_hier": float(t.cross_node_bytes_hier),
        "dispatch_bytes": float(t.bytes.sum()),
        "max_distinct_experts_per_rank": float(t.distinct_per_rank.max()),
        "mean_distinct_experts_per_rank": float(t.distinct_per_rank.float().mean()),
        "distinct_experts": float(seen.sum()),
    }


def sample_steps(trace: RoutingTrace, layer: int, batch: int, world_size: int, num_steps: int,
                 batch_scope: str = "group", seed: int = 0) -> list[StepSample]:
    """Decode steps of one layer.

    batch_scope "group": `batch` tokens per EP-group step, the first `batch` sequences at one
    position (lock-step decoding), sequence s on rank s % W.
    batch_scope "rank": `batch` tokens on *every* rank (W * batch per step), drawn without
    replacement from the trace's tokens of the layer (with replacement if it holds too few).
    """
    ids, weights, probs = trace.topk_ids[layer], trace.topk_weights[layer], trace.router_probs[layer]
    num_seqs, num_pos = ids.shape[:2]
    steps = []
    if batch_scope == "group":
        if batch > num_seqs:
            raise ValueError(f"batch={batch} needs {batch} sequences, the trace has {num_seqs}")
        src = torch.arange(batch) % world_size
        for pos in range(min(num_steps, num_pos)):
            steps.append(StepSample(src, ids[:batch, pos], weights[:batch, pos], probs[:batch, pos]))
        return steps
    if batch_scope != "rank":
        raise ValueError(f"batch_scope={batch_scope!r}: choose 'group' or 'rank'")
    flat = (ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1]), probs.reshape(-1, probs.shape[-1]))
    total, need = flat[0].shape[0], batch * world_size
    gen = torch.Generator().manual_seed(seed)
    src = torch.arange(world_size).repeat_interleave(batch)
    for _ in range(num_steps):
        pick = torch.randperm(total, generator=gen)[:need] if need <= total else torch.randint(0, total, (need,), generator=gen)
        steps.append(StepSample(src, flat[0][pick], flat[1][pick], flat[2][pick]))
    return steps


def scale_sweep(
    trace: RoutingTrace, similarity: dict[int, torch.Tensor], ep_sizes: list[int], batches: list[int],
    configs: dict[str, SereConfig], ranks_per_node: int = 8, placement_kind: str = "linear",
    dtype_bytes: int = 2, num_steps: int = 4, batch_scope: str = "group",
) -> list[dict]:
    """One record per (ep_size, batch, config), averaged over layers and steps; `configs` maps a
    label (the records' `policy`) to its SereConfig."""
    records = []
    row_bytes = trace.hidden_size * dtype_bytes
    for ep_size in ep_sizes:
        placement = make_placement(placement_kind, trace.num_experts, ep_size, min(ranks_per_node, ep_size))
        for batch in batches:
            samples = {layer: sample_steps(trace, layer, batch, ep_size, num_steps, batch_scope) for layer in trace.layers}
            for label, cfg in configs.items():
                rows = [simulate_step(step, placement, cfg, similarity.get(layer), row_bytes)
                        for layer in trace.layers for step in samples[layer]]
                mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
                mean["max_distinct_experts_per_rank_worst_step"] = max(r["max_distinct_experts_per_rank"] for r in rows)
                records.append({
                    "policy": label, "ep_size": ep_size, "num_nodes": placement.num_nodes,
                    "ranks_per_node": min(ranks_per_node, ep_size), "batch": batch, "batch_scope": batch_scope,
                    "num_experts": trace.num_experts, "hidden_size": trace.hidden_size,
                    "dtype_bytes": dtype_bytes, "trace": trace.source, "placement": placement_kind,
                    "steps": len(rows), "simulated": True, **mean,
                })
    return records
