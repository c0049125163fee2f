"""Policy `xshare` (arXiv 2602.07265, docs/spec.md §18): hand-worked cases, then seeded sweeps of
`sere.policy.route` and `sere.reference.xshare_reference` against a plain-loop oracle written
here, `route` under torch.compile(fullgraph=True), and the config checks.

Ids and statistics compare exactly; weights within a float32 tolerance. Sweeps with tied scores
use multiples of 1/8, whose sums are exact in float32 and float64 alike, so the tie rule (lower
expert id first) is what decides.
"""

import random

import pytest
import torch
from pydantic import ValidationError

from sere.config import SereConfig
from sere.policy import label, needs_router_scores, route
from sere.reference import xshare_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the oracle: plain loops


def oracle_xshare(ids, weights, scores, num_primary, budget, primary=None):
    """XShare of one step with Python lists. ids/weights: [T][K] (any slot order), scores: [T][E].

    Returns (new ids [T][K], new weights [T][K], stats [6]) with slots by descending weight."""
    num_tokens, top_k, num_experts = len(ids), len(ids[0]), len(scores[0])
    order = [sorted(range(top_k), key=lambda k: -weights[t][k]) for t in range(num_tokens)]  # stable
    ids = [[ids[t][k] for k in order[t]] for t in range(num_tokens)]
    weights = [[weights[t][k] for k in order[t]] for t in range(num_tokens)]
    if primary is None:
        primary = [any(e in row[:num_primary] for row in ids) for e in range(num_experts)]
    chosen = [e for e in range(num_experts) if primary[e]]
    mass = [0.0] * num_experts
    for row in scores:
        for e, value in enumerate(row):
            mass[e] += value
    while len(chosen) < budget:  # one greedy step: scan for the best unchosen expert
        best = None
        for e in range(num_experts):
            if e not in chosen and (best is None or mass[e] > mass[best]):
                best = e  # strict >: on a tie the first (lowest) id stays
        if best is None:
            break
        chosen.append(best)
    new_ids, new_weights, dropped = [], [], 0
    for t in range(num_tokens):
        left, row = list(chosen), []
        while left and len(row) < top_k:
            best = min(left, key=lambda e: (-scores[t][e], e))
            row.append(best)
            left.remove(best)
        raw = [scores[t][e] for e in row]
        dropped += top_k - len(row)
        raw += [0.0] * (top_k - len(row))
        row += [row[0]] * (top_k - len(row))
        total = sum(raw)
        scale = sum(weights[t]) / (total if total > 1e-20 else 1e-20)
        new_ids.append(row)
        new_weights.append([r * scale for r in raw])
    stats = [
        len({e for row in ids for e in row}),
        len({e for row in new_ids for e in row}),
        sum(primary),
        sum(a != b for row, new in zip(ids, new_ids) for a, b in zip(row, new)),
        0,
        dropped,
    ]
    return new_ids, new_weights, stats


def _route(ids, weights, scores, num_primary, budget, primary=None):
    cfg = SereConfig(policy="xshare", num_primary=num_primary, max_distinct=budget)
    return route(cfg, ids, weights, num_experts=scores.shape[1], router_scores=scores, primary=primary)


