"""One MoE layer's routing inside vLLM: the hook that post-processes what its router chose.

`RoutingHook` wraps a layer's `router._compute_routing` (installed by `sere.vllm.plugin`): the
model's own router selects, then the layer's policy (topk, sere, oea, sere-err) re-routes the
ids, with the primary set OR-ed over the expert-parallel group when one is given, counted in
`sere.vllm.metrics`, and optionally recorded (`SERE_RECORD=1`) for tests and benchmarks.

Shape legend: T tokens of the call, E routed experts, K top-k, S num_primary.
"""

from __future__ import annotations

import os
import threading

import torch

from sere import ops
from sere.vllm import metrics
from sere.config import SereConfig
from sere.reference import distinct_experts, oea_reference, reroute_stats

__all__ = ["ENV_RECORD", "SIDECAR_POLICIES", "RoutingHook", "router_scores"]

ENV_RECORD = "SERE_RECORD"  # "1": keep every routing call in memory (sere_dump_records)
SIDECAR_POLICIES = ("sere", "sere-err")  # policies that read a per-layer [E, E] sidecar matrix

_forward_context = None  # the module vllm.forward_context, bound on first use
_records: list[dict] = []
_records_lock = threading.Lock()


def router_scores(router_logits: torch.Tensor, scoring_func: str, num_experts: int) -> torch.Tensor:
    """[T, E] float32 post-activation scores, as the model's router computes them (OEA, refill)."""
    logits = router_logits[:, :num_experts].float()
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return logits.softmax(dim=-1)


