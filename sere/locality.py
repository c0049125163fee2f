"""Locality-aware SERE targets (SERE_SPEC section 5).

Shape legend:
    T  tokens      E  routed experts      K  top-k slots      S  num_primary
    W  EP ranks    N  nodes

Plain SERE sends a secondary expert `e` that is not in the primary set P to
`p* = argmax_{p in P} sim[e, p]`. Under expert parallelism that target may live on a rank the token
is not otherwise sent to, so the re-route saves an expert read but costs a dispatched row. Here,
among the primaries within `epsilon` of the best similarity, the target is chosen by tier:

    tier 2  a primary on a rank the token is already sent to          (no new row at all)
    tier 1  a primary on a node the token is already sent to          (no new cross-node row)
    tier 0  any other candidate

then by similarity, then by the lowest expert id. "Already sent to" starts from the slots that
never change (the top-S slots, secondaries already in P, kept critical experts) and grows as the
secondary slots are resolved left to right. Critical experts (`threshold`) are decided exactly as
in `sere.reference.reroute_reference`; with `epsilon = 0` and no similarity ties the result equals
plain SERE. Weights are never changed. Vectorised over tokens; the loop runs over the K - S
secondary slots only.
"""

from __future__ import annotations

import torch

from sere.reference import primary_mask

__all__ = ["locality_reroute"]


def locality_reroute(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    expert_to_rank: torch.Tensor,
    epsilon: float,
    threshold: float = 0.0,
    primary: torch.Tensor | None = None,
    expert_to_node: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SERE with locality-aware targets.

    Args:
        topk_ids: [T, K] int32/int64 from the model's router.
        topk_weights: [T, K] float, returned unchanged.
        similarity: [E, E] float similarity of this layer.
        num_primary: S, 1 <= S < K.
        expert_to_rank: [E] int64 owner rank of every expert.
        epsilon: >= 0, absolute similarity slack: candidates are primaries p with
            sim[e, p] >= max_{q in P} sim[e, q] - epsilon.
        threshold: rho, as in `reroute_reference`.
        primary: [E] bool primary set (the OR over the EP group); default from `topk_ids`.
        expert_to_node: [E] int64 node of every expert's owner; None disables tier 1.
    Returns:
        (new topk_ids [T, K] same dtype, topk_weights unchanged).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = similarity.shape[0]
    if not 0 < num_primary < top_k:
        raise ValueError(f"num_primary must be in [1, top_k={top_k}), got {num_primary}")
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    if expert_to_rank.shape != (num_experts,):
        raise ValueError(f"expert_to_rank must have shape [{num_experts}], got {tuple(expert_to_rank.shape)}")
    device = topk_ids.device
    if primary is None:
        primary = primary_mask(topk_ids, num_experts, num_primary)
    expert_to_rank = expert_to_rank.to(device).long()
    num_ranks = int(expert_to_rank.max()) + 1

    sim = similarity.float().to(device)  # [E, E]
    masked = sim.masked_fill(~primary[None, :], float("-inf"))  # [E, E] columns outside P removed
    best_val = masked.max(dim=1).values  # [E]
    candidate = masked >= (best_val - epsilon)[:, None]  # [E, E] near-best primaries

    ids = topk_ids.long()  # [T, K]
    secondary = ids[:, num_primary:]  # [T, K-S]
    keep = primary[secondary]  # [T, K-S]
    if threshold > 0:
        keep = keep | (best_val[secondary] < torch.tensor(threshold, dtype=torch.float32))

    token_idx = torch.arange(num_tokens, device=device)
    on_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)  # [T, W]
    fixed = torch.cat([ids[:, :num_primary], torch.where(keep, secondary, ids[:, :1])], dim=1)  # [T, K]
    on_rank[token_idx[:, None], expert_to_rank[fixed]] = True
    on_node = None
    if expert_to_node is not None:
        expert_to_node = expert_to_node.to(device).long()
        on_node = torch.zeros(num_tokens, int(expert_to_node.max()) + 1, dtype=torch.bool, device=device)
        on_node[token_idx[:, None], expert_to_node[fixed]] = True  # [T, N]

    expert_ids = torch.arange(num_experts, device=device)
    new_secondary = secondary.clone()  # [T, K-S]
    for slot in range(top_k - num_primary):
        e = secondary[:, slot]  # [T]
        tier = candidate[e].long()  # [T, E] 1 for candidates, 0 otherwise
        tier = tier * (1 + 2 * on_rank[:, expert_to_rank].long())  # [T, E] 3: same rank
        if on_node is not None:
            tier = tier + (tier == 1).long() * on_node[:, expert_to_node].long()  # 2: same node
        top_tier = tier == tier.max(dim=1, keepdim=True).values  # [T, E]
        score = sim[e].masked_fill(~top_tier, float("-inf"))  # [T, E]
        best = score.max(dim=1, keepdim=True).values  # [T, 1]
        choice = torch.where(score == best, expert_ids[None, :], num_experts).min(dim=1).values  # [T]
        moved = ~keep[:, slot]
        new_secondary[:, slot] = torch.where(moved, choice, e)
        # the chosen target's rank and node now receive this token: later slots may reuse them
        on_rank[token_idx[moved], expert_to_rank[choice[moved]]] = True
        if on_node is not None:
            on_node[token_idx[moved], expert_to_node[choice[moved]]] = True
    new_ids = torch.cat([topk_ids[:, :num_primary], new_secondary.to(topk_ids.dtype)], dim=1)
    return new_ids, topk_weights
