"""SERE inside DeepSpeed-MoE (`deepspeed.moe.layer.MoE`, DeepSpeed 0.19.x) through its gate.

Shape legend:  S tokens (DeepSpeed's name)   K top-k   E experts   C capacity per expert

`enable_sere(moe, cfg, matrix)` replaces `moe.deepspeed_moe.gate` (a `TopKGate`) by
`SereTopKGate`, which calls the original gate and post-processes its top-k selection with the
policy layer (`sere.policy.route`, any policy) before DeepSpeed dispatches. DeepSpeed 0.19's `MOELayer` asks the gate for *sparse
routes* (`gate(x, used_token, sparse_routes=True, use_tutel)`), an internal 7-tuple

    (l_aux, capacity, num_experts, indices [K, S] int32, locations [K, S] int32, gates [K, S], exp_counts [E])

with `indices[k, s] = -1` for a route dropped by the capacity limit. The wrapper re-routes
`indices.T` (= topk_ids), merges a token's duplicate experts (the later route becomes -1, its gate
is added to the first), and recomputes what depends on the routing: each route's slot in its
expert's capacity buffer (`locations`, in token order as DeepSpeed does), `exp_counts`, and the
capacity (max count, all-reduced MAX over the EP group, as DeepSpeed does with drop_tokens=False).
The primary set is the OR over the EP group.

Limits, and why:
- `drop_tokens=False` is required. With dropping on, DeepSpeed removes over-capacity routes
  *inside* the gate, before the wrapper sees them, so re-routing would act on an already truncated
  routing (and the primaries would overflow their capacity after re-routing).
- `use_tutel=True` and the dense gate output (`sparse_routes=False`: `combine_weights [S, E, C]`)
  are refused with an error: both are internal formats this wrapper does not translate.
- DeepSpeed's all-to-all moves a dense `[E, C, hidden]` buffer (padded to the largest expert's
  count), so SERE changes *which* experts run and how full the buffers are, not the byte count of
  that all-to-all; `sere.ep.dispatch` is the path where re-routing shrinks traffic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sere import policy as policies
from sere.agreement import agreed_primary, agreement_vector
from sere.config import SereConfig

__all__ = ["SereTopKGate", "enable_sere", "merge_duplicate_routes"]


def merge_duplicate_routes(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, K] ids/weights -> the same with each token's repeated expert set to -1 and its weight
    added to the expert's first slot (weight 0 on the dropped route).
    """
    num_slots = topk_ids.shape[1]
    same = topk_ids[:, :, None] == topk_ids[:, None, :]  # [S, K, K] same[s, j, i]: slot j equals slot i
    first = same.int().argmax(dim=2)  # [S, K] first slot holding the same expert
    duplicate = first != torch.arange(num_slots, device=topk_ids.device)
    merged = torch.zeros_like(topk_weights).scatter_add_(1, first, topk_weights)  # [S, K]
    return torch.where(duplicate, -1, topk_ids), torch.where(duplicate, 0.0, merged).to(topk_weights.dtype)


class SereTopKGate(nn.Module):
    """A DeepSpeed `TopKGate` whose selected experts are re-routed by SERE (see module doc)."""

    def __init__(self, gate: nn.Module, cfg: SereConfig, matrix: torch.Tensor | None = None):
        super().__init__()
        if getattr(gate, "drop_tokens", False):
            raise ValueError(
                "SERE in DeepSpeed-MoE needs MoE(..., drop_tokens=False): with dropping on, DeepSpeed "
                "removes over-capacity routes inside the gate, before re-routing could run"
            )
        num_experts = gate.wg.weight.shape[0]
        cfg.check_model(top_k=gate.k, num_experts=num_experts)
        kind = policies.matrix_kind(cfg)
        if kind is not None and (matrix is None or tuple(matrix.shape) != (num_experts, num_experts)):
            got = None if matrix is None else tuple(matrix.shape)
            raise ValueError(f"policy {cfg.policy!r} needs a [{num_experts}, {num_experts}] {kind} matrix, got {got}")
        self.inner = gate
        self.cfg = cfg
        self.num_experts = num_experts
        self.register_buffer("matrix", None if matrix is None else matrix.float().contiguous(), persistent=False)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (model's ids, dispatched ids) [S, K]

    # DeepSpeed's MOELayer talks to these attributes of its gate
    @property
    def wg(self):
        return self.inner.wg

    @property
    def k(self):
        return self.inner.k

    @property
    def ep_group(self):
        return self.inner.ep_group

    def _set_ep_group(self, ep_group):
        self.inner._set_ep_group(ep_group)

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError(
                "SereTopKGate translates DeepSpeed's sparse routes only (MOELayer in DeepSpeed 0.19 calls the gate "
                "with sparse_routes=True); the dense combine_weights form and Tutel are not supported"
            )
        l_aux, _, num_experts, indices, _, gates, _ = self.inner(input, used_token, True, False)
        topk_ids = indices.t().long().contiguous()  # [S, K]; no -1: drop_tokens is off
        topk_weights = gates.t().contiguous()  # [S, K]
        cfg = self.cfg.at(topk_ids.shape[0])  # policy "tuned": this step's bucket
        scores = None
        if policies.needs_router_scores(cfg):  # DeepSpeed's top-k gate scores with a softmax
            scores = torch.softmax(self.inner.wg(input.to(self.inner.wg.weight.dtype)).float(), dim=-1)  # [S, E]
        agreement = agreement_vector(cfg, topk_ids, topk_weights, num_experts, scores)  # [2E]
        group = self.inner.ep_group
        if cfg.scope == "ep_group" and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(agreement, group=group)  # SUM: the same P (and xshare's mass) on every rank
        primary = agreed_primary(cfg, agreement)  # [E]
        new_ids, new_weights, _, _ = policies.route(
            cfg, topk_ids, topk_weights, num_experts=num_experts, matrix=self.matrix, router_scores=scores,
            primary=primary,
        )
        self.last_routing = (topk_ids.detach(), new_ids.detach())
        route_ids, route_gates = merge_duplicate_routes(new_ids, new_weights)  # [S, K]

        kept = route_ids >= 0
        tokens = torch.arange(route_ids.shape[0], device=route_ids.device)[:, None].expand_as(route_ids)
        mask = torch.zeros(route_ids.shape[0], num_experts, dtype=torch.long, device=route_ids.device)  # [S, E]
        mask[tokens[kept], route_ids[kept]] = 1
        exp_counts = mask.sum(0)  # [E]
        locations = (torch.cumsum(mask, 0) - 1).gather(1, route_ids.clamp_min(0)) * kept  # [S, K]
        capacity = exp_counts.max().clamp_min(1)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=group)  # same C on every rank
        return (l_aux, capacity, num_experts, route_ids.t().to(torch.int32).contiguous(),
                locations.t().to(torch.int32).contiguous(), route_gates.t().contiguous(), exp_counts.detach())


def enable_sere(moe, cfg: SereConfig, matrix: torch.Tensor | None = None) -> SereTopKGate:
    """Swap `moe.deepspeed_moe.gate` of a `deepspeed.moe.layer.MoE` for a SereTopKGate; returns it."""
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the DeepSpeed adapter needs deepspeed: DS_BUILD_OPS=0 pip install 'deepspeed==0.19.8'") from exc
    if not isinstance(moe, MoE):
        raise TypeError(f"expected deepspeed.moe.layer.MoE, got {type(moe).__name__}")
    gate = SereTopKGate(moe.deepspeed_moe.gate, cfg, matrix)
    moe.deepspeed_moe.gate = gate
    return gate
