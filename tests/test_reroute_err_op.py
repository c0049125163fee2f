"""The compiled `sere::reroute_err` op (policy `sere-err`) against the loop oracle `loop_sere_err`.

Hand cases with their statistics and sweeps of the CPU op against the oracle, with and without
the refill of dropped slots. Errors, opcheck and torch.compile: test_reroute_err_op_checks.py;
the CUDA op: test_gpu_err_oea_ops.py, with the same random calls (`random_call`,
`random_refill_call`, `expected`, `compare`).
"""

import math
import random

import pytest
import torch
from oracle import error_matrix, loop_sere_err

import sere.ops
from sere.ops import ERR_STAT_FIELDS
from sere.reference import STAT_FIELDS

INF = math.inf

pytestmark = pytest.mark.usefixtures("compiled_op")  # fails, never skips, without sere._C


def test_stat_fields_extend_the_reroute_ones():
    assert ERR_STAT_FIELDS == STAT_FIELDS + ("dropped_slots",)


def test_substitute_drop_and_keep_by_hand():
    # E = 5, S = 1, P = {0, 1}, tolerance 0.5, keep_cost 0.5. Secondaries:
    #   2: best error 0.2 (to 1) -> substitute by 1
    #   3: best error 0.9 (to 0) -> drop (slot-0 expert, weight 0)
    #   4: best error 0.95, weight 0.6: cost 0.57 > 0.5 -> critical, kept
    #   token 0: [0 | 2 3]  w [.5 .3 .2]   ->  [0 | 1 0]  w [.5 .3 0]
    #   token 1: [1 | 4 2]  w [.2 .6 .2]   ->  [1 | 4 1]  w [.2 .6 .2]
    # stats: before {0..4} = 5, after {0, 1, 4} = 3, |P| = 2, rerouted 3, critical 1, dropped 1
    ids = torch.tensor([[0, 2, 3], [1, 4, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    error = error_matrix(5, {(2, 1): 0.2, (3, 0): 0.9, (4, 1): 0.95})
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5)
    assert new_ids.tolist() == [[0, 1, 0], [1, 4, 1]]
    assert torch.equal(new_w, torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.6, 0.2]]))
    assert stats.tolist() == [5, 3, 2, 3, 1, 1]
    # budget of 2 distinct experts (= |P|): no room for 4, whose error 0.95 >= 0.5 drops it
    #   token 1: [1 | 4 2]  ->  [1 | 1 1]  w [.2 0 .2]; after {0, 1}, rerouted 4, dropped 2
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, max_distinct=2
    )
    assert new_ids.tolist() == [[0, 1, 0], [1, 1, 1]]
    assert torch.equal(new_w, torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.0, 0.2]]))
    assert stats.tolist() == [5, 2, 2, 4, 0, 2]
    # renormalised: token 0 lost 0.2 of its weight 1.0, token 1 nothing
    new_ids, new_w = sere.ops.reroute_err(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, renormalize=True)
    torch.testing.assert_close(new_w, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0], [0.2, 0.6, 0.2]]))


def test_budget_keeps_the_largest_summed_cost_ties_to_the_lowest_id():
    # E = 5, S = 1, P = {0}, every error 1 (cost = weight), keep_cost 0.1, tolerance 1 (no
    # substitute: approximated slots drop). Summed cost: expert 1: .25 + .25 = .5, expert 2: .5,
    # expert 3: .75, expert 4: .2. max_distinct 3 -> room for 2 of them: 3 (.75), then 1 and 2
    # tie at .5 -> 1 (lower id). Expert 2 and 4 are dropped.
    #   [0 | 1]  [0 | 1]  [0 | 2]  [0 | 3]  [0 | 4]   ->   [0 | 1]  [0 | 1]  [0 | 0]  [0 | 3]  [0 | 0]
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3], [0, 4]], dtype=torch.int32)
    weights = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.8, 0.2]])
    error = error_matrix(5, {})
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error, 1, tolerance=1.0, keep_cost=0.1, max_distinct=3
    )
    assert new_ids.tolist() == [[0, 1], [0, 1], [0, 0], [0, 3], [0, 0]]
    assert new_w[:, 1].tolist() == [0.25, 0.25, 0.0, 0.75, 0.0]
    assert stats.tolist() == [5, 3, 1, 2, 3, 2]


