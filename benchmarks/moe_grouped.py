"""The routed experts of one MoE layer as two grouped GEMMs, and the per-expert loop they must equal.

Shapes: T tokens, K slots per token, E experts, H hidden, W expert width (SwiGLU: gate and up
stacked in `w_gate_up`), N = T * K slots.

`grouped_moe` sorts the N slots by expert and runs `torch._grouped_mm` over all E experts with
int32 cumulative offsets, so every shape is static whatever the routing: one CUDA graph serves any
ids, no host sync. An expert that no slot chose is an empty group. On sm_90/sm_100 the CUTLASS
grouped kernel schedules tiles per group, so an empty group launches no tile and reads none of
its weights (the premise of the benchmark; bench_moe_layer.py's compute floor checks it: all
slots on one expert must cost one expert's bytes, not E). On other GPUs `torch._grouped_mm`
falls back to a loop that copies the offsets to the host (not capturable). On CPU, torch 2.13
runs `torch._grouped_mm` as a loop over groups, which is what the CPU tests use.

`moe_loop_reference` is the spec: for each expert, the tokens routed to it, one matmul each, in
plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots in expert order and where each expert's group ends.

    Args:
        topk_ids: [T, K] int32/int64 expert ids in [0, E).
        num_experts: E.
    Returns:
        (order [N] int64: slot indices (token * K + k) sorted by expert, stable;
         offs [E] int32: offs[e] = number of slots with id <= e, the end of group e).
    """
    sorted_ids, order = topk_ids.reshape(-1).sort(stable=True)  # [N], [N]
    experts = torch.arange(num_experts, dtype=sorted_ids.dtype, device=sorted_ids.device)  # [E]
    offs = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)  # [E]
    return order, offs


def grouped_moe(
    hidden_states: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]), two grouped GEMMs.

    Args:
        hidden_states: [T, H] bfloat16.
        w_gate_up: [E, 2W, H] bfloat16, gate rows then up rows (the checkpoint layout).
        w_down: [E, H, W] bfloat16.
        topk_ids: [T, K] int32/int64 in [0, E).
        topk_weights: [T, K] float32.
    Returns:
        [T, H] bfloat16; the weighted sum over K in float32, in slot order (no atomics).
    """
    num_tokens, top_k = topk_ids.shape
    order, offs = sort_by_expert(topk_ids, w_gate_up.shape[0])  # [N], [E]
    x = hidden_states[order // top_k]  # [N, H] rows in expert order
    # NOTE: mat_b is [E, H, 2W] as a transposed view (column-major): no weight copy
    gate, up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [N, W] each
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [N, H]
    y = torch.empty_like(y).index_copy_(0, order, y)  # [N, H] back in slot order
    out = (y.view(num_tokens, top_k, -1).float() * topk_weights[..., None]).sum(dim=1)  # [T, H] float32
    return out.to(hidden_states.dtype)


def moe_loop_reference(
    hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """The same sum, one expert at a time over the tokens routed to it. Same arguments and
    result as `grouped_moe`; host syncs (nonzero), so never under graph capture."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # [T, H]
    for expert in range(w_gate_up.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)  # [n], [n]
        if tokens.numel() == 0:
            continue
        gate, up = (hidden_states[tokens] @ w_gate_up[expert].T).chunk(2, dim=-1)  # [n, W] each
        y = (F.silu(gate) * up) @ w_down[expert].T  # [n, H] bfloat16
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots][:, None])
    return out.to(hidden_states.dtype)
