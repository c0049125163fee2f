"""Expert-parallel MoE step: re-route, dispatch, expert computation, combine.

Shape legend:
    T  tokens on this rank       H  hidden        K  top-k         E  routed experts
    W  EP ranks                  L  experts per rank (E / W)       S  num_primary
    M  distinct (token, expert) pairs on this rank after merging
    R  rows sent by this rank = distinct (token, destination rank) pairs
    Rr rows received by this rank                                   Z  slots per row = min(K, L)

One step on every rank of the group (docs/spec.md §15):
  1. agree: a fixed-size all-gather of shapes, dtypes, placement and policy; any local problem or
     disagreement raises EPError on every rank (no rank is left waiting in a collective);
  2. re-route before dispatch against the primary set P of the whole group (all-reduce SUM of the
     [2E] agreement vector, `sere.agreement`: P's union and xshare's mass), optionally with locality-aware targets;
  3. merge duplicate (token, expert) slots (weights summed) and send each token once per
     destination rank, with its Z (local expert id, weight) slots;
  4. exchange the per-destination row counts (all_to_all_single of W int64), then ONE
     all_to_all_single of the packed rows with uneven split sizes (gloo cannot do the uneven
     list-form all_to_all);
  5. the owner computes its experts on the received rows and sums them per row, weighted;
  6. combine: one all_to_all_single back with the mirrored splits, and an index_add per token.
NOTE: the split sizes are read on the host (`.tolist()`): this path is not CUDA-graph capturable,
like the "normal" (non low-latency) mode of DeepEP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sere.agreement import agreed_primary, agreement_vector
from sere.ep.collective import agree_or_raise
from sere.ep.placement import ExpertPlacement, make_placement, placement_from_rank_experts
from sere import policy as policies
from sere.config import SereConfig

__all__ = ["EPStepInfo", "ep_moe_forward", "agree_placement"]

_TOPK = SereConfig(policy="topk")
_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


@dataclass
class EPStepInfo:
    """What one rank did in one step. Tensors are int64 [W] indexed by peer rank."""

    topk_ids: torch.Tensor  # [T, K] ids actually dispatched
    topk_weights: torch.Tensor  # [T, K] their weights
    send_rows: torch.Tensor  # rows this rank sent to each peer (incl. itself)
    recv_rows: torch.Tensor  # rows this rank received from each peer
    row_bytes: int  # dispatch payload per row: hidden + Z (int32 id, float32 weight)
    combine_row_bytes: int  # combine payload per row: hidden
    local_experts_computed: int  # distinct experts this rank ran
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def send_bytes(self) -> torch.Tensor:
        return self.send_rows * self.row_bytes


def agree_placement(
    spec: str | list[list[int]] | ExpertPlacement,
    num_experts: int,
    group=None,
    ranks_per_node: int | None = None,
) -> ExpertPlacement:
    """Build (or take) the placement on every rank and check that all ranks hold the same one.

    A placement that is invalid on any rank (not covering every expert once, world size not
    dividing E, a different table) raises EPError on every rank.
    """
    error, placement = None, None
    try:
        if isinstance(spec, ExpertPlacement):
            placement = spec
        elif isinstance(spec, str):
            placement = make_placement(spec, num_experts, dist.get_world_size(group), ranks_per_node)
        else:
            placement = placement_from_rank_experts(spec, num_experts, ranks_per_node)
        if placement.world_size != dist.get_world_size(group):
            raise ValueError(
                f"placement is for {placement.world_size} ranks, the group has {dist.get_world_size(group)}"
            )
    except ValueError as exc:
        error = str(exc)
    meta = {"placement_checksum": placement.checksum() if error is None else -1, "num_experts": num_experts}
    agree_or_raise(meta, error, group)
    return placement


def _local_problem(x, topk_ids, topk_weights, experts, placement, cfg, matrix, router_scores):
    """The first problem with this rank's inputs, as text, or None."""
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        return f"x {tuple(x.shape)} must be [T, H] and topk_ids {tuple(topk_ids.shape)} [T, K] with the same T"
    if topk_weights.shape != topk_ids.shape:
        return f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}"
    if topk_ids.dtype not in (torch.int32, torch.int64) or x.dtype not in _DTYPE_CODE:
        return f"topk_ids must be int32/int64 (got {topk_ids.dtype}), x a float type (got {x.dtype})"
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= placement.num_experts):
        return f"topk_ids outside [0, {placement.num_experts})"
    if getattr(experts, "num_local_experts", placement.num_local_experts) != placement.num_local_experts:
        return f"experts module holds {experts.num_local_experts} experts, placement gives {placement.num_local_experts}"
    try:
        cfg.check_model(top_k=topk_ids.shape[1], num_experts=placement.num_experts)
        policies.check_inputs(cfg, topk_ids, placement.num_experts, matrix, router_scores)
    except ValueError as exc:
        return str(exc)
    return None


