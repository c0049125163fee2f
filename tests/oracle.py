"""Plain per-token loop oracles of every routing policy, written from the rules in docs/spec.md.

Independent of `sere`: no vectorisation, no import of `sere.reference`, `sere.ops` or
`sere.policy`. Inputs are torch tensors (any device) or nested lists; everything is turned into
Python lists and floats first, and every rule is a loop over tokens and slots. Float32 comparisons
are exact: float32/bfloat16/float16 values are exact as Python floats, `f32` rounds a Python
float (a threshold, a product) as float32 arithmetic does, `rounded` stores one in the weights'
dtype. A NaN similarity / error to P leaves an expert without a target; a NaN router score holds
its rank in the fill order but fills nothing, -inf never fills. The policies return an `Outcome`
(`stats` counts it); `loop_reroute` / `loop_sere_err` / `loop_oea` return what the compiled ops
return, as lists. tests/test_oracle.py checks the oracles by hand.

Shape legend: T tokens, K top-k slots, E experts, S num_primary.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch

INF = math.inf


class Outcome(NamedTuple):
    """One policy's result: [T][K] ids and weights (lists), and its two decision counts."""

    ids: list
    weights: list
    critical: int  # secondary slots kept on an expert outside P
    dropped: int  # secondary slots dropped (weight 0), before any refill / unfilled OEA slots


def f32(x: float) -> float:
    """`x` rounded to the nearest float32 (inf and NaN pass through, overflow gives inf)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(INF, x)


def as_rows(x) -> list:
    """A tensor (any float or int dtype) or nested list as nested Python lists."""
    if hasattr(x, "tolist"):
        return (x.float() if x.is_floating_point() else x).tolist()
    return [list(row) for row in x]


def rounded(x: float, dtype) -> float:
    """`x` stored in a tensor of `dtype` (the weights keep their dtype); as it is for lists (None)."""
    return x if dtype is None else torch.tensor(x, dtype=torch.float64).to(dtype).item()


def as_list(x) -> list:
    """A 1-D tensor or list as a list of Python numbers."""
    return x.tolist() if hasattr(x, "tolist") else list(x)


def sort_slots(ids, weights) -> tuple[list, list]:
    """Per token, slots by descending weight; equal weights keep their slot order."""
    out_ids, out_w = [], []
    for row_ids, row_w in zip(as_rows(ids), as_rows(weights)):
        order = sorted(range(len(row_ids)), key=lambda k: -row_w[k])  # sorted() is stable
        out_ids.append([row_ids[k] for k in order])
        out_w.append([row_w[k] for k in order])
    return out_ids, out_w


def primary_set(ids, num_primary: int, primary=None) -> set:
    """P: the given [E] mask's True entries, else every token's first S slots."""
    if primary is not None:
        return {e for e, on in enumerate(as_list(primary)) if on}
    return {row[s] for row in as_rows(ids) for s in range(num_primary)}


def fill_order(scores_row: list, candidates) -> list:
    """Candidates in the spec's fill order: NaN first, then highest score, ties lowest id;
    experts at -inf never fill and are left out."""
    kept = [e for e in candidates if scores_row[e] != -INF]
    return sorted(kept, key=lambda e: (0, 0.0, e) if math.isnan(scores_row[e]) else (1, -scores_row[e], e))


def most_similar_primary(sim_row: list, primaries: set):
    """(p*, sim) with p* the most similar primary (lowest id on ties); (None, None) when there is
    nothing to re-route to: P empty, any similarity to P NaN, or every one of them -inf."""
    best, best_val = None, -INF
    for p in sorted(primaries):
        value = sim_row[p]
        if math.isnan(value):
            return None, None
        if value > best_val:
            best, best_val = p, value
    return best, best_val


def sere(ids, weights, sim, num_primary: int, threshold: float = 0.0, primary=None) -> Outcome:
    """SERE: a secondary outside P goes to its most similar primary, unless that similarity is
    below float32(threshold) (threshold > 0: a critical expert, kept). Weights unchanged."""
    ids, weights, sim = as_rows(ids), as_rows(weights), as_rows(sim)
    primaries = primary_set(ids, num_primary, primary)
    rho = f32(threshold)
    out, critical = [list(row) for row in ids], 0
    for t, row in enumerate(ids):
        for s in range(num_primary, len(row)):
            e = row[s]
            if e in primaries:
                continue
            best, best_val = most_similar_primary(sim[e], primaries)
            if best is None or (threshold > 0 and best_val < rho):
                critical += 1  # kept on an expert outside P
                continue
            out[t][s] = best
    return Outcome(out, [list(row) for row in weights], critical, 0)


def oea(ids, weights, router_scores, num_primary: int, primary=None) -> Outcome:
    """OEA: keep the top-S; the other slots take, in fill order of the token's router scores, the
    experts of P not among its top-S; an unfilled slot (nothing left, or a NaN score) repeats
    slot 0 with score 0. Weights: the scores rescaled to the token's original weight sum."""
    ids, weights, scores = as_rows(ids), as_rows(weights), as_rows(router_scores)
    primaries = primary_set(ids, num_primary, primary)
    out_ids, out_w, unfilled = [], [], 0
    for t, row in enumerate(ids):
        head, width = row[:num_primary], len(row) - num_primary
        order = fill_order(scores[t], [p for p in sorted(primaries) if p not in head])[:width]
        tail = [e if not math.isnan(scores[t][e]) else None for e in order] + [None] * (width - len(order))
        unfilled += tail.count(None)
        raw = [scores[t][e] for e in head] + [0.0 if e is None else scores[t][e] for e in tail]
        scale = sum(weights[t]) / max(sum(raw), 1e-20)
        out_ids.append(head + [row[0] if e is None else e for e in tail])
        out_w.append([r * scale for r in raw])
    return Outcome(out_ids, out_w, 0, unfilled)


