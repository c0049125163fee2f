"""Locality-aware SERE targets against a hand-drawn case and the plain SERE reference."""

import pytest
import torch

from sere.ep import linear_placement, traffic
from sere.locality import locality_reroute
from sere.reference import primary_mask, reroute_reference


def _golden_similarity():
    sim = torch.full((8, 8), 0.1)
    sim.fill_diagonal_(1.0)
    for a, b, v in [(5, 4, 0.90), (5, 0, 0.88), (7, 4, 0.52), (7, 2, 0.50)]:
        sim[a, b] = sim[b, a] = v
    return sim


def test_golden_case():
    # E = 8, W = 4 linear, 2 ranks per node:
    #   node 0: rank 0 {0, 1}  rank 1 {2, 3}     node 1: rank 2 {4, 5}  rank 3 {6, 7}
    # S = 1, P = {0, 2, 4} (slot 0 of the three tokens). Token 0 = [0, 5, 7] lives on rank 0's
    # experts only through its primary 0.
    #   slot 1, e = 5: best 4 (0.90, rank 2); 0 (0.88) is within eps = 0.05 and on rank 0 -> 0
    #   slot 2, e = 7: best 4 (0.52, rank 2, node 1); 2 (0.50, rank 1, node 0) is within eps and
    #                  on node 0, where the token already goes -> 2
    # Plain SERE sends both to 4: token 0 then goes to ranks {0, 2} (one cross-node row), with
    # locality to ranks {0, 1} (no cross-node row).
    pl = linear_placement(8, 4, ranks_per_node=2)
    ids = torch.tensor([[0, 5, 7], [2, 4, 0], [4, 2, 0]])
    w = torch.tensor([[0.5, 0.3, 0.2]] * 3)
    sim = _golden_similarity()
    sere_ids, _ = reroute_reference(ids, w, sim, 1)
    loc_ids, loc_w = locality_reroute(ids, w, sim, 1, pl.expert_to_rank, 0.05, expert_to_node=pl.expert_to_node())
    assert sere_ids[0].tolist() == [0, 4, 4]
    assert loc_ids[0].tolist() == [0, 0, 2]
    assert loc_w is w
    # without node information, slot 2 has no same-rank candidate and falls back to the best
    rank_only, _ = locality_reroute(ids, w, sim, 1, pl.expert_to_rank, 0.05)
    assert rank_only[0].tolist() == [0, 0, 4]
    # a tight epsilon is plain SERE
    tight, _ = locality_reroute(ids, w, sim, 1, pl.expert_to_rank, 0.0, expert_to_node=pl.expert_to_node())
    assert torch.equal(tight, sere_ids)
    src = torch.zeros(3, dtype=torch.long)
    assert int(traffic(loc_ids, src, pl, 1).cross_node_rows) < int(traffic(sere_ids, src, pl, 1).cross_node_rows)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,num_primary", [(16, 16, 4, 1), (64, 64, 8, 2), (7, 32, 6, 3)])
@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_zero_epsilon_equals_sere(num_tokens, num_experts, top_k, num_primary, threshold):
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(1)[:, :top_k]
    w = torch.rand(num_tokens, top_k, generator=gen)
    sim = torch.rand(num_experts, num_experts, generator=gen)  # continuous: no ties
    pl = linear_placement(num_experts, 4, ranks_per_node=2)
    primary = primary_mask(ids[: num_tokens // 2], num_experts, num_primary) | primary_mask(ids, num_experts, num_primary)
    ref, _ = reroute_reference(ids, w, sim, num_primary, threshold, primary)
    got, _ = locality_reroute(ids, w, sim, num_primary, pl.expert_to_rank, 0.0, threshold, primary, pl.expert_to_node())
    assert torch.equal(got, ref)


def test_targets_stay_in_primary_set_and_within_epsilon():
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_experts, top_k, num_primary, eps = 48, 64, 8, 2, 0.1
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(1)[:, :top_k]
    w = torch.rand(num_tokens, top_k, generator=gen)
    sim = torch.rand(num_experts, num_experts, generator=gen)
    pl = linear_placement(num_experts, 8, ranks_per_node=4)
    got, _ = locality_reroute(ids, w, sim, num_primary, pl.expert_to_rank, eps, expert_to_node=pl.expert_to_node())
    ref, _ = reroute_reference(ids, w, sim, num_primary)
    primary = primary_mask(ids, num_experts, num_primary)
    assert torch.equal(got[:, :num_primary], ids[:, :num_primary])
    assert primary[got].all()
    sec = ids[:, num_primary:]
    assert (sim[sec, got[:, num_primary:]] >= sim[sec, ref[:, num_primary:]] - eps - 1e-6).all()
    src = torch.arange(num_tokens) % 8
    t_loc, t_sere = traffic(got, src, pl, 1), traffic(ref, src, pl, 1)
    assert int(t_loc.token_rank_pairs) < int(t_sere.token_rank_pairs)
    assert int(t_loc.cross_node_rows) <= int(t_sere.cross_node_rows)


def test_bad_arguments():
    ids = torch.tensor([[0, 1, 2]])
    sim = torch.eye(4)
    with pytest.raises(ValueError, match="epsilon"):
        locality_reroute(ids, ids.float(), sim, 1, torch.zeros(4, dtype=torch.long), -0.1)
    with pytest.raises(ValueError, match="num_primary"):
        locality_reroute(ids, ids.float(), sim, 3, torch.zeros(4, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="expert_to_rank"):
        locality_reroute(ids, ids.float(), sim, 1, torch.zeros(3, dtype=torch.long), 0.1)