def _pack_rows(x_rows, slot_ids, slot_weights):
    """[R, H] float, [R, Z] int32, [R, Z] float32 -> [R, bytes] uint8."""
    parts = [x_rows.contiguous().view(torch.uint8), slot_ids.view(torch.uint8), slot_weights.view(torch.uint8)]
    return torch.cat(parts, dim=1)


def _agree_and_route(x, topk_ids, topk_weights, experts, placement, cfg, matrix, router_scores, group, timer):
    """Checks the call on every rank (one error raises everywhere), agrees on the step's tokens,
    builds P (over the group with scope ep_group) and routes: ([T, K] ids, [T, K] weights)."""
    world = dist.get_world_size(group)
    error = _local_problem(x, topk_ids, topk_weights, experts, placement, cfg, matrix, router_scores)
    if error is None and placement.world_size != world:
        error = f"placement is for {placement.world_size} ranks, the group has {world}"
    meta = {
        "hidden": x.shape[-1], "top_k": topk_ids.shape[-1], "num_experts": placement.num_experts,
        "x_dtype": _DTYPE_CODE.get(x.dtype, 0), "placement_checksum": placement.checksum(),
        "policy": policies.config_fingerprint(cfg),
    }
    tokens = agree_or_raise(meta, error, group, shared={"num_tokens": x.shape[0]})["num_tokens"]  # [W]
    timer["agree"] = time.perf_counter()

    step_tokens = sum(tokens)  # the same on every rank: all decide alike whether to re-route
    cfg = cfg.at(step_tokens)  # policy "tuned": the bucket of the group's step
    primary = None
    if cfg.policy != "topk" and 0 < step_tokens <= cfg.max_decode_tokens:
        local = agreement_vector(cfg, topk_ids, topk_weights, placement.num_experts, router_scores)  # [2E]
        if cfg.scope == "ep_group":
            dist.all_reduce(local, group=group)  # SUM: the same P (and xshare's mass) on every rank
        primary = agreed_primary(cfg, local)  # [E]
    timer["primary"] = time.perf_counter()
    ids, weights, _, _ = policies.route(
        cfg, topk_ids, topk_weights, num_experts=placement.num_experts, matrix=matrix,
        router_scores=router_scores, primary=primary, placement=placement, step_tokens=step_tokens,
    )
    timer["reroute"] = time.perf_counter()
    return ids, weights


def _merged_rows(ids: torch.Tensor, weights: torch.Tensor, placement: ExpertPlacement):
    """One row per (destination rank, token), grouped by rank: a token's slots on the same local
    expert are merged (weights summed). Returns (row_rank [R], row_token [R], slot_ids [R, Z]
    int32 local expert ids (-1: empty), slot_weights [R, Z] float32), Z = min(K, local experts)."""
    num_tokens, top_k = ids.shape
    key_tokens = max(num_tokens, 1)  # NOTE: a rank may have no tokens; keys must not divide by 0
    num_local = placement.num_local_experts
    device = ids.device
    expert_to_rank = placement.expert_to_rank.to(device)
    expert_to_local = placement.expert_to_local.to(device)
    flat_ids = ids.reshape(-1).long()  # [T*K]
    token_of_slot = torch.arange(num_tokens, device=device).repeat_interleave(top_k)  # [T*K]
    # pair key sorts by (destination rank, token, local expert): rows come out grouped by rank
    pair_key = (expert_to_rank[flat_ids] * key_tokens + token_of_slot) * num_local + expert_to_local[flat_ids]
    pairs, slot_to_pair = torch.unique(pair_key, return_inverse=True)  # [M], [T*K]
    pair_weight = torch.zeros(pairs.shape[0], dtype=torch.float32, device=device)
    pair_weight.index_add_(0, slot_to_pair, weights.reshape(-1).float())  # duplicates merged
    rows, pair_to_row, pairs_per_row = torch.unique_consecutive(
        pairs // num_local, return_inverse=True, return_counts=True
    )  # [R], [M], [R]
    row_start = torch.cumsum(pairs_per_row, 0) - pairs_per_row  # [R]
    slot_in_row = torch.arange(pairs.shape[0], device=device) - row_start[pair_to_row]  # [M]
    num_slots = min(top_k, num_local)
    slot_ids = torch.full((rows.shape[0], num_slots), -1, dtype=torch.int32, device=device)  # [R, Z]
    slot_weights = torch.zeros(rows.shape[0], num_slots, dtype=torch.float32, device=device)  # [R, Z]
    slot_ids[pair_to_row, slot_in_row] = (pairs % num_local).to(torch.int32)
    slot_weights[pair_to_row, slot_in_row] = pair_weight
    return rows // key_tokens, rows % key_tokens, slot_ids, slot_weights


