"""Plain-PyTorch reference of error-aware re-routing (`sere-err`, docs/spec.md §9): the specification.

Split from `sere.reference` (which re-exports every public name here, so
`from sere.reference import sere_err_reference` keeps working). Vectorised, no loop over tokens.

Shape legend:
    T  tokens in the step          E  routed experts
    K  top-k slots per token       S  num_primary (1 <= S < K)
"""

from __future__ import annotations

import torch

from sere.reference import primary_or_default

__all__ = ["sere_err_reference", "refill_dropped", "renormalize_weights"]


def _best_substitute(error: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every expert e: (p*, err[e, p*]) with p* = argmin over p in P of err[e, p].

    Ties go to the lowest expert id; an empty P (or a NaN row) gives error +inf.
    Returns ([E] int64 ids, [E] float32 errors).
    """
    num_experts = error.shape[0]
    masked = error.float().masked_fill(~mask[None, :], float("inf"))  # [E, E]
    best_err = masked.min(dim=1).values  # [E]
    expert_ids = torch.arange(num_experts, device=error.device)
    candidates = torch.where(masked == best_err[:, None], expert_ids[None, :], num_experts)
    best_id = candidates.min(dim=1).values.clamp_max(num_experts - 1)  # [E]
    best_err = torch.where(best_err == best_err, best_err, float("inf"))  # NaN -> inf
    return best_id, best_err


def sere_err_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    error: torch.Tensor,
    num_primary: int,
    tolerance: float = 1.0,
    keep_cost: float = float("inf"),
    max_distinct: int | None = None,
    renormalize: bool = False,
    primary: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-aware re-routing (`sere-err`).

    `error[i, j]` = E||Y_i - Y_j||^2 / E||Y_i||^2 over the calibration tokens routed to expert i:
    the relative output error of running j instead of i (dropping i costs 1; diagonal 0).

    For every secondary slot (t, s) whose expert e is not in P:
        p* = argmin_{p in P} error[e, p] (ties: lowest id),  c = error[e, p*]
        cost = topk_weights[t, s] * min(c, 1)      (the weighted error of approximating it)
        critical if cost > keep_cost: the slot keeps e. With `max_distinct`, at most
            max(0, max_distinct - |P|) distinct critical experts are kept: those with the
            largest summed cost (ties: lowest id); the others are approximated.
        approximated: substitute (id p*, weight kept) if c < tolerance, else drop
            (id = the token's slot-0 expert, weight 0: an exact no-op in the [T, K] layout).
    With `router_scores` (refill), dropped slots are refilled as OEA fills them: in slot order,
    with the loaded experts (P and the kept critical experts) that the token has not chosen yet,
    highest router score first (ties: lowest id), weight = score x the token's weight/score scale
    (sum of its top-k weights over the sum of their scores); a slot with no such expert left stays
    dropped. With `renormalize`, every token's weights are rescaled to their original sum.
    Slots < S never change; kept critical experts do not join P.

    Args:
        topk_ids: [T, K] int32/int64.  topk_weights: [T, K] float.
        error: [E, E] float substitution errors.  num_primary: S, 1 <= S < K.
        tolerance: in (0, 1]: the largest error at which a substitute is used.
        keep_cost: weighted error above which a slot keeps its expert (inf: never).
        max_distinct: optional budget of distinct experts per call (P included).
        primary: optional [E] bool primary set (default: from `topk_ids`).
        router_scores: optional [T, E] float post-activation router scores: refill dropped slots.
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = error.shape[0]
    if router_scores is not None and tuple(router_scores.shape) != (num_tokens, num_experts):
        raise ValueError(
            f"router_scores must be [num_tokens={num_tokens}, num_experts={num_experts}], "
            f"got {tuple(router_scores.shape)}"
        )
    if not 0.0 < tolerance <= 1.0:
        raise ValueError(f"tolerance={tolerance!r} must be in (0, 1]")
    primary = primary_or_default(topk_ids, num_experts, num_primary, primary)
    best_id, substitute, drop, critical = _sere_err_decision(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, primary
    )
    secondary = topk_ids[:, num_primary:].long()  # [T, K-S]
    new_secondary = torch.where(substitute, best_id[secondary], secondary)
    new_secondary = torch.where(drop, topk_ids[:, :1].long(), new_secondary)
    new_ids = torch.cat([topk_ids[:, :num_primary], new_secondary.to(topk_ids.dtype)], dim=1)
    new_weights = topk_weights.clone()
    new_weights[:, num_primary:] = torch.where(drop, 0.0, topk_weights[:, num_primary:])
    if router_scores is not None:
        loaded_set = primary.clone()
        loaded_set[secondary[critical]] = True
        live = drop & (topk_weights[:, num_primary:] != 0)  # a zero-weight slot stays as it is
        new_ids, new_weights = refill_dropped(new_ids, new_weights, live, loaded_set, router_scores,
                                              topk_ids, topk_weights)
    if renormalize:
        new_weights = renormalize_weights(new_weights, topk_weights)
    return new_ids, new_weights


def _sere_err_decision(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, primary):
    """sere-err's per-slot decision: ([E] best substitute ids, then [T, K-S] bool masks of the
    substituted, dropped and kept-critical secondary slots)."""
    num_experts = error.shape[0]
    best_id, best_err = _best_substitute(error, primary)
    secondary = topk_ids[:, num_primary:].long()  # [T, K-S]
    weights = topk_weights[:, num_primary:].float()  # [T, K-S]
    loaded = primary[secondary]  # [T, K-S]
    sub_err = best_err[secondary]  # [T, K-S]
    cost = weights * sub_err.clamp_max(1.0)  # [T, K-S]
    critical = ~loaded & (cost > keep_cost)
    if max_distinct is not None:
        budget = max(0, max_distinct - int(primary.sum()))
        mass = torch.zeros(num_experts, device=cost.device).index_put_(
            (secondary[critical],), cost[critical], accumulate=True
        )  # [E] summed cost of the slots that want to keep each expert
        order = torch.sort(mass, descending=True, stable=True).indices[:budget]
        allowed = torch.zeros(num_experts, dtype=torch.bool, device=cost.device)
        allowed[order] = True
        critical = critical & allowed[secondary]
    approximate = ~loaded & ~critical
    substitute = approximate & (sub_err < tolerance)
    drop = approximate & ~substitute
    return best_id, substitute, drop, critical


def renormalize_weights(new_weights: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, K] new weights rescaled per token to the sum of its original [T, K] top-k weights."""
    scale = topk_weights.float().sum(1, keepdim=True) / new_weights.float().sum(1, keepdim=True)
    return (new_weights.float() * scale).to(topk_weights.dtype)


