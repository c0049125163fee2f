"""sere: Similarity-based Expert Re-routing for batch decoding of Mixture-of-Experts LLMs.

`import sere` needs only torch: `SereConfig` (pydantic) is imported on first use, so the ops and
the reference also run where pydantic is absent (the GPU check machine).
"""

from sere.ops import ERR_STAT_FIELDS, HAS_COMPILED_OP, reroute, reroute_err, reroute_err_with_stats, reroute_with_stats
from sere.reference import (
    STAT_FIELDS,
    oea_reference,
    primary_mask,
    reroute_reference,
    reroute_stats,
    sere_err_reference,
)

__all__ = [
    "ERR_STAT_FIELDS",
    "HAS_COMPILED_OP",
    "STAT_FIELDS",
    "SereConfig",
    "oea_reference",
    "primary_mask",
    "reroute",
    "reroute_err",
    "reroute_err_with_stats",
    "reroute_reference",
    "reroute_stats",
    "reroute_with_stats",
    "sere_err_reference",
]


def __getattr__(name: str):
    if name == "SereConfig":
        from sere.config import SereConfig

        return SereConfig
    raise AttributeError(f"module 'sere' has no attribute {name!r}")
