"""Thin adapter for Hugging Face transformers MoE models (5.x): find the MoE blocks, run one
routed expert, and re-route what the model's own router chose.

Families covered (transformers 5.19): Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2,
DeepSeek-V3. In all of them the sparse block holds a router module `block.gate` whose forward
returns `(router_logits [T, E], topk_weights [T, K], topk_ids [T, K])` and an experts module
`block.experts` with fused 3-D weights `gate_up_proj [E, 2I, d]`, `down_proj [E, d, I]`
(`[E, d, 2I]` / `[E, I, d]` when `is_transposed`). Shared experts (Qwen2-MoE, DeepSeek) sit
beside them and are never touched here.

Re-routing is a forward hook on the router: it post-processes whatever the router returned
(softmax, sigmoid, biased, grouped top-k alike) and hands the new ids to the experts. No model
code is copied.

Shape legend:
    T  tokens in one forward call of a block (batch x sequence)
    E  routed experts    K  top-k    d  hidden size    I  expert intermediate size
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from sere.policy import matrix_kind, needs_router_scores, route, router_scores

if TYPE_CHECKING:
    from sere.config import SereConfig

__all__ = [
    "MoeBlock",
    "RoutingRecord",
    "find_moe_blocks",
    "expert_hidden",
    "expert_down",
    "run_experts",
    "run_expert",
    "routing_hook",
]

# Router classes whose scores are sigmoids of the logits; every other router uses a softmax.
_SIGMOID_ROUTERS = ("DeepseekV3TopkRouter",)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MoeBlock:
    """One sparse MoE block of a model."""

    layer_idx: int  # decoder layer index (the sidecar key)
    name: str  # module path, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module  # block.gate: forward(x) -> (logits [T, E], weights [T, K], ids [T, K])
    experts: nn.Module  # block.experts: fused routed experts
    num_experts: int
    top_k: int
    score_fn: str  # "softmax" | "sigmoid": router scores from logits (for OEA)


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every sparse MoE block of `model`, in decoder-layer order.

    A block is a module with a router `gate` (having `top_k`) and fused `experts`.
    Raises ValueError if the model has none (a dense model, or an unsupported layout).
    """
    blocks = []
    for name, module in model.named_modules():
        router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            continue
        if not hasattr(router, "top_k"):
            continue
        if not _is_fused_experts(experts):
            raise ValueError(
                f"{name}: experts of type {type(experts).__name__} are not fused 3-D tensors "
                "(gate_up_proj/down_proj); this adapter supports transformers>=5 MoE layouts"
            )
        if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{name}: only gated, concatenated [gate; up] experts are supported")
        match = _LAYER_RE.search(name + ".")
        if match is None:
            raise ValueError(f"{name}: cannot tell the decoder layer index from the module path")
        num_experts = int(getattr(router, "num_experts", experts.gate_up_proj.shape[0]))
        score_fn = "sigmoid" if type(router).__name__ in _SIGMOID_ROUTERS else "softmax"
        blocks.append(
            MoeBlock(int(match.group(1)), name, module, router, experts, num_experts,
                     int(router.top_k), score_fn)
        )
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no MoE blocks (a router `gate` with `top_k` next to fused "
            "`experts`); supported: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3"
        )
    return sorted(blocks, key=lambda b: b.layer_idx)


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    # x [..., N, in]; weight [..., out, in] (or [..., in, out] when transposed)
    return x @ weight if transposed else x @ weight.transpose(-1, -2)


def _select(param: torch.Tensor, expert_ids: torch.Tensor | None) -> torch.Tensor:
    return param if expert_ids is None else param[expert_ids]