def _check_all(ids, weights, scores, num_primary, budget, primary=None, context=""):
    """route, the reference and the oracle agree (the reference gets weight-sorted slots)."""
    want_ids, want_weights, want_stats = oracle_xshare(
        ids.tolist(), weights.tolist(), scores.tolist(), num_primary, budget,
        None if primary is None else primary.tolist())
    got = _route(ids, weights, scores, num_primary, budget, primary)
    assert got.rerouted and got.ids.tolist() == want_ids, context
    torch.testing.assert_close(got.weights.double(), torch.tensor(want_weights, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert got.stats.dtype == torch.int64 and got.stats.tolist() == want_stats, context
    assert got.ids.dtype == ids.dtype and got.weights.dtype == weights.dtype
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    ref_ids, ref_weights = xshare_reference(ids.gather(1, order), weights.gather(1, order), scores,
                                            num_primary, budget, primary)
    assert ref_ids.tolist() == want_ids, context
    torch.testing.assert_close(ref_weights.double(), torch.tensor(want_weights, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    return want_ids, want_weights, want_stats


# ---------------------------------------------------------------- hand-worked

# 4 tokens, 6 experts, K = 2, S = 1; router scores in sixteenths (not a softmax: any scores do):
#
#            e0  e1  e2  e3  e4  e5     top-2      weights (renormalised)
#     t0  [   8,  4,  0,  2,  1,  1 ]   e0, e1     8/12, 4/12
#     t1  [   1,  2,  8,  4,  1,  0 ]   e2, e3     8/12, 4/12
#     t2  [   6,  1,  1,  1,  5,  2 ]   e0, e4     6/11, 5/11
#     t3  [   1,  1,  4,  1,  2,  7 ]   e5, e2     7/11, 4/11
#     mass   16   8  13   8   9  10     6 distinct experts before
#
# warm-up (each token's top-1): W = {e0, e2, e5}.
SCORES = torch.tensor([[8, 4, 0, 2, 1, 1], [1, 2, 8, 4, 1, 0], [6, 1, 1, 1, 5, 2], [1, 1, 4, 1, 2, 7]]) / 16.0
IDS = torch.tensor([[0, 1], [2, 3], [0, 4], [5, 2]], dtype=torch.int32)
WEIGHTS = torch.tensor([[8 / 12, 4 / 12], [8 / 12, 4 / 12], [6 / 11, 5 / 11], [7 / 11, 4 / 11]])


def test_hand_worked_budget_4():
    # B = 4: W plus the best of the rest by mass, e4 (9 > 8, 8). Selected {e0, e2, e4, e5}.
    #   t0: e0 (8), then e4 (1) and e5 (1) tie: e4, the lower id    -> [0, 4], weights 8/9, 1/9
    #   t1: e2 (8), then e0 (1) and e4 (1) tie: e0                  -> [2, 0], weights 8/9, 1/9
    #   t2: e0 (6), e4 (5): its own choice                         -> [0, 4], 6/11, 5/11
    #   t3: e5 (7), e2 (4): its own choice                         -> [5, 2], 7/11, 4/11
    # stats: 6 before, 4 after, |W| = 3, 2 re-routed slots (t0 and t1 slot 1), 0, 0 dropped
    ids, weights, stats = _check_all(IDS, WEIGHTS, SCORES, 1, 4)
    assert ids == [[0, 4], [2, 0], [0, 4], [5, 2]]
    want = [8 / 9, 1 / 9, 8 / 9, 1 / 9, 6 / 11, 5 / 11, 7 / 11, 4 / 11]
    assert [w for row in weights for w in row] == pytest.approx(want)
    assert stats == [6, 4, 3, 2, 0, 0]


def test_hand_worked_mass_tie_goes_to_the_lower_id():
    # B = 5: e4 (9), then e1 and e3 tie at 8: e1. Selected {e0, e1, e2, e4, e5}.
    #   t0 keeps [0, 1]; t1: e2 (8), e1 (2) -> [2, 1] (was e3); t2, t3 keep theirs.
    ids, _, stats = _check_all(IDS, WEIGHTS, SCORES, 1, 5)
    assert ids == [[0, 1], [2, 1], [0, 4], [5, 2]]
    assert stats == [6, 5, 3, 1, 0, 0]


def test_hand_worked_budget_below_the_warm_up_keeps_the_warm_up():
    # B = 2 < |W| = 3: the warm-up set wins, selected = {e0, e2, e5}.
    #   t0: e0 (8), e5 (1) -> [0, 5], 8/9, 1/9;  t1: e2 (8), e0 (1) -> [2, 0]
    #   t2: e0 (6), e5 (2) -> [0, 5], 6/8, 2/8;  t3: [5, 2] as before
    ids, weights, stats = _check_all(IDS, WEIGHTS, SCORES, 1, 2)
    assert ids == [[0, 5], [2, 0], [0, 5], [5, 2]]
    assert weights[2] == pytest.approx([6 / 8, 2 / 8])
    assert stats == [6, 3, 3, 3, 0, 0]


def test_hand_worked_fewer_selected_than_k_drops_slots():
    # 1 token, K = 3, S = 1, B = 2: scores [8, 4, 2, 1, 1, 0] / 16, its top-3 [e0, e1, e2], not
    # renormalised (weights = scores, sum 14/16). W = {e0}; e1 has the largest other mass.
    # It takes e0, e1; slot 2 repeats e0 with weight 0. Scale 14 / 12: weights 8/12*14/16 ...
    scores = torch.tensor([[8, 4, 2, 1, 1, 0]]) / 16.0
    ids = torch.tensor([[0, 1, 2]])
    weights = torch.tensor([[8, 4, 2]]) / 16.0
    new_ids, new_weights, stats = _check_all(ids, weights, scores, 1, 2)
    assert new_ids == [[0, 1, 0]]
    assert new_weights[0] == pytest.approx([8 / 12 * 14 / 16, 4 / 12 * 14 / 16, 0.0])
    assert stats == [3, 2, 1, 1, 0, 1]  # slot 2 changed id and is dropped


def test_unsorted_slots_and_an_external_warm_up_set():
    # the router's slots in ascending order; an EP group's warm-up set that adds e3
    primary = torch.tensor([True, False, True, True, False, True])
    ids, _, stats = _check_all(IDS.flip(1), WEIGHTS.flip(1), SCORES, 1, 4, primary)
    # selected {e0, e2, e3, e5} (W is already 4): t0 -> e0, e3 (2); t1 -> e2, e3; t2 -> e0, e5 (2)
    assert ids == [[0, 3], [2, 3], [0, 5], [5, 2]]
    assert stats[2] == 4


# ---------------------------------------------------------------- sweeps


def _case(rng: random.Random, num_tokens, num_experts, top_k, ties: bool, softmax_renorm: bool):
    if ties:  # few distinct values: equal masses and equal scores are common
        scores = torch.tensor([[rng.randint(0, 6) / 8 for _ in range(num_experts)] for _ in range(num_tokens)])
    else:
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        scores = torch.randn(num_tokens, num_experts, generator=gen).mul(2).softmax(-1)
    weights, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    weights, ids = weights[:, :top_k], ids[:, :top_k]
    if softmax_renorm:
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-20)
    perm = torch.stack([torch.randperm(top_k, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
                        for _ in range(num_tokens)])  # the router's slot order is not assumed
    return ids.gather(1, perm).to(rng.choice([torch.int32, torch.int64])), weights.gather(1, perm), scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_random_sweep_against_the_oracle(seed, ties):
    rng = random.Random(seed * 2 + ties)
    for _ in range(25):
        num_experts = rng.choice([8, 16, 64])
        top_k = rng.choice([2, 4, 8])
        num_tokens = rng.randint(1, 40)
        num_primary = rng.randint(1, top_k - 1)
        budget = rng.randint(1, num_experts)
        ids, weights, scores = _case(rng, num_tokens, num_experts, top_k, ties, rng.random() < 0.5)
        primary = None
        if rng.random() < 0.3:  # an external warm-up set, e.g. OR-ed over an EP group
            primary = torch.rand(num_experts, generator=torch.Generator().manual_seed(rng.randrange(99))) < 0.2
            primary[ids[0, 0].long()] = True
        context = f"T={num_tokens} E={num_experts} K={top_k} S={num_primary} B={budget}"
        _check_all(ids, weights, scores, num_primary, budget, primary, context)


def test_full_budget_changes_nothing():
    # B = E: every expert is selected and each token takes its own top-k back
    rng = random.Random(7)
    ids, weights, scores = _case(rng, 12, 16, 4, False, True)
    got = _route(ids, weights, scores, 2, 16)
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    assert torch.equal(got.ids, ids.gather(1, order))
    torch.testing.assert_close(got.weights, weights.gather(1, order))
    assert got.stats.tolist()[3:] == [0, 0, 0]


def test_bf16_weights_keep_their_dtype():
    rng = random.Random(3)
    ids, weights, scores = _case(rng, 9, 16, 4, False, True)
    got = _route(ids, weights.bfloat16(), scores.bfloat16(), 1, 6)
    want_ids, want_weights, _ = oracle_xshare(ids.tolist(), weights.bfloat16().float().tolist(),
                                              scores.bfloat16().float().tolist(), 1, 6)
    assert got.weights.dtype == torch.bfloat16 and got.ids.tolist() == want_ids
    torch.testing.assert_close(got.weights.float(), torch.tensor(want_weights), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- torch.compile


def test_route_under_torch_compile_fullgraph_equals_eager():
    cfg = SereConfig(policy="xshare", num_primary=2, max_distinct=10)

    def step(ids, weights, scores):
        routed = route(cfg, ids, weights, num_experts=32, router_scores=scores)
        return routed.ids, routed.weights, routed.stats

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    rng = random.Random(11)
    for num_tokens in (5, 9, 17):
        ids, weights, scores = _case(rng, num_tokens, 32, 8, False, True)
        got, want = compiled(ids, weights, scores), step(ids, weights, scores)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1])
        assert want[2][1] <= max(10, want[2][2])  # at most max(B, |W|) distinct experts


@pytest.mark.gpu
def test_route_replays_inside_a_cuda_graph():
    """Captured once, replayed on new router outputs: fixed shapes and no host sync in xshare."""
    device = torch.device("cuda")
    cfg = SereConfig(policy="xshare", num_primary=1, max_distinct=12)
    num_tokens, num_experts, top_k = 6, 64, 8
    scores = torch.zeros(num_tokens, num_experts, device=device)  # static inputs, [T, E]
    weights = torch.zeros(num_tokens, top_k, device=device)
    ids = torch.zeros(num_tokens, top_k, dtype=torch.int32, device=device)

    def step():
        primary = torch.zeros(num_experts, dtype=torch.bool, device=device)
        primary[ids[:, 0].long()] = True  # [E] the router emits slot 0 first (sorted)
        return route(cfg, ids, weights, num_experts=num_experts, router_scores=scores, primary=primary)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routed = step()
    for seed in range(3):
        new_scores = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed)).softmax(-1)
        new_weights, new_ids = torch.topk(new_scores, top_k, dim=-1)
        scores.copy_(new_scores)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        want_ids, want_weights, want_stats = oracle_xshare(new_ids.tolist(), new_weights.tolist(),
                                                           new_scores.tolist(), 1, 12)
        assert routed.ids.cpu().tolist() == want_ids and routed.stats.cpu().tolist() == want_stats
        torch.testing.assert_close(routed.weights.cpu().double(), torch.tensor(want_weights, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- config


def test_config_needs_a_budget_and_refuses_node_limit():
    with pytest.raises(ValidationError, match="max_distinct"):
        SereConfig(policy="xshare")
    with pytest.raises(ValidationError, match="node_limit.*xshare"):
        SereConfig(policy="xshare", max_distinct=8, node_limit="primary_nodes")
    with pytest.raises(ValidationError, match="max_distinct"):
        SereConfig(policy="xshare", max_distinct=0)
    cfg = SereConfig(policy="xshare", num_primary=1, max_distinct=8)
    assert needs_router_scores(cfg) and label(cfg) == "xshare S=1 B=8"


def test_route_names_the_missing_router_scores():
    cfg = SereConfig(policy="xshare", num_primary=1, max_distinct=4)
    with pytest.raises(ValueError, match="router_scores"):
        route(cfg, IDS, WEIGHTS, num_experts=6)
