"""Live expert-parallel traffic counters of the vLLM routing hook (docs/spec.md §19).

Per MoE layer and re-routed step, on each EP rank: how many (token, expert), (token, rank) and
(token, node) pairs the tokens living on this rank form with other ranks and nodes, and their
bytes (pairs x hidden_size x activation bytes), for the ids actually dispatched: after SERE,
with repeated experts of a token merged (`sere.ep.accounting.duplicate_slots`), mapped to
physical ids by vLLM's EPLB when it is on. Placement: vLLM's own expert map (its
`determine_expert_map` for every rank, checked against this rank's `expert_map`); nodes: ranks
`[n * R, (n + 1) * R)` on node n for R = `SERE_RANKS_PER_NODE` (default: all ranks on one node).
The counting is `sere.ep.accounting.unit_counts` (the one implementation), on the device, added
into the layer's int64 vector `LayerStats.traffic` (`sere.vllm.metrics.TRAFFIC_FIELDS`) inside
the opaque op `sere::route_layer`: no host sync, no host-to-device copy after the first call.

Which tokens a rank counts, so that each token of the EP group is counted exactly once:
- dispatch after routing (all2all backends; vLLM's modular CPU/GPU kernels): every row the hook
  sees; where the TP ranks of a DP rank hold the same tokens (no sequence parallelism), only the
  first of them counts;
- vLLM's naive dispatch (every DP rank's tokens gathered before routing): the chunk of its own
  DP rank (of its EP rank with sequence parallelism), sizes from vLLM's `dp_metadata`.
Padding rows are never counted. Without EP (ep_size 1) nothing is counted.

Shape legend: T tokens of the call, K top-k, G physical experts, W EP ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

__all__ = ["ENV_RANKS_PER_NODE", "LayerTraffic", "count", "layer_traffic", "ranks_per_node", "rank_to_node"]

logger = logging.getLogger("vllm.sere")

ENV_RANKS_PER_NODE = "SERE_RANKS_PER_NODE"
_LAYERS: dict[str, "LayerTraffic | None"] = {}  # layer name -> its traffic state (None: no EP)

# The remote / cross-node pair fields (sere.ep.accounting.UNIT_FIELDS) whose bytes are exported.
BYTE_FIELDS = (
    "remote_token_expert_pairs", "cross_node_token_expert_pairs", "remote_token_rank_pairs",
    "cross_node_token_rank_pairs", "cross_node_token_node_pairs",
)


@dataclass
class LayerTraffic:
    """What one EP rank needs to count one layer's dispatch (fixed at the first call)."""

    layer_name: str
    ep_rank: int
    expert_to_rank: torch.Tensor  # [G] int64, on the ids' device
    rank_to_node: torch.Tensor  # [W] int64, on the ids' device
    num_nodes: int
    row_bytes: int  # hidden_size x activation dtype bytes
    counts_here: bool  # False: a TP replica of these tokens, counted by the first replica
    chunk: int | None  # index of this rank's tokens among gathered chunks; None: not gathered
    num_chunks: int
    dp_size: int
    eplb_state: object | None  # vLLM's EplbLayerState (its tensors change in place)

    def own_rows(self, num_tokens: int, context) -> tuple[int, int]:
        """[start, stop) of the call's rows that live on this rank (host ints, no sync)."""
        if self.chunk is None:
            return 0, num_tokens
        if self.dp_size == 1:  # vLLM's AgRs manager: equal chunks
            sizes = [num_tokens // self.num_chunks] * self.num_chunks
        else:
            sizes = list(context.dp_metadata.get_chunk_sizes_across_dp_rank())
        if len(sizes) != self.num_chunks or sum(sizes) != num_tokens:
            raise RuntimeError(f"sere: layer {self.layer_name}: gathered chunk sizes {sizes} do not "
                               f"make the {num_tokens} routed tokens of {self.num_chunks} ranks")
        start = sum(sizes[: self.chunk])
        return start, start + sizes[self.chunk]


def ranks_per_node(ep_size: int) -> int:
    """R from SERE_RANKS_PER_NODE (default ep_size: one node); it must divide ep_size."""
    text = os.environ.get(ENV_RANKS_PER_NODE, "")
    if not text:
        return ep_size
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV_RANKS_PER_NODE}={text!r} is not an integer") from None
    if value < 1 or ep_size % value:
        raise ValueError(f"{ENV_RANKS_PER_NODE}={value} must be >= 1 and divide the EP size {ep_size}")
    return value


def rank_to_node(ep_size: int) -> torch.Tensor:
    """[W] int64 node of every EP rank under SERE_RANKS_PER_NODE."""
    return torch.arange(ep_size, dtype=torch.int64) // ranks_per_node(ep_size)


