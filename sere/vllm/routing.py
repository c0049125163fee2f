"""One MoE layer's routing inside vLLM: the hook that post-processes what its router chose.

`RoutingHook` wraps a layer's `router._compute_routing` (installed by `sere.vllm.plugin`): the
model's own router selects, then ONE opaque custom op, `sere::route_layer`, applies the layer's
policy through `sere.policy.route`. vLLM compiles the model with torch.compile (full graph) and,
on GPUs, captures CUDA graphs; so everything that changes per step happens inside the op:

- the decode-only rule (`0 < T <= max_decode_tokens`) is a branch on the op's concrete T, so no
  guard on vLLM's symbolic token count is needed;
- the primary set (padding rows excluded) and its OR over the expert-parallel group;
- the statistics, added into the layer's device int64 accumulator `stats` (layout
  `sere.vllm.metrics.ROUTING_FIELDS`) and, under expert parallelism, the live traffic counts into
  `traffic` (`sere.vllm.metrics.TRAFFIC_FIELDS`, `sere.vllm.traffic`, docs/spec.md §19): the op's
  only mutated arguments; no host sync, no clock;
- records for tests (`SERE_RECORD=1`), which copy to the host (refused with CUDA graphs).

The op reads the layer's configuration from `LAYERS[layer_name]` (host state that
`configure` swaps between steps), and its sidecar matrix from the persistent [E, E] buffer it is
given (`configure` copies a new matrix into it in place, so compiled graphs keep pointing at it).
With CUDA graphs the op body runs once per captured size: the configuration is then fixed at
capture (`sere.vllm.plugin.configure` refuses to change it).

Shape legend: T tokens of the call, E routed experts, K top-k.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from sere import policy
from sere.agreement import agreed_primary, agreement_vector
from sere.vllm import metrics
from sere.vllm import traffic as ep_traffic

if TYPE_CHECKING:  # SereConfig needs pydantic, absent on the GPU check machine
    from sere.config import SereConfig

__all__ = ["ENV_RECORD", "LAYERS", "LayerRoute", "RoutingHook"]

ENV_RECORD = "SERE_RECORD"  # "1": keep every routing call in memory (sere_dump_records)

LAYERS: dict[str, "LayerRoute"] = {}  # layer name -> its routing state, this process
_forward_context = None  # the module vllm.forward_context, bound on first use
_records: list[dict] = []
_records_lock = threading.Lock()


@dataclass
class LayerRoute:
    """Host-side state of one hooked layer (read by the op body, changed only between steps).

    load_matrix: function (layer, cfg) -> ([E, E] float32 sidecar of `policy.matrix_kind(cfg)`,
        threshold for this layer); called when the policy needs a matrix.
    primary_allreduce: None, or a function summing a [2E] agreement vector (`sere.agreement`)
        over the EP group (called on every call, prefill included, so that all ranks stay in step).
    """

    layer_name: str
    layer: int
    num_experts: int
    top_k: int
    scoring_func: str
    device: torch.device
    load_matrix: Callable
    primary_allreduce: Callable | None = None
    record: bool = False
    cfg: SereConfig | None = None  # the engine's config
    layer_cfg: SereConfig | None = None  # this layer's: cfg.for_layer(layer)
    threshold: float = 0.0
    calls: int = 0  # forward passes through this layer (aligns records across DP ranks)
    matrix: torch.Tensor = field(init=False)  # [E, E] float32, persistent
    stats: metrics.LayerStats = field(init=False)

    def __post_init__(self):
        self.matrix = torch.zeros(self.num_experts, self.num_experts, dtype=torch.float32, device=self.device)
        self.stats = metrics.layer_stats(self.layer_name, self.layer, "topk", self.device)

    def configure(self, cfg: SereConfig) -> None:
        """Validate `cfg` for this layer and switch to it (between steps)."""
        cfg.check_model(top_k=self.top_k, num_experts=self.num_experts)
        if policy.needs_router_scores(cfg):  # an unknown scoring function fails here, not in a step
            policy.router_scores(torch.zeros(1, self.num_experts), self.scoring_func)
        threshold = cfg.threshold
        if policy.matrix_kind(cfg) is not None:
            matrix, threshold = self.load_matrix(self.layer, cfg)
            self.matrix.copy_(matrix)  # in place: compiled graphs hold this buffer
        self.stats.switch_policy(cfg.policy)
        self.cfg, self.layer_cfg, self.threshold = cfg, cfg.for_layer(self.layer), threshold


class RoutingHook:
    """Wraps one layer's `router._compute_routing`: the router, then `sere::route_layer`.

    Traced by Dynamo: it reads only attributes fixed at model load (the persistent tensors and
    the layer name), so compiled graphs stay valid when `configure` switches the policy.
    """

    def __init__(self, compute_routing, *, cfg: SereConfig, layer: int, layer_name: str, num_experts: int,
                 top_k: int, similarity, scoring_func: str, device, primary_allreduce=None):
        self.compute_routing = compute_routing
        self.layer_name = layer_name
        self.route = LayerRoute(
            layer_name, layer, num_experts, top_k, scoring_func, torch.device(device), similarity,
            primary_allreduce, record=os.environ.get(ENV_RECORD, "0") == "1",
        )
        self.route.configure(cfg)
        self.matrix = self.route.matrix  # [E, E]
        self.acc = self.route.stats.acc  # [len(ROUTING_FIELDS)] int64
        self.traffic = self.route.stats.traffic  # [len(TRAFFIC_FIELDS)] int64, EP only
        LAYERS[layer_name] = self.route

    @property
    def cfg(self) -> SereConfig:
        return self.route.cfg

    @property
    def stats(self) -> metrics.LayerStats:
        return self.route.stats

    def configure(self, cfg: SereConfig) -> None:
        self.route.configure(cfg)

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        topk_weights, topk_ids = self.compute_routing(*args, **kwargs)  # [T, K] each
        router_logits = args[1] if len(args) > 1 else kwargs["router_logits"]  # [T, >= E]
        return torch.ops.sere.route_layer(topk_weights, topk_ids, router_logits, self.matrix, self.acc, self.traffic,
                                          self.layer_name)


@torch.library.custom_op("sere::route_layer", mutates_args=("stats", "traffic"))
def route_layer(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    router_logits: torch.Tensor,
    matrix: torch.Tensor,
    stats: torch.Tensor,
    traffic: torch.Tensor,
    layer_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) [T, K] to dispatch for one layer's step; counts into `stats` (and, under
    expert parallelism, `traffic`: `sere.vllm.traffic`) in place."""
    state = LAYERS[layer_name]
    num_tokens = topk_ids.shape[0]
    cfg = state.layer_cfg.at(num_tokens)  # policy "tuned": this step size's bucket config
    threshold = state.threshold if cfg is state.layer_cfg else cfg.threshold
    context = _context()
    own_padding = None if context is None else context.is_padding  # [>= own rows] bool
    # [T] bool. Where vLLM gathers every DP rank's tokens before routing, `is_padding` covers this
    # rank's rows only: the gathered step's padding is then unknown and its rows count as tokens.
    padding = None if own_padding is None or own_padding.shape[0] < num_tokens else own_padding[:num_tokens]
    in_scope = 0 < num_tokens <= cfg.max_decode_tokens  # a decode-sized step
    # NOTE: with an EP-wide primary set every rank must join the collective on every call,
    # whatever its policy or step size, or the group deadlocks.
    collective = state.primary_allreduce is not None and cfg.scope == "ep_group"
    scores = primary = local_primary = None
    if in_scope and policy.needs_router_scores(cfg):
        scores = policy.router_scores(router_logits, state.scoring_func, state.num_experts)  # [T, E]
    if collective or (in_scope and cfg.policy != "topk"):
        local = agreement_vector(cfg, topk_ids, topk_weights, state.num_experts, scores, padding)  # [2E]
        local_primary = local[: state.num_experts] > 0  # [E] this rank's own P
        primary = agreed_primary(cfg, state.primary_allreduce(local) if collective else local)  # [E]
    state.calls += 1
    if not in_scope:
        stats[1].add_(1)
        return topk_weights.clone(), topk_ids.clone()
    routed = policy.route(
        cfg, topk_ids, topk_weights, num_experts=state.num_experts,
        matrix=matrix if policy.matrix_kind(cfg) is not None else None, threshold=threshold,
        router_scores=scores, primary=primary,
    )
    stats[0].add_(1)
    stats[2].add_(num_tokens if padding is None else (~padding).sum())
    stats[metrics.NUM_STEP_FIELDS:].add_(routed.stats)
    weights, ids = routed.weights.contiguous(), routed.ids.contiguous()
    if weights.data_ptr() == topk_weights.data_ptr() or ids.data_ptr() == topk_ids.data_ptr():
        weights, ids = weights.clone(), ids.clone()  # a custom op must not return its inputs
    sent = ep_traffic.count(layer_name, ids, own_padding, context)  # None without EP
    if sent is not None:
        traffic.add_(sent[0])
    if state.record:
        _record(state, cfg, threshold, router_logits, topk_weights, topk_ids, weights, ids, primary, local_primary,
                padding)
        with _records_lock:  # the rows this rank counted: (start, stop, its EP rank)
            _records[-1]["ep_rows"] = None if sent is None else sent[1]
    return weights, ids


