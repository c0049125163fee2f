"""Plain-PyTorch reference of the re-routing policies: this module is the specification.

The compiled ops (`csrc/`) and `sere.xshare` must return exactly what these functions return
(ids compared exactly). Vectorised, except `xshare_reference`, written as plain loops over
experts and tokens so that it reads like the paper's algorithm. The sere-err functions live in
`sere.reference_err` and are re-exported here.

Shape legend:
    T  tokens in the step          E  routed experts
    K  top-k slots per token       S  num_primary (1 <= S < K)

Policies (docs/spec.md §3, §5-§9, §18):
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
    xshare  in-batch expert sharing (arXiv 2602.07265): the batch keeps each token's top-S
          experts plus the experts of largest summed router score up to a budget of distinct
          experts; every token then takes its top-k among them.
"""

from __future__ import annotations

import torch

# also importable from here: the names of `sere.reference_err` (`_SPLIT_OUT`, see `__getattr__`)
__all__ = [
    "primary_mask",
    "reroute_reference",
    "oea_reference",
    "xshare_reference",
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

    Under expert parallelism the masks of all ranks are OR-ed (an all-reduce, `sere.agreement`)
    before re-routing, so that every rank re-routes against the same P.
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


def xshare_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    router_scores: torch.Tensor,
    num_primary: int,
    budget: int,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """XShare, collaborative in-batch expert sharing (arXiv 2602.07265; docs/spec.md §18).

    1. Warm-up: the batch's selected set starts as P, every token's top-S experts.
    2. Greedy: while fewer than `budget` experts are selected, add the unselected expert with the
       largest gating mass (its router score summed over the step's tokens; ties: lowest id).
       The objective (total mass of the selected set) is modular, so greedy is optimal. A budget
       below |P| adds nothing: the warm-up set is kept whole.
    3. Refinement: every token takes its top-K selected experts by its own router score (ties:
       lowest id), in that order; with fewer than K selected, the remaining slots repeat its
       slot-0 expert with score 0. Weights: those scores rescaled to the token's original
       top-k weight sum (as OEA, §8).

    Args:
        topk_ids: [T, K] int32/int64, slot 0 the largest weight.  topk_weights: [T, K] float.
        router_scores: [T, E] float post-activation router scores.
        num_primary: S, 1 <= S < K (the warm-up).  budget: B >= 1 distinct experts.
        primary: optional [E] bool warm-up set (default: P of `topk_ids`).
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = router_scores.shape[1]
    warm_up = primary_or_default(topk_ids, num_experts, num_primary, primary).tolist()
    scores = router_scores.float().tolist()  # [T][E]
    mass = [sum(scores[t][e] for t in range(num_tokens)) for e in range(num_experts)]
    selected = [e for e in range(num_experts) if warm_up[e]]
    while len(selected) < budget:
        candidates = [e for e in range(num_experts) if e not in selected]
        if not candidates:
            break
        selected.append(min(candidates, key=lambda e: (-mass[e], e)))  # the largest marginal gain
    new_ids, new_weights = [], []
    for t in range(num_tokens):
        ranked = sorted(selected, key=lambda e: (-scores[t][e], e))[:top_k]
        raw = [scores[t][e] for e in ranked] + [0.0] * (top_k - len(ranked))
        scale = float(topk_weights[t].float().sum()) / max(sum(raw), 1e-20)
        new_ids.append(ranked + [ranked[0]] * (top_k - len(ranked)))
        new_weights.append([value * scale for value in raw])
    return (
        torch.tensor(new_ids, dtype=topk_ids.dtype, device=topk_ids.device).reshape(num_tokens, top_k),
        torch.tensor(new_weights, device=topk_ids.device).reshape(num_tokens, top_k).to(topk_weights.dtype),
    )


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


_SPLIT_OUT = ("sere_err_reference", "refill_dropped", "renormalize_weights")


def __getattr__(name: str):
    """The sere-err names, from `sere.reference_err` (imported on first use: it imports this module)."""
    if name in _SPLIT_OUT:
        from sere import reference_err

        return getattr(reference_err, name)
    raise AttributeError(f"module 'sere.reference' has no attribute {name!r}")
