"""sere: Similarity-based Expert Re-routing for batch decoding of Mixture-of-Experts LLMs.

Every public name is imported on first use: `import sere` (and the `sere` command's --help) is
cheap, and the ops and the reference run where pydantic is absent (`SereConfig` needs it).

    sere.route(cfg, topk_ids, topk_weights, num_experts=E, matrix=M)   # the policy layer
    sere.reroute(topk_ids, topk_weights, similarity, num_primary=S)    # the compiled op
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SereConfig": "sere.config",
    "POLICIES": "sere.policy",
    "Routed": "sere.policy",
    "route": "sere.policy",
    "HAS_COMPILED_OP": "sere.ops",
    "ERR_STAT_FIELDS": "sere.ops",
    "oea": "sere.ops",
    "oea_with_stats": "sere.ops",
    "primary_mask": "sere.ops",
    "reroute": "sere.ops",
    "reroute_err": "sere.ops",
    "reroute_err_with_stats": "sere.ops",
    "reroute_with_stats": "sere.ops",
    "STAT_FIELDS": "sere.policy",
    "oea_reference": "sere.reference",
    "reroute_reference": "sere.reference",
    "sere_err_reference": "sere.reference",
}

_SUBMODULES = {"config", "locality", "ops", "policy", "reference", "sidecars", "progress", "cli", "ep", "hf", "vllm"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:  # `import sere; sere.ops.reroute(...)`
        return import_module(f"sere.{name}")
    raise AttributeError(f"module 'sere' has no attribute {name!r}")
