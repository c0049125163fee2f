"""`sere.policy.route` and `sere.reference` against the plain-loop oracles of tests/oracle.py.

Hand-worked cases first (the oracle is checked against them too), then seeded random sweeps over
E in {8, 16, 64}, K in {4, 8}, S in [1, K), T in [1, 40], with ties in similarities, errors,
scores and weights, NaN rows, external primary masks (all-False included) and bf16 weights.
Ids compare exactly, weights within a float tolerance, `route`'s 6 statistics exactly.
"""

import math
import random
from typing import NamedTuple

import pytest
import torch

import oracle
from sere.config import SereConfig
from sere.locality import locality_reroute
from sere.policy import route
from sere.reference import oea_reference, reroute_reference, reroute_stats, sere_err_reference


pytestmark = pytest.mark.usefixtures("one_thread")


class Placement(NamedTuple):
    """The two things `route` reads from an expert placement."""

    expert_to_rank: torch.Tensor  # [E] int64
    node_of_expert: torch.Tensor  # [E] int64

    def expert_to_node(self) -> torch.Tensor:
        return self.node_of_expert


def _tolerance(dtype):
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)


def assert_same(got_ids, got_weights, want_ids, want_weights, context=""):
    """Ids exactly, weights (in the input dtype) within its tolerance."""
    assert got_ids.tolist() == want_ids, context
    want = torch.tensor(want_weights, dtype=torch.float64).reshape(got_weights.shape)
    torch.testing.assert_close(got_weights.double(), want, **_tolerance(got_weights.dtype),
                               msg=lambda m: f"{context}\n{m}")


def check_route(cfg, ids, weights, context="", **kwargs):
    """`route` equals the oracle: ids, weights, stats, rerouted; returns the oracle's answer."""
    got = route(cfg, ids, weights, **kwargs)
    want_ids, want_weights, want_stats, want_rerouted = oracle.route(cfg, ids, weights, **kwargs)
    assert got.rerouted == want_rerouted, context
    assert_same(got.ids, got.weights, want_ids, want_weights, context)
    assert got.stats.dtype == torch.int64 and got.stats.tolist() == want_stats, context
    assert got.ids.dtype == ids.dtype and got.weights.dtype == weights.dtype, context
    return want_ids, want_weights, want_stats


# ---------------------------------------------------------------- hand-worked cases

def _close(got, want):
    """Nested lists of floats equal up to float32 rounding of the inputs."""
    return all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(sum(got, []), sum(want, [])))


def _sim(num_experts, rows):
    """Identity similarity plus the listed {e: {p: value}} entries."""
    sim = torch.eye(num_experts)
    for e, row in rows.items():
        for p, value in row.items():
            sim[e, p] = value
    return sim


def test_sere_by_hand():
    # Slots arrive unsorted; route sorts them by weight (stable): t0 -> [0 | 3 5], t1 -> [1 | 4 0].
    # P = {0, 1}. 3 -> 1 (0.75 > 0.5); 5 -> 0 (0.625 tie, lowest id); 4 -> 0 (0 = 0 tie); 0 in P.
    ids = torch.tensor([[3, 0, 5], [1, 4, 0]])
    weights = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]])
    sim = _sim(6, {3: {1: 0.75, 0: 0.5}, 5: {0: 0.625, 1: 0.625}})
    cfg = SereConfig(policy="sere", num_primary=1)
    sorted_w = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]
    # stats: distinct {0,1,3,4,5} -> {0,1}; |P| = 2; 3 slots changed; none critical or dropped
    assert check_route(cfg, ids, weights, num_experts=6, matrix=sim) == (
        [[0, 1, 0], [1, 0, 0]], sorted_w, [5, 2, 2, 3, 0, 0])
    # rho = 0.5: expert 4's best similarity 0 < 0.5 keeps it (critical); it does not join P
    assert check_route(cfg, ids, weights, num_experts=6, matrix=sim, threshold=0.5) == (
        [[0, 1, 0], [1, 4, 0]], sorted_w, [5, 3, 2, 2, 1, 0])
    assert check_route(SereConfig(policy="sere", num_primary=1, threshold=0.5), ids, weights,
                       num_experts=6, matrix=sim)[2] == [5, 3, 2, 2, 1, 0]
    # external P = {1, 4} (an EP group's OR): 3 -> 1, 5 -> 1; 4 stays; 0 -> 1 (0 = 0 tie, lowest)
    primary = torch.tensor([False, True, False, False, True, False])
    assert check_route(cfg, ids, weights, num_experts=6, matrix=sim, primary=primary) == (
        [[0, 1, 1], [1, 4, 1]], sorted_w, [5, 3, 2, 3, 0, 0])
    # all-False P: nothing to re-route to; the 4 secondaries are kept outside P
    assert check_route(cfg, ids, weights, num_experts=6, matrix=sim, primary=torch.zeros(6, dtype=torch.bool)) == (
        [[0, 3, 5], [1, 4, 0]], sorted_w, [5, 5, 0, 0, 4, 0])


