"""The error-aware policy `sere-err` against hand cases and the plain-loop oracle of tests/oracle.py."""

import math

import pytest
import torch

import oracle
from oracle import error_matrix
from sere.reference import primary_mask, sere_err_reference


def test_substitute_drop_and_keep_by_hand():
    # P = {0, 1}. Secondaries: 2 (err to 1 is 0.2 -> substitute), 3 (best err 0.9 -> drop),
    # 4 (err 0.95 but weight 0.6: cost 0.57 > keep_cost 0.5 -> critical, kept).
    #   token 0: [0 | 2 3]  w [.5 .3 .2]   ->  [0 | 1 0]  w [.5 .3 0]
    #   token 1: [1 | 4 2]  w [.2 .6 .2]   ->  [1 | 4 1]  w [.2 .6 .2]
    ids = torch.tensor([[0, 2, 3], [1, 4, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    error = error_matrix(5, {(2, 1): 0.2, (3, 0): 0.9, (4, 1): 0.95})
    new_ids, new_w = sere_err_reference(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5)
    assert new_ids.tolist() == [[0, 1, 0], [1, 4, 1]]
    torch.testing.assert_close(new_w, torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.6, 0.2]]))
    # a budget of 2 distinct experts (= |P|) leaves no room for the critical expert 4: it is
    # approximated, and its best error 0.95 >= tolerance drops it
    new_ids, new_w = sere_err_reference(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, max_distinct=2)
    assert new_ids.tolist() == [[0, 1, 0], [1, 1, 1]]
    assert new_w[1, 1] == 0
    # renormalised: token 0 lost 0.2 of weight 1.0
    _, new_w = sere_err_reference(ids, weights, error, 1, tolerance=0.5, renormalize=True)
    torch.testing.assert_close(new_w[0], torch.tensor([0.5, 0.3, 0.0]) / 0.8)


def test_ties_go_to_the_lowest_primary():
    ids = torch.tensor([[3, 0], [1, 2]])  # P = {1, 3}; expert 0 and 2 are equally close to both
    error = error_matrix(4, {(0, 1): 0.3, (0, 3): 0.3, (2, 1): 0.4, (2, 3): 0.4})
    new_ids, _ = sere_err_reference(ids, torch.ones(2, 2), error, 1)
    assert new_ids.tolist() == [[3, 1], [1, 1]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tolerance", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("keep_cost, max_distinct", [(math.inf, None), (0.05, None), (0.05, 6)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_equals_loop_transcription(seed, tolerance, keep_cost, max_distinct, renormalize):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(12, 16, generator=gen).softmax(1)
    weights, ids = scores.topk(4, dim=1)
    error = (torch.rand(16, 16, generator=gen) * 1.4 * 8).floor() / 8  # quantised: frequent ties
    error.fill_diagonal_(0.0)
    new_ids, new_w = sere_err_reference(ids, weights, error, 2, tolerance, keep_cost, max_distinct, renormalize)
    want_ids, want_w, _, _ = oracle.sere_err(ids, weights, error, 2, tolerance, keep_cost, max_distinct, renormalize)
    assert new_ids.tolist() == want_ids
    torch.testing.assert_close(new_w, torch.tensor(want_w))
    experts = set(new_ids[new_w > 0].tolist()) | set(primary_mask(ids, 16, 2).nonzero().flatten().tolist())
    if max_distinct is not None:
        assert len(experts) <= max(max_distinct, int(primary_mask(ids, 16, 2).sum()))


def test_bad_tolerance_is_named():
    with pytest.raises(ValueError, match="tolerance=1.5"):
        sere_err_reference(torch.tensor([[0, 1]]), torch.ones(1, 2), torch.zeros(2, 2), 1, tolerance=1.5)


def _canonical(ids, weights):
    """Per token {expert: summed weight} over slots with weight > 0 (slot order ignored)."""
    rows = []
    for row_ids, row_w in zip(ids.tolist(), weights.tolist()):
        merged = {}
        for e, w in zip(row_ids, row_w):
            if w > 1e-7:
                merged[e] = merged.get(e, 0.0) + w
        rows.append(merged)
    return rows


def _assert_same_routing(a, b):
    for got, want in zip(_canonical(*a), _canonical(*b)):
        assert got.keys() == want.keys()
        assert all(math.isclose(got[e], want[e], rel_tol=1e-5, abs_tol=1e-7) for e in got)


def test_refill_by_hand():
    # P = {0, 1} (S = 1). Every secondary is dropped (errors 1 >= tolerance), then refilled with
    # the loaded experts the token has not chosen, highest router score first:
    #   token 0: [0 | 2 3]  scores 0:.4 1:.3 2:.2 3:.1  -> [0 | 1 0]: only expert 1 is left
    #   token 1: [1 | 3 2]  scores 1:.5 0:.1 3:.3 2:.1  -> [1 | 0 1]: expert 0, then nothing
    ids = torch.tensor([[0, 2, 3], [1, 3, 2]])
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.1, 0.3]])
    weights = scores.gather(1, ids) / scores.gather(1, ids).sum(1, keepdim=True)  # renormalised top-3
    new_ids, new_w = sere_err_reference(ids, weights, error_matrix(4, {}), 1, tolerance=0.5, router_scores=scores)
    assert new_ids.tolist() == [[0, 1, 0], [1, 0, 1]]
    # weight = score x (sum of top-k weights / sum of their scores): 0.3 / 0.7 and 0.1 / 0.9
    torch.testing.assert_close(new_w, torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0.0], [0.5 / 0.9, 0.1 / 0.9, 0.0]]))