def best_substitute(err_row: list, primaries: set):
    """(p*, err) with p* the primary of lowest error (lowest id on ties); (None, inf) when P is
    empty or any error to P is NaN (no substitute)."""
    best, best_err = None, INF
    for p in sorted(primaries):
        value = err_row[p]
        if math.isnan(value):
            return None, INF
        if best is None or value < best_err:
            best, best_err = p, value
    return best, best_err


def _sere_err_decisions(ids, weights, error, num_primary, keep_cost, max_distinct, primaries):
    """{(t, s): (p*, err, cost)} for the secondary slots outside P, and the set of kept slots."""
    slots = {}
    for t, row in enumerate(ids):
        for s in range(num_primary, len(row)):
            if row[s] not in primaries:
                best, c = best_substitute(error[row[s]], primaries)
                slots[t, s] = (best, c, f32(weights[t][s] * min(c, 1.0)))
    kept = {key for key, (_, _, cost) in slots.items() if cost > f32(keep_cost)}
    if max_distinct is not None:
        mass = {}
        for t, s in sorted(kept):  # row-major, float32 accumulation
            mass[ids[t][s]] = f32(mass.get(ids[t][s], 0.0) + slots[t, s][2])
        budget = max(0, max_distinct - len(primaries))
        allowed = set(sorted(mass, key=lambda e: (-mass[e], e))[:budget])
        kept = {(t, s) for t, s in kept if ids[t][s] in allowed}
    return slots, kept