def test_oea_by_hand():
    # S = 1, P = {0, 1, 5}. Each token keeps slot 0 and takes P minus its own head by score:
    #   t0 [0 | 2 3]: {1: .1, 5: .05}          -> [0 1 5], raw [.4 .1 .05] x 1/.55
    #   t1 [1 | 4 2]: {0: .2, 5: .2} tie -> 0  -> [1 0 5], raw [.3 .2 .2] x 1/.7
    #   t2 [5 | 3 4]: {0: .2, 1: .2} tie -> 0  -> [5 0 1], raw [.1 .2 .2] x 1/.5
    ids = torch.tensor([[0, 2, 3], [1, 4, 2], [5, 3, 4]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.5, 0.25, 0.25]])
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.15, 0.0, 0.05],
                           [0.2, 0.3, 0.1, 0.1, 0.3, 0.2],
                           [0.2, 0.2, 0.1, 0.3, 0.1, 0.1]])
    want_ids = [[0, 1, 5], [1, 0, 5], [5, 0, 1]]
    want_w = [[0.4 / 0.55, 0.1 / 0.55, 0.05 / 0.55], [3 / 7, 2 / 7, 2 / 7], [0.2, 0.4, 0.4]]
    got = oracle.oea(ids, weights, scores, 1)
    assert got.ids == want_ids and _close(got.weights, want_w)
    assert_same(*oea_reference(ids, weights, scores, 1), want_ids, want_w)
    # external P = {0}: t0 has nothing left (2 slots repeat 0 at weight 0), t1 and t2 take 0
    primary = torch.tensor([True] + [False] * 5)
    want_ids_ext = [[0, 0, 0], [1, 0, 1], [5, 0, 5]]
    want_w_ext = [[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [1 / 3, 2 / 3, 0.0]]
    assert_same(*oea_reference(ids, weights, scores, 1, primary), want_ids_ext, want_w_ext)
    cfg = SereConfig(policy="oea", num_primary=1)
    # stats: 6 distinct -> 3, |P| 3, 6 slots changed, 0 critical, 0 unfilled
    assert check_route(cfg, ids, weights, num_experts=6, router_scores=scores)[2] == [6, 3, 3, 6, 0, 0]
    # |P| = 1, 6 slots changed, 4 slots unfilled
    assert check_route(cfg, ids, weights, num_experts=6, router_scores=scores, primary=primary)[2] == [
        6, 3, 1, 6, 0, 4]


def _sere_err_case():
    """E = 5, K = 3, S = 1, P = {0, 1}; weights dyadic so every cost is exact.

    errors: 2 -> 1 is 0.25, 3 -> 0 is 0.875, 4 -> 1 is 0.75, every other pair 1, diagonal 0.
    costs (weight x error): t0: 2 .0625, 3 .21875 | t1: 4 .28125, 2 .03125 | t2: 3 .21875, 4 .1875
    """
    ids = torch.tensor([[0, 2, 3], [1, 4, 2], [0, 3, 4]])
    weights = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.375, 0.125], [0.5, 0.25, 0.25]])
    error = torch.ones(5, 5).fill_diagonal_(0.0)
    error[2, 1], error[3, 0], error[4, 1] = 0.25, 0.875, 0.75
    scores = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1], [0.1, 0.5, 0.1, 0.1, 0.2], [0.3, 0.3, 0.1, 0.2, 0.2]])
    return ids, weights, error, scores


