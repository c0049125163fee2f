"""The public re-routing API: thin wrappers over the compiled ops `torch.ops.sere.*` (csrc/).

Shape legend:
    T  tokens in the step          E  routed experts
    K  top-k slots per token       S  num_primary (1 <= S < K)

Every policy that runs in production runs through these compiled ops (CPU and CUDA kernels,
fake kernels below for `torch.compile`); `sere.reference` is the readable specification the
tests compare against (docs/spec.md), never a fallback. When the extension `sere._C` is missing
or has no kernel for the tensors' device, the public functions raise RuntimeError naming the
cause and the build command. `import sere.ops` itself works without `sere._C`.

The ops check their arguments (each message names the argument) and never sync with the host,
so they run inside CUDA graphs and `torch.compile(fullgraph=True)`.

    reroute / reroute_with_stats           SERE (policy `sere`), stats [5] in STAT_FIELDS order
    reroute_err / reroute_err_with_stats   error-aware re-routing (`sere-err`), optional refill
    oea / oea_with_stats                   Opportunistic Expert Activation (`oea`)
    primary_mask                           P as an [E] bool mask (OR it across an EP group)

The [6] stats of `reroute_err_with_stats` and `oea_with_stats` follow ERR_STAT_FIELDS.

Node-aware routing (docs/spec.md §21): the re-routing ops take an optional [T, E] bool `allowed`;
token t then re-routes within P & allowed[t] (None: every expert, the plain policy).
"""

from __future__ import annotations

import functools
import inspect

import torch

from sere.reference import STAT_FIELDS

__all__ = [
    "BUILD_COMMAND",
    "ERR_STAT_FIELDS",
    "HAS_COMPILED_OP",
    "oea",
    "oea_with_stats",
    "primary_mask",
    "reroute",
    "reroute_err",
    "reroute_err_with_stats",
    "reroute_with_stats",
]

# [6] int64 statistics of sere::reroute_err and sere::oea: STAT_FIELDS plus
#   dropped_slots: secondary slots left as the token's slot-0 expert with weight 0 (sere-err:
#   counted before a refill; oea: slots no loaded expert was left to fill).
ERR_STAT_FIELDS = STAT_FIELDS + ("dropped_slots",)
BUILD_COMMAND = "pip install --no-build-isolation -e ."

try:
    from sere import _C  # noqa: F401  (loading it registers torch.ops.sere.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _IMPORT_ERROR = exc

HAS_COMPILED_OP = _IMPORT_ERROR is None


def _kernel_device_types(op_name: str) -> frozenset[str]:
    """Device types ("cpu", "cuda") with a compiled kernel for sere::<op_name>, fixed at import
    so that the dispatch below is a constant under torch.compile."""
    if not (HAS_COMPILED_OP and hasattr(torch.ops.sere, op_name)):
        return frozenset()
    return frozenset(
        device_type
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"sere::{op_name}", key)
    )


_COMPILED_DEVICE_TYPES = _kernel_device_types("reroute")  # sere::reroute and sere::primary_mask
_COMPILED_ERR_DEVICE_TYPES = _kernel_device_types("reroute_err")
_COMPILED_OEA_DEVICE_TYPES = _kernel_device_types("oea")


def _require_kernel(op_name: str, device_types: frozenset[str], device: torch.device) -> None:
    """Raise RuntimeError (the cause and the build command) unless sere::<op_name> has a kernel
    for `device`. No fallback: a silent slow path would hide a broken build."""
    if device.type in device_types:
        return
    if _IMPORT_ERROR is not None:
        why = f"the extension sere._C is not built ({_IMPORT_ERROR})"
    elif not hasattr(torch.ops.sere, op_name):
        why = f"the built sere._C predates sere::{op_name}"
    else:
        why = f"sere._C has no {device.type} kernel for sere::{op_name}"
    raise RuntimeError(f"sere: {why}; build it with `{BUILD_COMMAND}`")


def _check_reroute_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """sere::reroute never reads the weights; they are returned as they are, so check them here."""
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {list(topk_ids.shape)}, "
            f"got {list(topk_weights.shape)}"
        )
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating-point, got {str(topk_weights.dtype).removeprefix('torch.')}")
    if topk_weights.device != topk_ids.device:
        raise ValueError(
            f"topk_weights must be on the device of topk_ids ({topk_ids.device}), got {topk_weights.device}"
        )