def _run_received(received: torch.Tensor, x_bytes: int, num_slots: int, dtype: torch.dtype, experts):
    """The received rows [Rr, B] through this rank's experts: ([Rr, H] float32 weighted sums,
    number of distinct local experts that ran)."""
    recv_x = received[:, :x_bytes].contiguous().view(dtype)  # [Rr, H]
    recv_ids = received[:, x_bytes : x_bytes + 4 * num_slots].contiguous().view(torch.int32)  # [Rr, Z]
    recv_w = received[:, x_bytes + 4 * num_slots :].contiguous().view(torch.float32)  # [Rr, Z]
    valid_row, valid_slot = (recv_ids >= 0).nonzero(as_tuple=True)  # [Q]
    local_ids = recv_ids[valid_row, valid_slot].long()  # [Q]
    y = experts(recv_x[valid_row], local_ids).float() * recv_w[valid_row, valid_slot, None]  # [Q, H]
    out_rows = torch.zeros(recv_x.shape, dtype=torch.float32, device=received.device).index_add_(0, valid_row, y)
    return out_rows, int(torch.unique(local_ids).numel())


def ep_moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts,
    placement: ExpertPlacement,
    cfg: SereConfig | None = None,
    matrix: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
    group=None,
) -> tuple[torch.Tensor, EPStepInfo]:
    """One expert-parallel MoE layer step on this rank's tokens.

    Args:
        x: [T, H] float hidden states of this rank's tokens (T may differ between ranks).
        topk_ids / topk_weights: [T, K] from the model's router.
        experts: callable (rows [Q, H], local expert ids [Q] int64) -> [Q, H] for the experts of
            `placement.local_experts(rank)`, e.g. `SwiGLUExperts`.
        placement: the same on every rank (see `agree_placement`).
        cfg: the SereConfig, the same on every rank (None: policy topk). Its `scope` says whose
            primary set is used, `max_decode_tokens` bounds the group's tokens of a re-routed step.
        matrix: [E, E] the layer's sidecar matrix (`sere.policy.matrix_kind(cfg)`);
        router_scores: [T, E] where `sere.policy.needs_router_scores(cfg)`.
    Returns:
        ([T, H] output in x's dtype, EPStepInfo).
    """
    timer = {"start": time.perf_counter()}
    cfg = cfg or _TOPK
    world = dist.get_world_size(group)
    ids, weights = _agree_and_route(x, topk_ids, topk_weights, experts, placement, cfg, matrix, router_scores,
                                    group, timer)
    row_rank, row_token, slot_ids, slot_weights = _merged_rows(ids, weights, placement)  # [R], [R], [R, Z] x 2
    num_slots = slot_ids.shape[1]

    send_rows = torch.bincount(row_rank, minlength=world).long()  # [W]
    recv_rows = torch.empty_like(send_rows)
    dist.all_to_all_single(recv_rows, send_rows, group=group)
    send_splits, recv_splits = send_rows.tolist(), recv_rows.tolist()
    packed = _pack_rows(x[row_token], slot_ids, slot_weights)  # [R, B]
    row_bytes = packed.shape[1]
    received = torch.empty(sum(recv_splits), row_bytes, dtype=torch.uint8, device=x.device)  # [Rr, B]
    dist.all_to_all_single(received, packed, recv_splits, send_splits, group=group)
    timer["dispatch"] = time.perf_counter()

    x_bytes = x.shape[1] * x.element_size()
    out_rows, computed = _run_received(received, x_bytes, num_slots, x.dtype, experts)  # [Rr, H] float32
    timer["experts"] = time.perf_counter()

    back = out_rows.to(x.dtype).contiguous().view(torch.uint8)  # [Rr, H * bytes]
    returned = torch.empty(row_rank.shape[0], x_bytes, dtype=torch.uint8, device=x.device)  # [R, H * bytes]
    dist.all_to_all_single(returned, back, send_splits, recv_splits, group=group)
    out = torch.zeros(ids.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, row_token, returned.view(x.dtype).float())
    timer["combine"] = time.perf_counter()

    phases = ["agree", "primary", "reroute", "dispatch", "experts", "combine"]
    marks = [timer["start"]] + [timer[p] for p in phases]
    seconds = {p: marks[i + 1] - marks[i] for i, p in enumerate(phases)}
    seconds["total"] = marks[-1] - marks[0]
    info = EPStepInfo(ids, weights, send_rows, recv_rows, row_bytes, x_bytes, computed, seconds)
    return out.to(x.dtype), info