SERE_ERR_HAND = [
    # tolerance 1: every secondary substituted
    (dict(), [[0, 1, 0], [1, 1, 1], [0, 0, 1]],
     [[0.5, 0.25, 0.25], [0.5, 0.375, 0.125], [0.5, 0.25, 0.25]], [5, 2, 2, 6, 0, 0]),
    # tolerance .5: 3 and 4 (errors .875, .75) are dropped: slot-0 id, weight 0
    (dict(tolerance=0.5), [[0, 1, 0], [1, 1, 1], [0, 0, 0]],
     [[0.5, 0.25, 0.0], [0.5, 0.0, 0.125], [0.5, 0.0, 0.0]], [5, 2, 2, 6, 0, 4]),
    # keep_cost .2: the slots of cost .21875, .28125, .21875 keep 3, 4, 3; 4 at .1875 is dropped
    (dict(tolerance=0.5, keep_cost=0.2), [[0, 1, 3], [1, 4, 1], [0, 3, 0]],
     [[0.5, 0.25, 0.25], [0.5, 0.375, 0.125], [0.5, 0.25, 0.0]], [5, 4, 2, 3, 3, 1]),
    # + max_distinct 3: room for one critical expert; 3 (summed .4375) beats 4 (.28125), although
    # 4 has the largest single cost. 4 is then dropped.
    (dict(tolerance=0.5, keep_cost=0.2, max_distinct=3), [[0, 1, 3], [1, 1, 1], [0, 3, 0]],
     [[0.5, 0.25, 0.25], [0.5, 0.0, 0.125], [0.5, 0.25, 0.0]], [5, 3, 2, 4, 2, 2]),
    # renormalised: each token back to weight sum 1 (.75, .625, .5 left)
    (dict(tolerance=0.5, renormalize=True), [[0, 1, 0], [1, 1, 1], [0, 0, 0]],
     [[2 / 3, 1 / 3, 0.0], [0.8, 0.0, 0.2], [1.0, 0.0, 0.0]], [5, 2, 2, 6, 0, 4]),
    # refill from loaded {0, 1}, weight = score x 1.25 (t0, t1) or x 1/.7 (t2):
    # t0 has no unchosen loaded expert; t1's slot 1 takes 0; t2's slot 1 takes 1, slot 2 stays dropped
    (dict(tolerance=0.5, refill=True), [[0, 1, 0], [1, 0, 1], [0, 1, 0]],
     [[0.5, 0.25, 0.0], [0.5, 0.125, 0.125], [0.5, 3 / 7, 0.0]], [5, 2, 2, 6, 0, 4]),
    # all together: the budget case, refilled from {0, 1, 3} (t1: 0 and 3 tie at .1 -> 0;
    # t2 takes 1), then renormalised
    (dict(tolerance=0.5, keep_cost=0.2, max_distinct=3, refill=True, renormalize=True),
     [[0, 1, 3], [1, 0, 1], [0, 3, 1]],
     [[0.5, 0.25, 0.25], [2 / 3, 1 / 6, 1 / 6], [14 / 33, 7 / 33, 12 / 33]], [5, 3, 2, 4, 2, 2]),
]


