"""Plain-PyTorch reference of the re-routing policies: this module is the specification.

The compiled ops (`csrc/`) must return exactly what these functions return (ids compared
exactly). Everything here is vectorised: no Python loop over tokens or experts.

Shape legend:
    T  tokens in the step          E  routed experts
    K  top-k slots per token       S  num_primary (1 <= S < K)

Policies (docs/spec.md §3, §5-§9):
    topk  no change (the model's own routing).
    sere  Similarity-based Expert Re-routing: every secondary slot whose expert is not in the
          batch's primary set P is sent to the most similar expert of P (ties: lowest expert id),
          unless `threshold > 0` and that similarity is below it (a *critical* expert: kept).
          Weights are never changed.
    oea   Opportunistic Expert Activation (arXiv 2511.02237): every token keeps its top-S; its
          other K-S slots take the highest-router-score experts already loaded by the batch.
    sere-err  error-aware re-routing (docs/spec.md §9): like sere, but the substitute is the
          primary with the lowest calibrated substitution error, a slot whose best substitute is
          worse than `tolerance` is dropped instead, and a slot whose weighted error is too large
          to approximate keeps its expert (optionally within a budget of distinct experts).
"""

from __future__ import annotations

import torch

__all__ = [
    "primary_mask",
    "reroute_reference",
    "oea_reference",
    "sere_err_reference",
    "refill_dropped",
    "renormalize_weights",
    "reroute_stats",
    "distinct_experts",
]


# Index of each entry of the statistics vector returned by `reroute_stats` and the compiled op.
STAT_FIELDS = (
    "distinct_before",   # distinct experts selected by the model's router
    "distinct_after",    # distinct experts after re-routing (= primaries + critical experts)
    "num_primary_experts",  # |P|
    "rerouted_slots",    # (token, slot) pairs whose expert id changed
    "critical_slots",    # secondary slots kept on a non-primary (critical) expert
)


def _check_ids(topk_ids: torch.Tensor, num_experts: int, name: str = "topk_ids") -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {topk_ids.dtype}")


def primary_mask(topk_ids: torch.Tensor, num_experts: int, num_primary: int) -> torch.Tensor:
    """The batch's primary set P as a mask.

    Args:
        topk_ids: [T, K] int32/int64, slot 0 holds the largest routing weight.
        num_experts: E.
        num_primary: S, the number of leading slots of every token that form P.
    Returns:
        [E] bool, True for every expert in P = {topk_ids[t, s] : t < T, s < S}.

    Under expert parallelism the masks of all ranks are OR-ed (an all-reduce MAX) before
    re-routing, so that every rank re-routes against the same P.
    """
    _check_ids(topk_ids, num_experts)
    mask = torch.zeros(num_experts, dtype=torch.bool, device=topk_ids.device)
    mask[topk_ids[:, :num_primary].reshape(-1).long()] = True
    return mask


def primary_or_default(
    topk_ids: torch.Tensor, num_experts: int, num_primary: int, primary: torch.Tensor | None
) -> torch.Tensor:
    """`primary` ([E] bool), or P of `topk_ids` when None; checks 1 <= S < K first."""
    top_k = topk_ids.shape[1]
    if not 0 < num_primary < top_k:
        raise ValueError(f"num_primary must be in [1, top_k={top_k}), got {num_primary}")
    return primary_mask(topk_ids, num_experts, num_primary) if primary is None else primary


