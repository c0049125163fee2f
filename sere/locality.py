"""Locality-aware SERE targets (SERE_SPEC section 5) and the mask of node-aware routing.

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

Node-aware routing (`SereConfig.node_limit`, docs/spec.md §21) is built here only as far as its
[T, E] `allowed` mask (`node_allowed`, `allowed_experts`); the compiled ops of `sere.ops` apply it.
"""

from __future__ import annotations

import torch

from sere.reference import primary_or_default

__all__ = ["allowed_experts", "locality_reroute", "locality_stats", "node_allowed"]


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
    primary = primary_or_default(topk_ids, num_experts, num_primary, primary)
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    if expert_to_rank.shape != (num_experts,):
        raise ValueError(f"expert_to_rank must have shape [{num_experts}], got {tuple(expert_to_rank.shape)}")
    device = topk_ids.device
    expert_to_rank = expert_to_rank.to(device).long()
    num_ranks = int(expert_to_rank.max()) + 1

    sim = similarity.float().to(device)  # [E, E]
    masked = sim.masked_fill(~primary[None, :], float("-inf"))  # [E, E] columns outside P removed
    best_val = masked.max(dim=1).values  # [E]
    candidate = masked >= (best_val - epsilon)[:, None]  # [E, E] near-best primaries

    ids = topk_ids.long()  # [T, K]
    secondary = ids[:, num_primary:]  # [T, K-S]
    # already loaded, or nothing to re-route to (empty P, or a NaN row: as in docs/spec.md §6)
    keep = primary[secondary] | ~(best_val[secondary] > float("-inf"))  # [T, K-S]
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


# ---------------------------------------------------------------- node-aware routing
#
# Each token's secondary slots may only go to experts on the *units* (nodes, or ranks with
# node_scope "rank") that its own top-S slots occupy, optionally grown to at most M units in all
# (the token's next units in slot order, as DeepSeek-V3's node-limited routing caps a token at
# M nodes). `allowed_experts` computes that [T, E] mask here (fixed shapes, plain ATen); the
# compiled ops of `sere.ops` take it as `allowed` and re-route token t within its own primary set
#     P_t = P & allowed[t]
# by the per-policy rules of docs/spec.md §21.


def node_allowed(cfg, ids: torch.Tensor, placement) -> torch.Tensor:
    """[T, E] bool `allowed` mask of `cfg.node_limit` for the sorted ids [T, K] (docs/spec.md §21):
    the experts on the nodes (`cfg.node_scope` "rank": ranks) of each token's top-S experts, grown
    to `cfg.max_nodes` units. `placement` gives `expert_to_rank` [E] / `expert_to_node()` [E]."""
    if placement is None:
        raise ValueError("node_limit is set: route() needs the expert placement (placement=...)")
    if cfg.node_scope == "rank":
        unit, num_units = placement.expert_to_rank, placement.world_size
    else:
        unit, num_units = placement.expert_to_node(), placement.num_nodes
    return allowed_experts(ids, unit.to(ids.device).long(), num_units, cfg.num_primary, cfg.max_nodes)


def allowed_experts(
    ids: torch.Tensor, unit_of_expert: torch.Tensor, num_units: int, num_primary: int, max_units: int | None
) -> torch.Tensor:
    """[T, E] bool: the experts on a unit that token t may use (its top-S units, grown to `max_units`).

    Args: ids [T, K] sorted by descending weight; unit_of_expert [E] int64 (node or rank of each
    expert); num_units: nodes (or ranks) in all; max_units: M or None (the top-S units only).
    """
    top_k = ids.shape[1]
    units = unit_of_expert[ids.long()]  # [T, K]
    earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=ids.device).tril(-1)  # [K, K] i < j
    first = ~((units[:, :, None] == units[:, None, :]) & earlier).any(dim=2)  # [T, K] unit's first slot
    take = torch.arange(top_k, device=ids.device)[None, :] < num_primary  # [1, K]
    if max_units is not None:
        take = take | (first.long().cumsum(dim=1) - 1 < max_units)  # the first M distinct units
    ok_unit = torch.zeros(ids.shape[0], num_units + 1, dtype=torch.bool, device=ids.device)  # [T, U+1]
    token_idx = torch.arange(ids.shape[0], device=ids.device)[:, None]
    ok_unit[token_idx, torch.where(first & take, units, num_units)] = True  # column U: not taken
    return ok_unit[:, unit_of_expert]  # [T, E]


def locality_stats(ids, new_ids, primary, num_primary) -> torch.Tensor:
    """[6] int64 statistics of a weight-preserving re-route (no drops)."""
    num_experts = primary.shape[0]
    before, after = (torch.zeros(num_experts, dtype=torch.bool, device=ids.device) for _ in range(2))
    before[ids.reshape(-1).long()] = True
    after[new_ids.reshape(-1).long()] = True
    critical = ~primary[new_ids[:, num_primary:].long()]
    stats = [before.sum(), after.sum(), primary.sum(), (ids != new_ids).sum(), critical.sum()]
    return torch.stack(stats + [torch.zeros_like(stats[0])]).to(torch.int64)
