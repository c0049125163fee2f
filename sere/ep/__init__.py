"""Expert parallelism with SERE over torch.distributed: placement, dispatch/combine, accounting,
a Ray runner and a DeepSpeed-MoE adapter.

This is the dispatch layer for DeepSpeed-MoE and plain torch.distributed users, and the one the
traffic study measures. Serving does not use it: inside vLLM, SERE rewrites the router's ids
(`sere.vllm.routing`) and vLLM's own expert parallelism dispatches them.
"""

from sere.ep.accounting import Traffic, brute_force_traffic, traffic
from sere.ep.collective import EPError, agree_or_raise, default_backend
from sere.ep.dispatch import EPStepInfo, agree_placement, ep_moe_forward
from sere.ep.experts import SwiGLUExperts, moe_reference, random_expert_weights
from sere.ep.placement import (
    PLACEMENTS,
    ExpertPlacement,
    PlacementError,
    linear_placement,
    make_placement,
    placement_from_rank_experts,
    round_robin_placement,
)

__all__ = [
    "EPError",
    "EPStepInfo",
    "ExpertPlacement",
    "PLACEMENTS",
    "PlacementError",
    "SwiGLUExperts",
    "Traffic",
    "agree_or_raise",
    "agree_placement",
    "brute_force_traffic",
    "default_backend",
    "ep_moe_forward",
    "linear_placement",
    "make_placement",
    "moe_reference",
    "placement_from_rank_experts",
    "random_expert_weights",
    "round_robin_placement",
    "traffic",
]