def sere_err(ids, weights, error, num_primary: int, tolerance: float = 1.0, keep_cost: float = INF,
             max_distinct: int | None = None, renormalize: bool = False, primary=None,
             router_scores=None) -> Outcome:
    """sere-err: per secondary slot outside P, keep it (weighted error > keep_cost, within the
    budget of distinct experts by summed cost), else substitute p* (error < tolerance), else drop
    (slot-0 id, weight 0). Then refill dropped slots (router_scores) and renormalise (a token
    whose new weights sum to 0 gets NaN weights, as 0 / 0)."""
    dtype = getattr(weights, "dtype", None)
    ids, weights, error = as_rows(ids), as_rows(weights), as_rows(error)
    primaries = primary_set(ids, num_primary, primary)
    slots, kept = _sere_err_decisions(ids, weights, error, num_primary, keep_cost, max_distinct, primaries)
    out_ids, out_w = [list(row) for row in ids], [list(row) for row in weights]
    dropped = []
    for (t, s), (best, c, _) in sorted(slots.items()):
        if (t, s) in kept:
            continue
        if c < f32(tolerance):
            out_ids[t][s] = best
        else:
            out_ids[t][s], out_w[t][s] = ids[t][0], 0.0
            dropped.append((t, s))
    if router_scores is not None:
        loaded = primaries | {ids[t][s] for t, s in kept}
        live = [(t, s) for t, s in dropped if weights[t][s] != 0]
        refill(out_ids, out_w, live, loaded, as_rows(router_scores), ids, weights, dtype)
    if renormalize:
        for t in range(len(ids)):
            total = sum(out_w[t])
            out_w[t] = [w * sum(weights[t]) / total if total else math.nan for w in out_w[t]]
    return Outcome(out_ids, out_w, len(kept), len(dropped))


def refill(out_ids, out_w, live, loaded, scores, ids, weights, dtype=None) -> None:
    """In place: each token's dropped slots, in slot order, take the loaded experts it has not
    chosen, in fill order of its router scores, weight = score x the token's weight/score scale
    (rounded to `dtype`); a slot with no expert left, or whose pick has a NaN score, stays dropped."""
    for t in range(len(ids)):
        mine = [s for tt, s in live if tt == t]
        if not mine:
            continue
        ranked = fill_order(scores[t], [e for e in sorted(loaded) if e not in out_ids[t]])
        scale = sum(weights[t]) / max(sum(scores[t][e] for e in ids[t]), 1e-20)
        for s, e in zip(mine, ranked):
            if not math.isnan(scores[t][e]):
                out_ids[t][s], out_w[t][s] = e, rounded(scores[t][e] * scale, dtype)


def sere_locality(ids, weights, sim, num_primary: int, expert_to_rank, expert_to_node, epsilon: float,
                  threshold: float = 0.0, primary=None) -> Outcome:
    """SERE whose target is, among the primaries within epsilon of the best similarity, one on a
    rank the token is already sent to (tier 3), else on such a node (tier 2), else any (tier 1);
    then the most similar, then the lowest id. Slots are resolved left to right and each target
    joins the token's ranks and nodes. Kept slots are decided exactly as in `sere`."""
    ids, sim = as_rows(ids), as_rows(sim)
    rank_of, node_of = as_list(expert_to_rank), as_list(expert_to_node)
    primaries = primary_set(ids, num_primary, primary)
    plain = sere(ids, weights, sim, num_primary, threshold, primary)
    out = [list(row) for row in ids]
    for t, row in enumerate(ids):
        moved = [s for s in range(num_primary, len(row)) if plain.ids[t][s] != row[s]]
        fixed = [e for s, e in enumerate(row) if s not in moved]
        on_rank, on_node = {rank_of[e] for e in fixed}, {node_of[e] for e in fixed}
        for s in moved:
            e = row[s]
            best_val = max(sim[e][p] for p in primaries)
            cutoff = f32(best_val - f32(epsilon))
            near = [p for p in primaries if sim[e][p] >= cutoff]

            def tier(p):
                return 3 if rank_of[p] in on_rank else 2 if node_of[p] in on_node else 1

            choice = min(near, key=lambda p: (-tier(p), -sim[e][p], p))
            out[t][s] = choice
            on_rank.add(rank_of[choice])
            on_node.add(node_of[choice])
    return Outcome(out, plain.weights, plain.critical, 0)