def vllm_expert_to_rank(runner) -> torch.Tensor:
    """[G] int64 owner rank of every (physical) expert, from vLLM's own placement function."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    parallel = runner.moe_config.moe_parallel_config
    num_experts = runner.moe_config.num_experts
    strategy = runner.expert_placement_strategy
    owner = torch.full((num_experts,), -1, dtype=torch.int64)
    for rank in range(parallel.ep_size):
        _, expert_map, _ = determine_expert_map(parallel.ep_size, rank, num_experts, strategy)
        owner[expert_map >= 0] = rank
    mine = runner.expert_map
    if (owner < 0).any() or (mine is not None and not torch.equal(mine[:num_experts].cpu() >= 0,
                                                                 owner == parallel.ep_rank)):
        raise RuntimeError(f"sere: layer {runner.layer_name}: vLLM's expert map of EP rank {parallel.ep_rank} "
                           f"is not its '{strategy}' placement; the traffic counters cannot place experts")
    return owner


def build(runner, device: torch.device) -> LayerTraffic | None:
    """The traffic state of one vLLM MoE runner, or None without expert parallelism."""
    parallel = runner.moe_config.moe_parallel_config
    if not parallel.use_ep or parallel.ep_size <= 1:
        return None
    if parallel.pcp_size > 1:
        logger.warning("sere: no EP traffic counters under prefill context parallelism (pcp_size=%d)",
                       parallel.pcp_size)
        return None
    sequence_parallel = parallel.sp_size > 1
    gathered = bool(runner.do_naive_dispatch_combine)
    replicas = 1 if sequence_parallel else parallel.ep_size // parallel.dp_size
    moe = runner.moe_config
    return LayerTraffic(
        layer_name=runner.layer_name,
        ep_rank=parallel.ep_rank,
        expert_to_rank=vllm_expert_to_rank(runner).to(device),
        rank_to_node=rank_to_node(parallel.ep_size).to(device),
        num_nodes=parallel.ep_size // ranks_per_node(parallel.ep_size),
        row_bytes=moe.hidden_dim * torch.empty((), dtype=moe.in_dtype).element_size(),
        counts_here=parallel.ep_rank % replicas == 0,
        chunk=(parallel.ep_rank if sequence_parallel else parallel.dp_rank) if gathered else None,
        num_chunks=parallel.ep_size if sequence_parallel else parallel.dp_size,
        dp_size=parallel.dp_size,
        eplb_state=runner.router.eplb_state,
    )


def layer_traffic(layer_name: str, context, device: torch.device) -> LayerTraffic | None:
    """The layer's traffic state, built on its first call (host work, before any graph capture:
    vLLM's profile run), from vLLM's runner in the forward context; None where there is none."""
    if layer_name in _LAYERS:
        return _LAYERS[layer_name]
    runner = (getattr(context, "no_compile_layers", None) or {}).get(layer_name)
    if runner is None:  # a hook driven outside a vLLM engine (tests): nothing to count
        return None
    _LAYERS[layer_name] = build(runner, device)
    return _LAYERS[layer_name]


def count(layer_name: str, topk_ids: torch.Tensor, padding: torch.Tensor | None, context):
    """(increments [len(TRAFFIC_FIELDS)] int64 on the ids' device, (start, stop, src rank) of the
    rows counted), or None where this rank counts nothing (no EP, a TP replica, no engine).

    topk_ids: [T, K] the logical ids the hook returns; padding: [>= own rows] bool or None.
    """
    state = layer_traffic(layer_name, context, topk_ids.device)
    if state is None or not state.counts_here:
        return None
    from sere.ep.accounting import UNIT_FIELDS, duplicate_slots, eplb_physical_ids, unit_counts
    from sere.vllm.metrics import TRAFFIC_FIELDS

    repeat = duplicate_slots(topk_ids)  # [T, K] a slot naming an expert of an earlier slot
    ids = torch.where(repeat, torch.full_like(topk_ids, -1), topk_ids).long()  # merged
    if state.eplb_state is not None:  # vLLM maps after the hook, by row index of the whole call
        ids = eplb_physical_ids(ids, state.eplb_state.logical_to_physical_map,
                                state.eplb_state.logical_replica_count)
    start, stop = state.own_rows(topk_ids.shape[0], context)
    ids, repeat = ids[start:stop], repeat[start:stop]  # [T', K]
    real = torch.ones(stop - start, dtype=torch.bool, device=ids.device)  # [T']
    if padding is not None:
        real = ~padding[: stop - start].to(ids.device)
    ids = torch.where(real[:, None], ids, -1)
    counts = unit_counts(ids, state.expert_to_rank, state.rank_to_node, state.ep_rank, state.num_nodes)  # [10]
    values = dict(zip(UNIT_FIELDS, counts))
    values["tokens"] = real.sum()
    values["merged_slots"] = (repeat & real[:, None]).sum()
    for field in BYTE_FIELDS:
        values[field.replace("_pairs", "_bytes")] = values[field] * state.row_bytes
    vector = torch.stack([values[name.removeprefix("ep_")] for name in TRAFFIC_FIELDS]).to(torch.int64)
    return vector, (start, stop, state.ep_rank)