def _nearest_primary(similarity: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every expert e: (p*, sim[e, p*]) with p* = argmax over p in P of sim[e, p].

    Ties go to the lowest expert id. Similarities are compared in float32 (exact for
    bf16/fp16 inputs). Returns ([E] int64 ids, [E] float32 values).
    """
    num_experts = similarity.shape[0]
    sim = similarity.float()  # [E, E]
    masked = sim.masked_fill(~mask[None, :], float("-inf"))  # [E, E], columns outside P removed
    best_val = masked.max(dim=1).values  # [E]
    expert_ids = torch.arange(num_experts, device=sim.device)
    # lowest id among the columns that reach the maximum
    candidates = torch.where(masked == best_val[:, None], expert_ids[None, :], num_experts)
    best_id = candidates.min(dim=1).values  # [E]
    return best_id, best_val


def reroute_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    threshold: float = 0.0,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SERE re-routing (docs/spec.md §6).

    Args:
        topk_ids: [T, K] int32/int64 expert ids from the model's own router.
        topk_weights: [T, K] float routing weights; returned unchanged.
        similarity: [E, E] float32/bfloat16/float16 expert similarity (diagonal 1).
        num_primary: S, 1 <= S < K.
        threshold: rho in [0, 1]; rho > 0 keeps a secondary expert whose best primary has
            similarity < rho (compared in float32). A kept critical expert does not join P.
        primary: optional [E] bool primary set (e.g. the union over an EP group); by default
            the primary set of `topk_ids` itself.
    Returns:
        (new topk_ids [T, K] same dtype, topk_weights unchanged).
    """
    primary = primary_or_default(topk_ids, similarity.shape[0], num_primary, primary)
    best_id, best_val = _nearest_primary(similarity, primary)

    secondary = topk_ids[:, num_primary:].long()  # [T, K-S]
    # already loaded, or nothing to re-route to (an empty P, e.g. an all-False external mask,
    # or a NaN row: max() propagates NaN and NaN > -inf is False)
    keep = primary[secondary] | ~(best_val[secondary] > float("-inf"))  # [T, K-S]
    if threshold > 0:
        rho = torch.tensor(threshold, dtype=torch.float32)
        keep = keep | (best_val[secondary] < rho)  # critical experts
    new_secondary = torch.where(keep, secondary, best_id[secondary])
    new_ids = torch.cat([topk_ids[:, :num_primary], new_secondary.to(topk_ids.dtype)], dim=1)
    return new_ids, topk_weights


def oea_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    router_scores: torch.Tensor,
    num_primary: int,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Opportunistic Expert Activation, the peer policy.

    Every token keeps its top-S slots. Its other K-S slots take, in order of the token's own
    router score (ties: lowest id), the experts of P that it has not chosen yet. If fewer than
    K-S such experts exist, the remaining slots repeat the token's slot-0 expert with weight 0
    (an exact no-op that keeps the [T, K] layout).

    Weights: the router scores of the new experts, rescaled so that every token's weights
    sum to what its original top-k weights summed to (identical to the model's own
    renormalisation when it renormalises, scale-preserving when it does not).

    Args:
        topk_ids: [T, K] int32/int64.
        topk_weights: [T, K] float.
        router_scores: [T, E] float, the router's post-activation scores (softmax/sigmoid).
        num_primary: S, 1 <= S < K.
        primary: optional [E] bool primary set (default: from `topk_ids`).
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = router_scores.shape[1]
    primary = primary_or_default(topk_ids, num_experts, num_primary, primary)
    head = topk_ids[:, :num_primary].long()  # [T, S]
    scores = router_scores.float()  # [T, E]
    available = primary[None, :].expand(num_tokens, num_experts).clone()  # [T, E]
    available.scatter_(1, head, False)  # a token does not pick its own primaries twice
    masked = scores.masked_fill(~available, float("-inf"))
    # stable descending sort: among equal scores the lower expert id comes first
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : top_k - num_primary]
    picked_scores = masked.gather(1, order)  # [T, K-S]
    filled = picked_scores > float("-inf")
    tail = torch.where(filled, order, head[:, :1])  # [T, K-S]
    new_ids = torch.cat([head, tail], dim=1)  # [T, K]

    raw = torch.cat([scores.gather(1, head), torch.where(filled, picked_scores, 0.0)], dim=1)
    scale = topk_weights.float().sum(1, keepdim=True) / raw.sum(1, keepdim=True).clamp_min(1e-20)
    new_weights = (raw * scale).to(topk_weights.dtype)
    return new_ids.to(topk_ids.dtype), new_weights


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


def distinct_experts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of distinct experts in `topk_ids` ([T, K]) as a 0-d int64 tensor (no host sync)."""
    seen = torch.zeros(num_experts, dtype=torch.bool, device=topk_ids.device)
    seen[topk_ids.reshape(-1).long()] = True
    return seen.sum()


def reroute_stats(
    old_ids: torch.Tensor,
    new_ids: torch.Tensor,
    num_experts: int,
    num_primary: int,
    primary: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-call statistics as an [5] int64 tensor, in the order of `STAT_FIELDS`. No host sync."""
    if primary is None:
        primary = primary_mask(old_ids, num_experts, num_primary)
    secondary_new = new_ids[:, num_primary:].long()
    critical = ~primary[secondary_new]
    return torch.stack(
        [
            distinct_experts(old_ids, num_experts),
            distinct_experts(new_ids, num_experts),
            primary.sum(),
            (old_ids != new_ids).sum(),
            critical.sum(),
        ]
    ).to(torch.int64)
