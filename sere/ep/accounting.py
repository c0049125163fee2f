"""Exact dispatch accounting for expert parallelism (docs/spec.md; units: docs/ep_backends.md).

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

__all__ = [
    "BACKEND_UNITS", "CROSS_NODE_FIELD", "Traffic", "UNITS", "UNIT_FIELDS", "brute_force_traffic",
    "duplicate_slots", "eplb_physical_ids", "merge_duplicate_slots", "traffic", "unit_bytes", "unit_counts",
]


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


# ---------------------------------------------------------------- per all-to-all backend unit
#
# What each vLLM 0.32 all-to-all backend moves per step (docs/ep_backends.md cites the code):
#   token_expert  one row per valid (token, slot): DeepEP low-latency (`deepep_low_latency`) sends a
#                 token once per selected expert, also twice to one rank; a slot id of -1 is skipped.
#   token_rank    one row per distinct (token, rank): DeepEP normal kernels inside one node, and
#                 this package's gloo dispatch (`sere.ep.dispatch`).
#   token_node    one network copy per distinct (token, remote node), forwarded inside the node
#                 over NVLink: DeepEP normal internode kernels (`deepep_high_throughput` over RDMA).
#   all_gather    routing-independent: `allgather_reducescatter` (vLLM's default; `naive` and `pplx`
#                 fall back to it in 0.32) gathers every token to every rank of the group.
UNITS = ("token_expert", "token_rank", "token_node", "all_gather")
BACKEND_UNITS = {
    "deepep_low_latency": "token_expert",
    "deepep_high_throughput": "token_node",
    "allgather_reducescatter": "all_gather",
    "naive": "all_gather",
    "pplx": "all_gather",
}

# The [10] int64 counts of `unit_counts`, in this order. "remote": another rank; "cross_node":
# a rank (or node) on another node than the token's own.
UNIT_FIELDS = (
    "token_expert_pairs", "remote_token_expert_pairs", "cross_node_token_expert_pairs",
    "token_rank_pairs", "remote_token_rank_pairs", "cross_node_token_rank_pairs",
    "token_node_pairs", "cross_node_token_node_pairs",
    "all_gather_rows", "cross_node_all_gather_rows",
)
# The field whose rows cross a node boundary, per unit.
CROSS_NODE_FIELD = {
    "token_expert": "cross_node_token_expert_pairs",
    "token_rank": "cross_node_token_rank_pairs",
    "token_node": "cross_node_token_node_pairs",
    "all_gather": "cross_node_all_gather_rows",
}


def duplicate_slots(topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, K] bool: the slot names a valid expert that an earlier slot of its token names too."""
    top_k = topk_ids.shape[1]
    same = topk_ids[:, :, None] == topk_ids[:, None, :]  # [T, K, K] same[t, j, i]
    earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=topk_ids.device).tril(-1)  # i < j
    return (same & earlier).any(dim=2) & (topk_ids >= 0)