def refill_dropped(
    new_ids: torch.Tensor,
    new_weights: torch.Tensor,
    drop: torch.Tensor,
    loaded: torch.Tensor,
    router_scores: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OEA's fill of the dropped secondary slots (sere-err's `router_scores` option).

    Args:
        new_ids, new_weights: [T, K] after sere-err's decision.  drop: [T, K-S] dropped slots.
        loaded: [E] bool, the experts the step runs anyway.  router_scores: [T, E].
        topk_ids, topk_weights: [T, K] the router's choice (for the weight/score scale).
    """
    top_k, width = new_ids.shape[1], drop.shape[1]
    head = top_k - width  # S
    scores = router_scores.float()  # [T, E]
    available = loaded[None, :].expand_as(scores).clone()  # [T, E]
    available.scatter_(1, new_ids.long(), False)  # not chosen by the token already
    masked = scores.masked_fill(~available, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :width]  # [T, K-S]
    ranked = masked.gather(1, order)  # [T, K-S] candidate scores, best first
    slot_rank = (drop.long().cumsum(1) - 1).clamp_min(0)  # j-th dropped slot takes candidate j
    pick_id, pick_score = order.gather(1, slot_rank), ranked.gather(1, slot_rank)
    fill = drop & (pick_score > float("-inf"))  # [T, K-S]
    scale = topk_weights.float().sum(1, keepdim=True) / scores.gather(1, topk_ids.long()).sum(
        1, keepdim=True
    ).clamp_min(1e-20)  # [T, 1] weight per unit of router score
    tail_ids = torch.where(fill, pick_id, new_ids[:, head:].long())
    tail_weights = torch.where(fill, pick_score * scale, new_weights[:, head:].float())
    ids = torch.cat([new_ids[:, :head], tail_ids.to(new_ids.dtype)], dim=1)
    weights = torch.cat([new_weights[:, :head], tail_weights.to(new_weights.dtype)], dim=1)
    return ids, weights