class RoutingHook:
    """Wraps one layer's `router._compute_routing`; post-processes the ids it returns.

    Args:
        compute_routing: the router's bound `_compute_routing` -> (topk_weights [T, K] float,
            topk_ids [T, K] int32/int64).
        cfg: the layer's SereConfig (`configure` swaps it at run time).
        similarity: function layer -> ([E, E] float32 on `device`, threshold); called when the
            policy is or becomes "sere".
        primary_allreduce: None, or a function OR-ing an [E] bool mask over the EP group
            (called on every call, prefill included, so that all ranks stay in step).
    """

    def __init__(
        self,
        compute_routing,
        *,
        cfg: SereConfig,
        layer: int,
        layer_name: str,
        num_experts: int,
        top_k: int,
        similarity,
        scoring_func: str,
        device: torch.device | str,
        primary_allreduce=None,
    ):
        self.compute_routing = compute_routing
        self.layer = layer
        self.layer_name = layer_name
        self.num_experts = num_experts
        self.top_k = top_k
        self.load_similarity = similarity
        self.scoring_func = scoring_func
        self.device = torch.device(device)
        self.primary_allreduce = primary_allreduce
        self.record = os.environ.get(ENV_RECORD, "0") == "1"
        self.similarity: torch.Tensor | None = None  # [E, E] float32
        self.calls = 0  # forward passes through this layer (aligns records across DP ranks)
        self.configure(cfg)

    def configure(self, cfg: SereConfig) -> None:
        """Validate `cfg` for this layer and switch to it (plain ints/floats on the hot path)."""
        cfg.check_model(top_k=self.top_k, num_experts=self.num_experts)
        self.threshold = 0.0
        if cfg.policy in SIDECAR_POLICIES:
            self.similarity, self.threshold = self.load_similarity(self.layer, cfg)
        self.cfg = cfg
        self.policy = cfg.policy
        self.num_primary = cfg.num_primary
        self.max_decode_tokens = cfg.max_decode_tokens
        self.stats = metrics.layer_stats(self.layer_name, self.layer, self.policy, self.device)

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        topk_weights, topk_ids = self.compute_routing(*args, **kwargs)  # [T, K] each
        self.calls += 1
        router_logits = args[1] if len(args) > 1 else kwargs["router_logits"]  # [T, >= E]
        weights, ids = self.apply(topk_weights, topk_ids, router_logits)
        metrics.maybe_flush()
        return weights, ids

    def apply(self, topk_weights, topk_ids, router_logits):
        """(weights, ids) to dispatch: [T, K] each, the dtypes of the router's output."""
        num_tokens = topk_ids.shape[0]
        in_scope = 0 < num_tokens <= self.max_decode_tokens  # a decode-sized step
        # NOTE: with an EP-wide primary set every rank must join the collective on every call,
        # whatever its policy or step size, or the group deadlocks.
        collective = self.primary_allreduce is not None and self.cfg.scope == "ep_group"
        if self.policy == "topk" and not collective:
            return self._keep(router_logits, topk_weights, topk_ids, in_scope)

        # The policies need slot 0 = largest weight; routers may return top-k unsorted.
        order = torch.argsort(topk_weights, dim=1, descending=True, stable=True)  # [T, K]
        sorted_weights = topk_weights.gather(1, order).contiguous()
        sorted_ids = topk_ids.gather(1, order).contiguous()
        primary = local_primary = self._primary(sorted_ids)  # [E] bool
        if collective:
            primary = self.primary_allreduce(local_primary)
        if self.policy == "topk" or not in_scope:
            return self._keep(router_logits, topk_weights, topk_ids, in_scope, primary, local_primary)

        if self.policy == "sere":
            new_ids, new_weights, stats = ops.reroute_with_stats(
                sorted_ids, sorted_weights, self.similarity, self.num_primary, self.threshold, primary
            )
        elif self.policy == "sere-err":  # self.similarity holds the substitution errors
            cfg = self.cfg
            scores = router_scores(router_logits, self.scoring_func, self.num_experts) if cfg.refill else None
            new_ids, new_weights, err_stats = ops.reroute_err_with_stats(
                sorted_ids, sorted_weights, self.similarity, self.num_primary, cfg.tolerance,
                float("inf") if cfg.keep_cost is None else cfg.keep_cost, cfg.max_distinct,
                cfg.renormalize, primary, router_scores=scores,
            )
            stats = err_stats[:5]  # the common STAT_FIELDS (dropped_slots is the 6th)
        else:  # oea
            scores = router_scores(router_logits, self.scoring_func, self.num_experts)
            new_ids, new_weights = oea_reference(sorted_ids, sorted_weights, scores, self.num_primary, primary)
            stats = reroute_stats(sorted_ids, new_ids, self.num_experts, self.num_primary, primary)
        new_weights = new_weights.to(topk_weights.dtype).contiguous()
        new_ids = new_ids.to(topk_ids.dtype).contiguous()
        self.stats.add(stats, num_tokens)
        self._record(router_logits, topk_weights, topk_ids, new_weights, new_ids, primary, local_primary)
        return new_weights, new_ids

    def _keep(self, router_logits, topk_weights, topk_ids, in_scope, primary=None, local_primary=None):
        """The router's output unchanged (policy topk, or a step too large), counted."""
        if not in_scope:
            self.stats.skip()
            return topk_weights, topk_ids
        distinct = distinct_experts(topk_ids, self.num_experts)  # policy topk: nothing changes
        zero = torch.zeros_like(distinct)
        self.stats.add(torch.stack([distinct, distinct, zero, zero, zero]), topk_ids.shape[0])
        self._record(router_logits, topk_weights, topk_ids, topk_weights, topk_ids, primary, local_primary)
        return topk_weights, topk_ids

    def _primary(self, sorted_ids: torch.Tensor) -> torch.Tensor:
        """P of the step's real tokens: rows vLLM marks as padding (an idle DP rank's dummy
        batch, padded batches) must not add experts to P, least of all to the EP-wide P."""
        num_primary = min(self.num_primary, self.top_k - 1)  # policy topk does not bound it
        padding = _padding_rows()
        if padding is None:
            return ops.primary_mask(sorted_ids, self.num_experts, num_primary)
        num_tokens = sorted_ids.shape[0]
        head = sorted_ids[:, :num_primary].reshape(-1).long()  # [T * S]
        real = (~padding[:num_tokens]).to(torch.int32).repeat_interleave(num_primary)  # [T * S]
        mask = torch.zeros(self.num_experts, dtype=torch.int32, device=sorted_ids.device)
        return mask.scatter_reduce_(0, head, real, "amax").bool()  # [E]

    def _record(self, router_logits, weights_in, ids_in, weights_out, ids_out, primary, local_primary=None):
        if not self.record:
            return
        padding = _padding_rows()

        def host(tensor):
            return None if tensor is None else tensor.detach().cpu().clone()

        entry = {
            "layer": self.layer,
            "layer_name": self.layer_name,
            "call": self.calls,
            "policy": self.policy,
            "num_primary": self.num_primary,
            "threshold": self.threshold,
            "router_logits": host(router_logits.float()),  # [T, E]
            "router_topk_weights": host(weights_in),  # [T, K] as the router returned them
            "router_topk_ids": host(ids_in),
            "topk_weights": host(weights_out),  # [T, K] as dispatched
            "topk_ids": host(ids_out),
            "primary": host(primary),  # [E] bool, the P used (EP-wide under scope ep_group)
            "local_primary": host(local_primary),  # [E] bool, this rank's own P
            "padding": None if padding is None else host(padding[: ids_in.shape[0]]),  # [T] bool
        }
        with _records_lock:
            _records.append(entry)


def _padding_rows() -> torch.Tensor | None:
    """[>= T] bool, True for rows of the current forward pass that are not real tokens."""
    global _forward_context
    if _forward_context is None:
        import vllm.forward_context

        _forward_context = vllm.forward_context
    if not _forward_context.is_forward_context_available():
        return None
    return _forward_context.get_forward_context().is_padding
