"""Expert placement: layouts drawn by hand, and every invalid placement a clear error."""

import pytest
import torch

from sere.ep import PlacementError, linear_placement, make_placement, placement_from_rank_experts, round_robin_placement


def test_linear_layout():
    # E = 8, W = 4:  rank 0 | rank 1 | rank 2 | rank 3
    #                 0 1   |  2 3   |  4 5   |  6 7
    pl = linear_placement(8, 4, ranks_per_node=2)
    assert pl.expert_to_rank.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert pl.expert_to_local.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert pl.rank_to_node.tolist() == [0, 0, 1, 1]
    assert pl.expert_to_node().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pl.num_local_experts == 2 and pl.num_nodes == 2


def test_round_robin_layout():
    # E = 8, W = 4:  rank 0 | rank 1 | rank 2 | rank 3
    #                 0 4   |  1 5   |  2 6   |  3 7
    pl = round_robin_placement(8, 4)
    assert pl.rank_experts.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert pl.expert_to_rank.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert pl.expert_to_local.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pl.rank_to_node.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("kind", ["linear", "round_robin"])
@pytest.mark.parametrize("num_experts,world", [(64, 8), (256, 256), (12, 3), (5, 1)])
def test_every_expert_owned_once(kind, num_experts, world):
    pl = make_placement(kind, num_experts, world)
    assert sorted(pl.rank_experts.flatten().tolist()) == list(range(num_experts))
    owned = pl.rank_experts[pl.expert_to_rank, pl.expert_to_local]
    assert torch.equal(owned, torch.arange(num_experts))


def test_world_size_must_divide_experts():
    with pytest.raises(PlacementError, match="world_size=3 does not divide num_experts=8"):
        linear_placement(8, 3)
    with pytest.raises(PlacementError, match="ranks_per_node=3"):
        linear_placement(8, 4, ranks_per_node=3)


def test_missing_and_duplicate_experts():
    with pytest.raises(PlacementError, match=r"missing \[3\].*several ranks \[1\]"):
        placement_from_rank_experts([[0, 1], [1, 2]], 4)
    with pytest.raises(PlacementError, match="outside"):
        placement_from_rank_experts([[0, 1], [2, 9]], 4)
    with pytest.raises(PlacementError, match="rank 0 owns 3 experts"):
        placement_from_rank_experts([[0, 1, 2], [3]], 4)
    with pytest.raises(PlacementError, match="unknown"):
        make_placement("random", 4, 2)


def test_checksum_tells_placements_apart():
    assert linear_placement(8, 4).checksum() != round_robin_placement(8, 4).checksum()
    assert linear_placement(8, 4).checksum() == linear_placement(8, 4).checksum()
