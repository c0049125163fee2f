"""XShare (arXiv 2602.07265): collaborative in-batch expert sharing under an expert budget.

    new_ids, new_weights, stats = xshare_with_stats(ids, weights, router_scores, primary, budget)

The production path of policy `xshare` (docs/spec.md §18; `sere.reference.xshare_reference` is
the readable specification). One decode step, per layer:

1. warm-up: the selected set starts as `primary`, every token's top-S experts (the paper's
   guarantee that no token loses its most important experts);
2. greedy: the experts of largest gating mass (router score summed over the step's tokens,
   ties: lowest id) join until `budget` experts are selected; the objective is modular, so the
   greedy pick is a sort by mass. A budget below |P| leaves the warm-up set as it is;
3. refinement: each token takes its top-K selected experts by its own router score; weights are
   those scores rescaled to the token's original top-k weight sum (as OEA does).

Only fixed-shape ATen ops: no loop over tokens, no host sync, no data-dependent shape, so it runs
inside torch.compile(fullgraph=True) and CUDA graph capture.

Shape legend: T tokens of the step, K top-k slots, E routed experts.
"""

from __future__ import annotations

import torch

__all__ = ["select_by_mass", "select_experts", "xshare_with_stats"]


def select_experts(router_scores: torch.Tensor, primary: torch.Tensor, budget: int) -> torch.Tensor:
    """The step's selected experts as an [E] bool mask: `primary`, plus the experts of largest
    summed router score (ties: lowest id) until `budget` experts are selected.

    Args:
        router_scores: [T, E] float post-activation router scores.
        primary: [E] bool warm-up set.
        budget: B >= 1, the number of distinct experts to select (at least |primary| are).
    """
    return select_by_mass(router_scores.float().sum(dim=0), primary, budget)


def select_by_mass(mass: torch.Tensor, primary: torch.Tensor, budget: int) -> torch.Tensor:
    """`select_experts` from the [E] gating mass itself (e.g. summed over an EP group's tokens)."""
    num_experts = mass.shape[0]
    mass = mass.float()
    # the warm-up experts rank first; a stable descending sort puts the lower id first among ties
    key = mass.masked_fill(primary, float("inf"))  # [E]
    order = torch.sort(key, descending=True, stable=True).indices  # [E] expert ids, best first
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(num_experts, device=order.device))  # [E]
    return primary | (rank < budget)  # [E]


def xshare_with_stats(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    router_scores: torch.Tensor,
    primary: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XShare re-routing of one step plus its statistics, on the device.

    Args:
        topk_ids: [T, K] int32/int64 from the model's router, slot 0 the largest weight.
        topk_weights: [T, K] float routing weights (their per-token sum is kept).
        router_scores: [T, E] float post-activation router scores.
        primary: [E] bool warm-up set (each token's top-S experts, or their OR over an EP group).
        budget: B >= 1 distinct experts (`SereConfig.max_distinct`).
    Returns:
        (new ids [T, K] int64, new weights [T, K] float32, stats [6] int64 in
        `sere.policy.STAT_FIELDS` order). Slots are ordered by descending weight; a slot left
        without a selected expert (fewer than K selected) repeats the token's slot-0 id with
        weight 0 and is counted in dropped_slots. critical_slots is 0.
    """
    top_k = topk_ids.shape[1]
    selected = select_experts(router_scores, primary, budget)  # [E]
    scores = router_scores.float().masked_fill(~selected[None, :], float("-inf"))  # [T, E]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]  # [T, K]
    picked = scores.gather(1, order)  # [T, K]
    filled = picked > float("-inf")  # [T, K]
    new_ids = torch.where(filled, order, order[:, :1])  # [T, K]
    raw = torch.where(filled, picked, 0.0)  # [T, K]
    scale = topk_weights.float().sum(1, keepdim=True) / raw.sum(1, keepdim=True).clamp_min(1e-20)  # [T, 1]
    new_weights = raw * scale  # [T, K]
    return new_ids, new_weights, _stats(topk_ids, new_ids, primary, filled)


def _stats(topk_ids: torch.Tensor, new_ids: torch.Tensor, primary: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """[6] int64: distinct before/after, |P|, re-routed slots, 0 critical, unfilled (dropped) slots."""
    num_experts = primary.shape[0]
    before, after = (torch.zeros(num_experts, dtype=torch.bool, device=topk_ids.device) for _ in range(2))
    before[topk_ids.reshape(-1).long()] = True
    after[new_ids.reshape(-1)] = True
    rerouted = (topk_ids.long() != new_ids).sum()
    stats = [before.sum(), after.sum(), primary.sum(), rerouted, torch.zeros_like(rerouted), (~filled).sum()]
    return torch.stack(stats).to(torch.int64)