@route_layer.register_fake
def _route_layer_fake(topk_weights, topk_ids, router_logits, matrix, stats, traffic, layer_name):
    return torch.empty_like(topk_weights), torch.empty_like(topk_ids)


def _record(state: LayerRoute, applied, threshold, router_logits, weights_in, ids_in, weights_out, ids_out,
            primary, local_primary, padding) -> None:
    def host(tensor):
        return None if tensor is None else tensor.detach().cpu().clone()

    entry = {
        "layer": state.layer,
        "layer_name": state.layer_name,
        "call": state.calls,
        "config_policy": state.cfg.policy,  # the engine's policy ("tuned" under a schedule)
        "policy": applied.policy,  # the policy this step applied
        "bucket_label": policy.label(applied) if applied is not state.layer_cfg else None,
        "num_primary": applied.num_primary,
        "max_distinct": applied.max_distinct,
        "threshold": threshold,
        "router_logits": host(router_logits.float()),  # [T, E]
        "router_topk_weights": host(weights_in),  # [T, K] as the router returned them
        "router_topk_ids": host(ids_in),
        "topk_weights": host(weights_out),  # [T, K] as dispatched
        "topk_ids": host(ids_out),
        "primary": host(primary),  # [E] bool, the P used (EP-wide under scope ep_group)
        "local_primary": host(local_primary),  # [E] bool, this rank's own P
        "padding": host(padding),  # [T] bool
    }
    with _records_lock:
        _records.append(entry)


def _context():
    """vLLM's forward context of the current forward pass, or None outside one."""
    global _forward_context
    if _forward_context is None:
        import vllm.forward_context

        _forward_context = vllm.forward_context
    if not _forward_context.is_forward_context_available():
        return None
    return _forward_context.get_forward_context()