@pytest.mark.parametrize("params, want_ids, want_weights, want_stats", SERE_ERR_HAND)
def test_sere_err_by_hand(params, want_ids, want_weights, want_stats):
    ids, weights, error, scores = _sere_err_case()
    args = dict(params)
    refill = args.pop("refill", False)
    got = oracle.sere_err(ids, weights, error, 1, router_scores=scores if refill else None, **args)
    assert got.ids == want_ids and _close(got.weights, want_weights)
    assert_same(*sere_err_reference(ids, weights, error, 1, router_scores=scores if refill else None, **args),
                want_ids, want_weights)
    cfg = SereConfig(policy="sere-err", num_primary=1, **params)
    assert check_route(cfg, ids, weights, num_experts=5, matrix=error, router_scores=scores)[2] == want_stats


def test_refill_leaves_a_zero_weight_slot_dropped():
    # P = {0, 1}; every error 1 >= tolerance: all secondaries dropped. t0's slot 2 had weight 0:
    # it is not refilled. t0's slot 1 takes 1 (score .5) at .5 x 1/(.1+.1+.1).
    ids = torch.tensor([[0, 2, 3], [1, 2, 4]])
    weights = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.25, 0.25]])
    error = torch.ones(5, 5).fill_diagonal_(0.0)
    scores = torch.tensor([[0.1, 0.5, 0.1, 0.1, 0.2], [0.1, 0.3, 0.2, 0.2, 0.2]])
    want_ids, want_w = [[0, 1, 0], [1, 0, 1]], [[0.75, 0.5 / 0.3, 0.0], [0.5, 0.1 / 0.7, 0.0]]
    got = oracle.sere_err(ids, weights, error, 1, tolerance=0.5, router_scores=scores)
    assert got.ids == want_ids and _close(got.weights, want_w)
    assert_same(*sere_err_reference(ids, weights, error, 1, tolerance=0.5, router_scores=scores), want_ids, want_w)


