"""Plain per-token loop oracles of the three re-routing policies, independent of the code under
test: neither `sere.reference` nor the compiled ops (docs/spec.md is what they transcribe).

The op tests (test_reroute_*.py, test_oea_op.py) import them; the hand-worked cases at the end
check the oracles themselves. Every value is a Python float taken from a float32 tensor, and
every float32 step of the spec is rounded with `f32`, so ids and counts compare exactly.

Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
"""

import math
import struct

import torch

INF = math.inf


def f32(x: float) -> float:
    """x rounded to float32 (as torch rounds a Python scalar compared with a float32 tensor)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def rounded(x: float, dtype: torch.dtype) -> float:
    """x stored in a tensor of `dtype` (the spec keeps the weights in their own dtype)."""
    return torch.tensor(x, dtype=torch.float64).to(dtype).item()


def _lists(*tensors):
    return [None if t is None else t.cpu().float().tolist() if t.is_floating_point() else t.cpu().tolist()
            for t in tensors]


def _primary_set(ids, num_primary, primary):
    if primary is not None:
        return {e for e, on in enumerate(primary) if on}
    return {e for row in ids for e in row[:num_primary]}


def _stats(ids, new_ids, primary_set, critical, dropped):
    before = {e for row in ids for e in row}
    after = {e for row in new_ids for e in row}
    rerouted = sum(a != b for row, new in zip(ids, new_ids) for a, b in zip(row, new))
    return [len(before), len(after), len(primary_set), rerouted, critical, dropped]


def _fill_order(scores_row, candidates):
    """Candidates in the spec's fill order: NaN first, then highest score, ties lowest id;
    experts at -inf never fill and are left out."""
    kept = [e for e in candidates if scores_row[e] != -INF]
    return sorted(kept, key=lambda e: (0, 0.0, e) if math.isnan(scores_row[e]) else (1, -scores_row[e], e))


def loop_reroute(topk_ids, similarity, num_primary, threshold=0.0, primary=None):
    """SERE: ([T, K] ids as lists, [5] stats)."""
    ids, sim, mask = _lists(topk_ids, similarity, primary)
    pset = _primary_set(ids, num_primary, mask)
    ordered = sorted(pset)
    target = {}  # expert -> its new expert (itself when kept), computed once per expert

    def nearest(e):
        best_id, best = e, -INF
        for p in ordered:
            if math.isnan(sim[e][p]):
                return e  # the max over P is NaN: kept
            if sim[e][p] > best:
                best_id, best = p, sim[e][p]
        return e if threshold > 0 and best < f32(threshold) else best_id

    new_ids, critical = [], 0
    for row in ids:
        out = list(row)
        for s in range(num_primary, len(row)):
            e = row[s]
            if e in pset:
                continue
            if e not in target:
                target[e] = nearest(e)
            out[s] = target[e]
            critical += out[s] == e  # kept outside P
        new_ids.append(out)
    return new_ids, _stats(ids, new_ids, pset, critical, 0)[:5]


def _best_substitute(err_row, pset):
    """(p*, err) = argmin over P (ties lowest id); err inf when P is empty or a NaN is met."""
    best_id, best = 0, INF
    for p in sorted(pset):
        if math.isnan(err_row[p]):
            return best_id, INF
        if err_row[p] < best:
            best_id, best = p, err_row[p]
    return best_id, best


def _budget(ids, weights, subs, pset, num_primary, keep_cost, max_distinct):
    """The experts whose costly slots keep them: summed cost per expert (row-major order,
    float32), largest first, ties lowest id, at most max(0, max_distinct - |P|)."""
    mass = {}
    for t, row in enumerate(ids):
        for s in range(num_primary, len(row)):
            e = row[s]
            if e not in pset:
                cost = f32(weights[t][s] * min(subs[e][1], 1.0))
                if cost > f32(keep_cost):
                    mass[e] = f32(mass.get(e, 0.0) + cost)
    if max_distinct is None:
        return set(mass)
    room = max(0, max_distinct - len(pset))
    return set(sorted(mass, key=lambda e: (-mass[e], e))[:room])


def loop_sere_err(topk_ids, topk_weights, error, num_primary, tolerance=1.0, keep_cost=INF, max_distinct=None,
                  renormalize=False, primary=None, router_scores=None):
    """sere-err: ([T, K] ids, [T, K] float weights, [6] stats). dropped_slots counts the drops
    before a refill; distinct_after and rerouted_slots describe the returned ids."""
    ids, weights, err, mask, scores = _lists(topk_ids, topk_weights, error, primary, router_scores)
    pset = _primary_set(ids, num_primary, mask)
    subs = {e: _best_substitute(err[e], pset) for row in ids for e in row[num_primary:] if e not in pset}
    allowed = _budget(ids, weights, subs, pset, num_primary, keep_cost, max_distinct)
    loaded = sorted(pset | allowed)
    new_ids, new_weights, critical, dropped = [], [], 0, 0
    for t, row in enumerate(ids):
        out, w, live = list(row), list(weights[t]), []
        for s in range(num_primary, len(row)):
            e = row[s]
            if e in pset:
                continue
            sub_id, sub_err = subs[e]
            if e in allowed and f32(weights[t][s] * min(sub_err, 1.0)) > f32(keep_cost):
                critical += 1
            elif sub_err < f32(tolerance):
                out[s] = sub_id
            else:
                out[s], w[s] = row[0], 0.0
                dropped += 1
                live += [s] if weights[t][s] != 0 else []
        if scores is not None and live:
            scale = sum(weights[t]) / max(sum(scores[t][e] for e in row), 1e-20)
            order = _fill_order(scores[t], [e for e in loaded if e not in out])
            for s, e in zip(live, order):
                if not math.isnan(scores[t][e]):
                    out[s], w[s] = e, rounded(scores[t][e] * scale, topk_weights.dtype)
        if renormalize:
            total = sum(w)
            w = [x * sum(weights[t]) / total if total else math.nan for x in w]
        new_ids.append(out)
        new_weights.append(w)
    return new_ids, new_weights, _stats(ids, new_ids, pset, critical, dropped)


def loop_oea(topk_ids, topk_weights, router_scores, num_primary, primary=None):
    """OEA: ([T, K] ids, [T, K] float weights, [6] stats; critical 0, dropped = unfilled)."""
    ids, weights, scores, mask = _lists(topk_ids, topk_weights, router_scores, primary)
    pset = _primary_set(ids, num_primary, mask)
    new_ids, new_weights, unfilled = [], [], 0
    for t, row in enumerate(ids):
        head, width = row[:num_primary], len(row) - num_primary
        order = _fill_order(scores[t], [e for e in sorted(pset) if e not in head])[:width]
        tail, raw = [], [scores[t][e] for e in head]
        for j in range(width):
            if j < len(order) and not math.isnan(scores[t][order[j]]):
                tail.append(order[j])
                raw.append(scores[t][order[j]])
            else:
                tail.append(head[0])  # unfilled: the slot-0 expert with weight 0
                raw.append(0.0)
                unfilled += 1
        scale = sum(weights[t]) / max(sum(raw), 1e-20)
        new_ids.append(head + tail)
        new_weights.append([x * scale for x in raw])
    return new_ids, new_weights, _stats(ids, new_ids, pset, 0, unfilled)


# ------------------------------------------------------------------ the oracles, checked by hand


def test_loop_reroute_by_hand():
    #   P = {0, 1}; sim[2] = (.3, .8, 1, 0) -> 1; sim[3] has a NaN to P -> kept (critical)
    #   [0 | 2]  [1 | 3]   ->   [0 | 1]  [1 | 3]
    sim = torch.eye(4)
    sim[2, 0], sim[2, 1], sim[3, 0], sim[3, 1] = 0.3, 0.8, math.nan, 0.9
    ids, stats = loop_reroute(torch.tensor([[0, 2], [1, 3]]), sim, 1)
    assert ids == [[0, 1], [1, 3]] and stats == [4, 3, 2, 1, 1]


def test_loop_sere_err_by_hand():
    # P = {0, 1}, tolerance .5, keep_cost .5: 2 -> 1 (err .2), 3 dropped (err .9), 4 kept (cost .57)
    #   [0 | 2 3] w [.5 .3 .2]  ->  [0 | 1 0] w [.5 .3 0];   [1 | 4 2]  ->  [1 | 4 1]
    error = torch.ones(5, 5).fill_diagonal_(0.0)
    error[2, 1], error[3, 0], error[4, 1] = 0.2, 0.9, 0.95
    ids, weights = torch.tensor([[0, 2, 3], [1, 4, 2]]), torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    new_ids, new_w, stats = loop_sere_err(ids, weights, error, 1, 0.5, 0.5)
    assert new_ids == [[0, 1, 0], [1, 4, 1]] and stats == [5, 3, 2, 3, 1, 1]
    assert new_w[0] == [0.5, f32(0.3), 0.0]
    # refill: token 0's dropped slot takes the best loaded expert it lacks: loaded {0, 1, 4},
    # it holds {0, 1} -> 4 at score .4, weight .4 x (1.0 / (.1 + .1 + .1)) = 4/3
    scores = torch.tensor([[0.1, 0.2, 0.1, 0.1, 0.4], [0.2] * 5])
    new_ids, new_w, stats = loop_sere_err(ids, weights, error, 1, 0.5, 0.5, router_scores=scores)
    assert new_ids == [[0, 1, 4], [1, 4, 1]] and stats == [5, 3, 2, 3, 1, 1]
    assert math.isclose(new_w[0][2], 0.4 / 0.3, rel_tol=1e-6)


def test_loop_oea_by_hand():
    # S = 1, P = {0, 2, 3}; scores per token below.
    #   [0 | 1 2]  candidates 2, 3 tie at .3 -> 2 then 3             ->  [0 | 2 3]  raw [.1 .3 .3]
    #   [3 | 4 0]  candidates 2 (.5), 0 (.1)                         ->  [3 | 2 0]
    #   [2 | 0 1]  candidates 0 (.3); 3 is at -inf: never fills      ->  [2 | 0 2]  raw [.2 .3 0]
    ids = torch.tensor([[0, 1, 2], [3, 4, 0], [2, 0, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.3, 0.3, 0.2, -INF, 0.2]])
    new_ids, new_w, stats = loop_oea(ids, weights, scores, 1)
    assert new_ids == [[0, 2, 3], [3, 2, 0], [2, 0, 2]]
    assert stats == [5, 3, 3, 4, 0, 1]
    assert all(math.isclose(a, b / 0.7, rel_tol=1e-6) for a, b in zip(new_w[0], (0.1, 0.3, 0.3)))
    assert new_w[2][2] == 0.0
    # external P = {3}: token 0 gets 3 then nothing; tokens 1 and 2 have nothing left
    new_ids, new_w, stats = loop_oea(ids, weights, scores, 1, torch.tensor([False, False, False, True, False]))
    assert new_ids == [[0, 3, 0], [3, 3, 3], [2, 2, 2]]
    assert stats == [5, 3, 1, 6, 0, 5]
    assert math.isclose(new_w[1][0], 1.0, rel_tol=1e-6) and new_w[1][1:] == [0.0, 0.0]
