"""Exact dispatch accounting for expert parallelism (SERE_SPEC sections 5 and 6).

Shape legend:
    N  tokens of the whole EP group in one step (each token lives on one source rank)
    K  top-k slots      E  routed experts      W  EP ranks      M  nodes

A token is sent once to every rank that owns at least one of its (distinct) experts, including its
own rank (a local copy, no network). One such (token, rank) pair is one *row* of `hidden` elements;
the combine sends the same rows back. Rows to a rank on another node are *cross-node* rows; a
hierarchical dispatch (one network copy per node, then forwarded inside the node, as DeepEP's
internode kernels do) sends one copy per cross-node (token, node) pair instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sere.ep.placement import ExpertPlacement

__all__ = ["Traffic", "traffic", "brute_force_traffic"]


@dataclass(frozen=True)
class Traffic:
    """Counts for one MoE layer step (all int64 tensors; bytes are for the dispatch direction).

    rows: [W, W] rows[src, dst], (token, rank) pairs from src to dst (diagonal = local).
    bytes: [W, W] rows * row_bytes.
    token_rank_pairs: 0-d, all (token, rank) pairs.
    remote_rows: 0-d, pairs with dst != src.
    token_node_pairs: 0-d, all (token, node) pairs.
    cross_node_rows: 0-d, rows whose dst is on another node than src (flat dispatch).
    cross_node_token_node_pairs: 0-d, (token, node) pairs with another node (hierarchical dispatch).
    cross_node_bytes: 0-d, cross_node_rows * row_bytes.
    cross_node_bytes_hier: 0-d, cross_node_token_node_pairs * row_bytes.
    distinct_per_rank: [W], distinct experts each rank computes.
    """

    rows: torch.Tensor
    bytes: torch.Tensor
    token_rank_pairs: torch.Tensor
    remote_rows: torch.Tensor
    token_node_pairs: torch.Tensor
    cross_node_rows: torch.Tensor
    cross_node_token_node_pairs: torch.Tensor
    cross_node_bytes: torch.Tensor
    cross_node_bytes_hier: torch.Tensor
    distinct_per_rank: torch.Tensor

    def as_dict(self) -> dict:
        out = {}
        for name, value in self.__dict__.items():
            out[name] = value.tolist()
        return out


def traffic(
    topk_ids: torch.Tensor, src_rank: torch.Tensor, placement: ExpertPlacement, row_bytes: int
) -> Traffic:
    """Count rows and bytes for one step, vectorised.

    Args:
        topk_ids: [N, K] int, the expert ids actually dispatched (after any re-routing).
        src_rank: [N] int64, the rank each token lives on.
        placement: expert owners and rank nodes (W ranks).
        row_bytes: bytes of one row (hidden_size * dtype bytes).
    """
    num_ranks = placement.world_size
    num_nodes = placement.num_nodes
    device = topk_ids.device
    expert_to_rank = placement.expert_to_rank.to(device)
    rank_to_node = placement.rank_to_node.to(device)
    ids = topk_ids.long()
    num_tokens = ids.shape[0]
    token_idx = torch.arange(num_tokens, device=device)[:, None]
    src_rank = src_rank.to(device).long()

    to_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)  # [N, W]
    to_rank[token_idx, expert_to_rank[ids]] = True
    rows = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=device)  # [W, W]
    rows.index_add_(0, src_rank, to_rank.long())
    to_node = torch.zeros(num_tokens, num_nodes, dtype=torch.bool, device=device)  # [N, M]
    to_node[token_idx, rank_to_node[expert_to_rank[ids]]] = True

    src_node = rank_to_node[src_rank]  # [N]
    remote_node = rank_to_node[None, :] != src_node[:, None]  # [N, W]
    cross_rows = (to_rank & remote_node).sum()
    other_node = torch.arange(num_nodes, device=device)[None, :] != src_node[:, None]  # [N, M]
    cross_pairs = (to_node & other_node).sum()

    seen = torch.zeros(placement.num_experts, dtype=torch.bool, device=device)  # [E]
    seen[ids.reshape(-1)] = True
    distinct = seen[placement.rank_experts.to(device)].sum(dim=1)  # [W]
    return Traffic(
        rows=rows,
        bytes=rows * row_bytes,
        token_rank_pairs=rows.sum(),
        remote_rows=rows.sum() - rows.diagonal().sum(),
        token_node_pairs=to_node.sum(),
        cross_node_rows=cross_rows,
        cross_node_token_node_pairs=cross_pairs,
        cross_node_bytes=cross_rows * row_bytes,
        cross_node_bytes_hier=cross_pairs * row_bytes,
        distinct_per_rank=distinct,
    )


def brute_force_traffic(
    topk_ids: list[list[int]], src_rank: list[int], placement: ExpertPlacement, row_bytes: int
) -> dict:
    """The same counts with Python sets and loops, for tests. Returns plain ints / nested lists."""
    owner = placement.expert_to_rank.tolist()
    node = placement.rank_to_node.tolist()
    num_ranks = placement.world_size
    rows = [[0] * num_ranks for _ in range(num_ranks)]
    token_node_pairs = cross_rows = cross_pairs = 0
    computed: list[set[int]] = [set() for _ in range(num_ranks)]
    for experts, src in zip(topk_ids, src_rank):
        ranks = {owner[e] for e in experts}
        nodes = {node[r] for r in ranks}
        for e in experts:
            computed[owner[e]].add(e)
        for r in ranks:
            rows[src][r] += 1
            cross_rows += node[r] != node[src]
        token_node_pairs += len(nodes)
        cross_pairs += sum(1 for m in nodes if m != node[src])
    total = sum(map(sum, rows))
    return {
        "rows": rows,
        "bytes": [[n * row_bytes for n in line] for line in rows],
        "token_rank_pairs": total,
        "remote_rows": total - sum(rows[r][r] for r in range(num_ranks)),
        "token_node_pairs": token_node_pairs,
        "cross_node_rows": cross_rows,
        "cross_node_token_node_pairs": cross_pairs,
        "cross_node_bytes": cross_rows * row_bytes,
        "cross_node_bytes_hier": cross_pairs * row_bytes,
        "distinct_per_rank": [len(s) for s in computed],
    }