def _locality_case():
    """E = 8, 4 ranks of 2 experts (rank e // 2), 2 ranks per node (node e // 4); P = {0, 2, 4}."""
    ids = torch.tensor([[0, 5, 6], [2, 7, 1], [4, 3, 0]])
    weights = torch.tensor([[0.5, 0.25, 0.25]] * 3)
    sim = _sim(8, {5: {0: 0.5, 2: 0.5, 4: 0.75}, 6: {0: 0.25, 2: 0.5, 4: 0.5}, 7: {0: 0.5, 2: 0.25, 4: 0.625},
                   1: {0: 0.5, 2: 0.5, 4: 0.5}, 3: {0: 0.5, 2: 0.625, 4: 0.375}})
    placement = Placement(torch.arange(8) // 2, torch.arange(8) // 4)
    return ids, weights, sim, placement


@pytest.mark.parametrize("epsilon, threshold, want_ids, want_stats", [
    # eps 0, ties only: t0's 6 ties 2/4 -> 4 (rank of its slot-1 target 4); t1's 1 ties all -> 2 (own rank)
    (0.0, 0.0, [[0, 4, 4], [2, 4, 2], [4, 2, 0]], [8, 3, 3, 5, 0, 0]),
    # eps .25: the token's own rank wins (tier 3), then its node (tier 2)
    (0.25, 0.0, [[0, 0, 0], [2, 0, 0], [4, 0, 0]], [8, 3, 3, 5, 0, 0]),
    # rho .55 keeps 6 and 1 (best .5); their ranks count as already reached
    (0.25, 0.55, [[0, 0, 6], [2, 0, 1], [4, 0, 0]], [8, 5, 3, 3, 2, 0]),
])
def test_locality_by_hand(epsilon, threshold, want_ids, want_stats):
    ids, weights, sim, placement = _locality_case()
    got = oracle.sere_locality(ids, weights, sim, 1, placement.expert_to_rank, placement.expert_to_node(),
                               epsilon, threshold)
    assert got.ids == want_ids
    cfg = SereConfig(policy="sere", num_primary=1, locality_epsilon=epsilon)
    assert check_route(cfg, ids, weights, num_experts=8, matrix=sim, threshold=threshold,
                       placement=placement) == (want_ids, weights.tolist(), want_stats)
    # plain SERE for comparison: lowest-id ties, no locality
    assert oracle.sere(ids, weights, sim, 1).ids == [[0, 4, 2], [2, 4, 0], [4, 2, 0]]


@pytest.mark.parametrize("cfg, step_tokens", [
    (SereConfig(policy="sere", num_primary=1, max_decode_tokens=2), None),  # T = 3 > 2
    (SereConfig(policy="sere", num_primary=1), 0),  # an empty EP step
    (SereConfig(policy="sere", num_primary=1, max_decode_tokens=8), 9),  # the group's step is prefill
    (SereConfig(policy="topk"), None),
])
def test_route_leaves_a_step_alone(cfg, step_tokens):
    ids, weights, sim, _ = _locality_case()
    got = route(cfg, ids, weights, num_experts=8, matrix=sim, step_tokens=step_tokens)
    assert got.ids is ids and got.weights is weights and got.rerouted is False
    assert got.stats.tolist() == [8, 8, 0, 0, 0, 0]  # distinct {0..7} on both sides
    assert oracle.route(cfg, ids, weights, num_experts=8, step_tokens=step_tokens)[2:] == ([8, 8, 0, 0, 0, 0], False)


def test_nan_similarity_keeps_the_slot():
    # a NaN among expert 5's similarities to P: nothing to compare, 5 stays (counted as critical)
    ids, weights, sim, _ = _locality_case()
    sim[5, 2] = float("nan")
    want_ids = [[0, 5, 2], [2, 4, 0], [4, 2, 0]]  # 6 -> 2 (tie with 4), 7 -> 4, 1 -> 0 (tie), 3 -> 2
    assert oracle.sere(ids, weights, sim, 1).ids == want_ids
    assert reroute_reference(ids, weights, sim, 1)[0].tolist() == want_ids
    assert check_route(SereConfig(policy="sere", num_primary=1), ids, weights, num_experts=8, matrix=sim)[::2] == (
        want_ids, [8, 4, 3, 4, 1, 0])
    # -inf to every primary is "nothing to re-route to" too (reference); one -inf is just small
    sim[5, 2], sim[5, 0], sim[5, 4] = float("-inf"), float("-inf"), float("-inf")
    sim[6, 2] = float("-inf")  # 6 -> 4 now
    want_ids = [[0, 5, 4], [2, 4, 0], [4, 2, 0]]
    assert oracle.sere(ids, weights, sim, 1).ids == want_ids == reroute_reference(ids, weights, sim, 1)[0].tolist()


@pytest.mark.parametrize("primary, nan_row", [(torch.zeros(8, dtype=torch.bool), None), (None, 5)])
def test_locality_keeps_what_sere_keeps(primary, nan_row):
    """An empty P, or a NaN similarity to P, leaves the slot alone, as in plain SERE; the other
    slots follow the locality tiers."""
    ids, weights, sim, placement = _locality_case()
    if nan_row is not None:
        sim[nan_row, 2] = float("nan")
    want_ids = oracle.sere_locality(ids, weights, sim, 1, placement.expert_to_rank, placement.expert_to_node(), 0.25,
                                    primary=primary).ids
    plain = oracle.sere(ids, weights, sim, 1, primary=primary).ids
    for token, (want_row, plain_row) in enumerate(zip(want_ids, plain)):
        for slot in range(1, 3):
            if plain_row[slot] == ids[token, slot]:  # plain SERE keeps it: so does locality
                assert want_row[slot] == plain_row[slot]
    got, _ = locality_reroute(ids, weights, sim, 1, placement.expert_to_rank, 0.25, 0.0, primary,
                              placement.expert_to_node())
    assert got.tolist() == want_ids


# ---------------------------------------------------------------- random sweeps

class Case(NamedTuple):
    ids: torch.Tensor  # [T, K] int64 (int32 for odd seeds), slots in random order
    weights: torch.Tensor  # [T, K] float32 or bf16, > 0, ties frequent
    sim: torch.Tensor  # [E, E] float32, diagonal 1
    error: torch.Tensor  # [E, E] float32, diagonal 0
    scores: torch.Tensor  # [T, E] float32 router scores
    primary: torch.Tensor | None  # [E] bool or None
    num_primary: int
    num_experts: int


def _quantised(gen, shape, levels):
    """Uniform [0, 1) values, floored to `levels` steps when given (frequent exact ties)."""
    values = torch.rand(shape, generator=gen)
    return values if levels is None else (values * levels).floor() / levels


def random_case(seed, *, nan_rows=False, bf16=False, primary_kind=None) -> Case:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    E, K = rng.choice([8, 16, 64]), rng.choice([4, 8])
    S, T = rng.randint(1, K - 1), rng.randint(1, 40)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    ids = ids.to(torch.int32 if seed % 2 else torch.int64)
    weights = _quantised(gen, (T, K), rng.choice([4, 16, None])) + 1 / 16
    sim = _quantised(gen, (E, E), rng.choice([4, 8, None])).fill_diagonal_(1.0)
    error = (_quantised(gen, (E, E), rng.choice([8, None])) * 1.4).fill_diagonal_(0.0)
    scores = _quantised(gen, (T, E), rng.choice([8, None]))
    if nan_rows:
        rows = torch.randint(0, E, (2,), generator=gen)
        sim[rows], error[rows] = float("nan"), float("nan")
        if rng.random() < 0.5:  # a NaN at one entry only
            sim[rows[0], :] = sim[rows[0] - 1, :].nan_to_num(0.5)
            error[rows[0], :] = error[rows[0] - 1, :].nan_to_num(0.5)
            sim[rows[0], rng.randrange(E)], error[rows[0], rng.randrange(E)] = float("nan"), float("nan")
    primary = None
    if primary_kind == "mask":
        primary = torch.rand(E, generator=gen) < 0.3
    elif primary_kind == "none":
        primary = torch.zeros(E, dtype=torch.bool)
    return Case(ids, weights.to(torch.bfloat16) if bf16 else weights, sim, error, scores, primary, S, E)


def _variants(num_seeds):
    """(seed, bf16, primary kind) triples covering every combination."""
    kinds = [None, "mask", "none"]
    return [(seed, seed % 4 == 3, kinds[seed % 3]) for seed in range(num_seeds)]


@pytest.mark.parametrize("seed, bf16, primary_kind", _variants(36))
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_reference_sere_and_oea_sweep(seed, bf16, primary_kind, threshold):
    c = random_case(seed, nan_rows=seed % 2 == 0, bf16=bf16, primary_kind=primary_kind)
    context = f"seed={seed} E={c.num_experts} S={c.num_primary} T={c.ids.shape[0]}"
    sim = c.sim.to(torch.bfloat16) if seed % 5 == 0 else c.sim
    want = oracle.sere(c.ids, c.weights, sim, c.num_primary, threshold, c.primary)
    new_ids, new_weights = reroute_reference(c.ids, c.weights, sim, c.num_primary, threshold, c.primary)
    assert new_ids.tolist() == want.ids and new_weights is c.weights, context
    P = oracle.primary_set(c.ids, c.num_primary, c.primary)
    assert reroute_stats(c.ids, new_ids, c.num_experts, c.num_primary, c.primary).tolist() == oracle.stats(
        c.ids, want, P)[:5], context
    want = oracle.oea(c.ids, c.weights, c.scores, c.num_primary, c.primary)
    assert_same(*oea_reference(c.ids, c.weights, c.scores, c.num_primary, c.primary), want.ids, want.weights,
                context)


SERE_ERR_SWEEP = [
    dict(),
    dict(tolerance=0.5),
    dict(tolerance=0.6, keep_cost=0.05),
    dict(tolerance=0.6, keep_cost=0.02, max_distinct=6),
    dict(tolerance=0.8, renormalize=True),
    dict(tolerance=0.5, refill=True),
    dict(tolerance=0.6, keep_cost=0.02, max_distinct=10, refill=True, renormalize=True),
    dict(tolerance=1.0, keep_cost=0.0, max_distinct=1, refill=True),
]


@pytest.mark.parametrize("seed, bf16, primary_kind", _variants(18))
@pytest.mark.parametrize("params", SERE_ERR_SWEEP, ids=str)
def test_sere_err_sweep(seed, bf16, primary_kind, params):
    c = random_case(seed, nan_rows=seed % 2 == 0, bf16=bf16, primary_kind=primary_kind)
    context = f"seed={seed} E={c.num_experts} S={c.num_primary} T={c.ids.shape[0]} {params}"
    args = dict(params)
    scores = c.scores if args.pop("refill", False) else None
    want = oracle.sere_err(c.ids, c.weights, c.error, c.num_primary, primary=c.primary, router_scores=scores, **args)
    got = sere_err_reference(c.ids, c.weights, c.error, c.num_primary, primary=c.primary, router_scores=scores, **args)
    assert_same(*got, want.ids, want.weights, "reference " + context)
    cfg = SereConfig(policy="sere-err", num_primary=c.num_primary, **params)
    check_route(cfg, c.ids, c.weights, "route " + context, num_experts=c.num_experts, matrix=c.error,
                router_scores=c.scores, primary=c.primary)


@pytest.mark.parametrize("seed, bf16, primary_kind", _variants(24))
def test_route_sere_sweep(seed, bf16, primary_kind):
    c = random_case(seed, nan_rows=seed % 2 == 0, bf16=bf16, primary_kind=primary_kind)
    for threshold in (0.0, 0.25, 0.5):
        cfg = SereConfig(policy="sere", num_primary=c.num_primary, threshold=threshold)
        check_route(cfg, c.ids, c.weights, f"seed={seed} rho={threshold}", num_experts=c.num_experts,
                    matrix=c.sim, primary=c.primary)


@pytest.mark.parametrize("seed, bf16, primary_kind", _variants(24))
def test_route_oea_sweep(seed, bf16, primary_kind):
    c = random_case(seed, bf16=bf16, primary_kind=primary_kind)
    check_route(SereConfig(policy="oea", num_primary=c.num_primary), c.ids, c.weights, f"seed={seed}",
                num_experts=c.num_experts, router_scores=c.scores, primary=c.primary)


@pytest.mark.parametrize("seed, bf16, primary_kind", [v for v in _variants(24) if v[2] != "none"])
@pytest.mark.parametrize("epsilon", [0.0, 0.125, 0.3])
def test_route_locality_sweep(seed, bf16, primary_kind, epsilon):
    c = random_case(seed, bf16=bf16, primary_kind=primary_kind)
    world = random.Random(seed).choice([2, 4, 8])
    ranks_per_node = random.Random(seed + 1).choice([1, 2, world])
    owner = torch.randperm(c.num_experts, generator=torch.Generator().manual_seed(seed)) % world
    placement = Placement(owner, owner // ranks_per_node)
    for threshold in (0.0, 0.5):
        cfg = SereConfig(policy="sere", num_primary=c.num_primary, locality_epsilon=epsilon)
        check_route(cfg, c.ids, c.weights, f"seed={seed} eps={epsilon} rho={threshold}",
                    num_experts=c.num_experts, matrix=c.sim, threshold=threshold, primary=c.primary,
                    placement=placement)