def test_external_primary_and_nan_errors():
    # External P = {1, 2}; S = 1. Row 3 of `error` has a NaN among its errors to P: expert 3 is
    # unsubstitutable (error +inf) and is dropped, onto the token's slot-0 expert 0, which is not
    # in P: it stays and counts as neither critical nor kept.
    #   [0 | 3 1]  ->  [0 | 0 1]  w [.5 0 .2];   [2 | 4 0]  ->  [2 | 1 1]   (4 -> 1 at 0.25, 0 -> 1)
    ids = torch.tensor([[0, 3, 1], [2, 4, 0]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]])
    error = error_matrix(5, {(3, 2): float("nan"), (3, 1): 0.1, (4, 1): 0.25, (0, 1): 0.5})
    primary = torch.tensor([False, True, True, False, False])
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, primary=primary)
    assert new_ids.tolist() == [[0, 0, 1], [2, 1, 1]]
    assert new_w.tolist() == [[0.5, 0.0, weights[0, 2].item()], weights[1].tolist()]
    # before {0..4}, after {0, 1, 2}, |P| 2, rerouted 3, critical 0, dropped 1
    assert stats.tolist() == [5, 3, 2, 3, 0, 1]


def test_empty_batch():
    ids = torch.zeros(0, 4, dtype=torch.int64)
    weights = torch.zeros(0, 4)
    primary = torch.arange(8) < 3
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, torch.rand(8, 8), 2, 0.5, 0.0, 4, True, primary)
    assert new_ids.shape == (0, 4) and new_w.shape == (0, 4)
    assert stats.tolist() == [0, 0, 3, 0, 0, 0]