def reroute_with_stats(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, similarity: torch.Tensor, num_primary: int,
    threshold: float = 0.0, primary: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SERE re-routing (docs/spec.md) plus its statistics, without a host sync.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E), from the model's own router.
        topk_weights: [T, K] float routing weights; returned unchanged (same object).
        similarity: [E, E] float32/bfloat16/float16, contiguous, on the device of topk_ids.
        num_primary: S, 1 <= S < K.
        threshold: rho in [0, 1]; > 0 keeps a secondary expert whose best primary has
            similarity < float32(rho) (a critical expert; it does not join P).
        primary: optional [E] bool primary set (the OR over an expert-parallel group);
            default: P from the first S slots of `topk_ids`.
        allowed: optional [T, E] bool, contiguous (node-aware routing, docs/spec.md §21): token
            t re-routes within P & allowed[t], and keeps a critical expert only if allowed.
    Returns:
        (new topk_ids [T, K] same dtype, topk_weights, stats [5] int64 in STAT_FIELDS order:
        distinct_before, distinct_after, num_primary_experts, rerouted_slots, critical_slots).
    Raises:
        RuntimeError when sere._C has no kernel for the device. ValueError / TypeError naming
        the argument. On CPU, ids outside [0, E) raise; on CUDA they cannot be checked without a
        sync: such an id is left unchanged and counted in no statistic. A row of `similarity`
        with a NaN among its entries to P keeps its expert (critical), as the reference does.
    """
    _check_reroute_weights(topk_ids, topk_weights)
    _require_kernel("reroute", _COMPILED_DEVICE_TYPES, topk_ids.device)
    new_ids, stats = torch.ops.sere.reroute(topk_ids, similarity, num_primary, float(threshold), primary, allowed)
    return new_ids, topk_weights, stats


def reroute_err_with_stats(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, error: torch.Tensor, num_primary: int,
    tolerance: float = 1.0, keep_cost: float = float("inf"), max_distinct: int | None = None,
    renormalize: bool = False, primary: torch.Tensor | None = None, router_scores: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Error-aware re-routing (`sere-err`, sere.reference.sere_err_reference) plus statistics,
    without a host sync.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E), from the model's own router.
        topk_weights: [T, K] float32/bfloat16/float16, contiguous, on the device of topk_ids.
        error: [E, E] float32/bfloat16/float16 substitution errors (error[i, j]: relative output
            error of running j instead of i), contiguous, on the device of topk_ids.
        num_primary: S, 1 <= S < K.
        tolerance: in (0, 1]: a slot is substituted only if its best error is < float32(tolerance).
        keep_cost: >= 0; a slot whose weighted error weight * min(err, 1) exceeds float32(keep_cost)
            keeps its expert (a critical expert; inf: never).
        max_distinct: optional budget of distinct experts per call (P included), >= 1: at most
            max_distinct - |P| critical experts are kept, those of largest summed cost.
        renormalize: rescale every token's weights to their original sum (after any refill).
        primary: optional [E] bool primary set (the OR over an expert-parallel group);
            default: P from the first S slots of `topk_ids`.
        router_scores: optional [T, E] float32/bfloat16/float16 post-activation router scores,
            contiguous: dropped slots are refilled from the loaded experts (P and the kept
            critical ones) by score, as OEA fills (see `sere_err_reference`), inside the op.
        allowed: optional [T, E] bool, contiguous (node-aware routing, docs/spec.md §21): token
            t substitutes within P & allowed[t], keeps a critical expert only if allowed, and is
            refilled only from allowed loaded experts; the budget still counts the whole |P|.
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype, stats [6] int64 in
        ERR_STAT_FIELDS order: distinct_before, distinct_after, num_primary_experts,
        rerouted_slots, critical_slots, dropped_slots). distinct_after and rerouted_slots describe
        the returned ids (after a refill); dropped_slots counts the drops before a refill.
        Ids equal the reference's exactly; weights up to float32 rounding of per-token sums.
    Raises:
        RuntimeError when sere._C has no kernel for the device. ValueError / TypeError naming
        the argument. On CPU, ids outside [0, E) raise. On CUDA they cannot be checked without a
        sync: such an id is left unchanged and counted in no distinct-expert statistic. The CUDA
        op handles T * K <= 8192 slots (one thread block) and E <= 4096; larger calls raise.
    """
    if max_distinct is not None and max_distinct < 1:
        raise ValueError(f"max_distinct must be >= 1 or None, got {max_distinct}")
    _require_kernel("reroute_err", _COMPILED_ERR_DEVICE_TYPES, topk_ids.device)
    return torch.ops.sere.reroute_err(
        topk_ids, topk_weights, error, num_primary, float(tolerance), float(keep_cost),
        0 if max_distinct is None else int(max_distinct), bool(renormalize), primary, router_scores, allowed,
    )


