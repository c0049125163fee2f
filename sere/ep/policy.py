"""Re-routing policies applied before an expert-parallel dispatch (pure functions, no collectives).

Shape legend:  T tokens   K top-k   E routed experts   S num_primary
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

import sere
from sere.ep.locality import locality_reroute
from sere.ep.placement import ExpertPlacement
from sere.reference import oea_reference

__all__ = ["RoutingPolicy", "apply_policy", "POLICY_LABELS"]

POLICY_LABELS = ("topk", "oea", "sere", "sere+locality")


@dataclass(frozen=True)
class RoutingPolicy:
    """How topk_ids are changed before dispatch (plain values: this is the hot path).

    name: "topk", "sere" or "oea". locality_epsilon: None, or the similarity slack of
    locality-aware SERE targets (sere only). scope: "ep_group" (P is the OR over the EP group) or
    "rank" (each rank's own P). max_tokens: re-routing is skipped in a step whose EP group holds
    more tokens than this (prefill, chunked prefill; SERE_SPEC section 4); None never skips.
    """

    name: str = "topk"
    num_primary: int = 2
    threshold: float = 0.0
    locality_epsilon: float | None = None
    scope: str = "ep_group"
    max_tokens: int | None = None

    @property
    def label(self) -> str:
        return "sere+locality" if self.name == "sere" and self.locality_epsilon is not None else self.name

    def fingerprint(self) -> int:
        """A process-independent integer (Python's str hash is salted per process)."""
        return zlib.crc32(repr((self.name, self.num_primary, self.threshold, self.locality_epsilon, self.scope,
                                self.max_tokens)).encode())

    @classmethod
    def from_label(cls, label: str, num_primary: int = 2, threshold: float = 0.0, epsilon: float = 0.02):
        """"topk", "oea", "sere" or "sere+locality" (with `epsilon`)."""
        if label == "sere+locality":
            return cls("sere", num_primary, threshold, epsilon)
        return cls(label, num_primary, threshold)


def apply_policy(
    policy: RoutingPolicy,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    primary: torch.Tensor,
    similarity: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-route [T, K] ids/weights against the given [E] bool primary set.

    similarity [E, E] is needed by sere, router_scores [T, E] by oea.
    """
    if policy.name == "topk":
        return topk_ids, topk_weights
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()  # the compiled op needs it
    if policy.name == "oea":
        return oea_reference(topk_ids, topk_weights, router_scores, policy.num_primary, primary)
    if policy.locality_epsilon is not None:
        return locality_reroute(
            topk_ids, topk_weights, similarity, policy.num_primary, placement.expert_to_rank,
            policy.locality_epsilon, policy.threshold, primary, placement.expert_to_node(),
        )
    return sere.reroute(topk_ids, topk_weights, similarity.contiguous(), policy.num_primary, policy.threshold, primary)
