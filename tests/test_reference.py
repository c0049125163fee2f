"""The vectorised reference against hand cases and the plain-loop oracle of tests/oracle.py."""

import pytest
import torch

import oracle
from sere.reference import oea_reference, primary_mask, reroute_reference, reroute_stats


def random_case(seed, num_tokens, num_experts, top_k, levels=None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    weights, ids = scores.topk(top_k, dim=1)
    sim = torch.rand(num_experts, num_experts, generator=gen)
    if levels:  # quantise so that ties are frequent
        sim = (sim * levels).floor() / levels
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return ids, weights, sim


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_primary", [1, 2, 3])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("levels", [None, 4])
def test_reference_equals_loop_oracle(seed, num_primary, rho, levels):
    ids, weights, sim = random_case(seed, num_tokens=9, num_experts=16, top_k=4, levels=levels)
    new_ids, new_weights = reroute_reference(ids, weights, sim, num_primary, rho)
    assert new_ids.tolist() == oracle.sere(ids, weights, sim, num_primary, rho).ids
    assert new_weights is weights


def test_primary_mask_and_stats():
    #            slot: 0  1  2
    ids = torch.tensor([[0, 3, 5],
                        [1, 0, 4]])
    sim = torch.eye(6)
    sim[3, 1] = sim[5, 0] = 0.9  # 3 -> 1, 5 -> 0 ; 4 has nothing similar: 4 -> 0 (tie, lowest id)
    mask = primary_mask(ids, 6, 1)
    assert mask.tolist() == [True, True, False, False, False, False]
    new_ids, _ = reroute_reference(ids, torch.ones(2, 3), sim, 1)
    assert new_ids.tolist() == [[0, 1, 0], [1, 0, 0]]
    stats = reroute_stats(ids, new_ids, 6, 1)
    # distinct before {0,1,3,4,5}=5, after {0,1}=2, |P|=2, 3 slots changed, 0 critical
    assert stats.tolist() == [5, 2, 2, 3, 0]
    kept, _ = reroute_reference(ids, torch.ones(2, 3), sim, 1, threshold=0.5)
    assert kept.tolist() == [[0, 1, 0], [1, 0, 4]]  # 4 is critical (best sim 0 < 0.5)
    assert reroute_stats(ids, kept, 6, 1).tolist() == [5, 3, 2, 2, 1]


def test_oea_fills_from_loaded_experts_by_router_score():
    # P = {0, 1} (top-1 of each token). Token 0 keeps 0, takes 1 (the only other loaded expert),
    # and pads its third slot with its own slot-0 expert at weight 0.
    ids = torch.tensor([[0, 2, 3], [1, 3, 2]])
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.2, 0.4, 0.1, 0.3]])
    weights = scores.gather(1, ids)
    new_ids, new_w = oea_reference(ids, weights, scores, 1)
    assert new_ids.tolist() == [[0, 1, 0], [1, 0, 1]]
    assert new_w[:, 2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(new_w.sum(1), weights.sum(1))
    torch.testing.assert_close(new_w[0, 1] / new_w[0, 0], torch.tensor(0.1 / 0.5))


@pytest.mark.parametrize("num_primary", [0, 4, 5])
def test_num_primary_out_of_range_is_an_error(num_primary):
    ids, weights, sim = random_case(0, 4, 8, 4)
    with pytest.raises(ValueError, match="num_primary"):
        reroute_reference(ids, weights, sim, num_primary)