def oea_with_stats(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, router_scores: torch.Tensor, num_primary: int,
    primary: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Opportunistic Expert Activation (sere.reference.oea_reference) plus statistics, no host sync.

    Every token keeps its S primary slots; its K - S others take the experts of P it has not
    chosen yet, best router score first (ties: lowest id); a slot left without one repeats the
    token's slot-0 expert with weight 0. Weights: the router scores of the K experts, rescaled
    to the token's original weight sum.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E), slot 0 the largest weight.
        topk_weights: [T, K] float32/bfloat16/float16, contiguous, on the device of topk_ids.
        router_scores: [T, E] float32/bfloat16/float16 post-activation router scores, contiguous.
        num_primary: S, 1 <= S < K.
        primary: optional [E] bool primary set (the OR over an expert-parallel group);
            default: P from the first S slots of `topk_ids`.
        allowed: optional [T, E] bool, contiguous (node-aware routing, docs/spec.md §21): token
            t's other slots take experts of P & allowed[t] only.
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype, stats [6] int64 in
        ERR_STAT_FIELDS order; critical_slots is 0, dropped_slots counts the unfilled slots).
    Raises:
        RuntimeError when sere._C has no kernel for the device; ValueError / TypeError naming
        the argument. The CUDA op handles T * K <= 8192 slots and E <= 4096.
    """
    _require_kernel("oea", _COMPILED_OEA_DEVICE_TYPES, topk_ids.device)
    return torch.ops.sere.oea(topk_ids, topk_weights, router_scores, num_primary, primary, allowed)


def _without_stats(with_stats, name: str, doc: str):
    """`with_stats` minus its last output (the stats): the same arguments (and signature), the
    same checks and kernels."""

    @functools.wraps(with_stats)
    def without_stats(*args, **kwargs):
        return with_stats(*args, **kwargs)[:-1]

    without_stats.__name__ = without_stats.__qualname__ = name
    without_stats.__doc__ = doc
    returns = "tuple[torch.Tensor, torch.Tensor]"
    without_stats.__signature__ = inspect.signature(with_stats).replace(return_annotation=returns)
    return without_stats


reroute = _without_stats(
    reroute_with_stats, "reroute",
    """SERE re-routing: (new topk_ids [T, K] same dtype, topk_weights unchanged).

    Arguments as in `reroute_with_stats`.
    """,
)
reroute_err = _without_stats(
    reroute_err_with_stats, "reroute_err",
    """Error-aware re-routing: (new topk_ids [T, K], new topk_weights [T, K]), same dtypes.

    Arguments as in `reroute_err_with_stats`.
    """,
)
oea = _without_stats(
    oea_with_stats, "oea", """OEA: (new topk_ids [T, K], new topk_weights [T, K]); arguments as in `oea_with_stats`."""
)


def primary_mask(topk_ids: torch.Tensor, num_experts: int, num_primary: int) -> torch.Tensor:
    """P = {topk_ids[t, s] : s < num_primary} as an [E] bool mask; OR it across an EP group.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E).
        num_experts: E >= 1.
        num_primary: S, 1 <= S < K.
    """
    _require_kernel("primary_mask", _COMPILED_DEVICE_TYPES, topk_ids.device)
    return torch.ops.sere.primary_mask(topk_ids, num_experts, num_primary)


def _check_devices(topk_ids: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """The device rule of csrc/reroute_checks.cpp, for the fake kernels: a call that mixes a
    meta tensor with real ones is dispatched to the fake kernel, never to a checking one."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != topk_ids.device:
            raise ValueError(f"{name} must be on the device of topk_ids ({topk_ids.device}), got {tensor.device}")


# Fake kernels for torch.compile / opcheck: the devices, then output shapes and dtypes; the real
# kernels check everything else (csrc/reroute_checks.cpp).
if _COMPILED_DEVICE_TYPES:

    @torch.library.register_fake("sere::reroute")
    def _reroute_fake(topk_ids, similarity, num_primary, threshold, primary=None, allowed=None):
        _check_devices(topk_ids, similarity=similarity, primary=primary, allowed=allowed)
        return torch.empty_like(topk_ids), topk_ids.new_empty((len(STAT_FIELDS),), dtype=torch.int64)

    @torch.library.register_fake("sere::primary_mask")
    def _primary_mask_fake(topk_ids, num_experts, num_primary):
        return topk_ids.new_empty((num_experts,), dtype=torch.bool)  # [E]


if _COMPILED_ERR_DEVICE_TYPES:

    @torch.library.register_fake("sere::reroute_err")
    def _reroute_err_fake(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize,
        primary=None, router_scores=None, allowed=None,
    ):
        _check_devices(
            topk_ids, topk_weights=topk_weights, error=error, primary=primary, router_scores=router_scores,
            allowed=allowed,
        )
        stats = topk_ids.new_empty((len(ERR_STAT_FIELDS),), dtype=torch.int64)  # [6]
        return torch.empty_like(topk_ids), torch.empty_like(topk_weights), stats


if _COMPILED_OEA_DEVICE_TYPES:

    @torch.library.register_fake("sere::oea")
    def _oea_fake(topk_ids, topk_weights, router_scores, num_primary, primary=None, allowed=None):
        _check_devices(
            topk_ids, topk_weights=topk_weights, router_scores=router_scores, primary=primary, allowed=allowed
        )
        stats = topk_ids.new_empty((len(ERR_STAT_FIELDS),), dtype=torch.int64)  # [6]
        return torch.empty_like(topk_ids), torch.empty_like(topk_weights), stats
