"""Expert parallelism with SERE: placement, dispatch/combine, locality-aware targets, accounting."""

from sere.ep.accounting import Traffic, brute_force_traffic, traffic
from sere.ep.collective import EPError, agree_or_raise, default_backend, group_primary_mask
from sere.ep.dispatch import EPStepInfo, agree_placement, ep_moe_forward
from sere.ep.experts import SwiGLUExperts, moe_reference, random_expert_weights
from sere.ep.locality import locality_reroute
from sere.ep.placement import (
    PLACEMENTS,
    ExpertPlacement,
    PlacementError,
    linear_placement,
    make_placement,
    placement_from_rank_experts,
    round_robin_placement,
)
from sere.ep.policy import POLICY_LABELS, RoutingPolicy, apply_policy

__all__ = [
    "EPError",
    "EPStepInfo",
    "ExpertPlacement",
    "PLACEMENTS",
    "POLICY_LABELS",
    "PlacementError",
    "RoutingPolicy",
    "SwiGLUExperts",
    "Traffic",
    "agree_or_raise",
    "agree_placement",
    "apply_policy",
    "brute_force_traffic",
    "default_backend",
    "ep_moe_forward",
    "group_primary_mask",
    "linear_placement",
    "locality_reroute",
    "make_placement",
    "moe_reference",
    "placement_from_rank_experts",
    "random_expert_weights",
    "round_robin_placement",
    "traffic",
]