def merge_duplicate_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token naming one expert in several slots names it once, with the summed weight.

    Every repeated slot after the first becomes id -1 with weight 0 (DeepEP's "no selection",
    also kept by vLLM's EPLB mapping); the first occurrence carries the sum. The MoE output
    sum_k w_k * expert_k(x) is unchanged. Existing -1 slots stay as they are.

    Args:
        topk_ids: [T, K] int ids (-1 = no expert).  topk_weights: [T, K] float.
    Returns:
        ([T, K] ids, [T, K] weights), dtypes of the inputs.
    """
    top_k = topk_ids.shape[1]
    same = topk_ids[:, :, None] == topk_ids[:, None, :]  # [T, K, K] same[t, j, i]
    repeat = duplicate_slots(topk_ids)  # [T, K]
    upper = torch.ones(top_k, top_k, dtype=torch.bool, device=topk_ids.device).triu(1)  # i > j
    first = (same & ~upper).int().argmax(dim=2)  # [T, K] first i with ids equal
    summed = torch.zeros_like(topk_weights).scatter_add_(1, first, topk_weights)  # [T, K]
    ids = torch.where(repeat, torch.full_like(topk_ids, -1), topk_ids)
    weights = torch.where(repeat | (topk_ids < 0), topk_weights, summed).masked_fill(repeat, 0)
    return ids, weights


def eplb_physical_ids(
    topk_ids: torch.Tensor, logical_to_physical: torch.Tensor, replica_count: torch.Tensor
) -> torch.Tensor:
    """vLLM 0.32's EPLB mapping of logical to physical expert ids (`base_router.py`).

    Token t's replica of expert e is `((t * 2654435769) mod 2^32) mod replica_count[e]`; ids -1
    stay -1. Args: topk_ids [T, K]; logical_to_physical [E, R] int (-1 padded);
    replica_count [E] int. Returns [T, K] int64 physical ids.
    """
    ids = topk_ids.long()
    valid = ids >= 0
    safe = ids.clamp_min(0)
    token = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64)[:, None]  # [T, 1]
    replica = ((token * 2654435769) & 0xFFFFFFFF) % replica_count.long().clamp_min(1)[safe]  # [T, K]
    physical = logical_to_physical.long()[safe, replica]
    return torch.where(valid, physical, torch.full_like(physical, -1))


def unit_counts(
    topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, rank_to_node: torch.Tensor, src_rank,
    num_nodes: int | None = None,
) -> torch.Tensor:
    """The [10] int64 counts of UNIT_FIELDS for the ids actually dispatched.

    Callable on a vLLM hook's ids: one rank's [T, K] ids (physical ids under EPLB, -1 = no
    expert), the [E] expert -> rank map, the [W] rank -> node map and `src_rank` (the int rank
    of all T tokens, or a [T] tensor). Bytes are counts x row bytes (`unit_bytes`).
    With the maps on the ids' device, an int `src_rank` and `num_nodes` given, no host sync
    and no host-to-device copy happens (safe inside a CUDA graph capture, as in the vLLM hook);
    without `num_nodes` it is read from `rank_to_node` (one sync on a GPU).
    """
    device = topk_ids.device
    ids = topk_ids.long()
    num_tokens = ids.shape[0]
    owner_of = expert_to_rank.to(device).long()
    node_of = rank_to_node.to(device).long()
    num_ranks = node_of.shape[0]
    if num_nodes is None:
        num_nodes = int(node_of.max()) + 1 if node_of.numel() else 1
    if isinstance(src_rank, int):
        src = torch.full((num_tokens,), src_rank, dtype=torch.int64, device=device)  # [T]
    else:
        src = torch.as_tensor(src_rank, device=device).long().expand(num_tokens)  # [T]
    valid = ids >= 0  # [T, K]
    owner = owner_of[ids.clamp_min(0)]  # [T, K]
    src_node = node_of[src]  # [T]
    remote = valid & (owner != src[:, None])
    cross = valid & (node_of[owner] != src_node[:, None])

    token_idx = torch.arange(num_tokens, device=device)[:, None].expand_as(ids)
    to_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)  # [T, W+1]
    to_rank[token_idx, torch.where(valid, owner, num_ranks)] = True  # column W collects -1 slots
    to_rank = to_rank[:, :num_ranks]
    to_node = torch.zeros(num_tokens, num_nodes, dtype=torch.long, device=device)  # [T, M]
    to_node.index_add_(1, node_of, to_rank.long())
    to_node = to_node > 0
    other_rank = torch.arange(num_ranks, device=device)[None, :] != src[:, None]  # [T, W]
    other_node_rank = node_of[None, :] != src_node[:, None]  # [T, W]
    other_node = torch.arange(num_nodes, device=device)[None, :] != src_node[:, None]  # [T, M]
    ranks_elsewhere = other_node_rank.sum(dim=1)  # [T] ranks on other nodes
    return torch.stack([
        valid.sum(), remote.sum(), cross.sum(),
        to_rank.sum(), (to_rank & other_rank).sum(), (to_rank & other_node_rank).sum(),
        to_node.sum(), (to_node & other_node).sum(),
        torch.full_like(valid.sum(), num_tokens * num_ranks), ranks_elsewhere.sum(),
    ]).to(torch.int64)


def unit_bytes(counts: torch.Tensor, row_bytes: int) -> dict[str, int]:
    """{unit: cross-node dispatch bytes} from a [10] `unit_counts` vector (one direction; the
    combine sends as many back)."""
    values = dict(zip(UNIT_FIELDS, counts.tolist()))
    return {unit: values[field] * row_bytes for unit, field in CROSS_NODE_FIELD.items()}
