"""Dispatch accounting: a hand-counted case and a sweep against the brute-force counter."""

import pytest
import torch

from sere.ep import brute_force_traffic, linear_placement, round_robin_placement, traffic


def test_golden_counts():
    # E = 8, W = 4 linear (rank r owns 2r, 2r+1), 2 ranks per node; row_bytes = 10.
    #   token a on rank 0: experts {0, 1, 4} -> ranks {0, 2}     nodes {0, 1}
    #   token b on rank 3: experts {6, 7, 6} -> ranks {3}        nodes {1}
    #   token c on rank 1: experts {2, 5, 7} -> ranks {1, 2, 3}  nodes {0, 1}
    pl = linear_placement(8, 4, ranks_per_node=2)
    ids = torch.tensor([[0, 1, 4], [6, 7, 6], [2, 5, 7]])
    src = torch.tensor([0, 3, 1])
    t = traffic(ids, src, pl, row_bytes=10)
    assert t.rows.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert int(t.token_rank_pairs) == 6 and int(t.remote_rows) == 3
    assert int(t.token_node_pairs) == 5
    assert int(t.cross_node_rows) == 3  # a -> rank 2, c -> ranks 2 and 3
    assert int(t.cross_node_token_node_pairs) == 2  # a -> node 1, c -> node 1
    assert int(t.cross_node_bytes) == 30 and int(t.cross_node_bytes_hier) == 20
    assert t.distinct_per_rank.tolist() == [2, 1, 2, 2]
    assert t.bytes.tolist()[1] == [0, 10, 10, 10]


@pytest.mark.parametrize("make", [linear_placement, round_robin_placement])
@pytest.mark.parametrize("num_experts,world,rpn,num_tokens,top_k", [(16, 4, 2, 20, 4), (64, 16, 4, 50, 8), (8, 8, 8, 5, 3)])
def test_matches_brute_force(make, num_experts, world, rpn, num_tokens, top_k):
    gen = torch.Generator().manual_seed(num_experts * world)
    pl = make(num_experts, world, ranks_per_node=rpn)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)  # duplicates included
    src = torch.randint(0, world, (num_tokens,), generator=gen)
    fast = traffic(ids, src, pl, row_bytes=512).as_dict()
    slow = brute_force_traffic(ids.tolist(), src.tolist(), pl, row_bytes=512)
    assert fast == slow
