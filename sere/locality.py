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

from sere.reference import primary_or_default, renormalize_weights

__all__ = ["allowed_experts", "locality_reroute", "locality_stats", "node_aware_route", "node_oea", "node_sere", "node_sere_err"]


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


# ---------------------------------------------------------------- node-aware re-routing
#
# Each token's secondary slots may only go to experts on the *units* (nodes, or ranks with
# node_scope "rank") that its own top-S slots occupy, optionally grown to at most M units in all
# (the token's next units in slot order, as DeepSeek-V3's node-limited routing caps a token at
# M nodes). Inside those units the policy chooses as usual, against the token's own primary set
#     P_t = P & {experts on an allowed unit of t}.
# A slot whose expert is outside P_t is re-routed (sere: most similar in P_t; sere-err: lowest
# substitution error in P_t or dropped; oea: the highest router scores in P_t). Critical experts
# (sere `threshold`, sere-err `keep_cost`) are kept only on an allowed unit. Where nothing
# qualifies, sere-err drops (weight 0, optionally renormalised or refilled from loaded experts on
# an allowed unit) and oea leaves a zero-weight slot; sere always has the token's own primaries.


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


def _best_in_set(values: torch.Tensor, allowed: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the last dim of values [..., E] within allowed [..., E]: (best value, lowest id reaching it).
    No allowed entry (or NaN): value -inf (largest) / +inf (smallest)."""
    fill = float("-inf") if largest else float("inf")
    masked = values.float().masked_fill(~allowed, fill)
    best = masked.max(dim=-1).values if largest else masked.min(dim=-1).values
    best = torch.where(best == best, best, torch.full_like(best, fill))  # NaN -> no target
    ids = torch.arange(values.shape[-1], device=values.device)
    best_id = torch.where(masked == best[..., None], ids, values.shape[-1]).min(dim=-1).values
    return best, best_id.clamp_max(values.shape[-1] - 1)


def node_sere(ids, weights, similarity, num_primary, threshold, token_primary, allowed):
    """SERE inside each token's allowed units. ids/weights [T, K] sorted; token_primary, allowed
    [T, E] bool. Returns (new ids [T, K] int64, weights unchanged, dropped [T, K-S] all False)."""
    secondary = ids[:, num_primary:].long()  # [T, J]
    token_idx = torch.arange(ids.shape[0], device=ids.device)[:, None]
    best_val, best_id = _best_in_set(similarity.float()[secondary], token_primary[:, None, :], largest=True)
    keep = token_primary[token_idx, secondary] | ~(best_val > float("-inf"))  # [T, J]
    if threshold > 0:
        keep = keep | (allowed[token_idx, secondary] & (best_val < torch.tensor(threshold)))
    new_ids = torch.cat([ids[:, :num_primary].long(), torch.where(keep, secondary, best_id)], dim=1)
    return new_ids, weights, torch.zeros_like(keep)


def node_oea(ids, weights, router_scores, num_primary, token_primary):
    """OEA inside each token's allowed units (as `sere.reference.oea_reference` with P_t)."""
    top_k, head = ids.shape[1], ids[:, :num_primary].long()  # [T, S]
    scores = router_scores.float()  # [T, E]
    masked = scores.masked_fill(~token_primary.clone().scatter_(1, head, False), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : top_k - num_primary]
    picked = masked.gather(1, order)  # [T, J]
    filled = picked > float("-inf")
    new_ids = torch.cat([head, torch.where(filled, order, head[:, :1])], dim=1)
    raw = torch.cat([scores.gather(1, head), torch.where(filled, picked, 0.0)], dim=1)
    scale = weights.float().sum(1, keepdim=True) / raw.sum(1, keepdim=True).clamp_min(1e-20)
    return new_ids, (raw * scale).to(weights.dtype), ~filled


def node_sere_err(ids, weights, error, num_primary, cfg, primary, token_primary, allowed, router_scores):
    """sere-err inside each token's allowed units (as `sere.reference.sere_err_reference` with P_t);
    `cfg` gives tolerance, keep_cost, max_distinct, renormalize, refill."""
    secondary = ids[:, num_primary:].long()  # [T, J]
    token_idx = torch.arange(ids.shape[0], device=ids.device)[:, None]
    best_err, best_id = _best_in_set(error.float()[secondary], token_primary[:, None, :], largest=False)
    loaded = token_primary[token_idx, secondary]
    cost = weights[:, num_primary:].float() * best_err.clamp_max(1.0)  # [T, J]
    keep_cost = float("inf") if cfg.keep_cost is None else cfg.keep_cost
    critical = ~loaded & allowed[token_idx, secondary] & (cost > keep_cost)
    if cfg.max_distinct is not None:
        budget = max(0, cfg.max_distinct - int(primary.sum()))
        mass = torch.zeros(error.shape[0], device=ids.device).index_put_((secondary[critical],), cost[critical], accumulate=True)
        chosen = torch.zeros(error.shape[0], dtype=torch.bool, device=ids.device)
        chosen[torch.sort(mass, descending=True, stable=True).indices[:budget]] = True
        critical = critical & chosen[secondary]
    approximate = ~loaded & ~critical
    drop = approximate & ~(best_err < cfg.tolerance)
    new_secondary = torch.where(approximate & ~drop, best_id, secondary)
    new_ids = torch.cat([ids[:, :num_primary].long(), torch.where(drop, ids[:, :1].long(), new_secondary)], dim=1)
    new_weights = weights.clone()
    new_weights[:, num_primary:] = torch.where(drop, 0.0, weights[:, num_primary:])
    if cfg.refill:
        loaded_set = primary.clone()
        loaded_set[secondary[critical]] = True
        live = drop & (weights[:, num_primary:] != 0)
        new_ids, new_weights = _refill(new_ids, new_weights, live, loaded_set[None, :] & allowed, router_scores, ids, weights)
    if cfg.renormalize:
        new_weights = renormalize_weights(new_weights, weights)
    return new_ids, new_weights, drop


def _refill(new_ids, new_weights, drop, loaded, router_scores, topk_ids, topk_weights):
    """`sere.reference.refill_dropped` with a per-token [T, E] loaded set."""
    head = new_ids.shape[1] - drop.shape[1]
    scores = router_scores.float()  # [T, E]
    masked = scores.masked_fill(~loaded.clone().scatter_(1, new_ids.long(), False), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : drop.shape[1]]  # [T, J]
    ranked = masked.gather(1, order)
    slot_rank = (drop.long().cumsum(1) - 1).clamp_min(0)  # the j-th dropped slot takes candidate j
    pick_id, pick_score = order.gather(1, slot_rank), ranked.gather(1, slot_rank)
    fill = drop & (pick_score > float("-inf"))
    scale = topk_weights.float().sum(1, keepdim=True) / scores.gather(1, topk_ids.long()).sum(1, keepdim=True).clamp_min(1e-20)
    tail_ids = torch.where(fill, pick_id, new_ids[:, head:].long())
    tail_w = torch.where(fill, pick_score * scale, new_weights[:, head:].float()).to(new_weights.dtype)
    return torch.cat([new_ids[:, :head], tail_ids], dim=1), torch.cat([new_weights[:, :head], tail_w], dim=1)


def node_aware_route(cfg, ids, weights, matrix, threshold, router_scores, primary, placement):
    """`cfg.policy` (sere, oea, sere-err) restricted to each token's allowed nodes or ranks, as
    `sere.policy.route` applies `cfg.node_limit`: ([T, K] ids, [T, K] weights, [6] int64 stats)."""
    if placement is None:
        raise ValueError("node_limit is set: route() needs the expert placement (placement=...)")
    if cfg.node_scope == "rank":
        unit, num_units = placement.expert_to_rank, placement.world_size
    else:
        unit, num_units = placement.expert_to_node(), placement.num_nodes
    allowed = allowed_experts(ids, unit.to(ids.device).long(), num_units, cfg.num_primary, cfg.max_nodes)  # [T, E]
    token_primary = allowed & primary[None, :]  # [T, E]
    if cfg.policy == "sere":
        new_ids, new_weights, dropped = node_sere(ids, weights, matrix, cfg.num_primary, threshold, token_primary, allowed)
    elif cfg.policy == "oea":
        new_ids, new_weights, dropped = node_oea(ids, weights, router_scores, cfg.num_primary, token_primary)
    else:
        new_ids, new_weights, dropped = node_sere_err(
            ids, weights, matrix, cfg.num_primary, cfg, primary, token_primary, allowed, router_scores
        )
    stats = locality_stats(ids, new_ids, primary, cfg.num_primary)
    return new_ids, new_weights, torch.cat([stats[:5], dropped.sum().reshape(1).to(torch.int64)])


def locality_stats(ids, new_ids, primary, num_primary) -> torch.Tensor:
    """[6] int64 statistics of a weight-preserving re-route (no drops)."""
    num_experts = primary.shape[0]
    before, after = (torch.zeros(num_experts, dtype=torch.bool, device=ids.device) for _ in range(2))
    before[ids.reshape(-1).long()] = True
    after[new_ids.reshape(-1).long()] = True
    critical = ~primary[new_ids[:, num_primary:].long()]
    stats = [before.sum(), after.sum(), primary.sum(), (ids != new_ids).sum(), critical.sum()]
    return torch.stack(stats + [torch.zeros_like(stats[0])]).to(torch.int64)