def test_refill_by_hand():
    # The first hand case with router scores. P = {0, 1}; expert 4 is kept (critical), so the
    # loaded experts are {0, 1, 4}. Token 0's dropped slot 2 (expert 3) takes the best loaded
    # expert the token lacks: 4 (it holds 0 and 1), weight .4 x 1.0 / (.1 + .1 + .1) = 4/3.
    #   [0 | 2 3]  ->  [0 | 1 4]  w [.5 .3 4/3];   [1 | 4 2]  ->  [1 | 4 1]  unchanged
    # stats: after {0, 1, 4} 3, rerouted 3, critical 1, dropped 1 (before the refill)
    ids = torch.tensor([[0, 2, 3], [1, 4, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    error = error_matrix(5, {(2, 1): 0.2, (3, 0): 0.9, (4, 1): 0.95})
    scores = torch.tensor([[0.1, 0.2, 0.1, 0.1, 0.4], [0.2] * 5])
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, router_scores=scores
    )
    assert new_ids.tolist() == [[0, 1, 4], [1, 4, 1]]
    torch.testing.assert_close(new_w, torch.tensor([[0.5, 0.3, 0.4 / 0.3], [0.2, 0.6, 0.2]]))
    assert stats.tolist() == [5, 3, 2, 3, 1, 1]
    # renormalised after the refill: token 0 sums to 1 again
    _, new_w = sere.ops.reroute_err(ids, weights, error, 1, 0.5, 0.5, renormalize=True, router_scores=scores)
    torch.testing.assert_close(new_w[0], torch.tensor([0.5, 0.3, 0.4 / 0.3]) / (0.8 + 0.4 / 0.3))


def test_refill_skips_nan_and_zero_weight_slots():
    # S = 1, P = {0}, nothing substitutes (errors 1, tolerance .5): every secondary drops.
    # External P = {0, 2, 3}. Token 0 [0 | 1 4], scores (.1 .1 NaN .3 .1): fill order 2 (NaN),
    # 3: slot 1 stays dropped (NaN fills nothing), slot 2 takes 3. Token 1 [0 | 1 4] with a
    # zero weight on slot 2: only slot 1 is refilled (with 3, the best), slot 2 stays as it is.
    ids = torch.tensor([[0, 1, 4], [0, 1, 4]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.3, 0.0]])
    scores = torch.tensor([[0.1, 0.1, math.nan, 0.3, 0.1], [0.1, 0.1, 0.2, 0.3, 0.1]])
    primary = torch.tensor([True, False, True, True, False])
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error_matrix(5, {}), 1, 0.5, primary=primary, router_scores=scores
    )
    assert new_ids.tolist() == [[0, 0, 3], [0, 3, 0]]
    assert new_w[0, 1].item() == 0.0 and new_w[1, 2].item() == 0.0
    torch.testing.assert_close(new_w[:, 1:], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert stats.tolist() == [3, 2, 3, 4, 0, 4]


# ------------------------------------------------------------------------------------------ sweep


def sample(gen, num_tokens, num_experts, top_k, quantised):
    """([T, K] int64 ids, [T, K] float32 weights, [E, E] float32 errors) from a skewed router.

    `quantised`: weights in sixteenths and errors in eighths, so that costs, their sums and the
    errors tie often (exercising every tie-break); else softmax weights. About 1% of the
    errors are NaN (a NaN among a row's errors to P makes that expert unsubstitutable)."""
    bias = torch.randn(num_experts, generator=gen) * 1.5  # [E] some experts are popular
    logits = torch.randn(num_tokens, num_experts, generator=gen) + bias  # [T, E]
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if quantised:
        weights = torch.randint(1, 17, weights.shape, generator=gen).float().sort(1, descending=True).values / 16
    error = (torch.rand(num_experts, num_experts, generator=gen) * 1.4 * 8).floor() / 8
    if not quantised:
        error = error + torch.rand(num_experts, num_experts, generator=gen) / 64
    error[torch.rand(num_experts, num_experts, generator=gen) < 0.01] = math.nan
    return ids, weights, error.fill_diagonal_(0.0)


def compare(case, got, want, exact_weights):
    """Ids and stats exactly; weights exactly, or (renormalised, refilled) to float tolerance."""
    new_ids, new_w, stats = (t.cpu() for t in got)
    want_ids, want_w, want_stats = want
    assert new_ids.tolist() == want_ids, case
    assert stats.tolist() == want_stats, f"{case}: {stats.tolist()} != {want_stats}"
    want_w = torch.tensor(want_w, dtype=torch.float64).to(new_w.dtype)  # the dtype's rounding
    if exact_weights:
        assert torch.equal(new_w, want_w), case
    else:
        tol = 1e-5 if new_w.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(new_w.float(), want_w.float(), rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{case}: {m}")


def expected(args, router_scores=None):
    """The loop oracle's (ids, weights, stats) for a `random_call` argument tuple, on CPU."""
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    scores = None if router_scores is None else router_scores.cpu()
    return loop_sere_err(*args, router_scores=scores)


def _own_primary(ids, num_primary):
    mask = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.bool)
    mask[ids[:, :num_primary].reshape(-1)] = True
    return mask


def random_call(rng, gen, num_tokens, num_experts, top_k, tolerance, keep_cost, budget, renormalize):
    ids, weights, error = sample(gen, num_tokens, num_experts, top_k, quantised=rng.random() < 0.5)
    num_primary = rng.randrange(1, top_k)
    primary = None
    if rng.random() < 0.3:  # an EP group's union: own primaries plus others
        primary = torch.rand(num_experts, generator=gen) < 0.2
        primary[ids[:, :num_primary].reshape(-1)] = True
    elif rng.random() < 0.05:
        primary = torch.zeros(num_experts, dtype=torch.bool)  # nothing loaded anywhere
    size = int(primary.sum()) if primary is not None else int(_own_primary(ids, num_primary).sum())
    max_distinct = max(1, size + rng.choice((0, 1, 2))) if budget else None
    ids = ids.to(rng.choice((torch.int32, torch.int64)))
    weights = weights.to(rng.choice((torch.float32, torch.bfloat16, torch.float16)))
    error = error.to(rng.choice((torch.float32, torch.bfloat16)))
    return ids, weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary


def case_name(args):
    ids, weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary = args
    return (
        f"T={ids.shape[0]} E={error.shape[0]} K={ids.shape[1]} S={num_primary} tol={tolerance} "
        f"keep={keep_cost} max_distinct={max_distinct} renorm={renormalize} {ids.dtype} {weights.dtype} "
        f"{error.dtype} external={primary is not None}"
    )


KNOBS = [
    (tolerance, keep_cost, budget, renormalize)
    for tolerance in (0.3, 1.0)
    for keep_cost, budget in ((INF, False), (0.05, False), (0.05, True), (0.01, True))
    for renormalize in (False, True)
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "tol{}-keep{}-budget{}-renorm{}".format(*k))
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 4), (8, 8), (64, 4), (64, 8), (128, 8)])
def test_sweep_against_the_loop_oracle(num_experts, top_k, knobs):
    seed = num_experts * 1000 + top_k * 100 + KNOBS.index(knobs)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for num_tokens in (1, rng.randint(2, 48), rng.randint(49, 512)):
        args = random_call(rng, gen, num_tokens, num_experts, top_k, *knobs)
        got = sere.ops.reroute_err_with_stats(*args)
        compare(case_name(args), got, expected(args), exact_weights=not knobs[3])


