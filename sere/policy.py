"""The policy layer: one entry from a router's choice to the ids and weights to dispatch.

    routed = sere.policy.route(cfg, topk_ids, topk_weights, matrix=..., router_scores=...)
    routed.ids, routed.weights      # [T, K] to dispatch (slots ordered by descending weight)
    routed.stats                    # [6] int64 in STAT_FIELDS order, on the device, no host sync

Every caller (the vLLM hook, the HF hook, the EP dispatch, `sere.hf.evaluate`, the benchmarks)
calls `route`; none of them branches on the policy name. What a policy needs is asked with
`matrix_kind(cfg)` (which per-layer sidecar to load) and `needs_router_scores(cfg)`. Every policy
runs through the compiled ops of `sere.ops` (xshare: the ATen ops of `sere.xshare`);
`sere.reference` is the readable specification the tests compare against (docs/spec.md).

Shape legend: T tokens of the step, K top-k slots, E routed experts, S num_primary.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, NamedTuple

import torch

from sere import ops
from sere.locality import locality_reroute, locality_stats, node_allowed
from sere.xshare import xshare_with_stats

if TYPE_CHECKING:  # SereConfig needs pydantic; this module does not
    from sere.config import SereConfig

__all__ = [
    "POLICIES",
    "STAT_FIELDS",
    "TUNED",
    "Routed",
    "check_inputs",
    "config_fingerprint",
    "label",
    "matrix_kind",
    "needs_router_scores",
    "primary_set",
    "route",
    "router_scores",
    "sort_by_weight",
]

# The policy names: the only place they are spelled (SereConfig, the CLIs and the hooks read it).
POLICIES = ("topk", "sere", "oea", "sere-err", "xshare")

# Not a rule of its own: follow the schedule `sere tune` made (SereConfig.at picks the bucket's config).
TUNED = "tuned"

# The [6] int64 statistics of one routed step.
STAT_FIELDS = (
    "distinct_before",      # distinct experts the model's router chose
    "distinct_after",       # distinct experts dispatched after re-routing
    "num_primary_experts",  # |P| (0 for topk)
    "rerouted_slots",       # (token, slot) pairs whose expert id changed
    "critical_slots",       # secondary slots kept on an expert outside P
    "dropped_slots",        # secondary slots dropped (weight 0), before any refill (sere-err)
)

# Which [E, E] sidecar matrix a policy reads, per layer.
_MATRIX_KIND = {"sere": "similarity", "sere-err": "substitution_error"}


class Routed(NamedTuple):
    """What `route` returns: [T, K] ids and weights to dispatch, [6] int64 statistics."""

    ids: torch.Tensor
    weights: torch.Tensor
    stats: torch.Tensor
    rerouted: bool  # False when the step was left alone (policy topk, or a prefill-sized step)


def matrix_kind(cfg: "SereConfig") -> str | None:
    """"similarity", "substitution_error" or None: the per-layer matrix `cfg.policy` reads
    (with policy "tuned": the one its schedule's buckets read)."""
    if cfg.policy == TUNED:
        return next((kind for bucket in cfg.bucket_configs() if (kind := matrix_kind(bucket))), None)
    return _MATRIX_KIND.get(cfg.policy)


def needs_router_scores(cfg: "SereConfig") -> bool:
    """Whether `route` needs the router's [T, E] post-activation scores (OEA, refill)."""
    if cfg.policy == TUNED:
        return any(needs_router_scores(bucket) for bucket in cfg.bucket_configs())
    return cfg.policy in ("oea", "xshare") or (cfg.policy == "sere-err" and cfg.refill)


def config_fingerprint(cfg: "SereConfig") -> int:
    """A process-independent integer for the whole config (ranks check that they agree)."""
    return zlib.crc32(json.dumps(cfg.model_dump(), sort_keys=True).encode())


def router_scores(router_logits: torch.Tensor, scoring_func: str, num_experts: int | None = None) -> torch.Tensor:
    """[T, E] float32 post-activation router scores from [T, >= E] logits, as the model's router
    computes them: "softmax" (Qwen, Mixtral, OLMoE, DeepSeek-V2), "sigmoid" (DeepSeek-V3),
    "sqrtsoftplus". OEA and refill rank experts by these."""
    logits = router_logits[:, :num_experts].float() if num_experts else router_logits.float()
    if scoring_func == "softmax":
        return logits.softmax(dim=-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    raise ValueError(f"scoring_func={scoring_func!r} is unknown; choose softmax, sigmoid or sqrtsoftplus")


def label(cfg: "SereConfig") -> str:
    """A short human label, e.g. "sere S=2 rho=0.0" or "sere-err S=4 tol=0.6 renorm refill"."""
    if cfg.policy in ("topk", TUNED):
        return cfg.policy if cfg.schedule is None else f"{cfg.policy} {cfg.schedule}"
    text = f"{cfg.policy} S={cfg.num_primary}"
    if cfg.policy == "sere":
        text += f" q={cfg.threshold_quantile}" if cfg.threshold_quantile is not None else f" rho={cfg.threshold}"
        text += "" if cfg.locality_epsilon is None else f" eps={cfg.locality_epsilon}"
    if cfg.node_limit is not None:
        text += f" node:{cfg.node_scope}" + ("" if cfg.max_nodes is None else f"<={cfg.max_nodes}")
    if cfg.policy == "sere-err":
        text += f" tol={cfg.tolerance}"
        text += "" if cfg.keep_cost is None else f" keep={cfg.keep_cost}"
        text += "" if cfg.max_distinct is None else f" max={cfg.max_distinct}"
        text += " renorm" if cfg.renormalize else ""
        text += " refill" if cfg.refill else ""
    if cfg.policy == "xshare":
        text += f" B={cfg.max_distinct}"
    if cfg.layer_num_primary:
        text += " " + " ".join(f"L{layer}:S={s}" for layer, s in sorted(cfg.layer_num_primary.items()))
    return text


def sort_by_weight(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] ids and weights with slot 0 = largest weight (stable; some routers return top-k unsorted)."""
    order = torch.argsort(topk_weights, dim=1, descending=True, stable=True)  # [T, K]
    return topk_ids.gather(1, order).contiguous(), topk_weights.gather(1, order).contiguous()


def primary_set(
    cfg: "SereConfig",
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """This step's primary set P as an [E] bool mask: every real token's top-S experts by weight.

    `padding` ([>= T] bool, True for rows that are not real tokens, e.g. an idle DP rank's dummy
    batch) keeps those rows out of P. Under expert parallelism OR the masks over the group
    before calling `route(primary=...)`. With policy topk S is 1 (nothing is re-routed; an
    EP group still needs every rank's mask to stay in step).
    """
    num_primary = cfg.num_primary if cfg.policy != "topk" else 1
    ids, _ = sort_by_weight(topk_ids, topk_weights)
    num_primary = min(num_primary, ids.shape[1])
    if padding is None:
        return ops.primary_mask(ids, num_experts, max(1, min(num_primary, ids.shape[1] - 1)))
    head = ids[:, :num_primary].reshape(-1).long()  # [T * S]
    real = (~padding[: ids.shape[0]]).to(torch.int32).repeat_interleave(num_primary)  # [T * S]
    mask = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    return mask.scatter_reduce_(0, head, real, "amax").bool()  # [E]


def route(
    cfg: "SereConfig",
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    matrix: torch.Tensor | None = None,
    threshold: float | None = None,
    router_scores: torch.Tensor | None = None,
    primary: torch.Tensor | None = None,
    placement=None,
    step_tokens: int | None = None,
) -> Routed:
    """Apply `cfg.policy` to one step's router output.

    Args:
        cfg: the SereConfig (policy and its parameters).
        topk_ids: [T, K] int32/int64 from the model's router, any slot order.
        topk_weights: [T, K] float routing weights.
        num_experts: E.
        matrix: [E, E] float32 per-layer sidecar matrix, of the kind `matrix_kind(cfg)` names.
        threshold: rho for sere, resolved for this layer (e.g. from `cfg.threshold_quantile`);
            default `cfg.threshold`.
        router_scores: [T, E] float post-activation router scores (`needs_router_scores(cfg)`).
        primary: [E] bool primary set, e.g. OR-ed over an EP group (`primary_set`); default this
            step's own.
        placement: an expert placement (`expert_to_rank` [E], `expert_to_node()` [E]) for the
            locality-aware targets (`cfg.locality_epsilon`) and node-aware routing (`cfg.node_limit`).
        step_tokens: tokens that decide whether the step is decode-sized (an EP group's total),
            and with policy "tuned" which bucket's config applies (its own threshold, not
            `threshold`); default T. Steps with 0 or more than `cfg.max_decode_tokens` tokens
            are left alone.
    Returns:
        Routed(ids, weights, stats, rerouted). Re-routed: ids/weights in descending-weight slot
        order, dtypes of the inputs. Left alone: the inputs themselves.
    """
    num_tokens = topk_ids.shape[0]
    step_tokens = num_tokens if step_tokens is None else step_tokens
    if cfg.layer_num_primary is not None:
        raise ValueError("layer_num_primary is per layer: route with cfg.for_layer(layer)")
    if cfg.policy == TUNED:
        cfg, threshold = cfg.at(step_tokens), None
    if cfg.policy == "topk" or not 0 < step_tokens <= cfg.max_decode_tokens:
        return Routed(topk_ids, topk_weights, _unchanged_stats(topk_ids, num_experts), False)
    check_inputs(cfg, topk_ids, num_experts, matrix, router_scores)
    ids, weights = sort_by_weight(topk_ids, topk_weights)
    if primary is None:
        primary = ops.primary_mask(ids, num_experts, cfg.num_primary)
    # node-aware routing (docs/spec.md §21): the ops re-route token t within P & allowed[t]
    allowed = None if cfg.node_limit is None else node_allowed(cfg, ids, placement)  # [T, E] bool
    new_ids, new_weights, stats = _POLICY_FNS[cfg.policy](
        cfg, ids, weights, matrix, cfg.threshold if threshold is None else threshold, router_scores, primary,
        placement, allowed,
    )
    return Routed(new_ids.to(topk_ids.dtype), new_weights.to(topk_weights.dtype), stats, True)


def check_inputs(cfg, topk_ids, num_experts, matrix, router_scores) -> None:
    """ValueError naming what `cfg.policy` needs and did not get (the matrix, router scores)."""
    kind = matrix_kind(cfg)
    if kind is not None and (matrix is None or tuple(matrix.shape) != (num_experts, num_experts)):
        got = None if matrix is None else tuple(matrix.shape)
        raise ValueError(f"policy {cfg.policy!r} needs the layer's [{num_experts}, {num_experts}] {kind} matrix, got {got}")
    if needs_router_scores(cfg) and (
        router_scores is None or tuple(router_scores.shape) != (topk_ids.shape[0], num_experts)
    ):
        got = None if router_scores is None else tuple(router_scores.shape)
        raise ValueError(
            f"policy {cfg.policy!r} (refill={cfg.refill}) needs router_scores "
            f"[{topk_ids.shape[0]}, {num_experts}], got {got}"
        )


def _unchanged_stats(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[6] int64 statistics of a step left as the router chose it."""
    seen = torch.zeros(num_experts, dtype=torch.bool, device=topk_ids.device)
    seen[topk_ids.reshape(-1).long()] = True
    distinct = seen.sum()
    zero = torch.zeros_like(distinct)
    return torch.stack([distinct, distinct, zero, zero, zero, zero]).to(torch.int64)


def _with_dropped(stats5: torch.Tensor) -> torch.Tensor:
    return torch.cat([stats5, stats5.new_zeros(1)])  # [6]


def _sere(cfg, ids, weights, matrix, threshold, router_scores, primary, placement, allowed):
    if cfg.locality_epsilon is None:
        new_ids, new_weights, stats = ops.reroute_with_stats(
            ids, weights, matrix.contiguous(), cfg.num_primary, threshold, primary, allowed
        )
        return new_ids, new_weights, _with_dropped(stats)
    if placement is None:
        raise ValueError("locality_epsilon is set: route() needs the expert placement")
    new_ids, _ = locality_reroute(
        ids, weights, matrix, cfg.num_primary, placement.expert_to_rank, cfg.locality_epsilon, threshold, primary,
        placement.expert_to_node(),
    )
    return new_ids, weights, locality_stats(ids, new_ids, primary, cfg.num_primary)


def _oea(cfg, ids, weights, matrix, threshold, router_scores, primary, placement, allowed):
    return ops.oea_with_stats(ids, weights, router_scores, cfg.num_primary, primary, allowed)


def _xshare(cfg, ids, weights, matrix, threshold, router_scores, primary, placement, allowed):  # no node_limit
    return xshare_with_stats(ids, weights, router_scores, primary, cfg.max_distinct)


def _sere_err(cfg, ids, weights, matrix, threshold, router_scores, primary, placement, allowed):
    return ops.reroute_err_with_stats(
        ids, weights, matrix.contiguous(), cfg.num_primary, cfg.tolerance,
        float("inf") if cfg.keep_cost is None else cfg.keep_cost, cfg.max_distinct, cfg.renormalize, primary,
        router_scores=router_scores if cfg.refill else None, allowed=allowed,
    )


_POLICY_FNS = {"sere": _sere, "oea": _oea, "sere-err": _sere_err, "xshare": _xshare}
assert set(_POLICY_FNS) | {"topk"} == set(POLICIES)