def stats(old_ids, outcome: Outcome, primaries: set) -> list:
    """The 6 statistics: distinct before, distinct after, |P|, changed slots, critical, dropped."""
    old = as_rows(old_ids)
    changed = sum(a != b for row_a, row_b in zip(old, outcome.ids) for a, b in zip(row_a, row_b))
    distinct_before = len({e for row in old for e in row})
    distinct_after = len({e for row in outcome.ids for e in row})
    return [distinct_before, distinct_after, len(primaries), changed, outcome.critical, outcome.dropped]


def route(cfg, topk_ids, topk_weights, *, num_experts: int, matrix=None, threshold=None, router_scores=None,
          primary=None, placement=None, step_tokens=None):
    """What `sere.policy.route` must return, as (ids, weights, stats, rerouted) lists."""
    if getattr(cfg, "node_limit", None) is not None:
        raise NotImplementedError("node_limit is not modelled here (tests/test_node_aware.py has its own loop)")
    ids, weights = as_rows(topk_ids), as_rows(topk_weights)
    step_tokens = len(ids) if step_tokens is None else step_tokens
    if cfg.policy == "topk" or not 0 < step_tokens <= cfg.max_decode_tokens:
        distinct = len({e for row in ids for e in row})
        return ids, weights, [distinct, distinct, 0, 0, 0, 0], False
    ids, weights = sort_slots(ids, weights)
    S = cfg.num_primary
    rho = cfg.threshold if threshold is None else threshold
    if cfg.policy == "sere" and cfg.locality_epsilon is not None:
        out = sere_locality(ids, weights, matrix, S, placement.expert_to_rank, placement.expert_to_node(),
                            cfg.locality_epsilon, rho, primary)
    elif cfg.policy == "sere":
        out = sere(ids, weights, matrix, S, rho, primary)
    elif cfg.policy == "oea":
        out = oea(ids, weights, router_scores, S, primary)
    else:
        keep_cost = INF if cfg.keep_cost is None else cfg.keep_cost
        out = sere_err(ids, weights, matrix, S, cfg.tolerance, keep_cost, cfg.max_distinct, cfg.renormalize,
                       primary, router_scores if cfg.refill else None)
    return out.ids, out.weights, stats(ids, out, primary_set(ids, S, primary)), True


def _op_outputs(topk_ids, out: Outcome, num_primary: int, primary) -> tuple[list, list, list]:
    """(ids, weights, [6] stats) of an outcome, as the compiled ops return them."""
    return out.ids, out.weights, stats(topk_ids, out, primary_set(topk_ids, num_primary, primary))


def loop_reroute(topk_ids, similarity, num_primary, threshold=0.0, primary=None) -> tuple[list, list]:
    """sere::reroute's outputs: ([T, K] ids, [5] stats in STAT_FIELDS order). Weights pass through."""
    out = sere(topk_ids, topk_ids, similarity, num_primary, threshold, primary)
    ids, _, counts = _op_outputs(topk_ids, out, num_primary, primary)
    return ids, counts[:5]


def loop_sere_err(topk_ids, topk_weights, error, num_primary, tolerance=1.0, keep_cost=INF, max_distinct=None,
                  renormalize=False, primary=None, router_scores=None) -> tuple[list, list, list]:
    """sere::reroute_err's outputs (dropped_slots counts the drops before a refill)."""
    out = sere_err(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize,
                   primary, router_scores)
    return _op_outputs(topk_ids, out, num_primary, primary)


def loop_oea(topk_ids, topk_weights, router_scores, num_primary, primary=None) -> tuple[list, list, list]:
    """sere::oea's outputs (critical_slots 0, dropped_slots = unfilled slots)."""
    return _op_outputs(topk_ids, oea(topk_ids, topk_weights, router_scores, num_primary, primary), num_primary, primary)


def error_matrix(num_experts: int, entries: dict) -> torch.Tensor:
    """A hand-case substitution-error matrix: 1 (as bad as dropping) except the listed (i, j)
    entries; diagonal 0."""
    error = torch.ones(num_experts, num_experts)
    error.fill_diagonal_(0.0)
    for (i, j), value in entries.items():
        error[i, j] = value
    return error