# ------------------------------------------------------------------------------------- refill


def random_refill_call(rng, gen, num_tokens, num_experts, top_k, knobs, no_substitutes=False):
    """A `random_call` and [T, E] router scores (some ties, a rare NaN)."""
    args = list(random_call(rng, gen, num_tokens, num_experts, top_k, *knobs))
    if no_substitutes:  # S = 1, no substitute anywhere: every slot outside P is dropped or kept
        args[2] = torch.ones_like(args[2]).fill_diagonal_(0.0)
        args[3], args[8] = 1, None
        if args[6] is not None:
            args[6] = int(_own_primary(args[0].long(), 1).sum()) + 2
    scores = (torch.randn(num_tokens, num_experts, generator=gen) * 2).softmax(1)  # [T, E]
    if rng.random() < 0.5:
        scores = (scores * 32).round() / 32  # ties
    if rng.random() < 0.2:
        scores[rng.randrange(num_tokens), rng.randrange(num_experts)] = math.nan
    return args, scores.to(rng.choice((torch.float32, torch.bfloat16)))


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "tol{}-keep{}-budget{}-renorm{}".format(*k))
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 4), (64, 8), (128, 8)])
def test_refill_sweep_against_the_loop_oracle(num_experts, top_k, knobs):
    """`router_scores=`: dropped slots refilled inside the op from the loaded experts."""
    seed = 7 + num_experts * 1000 + top_k * 100 + KNOBS.index(knobs)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    refilled = 0
    for k, num_tokens in enumerate((1, rng.randint(2, 48), rng.randint(2, 48), rng.randint(49, 256))):
        args, scores = random_refill_call(rng, gen, num_tokens, num_experts, top_k, knobs, k % 2 == 1)
        got = sere.ops.reroute_err_with_stats(*args, router_scores=scores)
        compare(case_name(args), got, expected(args, scores), exact_weights=False)
        plain_w = sere.ops.reroute_err_with_stats(*args)[1]
        refilled += int(((plain_w == 0) & (got[1] != 0)).sum())
    if num_experts >= 64 and (knobs[1] == INF or knobs[2]):  # drops with loaded experts to refill
        assert refilled > 0