def expert_hidden(
    block: MoeBlock, x: torch.Tensor, expert_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Gated intermediate activations of routed experts (float32).

    Args:
        x: [N, d] float layer inputs.
        expert_ids: optional [E'] int64 subset of experts (default all E).
    Returns:
        [E', N, I] float32, `act(x W_gate^T) * (x W_up^T)` for each expert.
    """
    ex = block.experts
    transposed = bool(getattr(ex, "is_transposed", False))
    gate_up = _select(ex.gate_up_proj, expert_ids).float()  # [E', 2I, d]
    out = _linear(x.float()[None], gate_up, transposed)  # [E', N, 2I]
    if getattr(ex, "has_bias", False):
        out = out + _select(ex.gate_up_proj_bias, expert_ids).float()[:, None, :]
    apply_gate = getattr(ex, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(out)
    gate, up = out.chunk(2, dim=-1)
    return ex.act_fn(gate) * up


def expert_down(
    block: MoeBlock, hidden: torch.Tensor, expert_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Down projection: [E', N, I] float32 -> [E', N, d] float32 expert outputs."""
    ex = block.experts
    transposed = bool(getattr(ex, "is_transposed", False))
    out = _linear(hidden, _select(ex.down_proj, expert_ids).float(), transposed)  # [E', N, d]
    if getattr(ex, "has_bias", False):
        out = out + _select(ex.down_proj_bias, expert_ids).float()[:, None, :]
    return out


def down_matrices(block: MoeBlock) -> torch.Tensor:
    """[E, d, I] float32 down-projection matrices W_i (y = h W_i^T + b)."""
    down = block.experts.down_proj.float()
    return down.transpose(-1, -2) if getattr(block.experts, "is_transposed", False) else down


def run_experts(
    block: MoeBlock, x: torch.Tensor, expert_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Outputs of routed experts on the same tokens, unweighted, shared experts excluded.

    Args:
        x: [N, d] float.
        expert_ids: optional [E'] int64 (default all E).
    Returns:
        [E', N, d] float32. Memory E' x N x d: callers stream N in chunks.
    """
    return expert_down(block, expert_hidden(block, x, expert_ids), expert_ids)


def run_expert(block: MoeBlock, expert_id: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert `expert_id` on x [N, d] -> [N, d] float32 (no routing weight applied)."""
    if not 0 <= expert_id < block.num_experts:
        raise IndexError(f"expert_id={expert_id} outside [0, {block.num_experts})")
    return run_experts(block, x, torch.tensor([expert_id], device=x.device))[0]


def _layer_matrices(blocks: list[MoeBlock], cfg, matrices) -> dict[int, torch.Tensor]:
    """{layer: [E, E] float32 on the experts' device} of the kind cfg's policy reads, checked."""
    kind = matrix_kind(cfg)
    if kind is None:
        return {}
    kind = kind.replace("_", " ")
    if matrices is None:
        raise ValueError(f"policy {cfg.policy!r} needs a {kind} matrix per MoE layer")
    tables = {}
    for b in blocks:
        if b.layer_idx not in matrices:
            raise ValueError(f"no {kind} matrix for MoE layer {b.layer_idx}")
        matrix = matrices[b.layer_idx]
        if tuple(matrix.shape) != (b.num_experts, b.num_experts):
            raise ValueError(
                f"layer {b.layer_idx}: {kind} shape {tuple(matrix.shape)} does not match num_experts={b.num_experts}"
            )
        tables[b.layer_idx] = matrix.float().to(b.experts.gate_up_proj.device).contiguous()
    return tables


@dataclass
class RoutingRecord:
    """Per-call routing statistics, per decoder layer.

    `calls[layer]` is a list of (num_tokens, distinct_before, distinct_after, rerouted_slots),
    one entry per forward call of that layer's MoE block.
    """

    calls: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.calls = {layer: [] for layer in self.calls}

    def mean_distinct(self, after: bool = True) -> float:
        """Mean distinct experts per layer per call (over all layers and calls)."""
        values = [c[2 if after else 1] for calls in self.calls.values() for c in calls]
        return sum(values) / len(values) if values else float("nan")

    def rerouted_slots(self) -> int:
        return sum(c[3] for calls in self.calls.values() for c in calls)


@contextmanager
def routing_hook(
    model: nn.Module,
    cfg: "SereConfig | None" = None,
    *,
    matrices: dict[int, torch.Tensor] | None = None,
    thresholds: dict[int, float] | None = None,
    lockstep_batch: int | None = None,
    placement=None,
) -> Iterator[RoutingRecord]:
    """Make every MoE block of `model` route through `sere.policy.route(cfg, ...)`, within the block.

    The primary set is taken over all T tokens of each forward call (the batch of a decode step),
    or, with `lockstep_batch=B`, over each position's B tokens of a teacher-forced forward over
    [B, L] (T = B x L, batch-major): with causal attention, layer l at position t then sees
    exactly what B sequences decoded in lock-step would see, in one forward instead of L.
    Steps with more than `cfg.max_decode_tokens` tokens are left alone, as in serving.

    Args:
        cfg: the SereConfig; None (or policy topk) records the router's choice only.
        matrices: {layer: [E, E]} the per-layer sidecar matrix `sere.policy.matrix_kind(cfg)` names
            (e.g. `Sidecar.matrices`), for every MoE layer.
        thresholds: {layer: rho} for sere, e.g. resolved from `cfg.threshold_quantile`
            (`Sidecar.threshold_for`); default `cfg.threshold` everywhere.
        lockstep_batch: B, re-route each position of a [B, L] teacher-forced call as one step
            (every call's T must be a multiple of B); record one entry per position.
        placement: a (virtual) expert placement (`sere.ep.placement`) for the placement-aware
            options (`locality_epsilon`, `node_limit`), e.g. the one the traffic figures assume.
    Yields:
        a RoutingRecord filled while the context is active.
    """
    if cfg is None:
        from sere.config import SereConfig

        cfg = SereConfig(policy="topk")
    blocks = find_moe_blocks(model)
    cfg.check_model(top_k=blocks[0].top_k, num_experts=blocks[0].num_experts)
    cfg.check_layers([b.layer_idx for b in blocks])
    tables = _layer_matrices(blocks, cfg, matrices)
    if lockstep_batch is not None and lockstep_batch < 1:
        raise ValueError(f"lockstep_batch must be >= 1, got {lockstep_batch}")
    record = RoutingRecord(calls={b.layer_idx: [] for b in blocks})

    def make_hook(b: MoeBlock):
        threshold = None if thresholds is None else thresholds[b.layer_idx]
        layer_cfg = cfg.for_layer(b.layer_idx)

        def hook(module, args, output):
            router_logits, topk_weights, topk_ids = output  # [T, E], [T, K], [T, K]
            num_tokens = topk_ids.shape[0]
            per_step = lockstep_batch or num_tokens
            if num_tokens % per_step:
                raise ValueError(f"lockstep_batch={lockstep_batch} does not divide the {num_tokens} tokens")
            # batch-major tokens -> one row of token indices per decode step
            steps = torch.arange(num_tokens, device=topk_ids.device).view(per_step, -1).T  # [L, B]
            logits = router_logits.reshape(num_tokens, -1)
            new_weights, new_ids = topk_weights.clone(), topk_ids.clone()
            for rows in steps:
                scores = router_scores(logits[rows], b.score_fn, b.num_experts) if needs_router_scores(cfg) else None
                routed = route(layer_cfg, topk_ids[rows], topk_weights[rows], num_experts=b.num_experts,
                               matrix=tables.get(b.layer_idx), threshold=threshold, router_scores=scores,
                               placement=placement)
                new_ids[rows], new_weights[rows] = routed.ids, routed.weights
                before, after, _, changed = (int(v) for v in routed.stats[:4])
                record.calls[b.layer_idx].append((per_step, before, after, changed))
            return router_logits, new_weights, new_ids

        return hook

    handles = [b.router.register_forward_hook(make_hook(b)) for b in blocks]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
