"""The routed experts an EP rank owns, and the single-process MoE they must reproduce.

Shape legend:
    T  tokens   H  hidden   I  expert intermediate size   K  top-k
    E  routed experts (global)   L  experts on this rank   Q  (row, expert) pairs on this rank

Weights use the Qwen3-MoE / transformers 5.x fused layout: `gate_up_proj [E, 2I, H]` (gate rows
first) and `down_proj [E, H, I]`; an expert computes `down(silu(gate(x)) * up(x))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sere.ep.placement import ExpertPlacement

__all__ = ["SwiGLUExperts", "moe_reference", "random_expert_weights"]


def random_expert_weights(
    num_experts: int, hidden: int, inter: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, 2I, H], [E, H, I]) reproducible random weights (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return gate_up.to(dtype), down.to(dtype)


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, down)  # [n, H]


class SwiGLUExperts(nn.Module):
    """The L experts of one rank. `forward(x [Q, H], local_ids [Q]) -> [Q, H]` (unweighted)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, expert_ids: torch.Tensor):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj.contiguous(), requires_grad=False)  # [L, 2I, H]
        self.down_proj = nn.Parameter(down_proj.contiguous(), requires_grad=False)  # [L, H, I]
        self.register_buffer("expert_ids", expert_ids.long(), persistent=False)  # [L] global ids

    @classmethod
    def from_global(
        cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, placement: ExpertPlacement, rank: int
    ) -> "SwiGLUExperts":
        """Slice this rank's experts out of the full [E, ...] weights."""
        owned = placement.local_experts(rank)  # [L]
        return cls(gate_up_proj[owned], down_proj[owned], owned)

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(local_ids, stable=True)  # [Q] rows grouped by expert
        counts = torch.bincount(local_ids, minlength=self.num_local_experts).tolist()
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = order[start : start + n]
                w_gate_up, w_down = self.gate_up_proj[e], self.down_proj[e]
                out[rows] = _swiglu(x[rows].to(w_gate_up.dtype), w_gate_up, w_down).to(x.dtype)
                start += n
        return out


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Single-process MoE: sum_k w[t, k] * expert_{ids[t, k]}(x[t]), slot by slot (no merging).

    x [T, H], topk_ids [T, K], topk_weights [T, K], gate_up_proj [E, 2I, H], down_proj [E, H, I]
    -> [T, H] in x's dtype, accumulated in float32.
    """
    out = torch.zeros(x.shape, dtype=torch.float32)
    for slot in range(topk_ids.shape[1]):
        for e in topk_ids[:, slot].unique().tolist():
            rows = (topk_ids[:, slot] == e).nonzero().flatten()
            y = _swiglu(x[rows], gate_up_proj[e], down_proj[e]).float()
            out.index_add_(0, rows, y * topk_weights[rows, slot, None].float())
    return out.to(x.dtype)