@pytest.mark.parametrize("seed", range(4))
def test_refill_without_substitutes_is_oea(seed):
    """With no substitute below tolerance, nothing kept, and renormalisation, sere-err + refill
    is OEA: the same experts with the same weights for every token."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(24, 32, generator=gen) * 2).softmax(1)
    weights, ids = scores.topk(8, dim=1)
    weights = weights / weights.sum(1, keepdim=True)
    error = torch.rand(32, 32, generator=gen).fill_diagonal_(0.0)
    for s in (1, 2, 4):
        got = sere_err_reference(ids, weights, error, s, tolerance=1e-9, renormalize=True, router_scores=scores)
        want = oracle.oea(ids, weights, scores, s)
        _assert_same_routing(got, (torch.tensor(want.ids), torch.tensor(want.weights)))


@pytest.mark.parametrize("seed", range(4))
def test_refill_keeps_decisions_and_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(8, 32, generator=gen) * 2).softmax(1)  # |P| <= 8 tokens < budget 12
    weights, ids = scores.topk(8, dim=1)
    error = (0.4 + torch.rand(32, 32, generator=gen)).fill_diagonal_(0.0)  # some substitutes, many drops
    plain = oracle.sere_err(ids, weights, error, 1, 0.5, keep_cost=0.0, max_distinct=12)
    plain = (torch.tensor(plain.ids), torch.tensor(plain.weights))
    refilled = sere_err_reference(ids, weights, error, 1, 0.5, keep_cost=0.0, max_distinct=12, router_scores=scores)
    want = oracle.sere_err(ids, weights, error, 1, 0.5, keep_cost=0.0, max_distinct=12, router_scores=scores)
    assert refilled[0].tolist() == want.ids
    torch.testing.assert_close(refilled[1], torch.tensor(want.weights, dtype=torch.float32))
    dropped = plain[1] == 0
    # every slot that was not dropped is unchanged; refilled slots use loaded experts only
    assert torch.equal(refilled[0][~dropped], plain[0][~dropped])
    loaded = set(plain[0][~dropped].tolist())
    assert set(refilled[0][dropped & (refilled[1] > 0)].tolist()) <= loaded
    assert len(set(refilled[0][refilled[1] > 0].tolist())) == len(loaded) == 12
    assert (refilled[1] > 0).sum() > (~dropped).sum()  # something was refilled


def test_bad_router_scores_are_named():
    with pytest.raises(ValueError, match=r"router_scores must be \[num_tokens=1, num_experts=2\]"):
        sere_err_reference(torch.tensor([[0, 1]]), torch.ones(1, 2), torch.zeros(2, 2), 1, router_scores=torch.ones(2))
