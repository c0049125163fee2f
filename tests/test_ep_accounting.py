"""Dispatch accounting: hand-counted cases, and sweeps against plain loop counters."""

import pytest
import torch

from sere.ep import brute_force_traffic, linear_placement, round_robin_placement, traffic
from sere.ep.accounting import (
    UNIT_FIELDS,
    duplicate_slots,
    eplb_physical_ids,
    merge_duplicate_slots,
    unit_bytes,
    unit_counts,
)


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


# ---------------------------------------------------------------- per-backend units


def loop_unit_counts(ids, expert_to_rank, rank_to_node, src):
    """Plain per-token loop oracle of the per-unit counts (independent of sere.ep)."""
    out = dict.fromkeys(UNIT_FIELDS, 0)
    num_ranks = len(rank_to_node)
    for row, s in zip(ids, src):
        slots = [e for e in row if e >= 0]
        ranks = {expert_to_rank[e] for e in slots}
        nodes = {rank_to_node[r] for r in ranks}
        out["token_expert_pairs"] += len(slots)
        out["remote_token_expert_pairs"] += sum(expert_to_rank[e] != s for e in slots)
        out["cross_node_token_expert_pairs"] += sum(rank_to_node[expert_to_rank[e]] != rank_to_node[s] for e in slots)
        out["token_rank_pairs"] += len(ranks)
        out["remote_token_rank_pairs"] += sum(r != s for r in ranks)
        out["cross_node_token_rank_pairs"] += sum(rank_to_node[r] != rank_to_node[s] for r in ranks)
        out["token_node_pairs"] += len(nodes)
        out["cross_node_token_node_pairs"] += sum(m != rank_to_node[s] for m in nodes)
        out["all_gather_rows"] += num_ranks
        out["cross_node_all_gather_rows"] += sum(rank_to_node[r] != rank_to_node[s] for r in range(num_ranks))
    return out


def test_unit_counts_hand_worked():
    # E = 8 on W = 4 ranks (rank r owns 2r, 2r+1), 2 ranks per node, row_bytes 10.
    #   token a on rank 0: experts [0, 1, 4]  -> slots to ranks 0, 0, 2; ranks {0, 2}; nodes {0, 1}
    #   token b on rank 3: experts [6, 6, -1] -> slots to ranks 3, 3;    ranks {3};    nodes {1}
    #   token c on rank 1: experts [2, 5, 7]  -> slots to ranks 1, 2, 3; ranks {1,2,3}; nodes {0, 1}
    ids = torch.tensor([[0, 1, 4], [6, 6, -1], [2, 5, 7]])
    counts = unit_counts(ids, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 3, 1]))
    got = dict(zip(UNIT_FIELDS, counts.tolist()))
    assert got == {
        "token_expert_pairs": 8, "remote_token_expert_pairs": 3, "cross_node_token_expert_pairs": 3,
        "token_rank_pairs": 6, "remote_token_rank_pairs": 3, "cross_node_token_rank_pairs": 3,
        "token_node_pairs": 5, "cross_node_token_node_pairs": 2,
        "all_gather_rows": 12, "cross_node_all_gather_rows": 6,
    }
    assert unit_bytes(counts, 10) == {"token_expert": 30, "token_rank": 30, "token_node": 20, "all_gather": 60}


@pytest.mark.parametrize("num_experts,world,rpn,num_tokens,top_k", [(16, 4, 2, 30, 4), (64, 16, 4, 40, 8), (12, 6, 3, 9, 5)])
def test_unit_counts_match_loop(num_experts, world, rpn, num_tokens, top_k):
    gen = torch.Generator().manual_seed(num_experts + world)
    owner = torch.randint(0, world, (num_experts,), generator=gen)  # any map, not only balanced ones
    node = torch.arange(world) // rpn
    ids = torch.randint(-1, num_experts, (num_tokens, top_k), generator=gen)  # duplicates and -1 included
    src = torch.randint(0, world, (num_tokens,), generator=gen)
    got = dict(zip(UNIT_FIELDS, unit_counts(ids, owner, node, src).tolist()))
    assert got == loop_unit_counts(ids.tolist(), owner.tolist(), node.tolist(), src.tolist())
    scalar = unit_counts(ids, owner, node, 2)  # one rank's tokens, as in a vLLM hook
    assert dict(zip(UNIT_FIELDS, scalar.tolist())) == loop_unit_counts(ids.tolist(), owner.tolist(), node.tolist(), [2] * num_tokens)


