"""sere: Similarity-based Expert Re-routing for batch decoding of Mixture-of-Experts LLMs."""

from sere.config import SereConfig
from sere.ops import HAS_COMPILED_OP, reroute, reroute_with_stats
from sere.reference import STAT_FIELDS, oea_reference, primary_mask, reroute_reference, reroute_stats

__all__ = [
    "HAS_COMPILED_OP",
    "STAT_FIELDS",
    "SereConfig",
    "oea_reference",
    "primary_mask",
    "reroute",
    "reroute_reference",
    "reroute_stats",
    "reroute_with_stats",
]
