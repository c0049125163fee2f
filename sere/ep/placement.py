"""Expert-to-rank placement for expert parallelism (EP).

Shape legend:
    E  routed experts      W  EP world size (ranks)      L  experts per rank = E / W
    N  nodes (hosts)

A placement says which rank owns (holds the weights of, and computes) every expert. Every expert
is owned by exactly one rank and every rank owns the same number of experts, so W must divide E.
`rank_to_node` groups ranks into hosts (ranks `[n * R, (n + 1) * R)` on node `n` for R ranks per
node), which the accounting uses to tell intra-node from cross-node traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PlacementError",
    "ExpertPlacement",
    "linear_placement",
    "round_robin_placement",
    "placement_from_rank_experts",
    "make_placement",
    "PLACEMENTS",
]

PLACEMENTS = ("linear", "round_robin")


class PlacementError(ValueError):
    """An expert placement that does not cover every expert exactly once, or a bad world size."""


@dataclass(frozen=True)
class ExpertPlacement:
    """Which rank owns each expert, and which node each rank is on.

    expert_to_rank: [E] int64, owner rank of every expert.
    expert_to_local: [E] int64, index of the expert among its owner's experts (0 <= i < L).
    rank_experts: [W, L] int64, the global expert ids owned by each rank, in local order.
    rank_to_node: [W] int64, node of every rank.
    """

    num_experts: int
    world_size: int
    expert_to_rank: torch.Tensor
    expert_to_local: torch.Tensor
    rank_experts: torch.Tensor
    rank_to_node: torch.Tensor

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def num_nodes(self) -> int:
        return int(self.rank_to_node.max()) + 1

    def local_experts(self, rank: int) -> torch.Tensor:
        """[L] int64 global ids owned by `rank`."""
        return self.rank_experts[rank]

    def expert_to_node(self) -> torch.Tensor:
        """[E] int64 node of every expert's owner."""
        return self.rank_to_node[self.expert_to_rank]

    def checksum(self) -> int:
        """An integer that differs (with high probability) between different placements."""
        weights = torch.arange(1, self.num_experts + 1, dtype=torch.int64)
        node_weights = torch.arange(1, self.world_size + 1, dtype=torch.int64)
        return int((self.expert_to_rank * weights * 7919).sum() + (self.rank_to_node * node_weights).sum())

    def with_nodes(self, ranks_per_node: int) -> "ExpertPlacement":
        """The same placement with ranks `[n * R, (n + 1) * R)` on node n."""
        return placement_from_rank_experts(self.rank_experts.tolist(), self.num_experts, ranks_per_node)


def _check_sizes(num_experts: int, world_size: int, ranks_per_node: int | None) -> None:
    if world_size < 1:
        raise PlacementError(f"world_size={world_size} must be >= 1")
    if num_experts < 1:
        raise PlacementError(f"num_experts={num_experts} must be >= 1")
    if num_experts % world_size != 0:
        raise PlacementError(
            f"world_size={world_size} does not divide num_experts={num_experts}: every rank must own "
            f"the same number of experts (choose an EP size among the divisors of {num_experts})"
        )
    if ranks_per_node is not None and (ranks_per_node < 1 or world_size % ranks_per_node != 0):
        raise PlacementError(f"ranks_per_node={ranks_per_node} must be >= 1 and divide world_size={world_size}")


def placement_from_rank_experts(
    rank_experts: list[list[int]], num_experts: int, ranks_per_node: int | None = None
) -> ExpertPlacement:
    """Validate a per-rank list of expert ids and build the placement.

    Raises PlacementError naming the experts that are missing, duplicated or out of range, or the
    rank whose list has the wrong length.
    """
    world_size = len(rank_experts)
    _check_sizes(num_experts, world_size, ranks_per_node)
    per_rank = num_experts // world_size
    for rank, experts in enumerate(rank_experts):
        if len(experts) != per_rank:
            raise PlacementError(
                f"rank {rank} owns {len(experts)} experts, expected num_experts / world_size = {per_rank}"
            )
    flat = torch.tensor([e for experts in rank_experts for e in experts], dtype=torch.int64)  # [E]
    bad = flat[(flat < 0) | (flat >= num_experts)]
    if bad.numel():
        raise PlacementError(f"expert ids {bad.tolist()} are outside [0, {num_experts})")
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    missing = (counts == 0).nonzero().flatten().tolist()
    duplicated = (counts > 1).nonzero().flatten().tolist()
    if missing or duplicated:
        raise PlacementError(
            f"placement must cover every expert exactly once: missing {missing[:16]}, "
            f"owned by several ranks {duplicated[:16]}"
        )
    rank_table = torch.tensor(rank_experts, dtype=torch.int64).reshape(world_size, per_rank)  # [W, L]
    expert_to_rank = torch.empty(num_experts, dtype=torch.int64)
    expert_to_local = torch.empty(num_experts, dtype=torch.int64)
    expert_to_rank[rank_table.flatten()] = torch.arange(world_size).repeat_interleave(per_rank)
    expert_to_local[rank_table.flatten()] = torch.arange(per_rank).repeat(world_size)
    rpn = world_size if ranks_per_node is None else ranks_per_node
    rank_to_node = torch.arange(world_size, dtype=torch.int64) // rpn  # [W]
    return ExpertPlacement(num_experts, world_size, expert_to_rank, expert_to_local, rank_table, rank_to_node)


def linear_placement(num_experts: int, world_size: int, ranks_per_node: int | None = None) -> ExpertPlacement:
    """Rank r owns experts [r * L, (r + 1) * L) (vLLM's and DeepSpeed's default)."""
    _check_sizes(num_experts, world_size, ranks_per_node)
    per_rank = num_experts // world_size
    table = torch.arange(num_experts).reshape(world_size, per_rank)
    return placement_from_rank_experts(table.tolist(), num_experts, ranks_per_node)


def round_robin_placement(num_experts: int, world_size: int, ranks_per_node: int | None = None) -> ExpertPlacement:
    """Rank r owns experts r, r + W, r + 2W, ... (spreads neighbouring expert ids over ranks)."""
    _check_sizes(num_experts, world_size, ranks_per_node)
    table = torch.arange(num_experts).reshape(-1, world_size).T.contiguous()  # [W, L]
    return placement_from_rank_experts(table.tolist(), num_experts, ranks_per_node)


def make_placement(
    kind: str, num_experts: int, world_size: int, ranks_per_node: int | None = None
) -> ExpertPlacement:
    """`kind` is one of PLACEMENTS."""
    if kind == "linear":
        return linear_placement(num_experts, world_size, ranks_per_node)
    if kind == "round_robin":
        return round_robin_placement(num_experts, world_size, ranks_per_node)
    raise PlacementError(f"placement={kind!r} is unknown; choose one of {list(PLACEMENTS)}")
