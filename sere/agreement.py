"""What an expert-parallel group agrees on before it routes a step: one SUM all-reduce.

    local = agreement_vector(cfg, topk_ids, topk_weights, num_experts, router_scores, padding)
    torch.distributed.all_reduce(local)                     # [2E] float32, SUM over the EP group
    primary = agreed_primary(cfg, local)                    # [E] bool, the same on every rank
    sere.policy.route(cfg, topk_ids, topk_weights, ..., primary=primary)

Every rank contributes its primary-set mask ([E], 1.0 per member) and, for `xshare`, its tokens'
gating mass ([E], router scores summed over its real rows; zeros for other policies). Summed over the group the
first half is the union of the primary sets (> 0), and the second the batch's mass, from which
`xshare` selects its experts (docs/spec.md §18): with that selection as `primary`, every rank's
`route` picks from the set a single process holding all the group's tokens would pick. The
vector has the same length for every policy, so ranks whose steps differ (a tuned schedule's
buckets, prefill against decode) still meet in the same collective.

Shape legend: T tokens of this rank's step, K top-k slots, E routed experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sere.policy import primary_set
from sere.xshare import select_by_mass

if TYPE_CHECKING:
    from sere.config import SereConfig

__all__ = ["agreed_primary", "agreement_vector"]


def agreement_vector(
    cfg: "SereConfig",
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    router_scores: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """[2E] float32: this rank's primary mask (top-S experts of its real tokens) and gating mass.

    Args: topk_ids / topk_weights [T, K]; router_scores [T, E] post-activation or None (mass 0;
    also 0 unless cfg.policy is xshare);
    padding [>= T] bool, True for rows that are not real tokens (kept out of both halves).
    """
    mask = primary_set(cfg, topk_ids, topk_weights, num_experts, padding).float()  # [E]
    if router_scores is None or cfg.policy != "xshare":  # only xshare reads the mass
        return torch.cat([mask, torch.zeros_like(mask)])
    scores = router_scores[:, :num_experts].float()  # [T, E]
    if padding is not None:
        scores = scores.masked_fill(padding[: scores.shape[0], None], 0.0)
    return torch.cat([mask, scores.sum(dim=0)])  # [2E]


def agreed_primary(cfg: "SereConfig", summed: torch.Tensor) -> torch.Tensor:
    """[E] bool `primary` for `route` from the group's summed [2E] agreement vector: the union of
    the primary sets, or for `xshare` its selected experts (warm-up union + greedy by the mass)."""
    num_experts = summed.shape[0] // 2
    primary = summed[:num_experts] > 0  # [E]
    if cfg.policy == "xshare":
        return select_by_mass(summed[num_experts:], primary, cfg.max_distinct)
    return primary