def test_merge_duplicate_slots_hand_worked():
    ids = torch.tensor([[0, 1, 0, 0], [3, -1, 2, 3], [5, 6, 7, 8]])
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.0, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    mid, mw = merge_duplicate_slots(ids, w)
    assert mid.tolist() == [[0, 1, -1, -1], [3, -1, 2, -1], [5, 6, 7, 8]]
    assert torch.allclose(mw, torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.75, 0.0, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]))


def test_duplicate_slots_hand_worked():
    ids = torch.tensor([[0, 1, 0, 0], [3, -1, -1, 3], [5, 6, 7, 8]])
    assert duplicate_slots(ids).tolist() == [[False, False, True, True], [False, False, False, True], [False] * 4]


def test_unit_counts_with_the_node_count_given_as_the_live_hook_calls_it():
    # the vLLM hook passes num_nodes (no host read of the map) and an int source rank
    gen = torch.Generator().manual_seed(5)
    owner, node = torch.arange(16) // 4, torch.tensor([0, 0, 1, 1])
    ids = torch.randint(-1, 16, (12, 4), generator=gen)
    got = dict(zip(UNIT_FIELDS, unit_counts(ids, owner, node, 3, num_nodes=2).tolist()))
    assert got == loop_unit_counts(ids.tolist(), owner.tolist(), node.tolist(), [3] * 12)


def test_merge_keeps_moe_output_and_cuts_token_expert_rows():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (40, 4), generator=gen)
    w = torch.rand(40, 4, generator=gen)
    outs = torch.randn(6, 40, 8, generator=gen)  # expert e's output for token t
    mid, mw = merge_duplicate_slots(ids, w)

    def moe(ids_, w_):  # plain loop: sum over valid slots of w * expert output
        y = torch.zeros(40, 8)
        for t in range(40):
            for k in range(4):
                if ids_[t, k] >= 0:
                    y[t] += w_[t, k] * outs[ids_[t, k], t]
        return y

    assert torch.allclose(moe(ids, w), moe(mid, mw), atol=1e-6)
    for t in range(40):
        assert sorted(e for e in mid[t].tolist() if e >= 0) == sorted(set(ids[t].tolist()))
    owner, node = torch.arange(6) // 2, torch.tensor([0, 0, 1])
    before, after = unit_counts(ids, owner, node, 0), unit_counts(mid, owner, node, 0)
    assert int(after[0]) == sum(len(set(r)) for r in ids.tolist()) < int(before[0])
    assert torch.equal(before[3:], after[3:])  # rank, node and all-gather units do not see duplicates


def test_eplb_physical_ids_loop():
    # 4 logical experts; expert 1 has replicas 1 and 4, expert 3 has 3, 5 and 6 (vLLM's hash picks)
    l2p = torch.tensor([[0, -1, -1], [1, 4, -1], [2, -1, -1], [3, 5, 6]])
    count = torch.tensor([1, 2, 1, 3])
    ids = torch.tensor([[1, 3], [3, -1], [1, 0], [3, 2], [1, 3]])
    got = eplb_physical_ids(ids, l2p, count)
    want = [[-1 if e < 0 else l2p[e][((t * 2654435769) % 2**32) % int(count[e])].item() for e in row]
            for t, row in enumerate(ids.tolist())]
    assert got.tolist() == want
    # by hand: h(t) = t * 2654435769 mod 2^32; h(1) = 2654435769 (digit sum 51: = 0 mod 3),
    # h(4) = 2027808484 (even; digit sum 43: = 1 mod 3)
    assert got[1].tolist() == [3, -1] and got[4].tolist() == [1, 5]
