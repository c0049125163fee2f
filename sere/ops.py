"""The public re-routing API: the compiled `sere::reroute` / `sere::reroute_err` ops, else the
reference with a warning.

Shape legend:
    T  tokens in the step          E  routed experts
    K  top-k slots per token       S  num_primary (1 <= S < K)

`reroute` runs `torch.ops.sere.reroute` (csrc/) when the extension `sere._C` is built with a
kernel for the tensors' device, else `sere.reference.reroute_reference` (one warning per
process). Both paths check their arguments with the same messages, each naming the argument.
The compiled op never syncs with the host, so it runs inside CUDA graphs and `torch.compile`.

`reroute_err` (error-aware re-routing, policy `sere-err`) runs `torch.ops.sere.reroute_err` the
same way, else `sere.reference.sere_err_reference`. Its statistics have one more entry than
`STAT_FIELDS`: `ERR_STAT_FIELDS` = STAT_FIELDS + ("dropped_slots",).
"""

from __future__ import annotations

import warnings

import torch

from sere.reference import (
    STAT_FIELDS,
    _best_substitute,
    reroute_reference,
    refill_dropped,
    renormalize_weights,
    reroute_stats,
    sere_err_reference,
)
from sere.reference import primary_mask as _primary_mask_reference

__all__ = [
    "ERR_STAT_FIELDS",
    "HAS_COMPILED_OP",
    "primary_mask",
    "reroute",
    "reroute_err",
    "reroute_err_with_stats",
    "reroute_with_stats",
]

# Statistics of `reroute_err_with_stats` (and torch.ops.sere.reroute_err), an [6] int64 vector:
# STAT_FIELDS, where critical_slots counts the secondary slots that keep a non-primary expert
# because approximating it costs more than keep_cost, plus
#   dropped_slots: secondary slots dropped (set to the token's slot-0 expert with weight 0).
ERR_STAT_FIELDS = STAT_FIELDS + ("dropped_slots",)

try:
    from sere import _C  # noqa: F401  (loading it registers torch.ops.sere.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _IMPORT_ERROR = exc

HAS_COMPILED_OP = _IMPORT_ERROR is None
# Device types with a compiled kernel ("cpu", and "cuda" for a CUDA build), fixed at import so
# that the dispatch below is a constant under torch.compile.
_COMPILED_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if HAS_COMPILED_OP and torch._C._dispatch_has_kernel_for_dispatch_key("sere::reroute", key)
)
_FLOAT_SIMILARITY = (torch.float32, torch.bfloat16, torch.float16)
_warned_fallback = False


def _has_op(name: str) -> bool:
    """Whether the loaded sere._C declares torch.ops.sere.<name> (an older build may not)."""
    return HAS_COMPILED_OP and hasattr(torch.ops.sere, name)


_HAS_ERR_OP = _has_op("reroute_err")
# Like _COMPILED_DEVICE_TYPES, for sere::reroute_err.
_COMPILED_ERR_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _HAS_ERR_OP and torch._C._dispatch_has_kernel_for_dispatch_key("sere::reroute_err", key)
)
_warned_err_fallback = False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_topk_ids(topk_ids: torch.Tensor, num_primary: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [num_tokens, top_k], got shape {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {_dtype_name(topk_ids.dtype)}")
    if not topk_ids.is_contiguous():
        raise ValueError("topk_ids must be contiguous")
    top_k = topk_ids.shape[1]
    if not 1 <= num_primary < top_k:
        raise ValueError(f"num_primary must be in [1, top_k={top_k}), got {num_primary}")


def _check_reroute_args(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    threshold: float,
    primary: torch.Tensor | None,
) -> None:
    """The checks of csrc/reroute_checks.cpp, in the same order with the same messages."""
    _check_topk_ids(topk_ids, num_primary)
    _check_expert_matrix(similarity, "similarity", topk_ids)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold:g}")
    _check_primary(primary, topk_ids, similarity.shape[0])


def _check_expert_matrix(matrix: torch.Tensor, name: str, topk_ids: torch.Tensor) -> None:
    """A square [E, E] float32/bfloat16/float16 contiguous matrix on the device of topk_ids."""
    if matrix.device != topk_ids.device:
        raise ValueError(f"{name} must be on the device of topk_ids ({topk_ids.device}), got {matrix.device}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(
            f"{name} must be a square [num_experts, num_experts] matrix with num_experts >= 1, "
            f"got shape {list(matrix.shape)}"
        )
    if matrix.dtype not in _FLOAT_SIMILARITY:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {_dtype_name(matrix.dtype)}")
    if not matrix.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_primary(primary: torch.Tensor | None, topk_ids: torch.Tensor, num_experts: int) -> None:
    """The optional [E] bool contiguous primary mask on the device of topk_ids."""
    if primary is None:
        return
    if primary.device != topk_ids.device:
        raise ValueError(f"primary must be on the device of topk_ids ({topk_ids.device}), got {primary.device}")
    if primary.dim() != 1 or primary.shape[0] != num_experts:
        raise ValueError(
            f"primary must be a 1-D [num_experts={num_experts}] mask, got shape {list(primary.shape)}"
        )
    if primary.dtype != torch.bool:
        raise TypeError(f"primary must be bool, got {_dtype_name(primary.dtype)}")
    if not primary.is_contiguous():
        raise ValueError("primary must be contiguous")


def _check_reroute_err_args(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    error: torch.Tensor,
    num_primary: int,
    tolerance: float,
    keep_cost: float,
    primary: torch.Tensor | None,
) -> None:
    """The checks of csrc/reroute_checks.cpp (check_reroute_err_args), same order, same messages."""
    _check_topk_ids(topk_ids, num_primary)
    if topk_weights.device != topk_ids.device:
        raise ValueError(
            f"topk_weights must be on the device of topk_ids ({topk_ids.device}), got {topk_weights.device}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {list(topk_ids.shape)}, "
            f"got {list(topk_weights.shape)}"
        )
    if topk_weights.dtype not in _FLOAT_SIMILARITY:
        raise TypeError(
            f"topk_weights must be float32, bfloat16 or float16, got {_dtype_name(topk_weights.dtype)}"
        )
    if not topk_weights.is_contiguous():
        raise ValueError("topk_weights must be contiguous")
    _check_expert_matrix(error, "error", topk_ids)
    if not 0.0 < tolerance <= 1.0:
        raise ValueError(f"tolerance must be in (0, 1], got {tolerance:g}")
    if not keep_cost >= 0.0:  # NaN fails too; inf (never keep) passes
        raise ValueError(f"keep_cost must be >= 0 (inf: never keep), got {keep_cost:g}")
    _check_primary(primary, topk_ids, error.shape[0])


def _check_topk_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {list(topk_ids.shape)}, "
            f"got {list(topk_weights.shape)}"
        )
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating-point, got {_dtype_name(topk_weights.dtype)}")
    if topk_weights.device != topk_ids.device:
        raise ValueError(
            f"topk_weights must be on the device of topk_ids ({topk_ids.device}), got {topk_weights.device}"
        )


def _can_sync(device: torch.device) -> bool:
    """Whether data-dependent checks may read values back (not while tracing or capturing)."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _check_values(topk_ids: torch.Tensor, num_experts: int, similarity: torch.Tensor | None) -> None:
    """Range of the ids (first bad one in row-major order) and finiteness of `similarity`."""
    bad = ((topk_ids < 0) | (topk_ids >= num_experts)).reshape(-1)  # [T * K]
    if bool(bad.any()):
        flat = int(bad.nonzero()[0])
        row, col = divmod(flat, topk_ids.shape[1])
        raise ValueError(
            f"topk_ids[{row}, {col}] = {int(topk_ids.reshape(-1)[flat])} is outside "
            f"[0, num_experts={num_experts})"
        )
    if similarity is None:
        return
    finite = torch.isfinite(similarity).reshape(-1)  # [E * E]
    if not bool(finite.all()):
        flat = int((~finite).nonzero()[0])
        row, col = divmod(flat, num_experts)
        raise ValueError(f"similarity[{row}, {col}] = {float(similarity[row, col])} is not finite")


def _warn_fallback(device: torch.device, stacklevel: int) -> None:
    """Warn once per process; `stacklevel` points the warning at the caller of the public API."""
    global _warned_fallback
    if _warned_fallback or torch.compiler.is_compiling():
        return
    _warned_fallback = True
    if _IMPORT_ERROR is not None:
        why = f"the extension sere._C is not built ({_IMPORT_ERROR})"
    else:
        why = f"sere._C was built without {device.type} kernels"
    warnings.warn(
        f"sere: {why}; using the slower Python reference sere.reference.reroute_reference. "
        "Build it with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _reroute_python(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    threshold: float = 0.0,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback path with the op's contract: ([T, K] new ids, [5] int64 stats).

    Slow (tens of small torch ops); validates like the compiled op, which rejects non-finite
    entries of `similarity` only where it reads them (this path rejects any).
    """
    _check_reroute_args(topk_ids, similarity, num_primary, threshold, primary)
    num_experts = similarity.shape[0]
    if _can_sync(topk_ids.device):
        _check_values(topk_ids, num_experts, similarity)
    # the reference returns the weights it is given untouched: none are needed here
    new_ids, _ = reroute_reference(topk_ids, None, similarity, num_primary, threshold, primary)
    stats = reroute_stats(topk_ids, new_ids, num_experts, num_primary, primary)
    return new_ids, stats


def _dispatch(topk_ids, topk_weights, similarity, num_primary, threshold, primary):
    """(new ids, stats) from the compiled op, else from the Python path."""
    _check_topk_weights(topk_ids, topk_weights)
    if topk_ids.device.type in _COMPILED_DEVICE_TYPES:
        return torch.ops.sere.reroute(topk_ids, similarity, num_primary, float(threshold), primary)
    _warn_fallback(topk_ids.device, stacklevel=3)
    return _reroute_python(topk_ids, similarity, num_primary, float(threshold), primary)


def reroute_with_stats(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    threshold: float = 0.0,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SERE re-routing (SERE_SPEC section 2) plus its statistics, without a host sync.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E), from the model's own router.
        topk_weights: [T, K] float routing weights; returned unchanged (same object).
        similarity: [E, E] float32/bfloat16/float16, contiguous, on the device of topk_ids.
        num_primary: S, 1 <= S < K.
        threshold: rho in [0, 1]; > 0 keeps a secondary expert whose best primary has
            similarity < float32(rho) (a critical expert; it does not join P).
        primary: optional [E] bool primary set (the OR over an expert-parallel group);
            default: P from the first S slots of `topk_ids`.
    Returns:
        (new topk_ids [T, K] same dtype, topk_weights, stats [5] int64 in STAT_FIELDS order:
        distinct_before, distinct_after, num_primary_experts, rerouted_slots, critical_slots).
    Raises:
        ValueError / TypeError naming the argument. On CPU, ids outside [0, E) raise, and so do
        non-finite similarities that the op reads. On CUDA neither can be checked without a
        sync: an id outside [0, E) is left unchanged and counted in no statistic, and a NaN
        similarity is never chosen as the best primary.
    """
    new_ids, stats = _dispatch(topk_ids, topk_weights, similarity, num_primary, threshold, primary)
    return new_ids, topk_weights, stats


def reroute(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    similarity: torch.Tensor,
    num_primary: int,
    threshold: float = 0.0,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SERE re-routing: (new topk_ids [T, K] same dtype, topk_weights unchanged).

    Arguments as in `reroute_with_stats`.
    """
    new_ids, _ = _dispatch(topk_ids, topk_weights, similarity, num_primary, threshold, primary)
    return new_ids, topk_weights


def _warn_err_fallback(device: torch.device, stacklevel: int) -> None:
    """Like `_warn_fallback`, once per process, for the error-aware op."""
    global _warned_err_fallback
    if _warned_err_fallback or torch.compiler.is_compiling():
        return
    _warned_err_fallback = True
    if _IMPORT_ERROR is not None:
        why = f"the extension sere._C is not built ({_IMPORT_ERROR})"
    elif not _HAS_ERR_OP:
        why = "sere._C predates sere::reroute_err"
    else:
        why = f"sere._C was built without {device.type} kernels for sere::reroute_err"
    warnings.warn(
        f"sere: {why}; using the slower Python reference sere.reference.sere_err_reference. "
        "Build it with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _err_stats(topk_ids, new_ids, new_weights, error, num_primary, tolerance, primary):
    """[6] int64 statistics in ERR_STAT_FIELDS order from the reference's inputs and outputs.

    A non-primary secondary slot was substituted (new id in P), kept (same id) or dropped (slot-0
    id, weight 0). Only a slot whose best error reaches `tolerance` can be dropped; it is told
    apart from a kept one by its id, or, where the slot-0 expert is its own, by its zero weight.
    """
    num_experts = error.shape[0]
    if primary is None:
        primary = _primary_mask_reference(topk_ids, num_experts, num_primary)
    _, best_err = _best_substitute(error, primary)  # [E] float32
    old_tail = topk_ids[:, num_primary:].long()  # [T, K-S]
    new_tail = new_ids[:, num_primary:].long()  # [T, K-S]
    outside = ~primary[old_tail]
    unchanged = new_tail == old_tail
    no_substitute = ~(best_err[old_tail] < tolerance)  # compared in float32, like the reference
    dropped = outside & no_substitute & (~unchanged | (new_weights[:, num_primary:] == 0))
    critical = outside & unchanged & ~dropped
    base = reroute_stats(topk_ids, new_ids, num_experts, num_primary, primary)  # [5]
    return torch.cat([base[:4], torch.stack([critical.sum(), dropped.sum()])]).to(torch.int64)


def _reroute_err_python(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    error: torch.Tensor,
    num_primary: int,
    tolerance: float,
    keep_cost: float,
    max_distinct: int,
    renormalize: bool,
    primary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fallback path with the op's contract (max_distinct <= 0: no budget):
    ([T, K] new ids, [T, K] new weights, [6] int64 stats)."""
    _check_reroute_err_args(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, primary)
    if _can_sync(topk_ids.device):
        _check_values(topk_ids, error.shape[0], None)
    new_ids, new_weights = sere_err_reference(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost,
        max_distinct if max_distinct > 0 else None, renormalize, primary,
    )
    stats = _err_stats(topk_ids, new_ids, new_weights, error, num_primary, tolerance, primary)
    return new_ids, new_weights, stats


def _dispatch_err(
    topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary,
    router_scores=None,
):
    """(new ids, new weights, stats) from the compiled op, else from the Python path; with
    `router_scores`, the op's dropped slots are then refilled (`refill_dropped`, plain torch,
    no host sync) and the weights renormalised afterwards, as in the reference."""
    if max_distinct is not None and max_distinct < 1:
        raise ValueError(f"max_distinct must be >= 1 or None, got {max_distinct}")
    refill = router_scores is not None
    if refill and tuple(router_scores.shape) != (topk_ids.shape[0], error.shape[0]):
        raise ValueError(
            f"router_scores must be [num_tokens={topk_ids.shape[0]}, num_experts={error.shape[0]}], "
            f"got {tuple(router_scores.shape)}"
        )
    if refill and primary is None:
        primary = primary_mask(topk_ids, error.shape[0], num_primary)
    args = (
        topk_ids, topk_weights, error, num_primary, float(tolerance), float(keep_cost),
        0 if max_distinct is None else int(max_distinct), bool(renormalize) and not refill, primary,
    )
    if topk_ids.device.type in _COMPILED_ERR_DEVICE_TYPES:
        new_ids, new_weights, stats = torch.ops.sere.reroute_err(*args)
    else:
        _warn_err_fallback(topk_ids.device, stacklevel=3)
        new_ids, new_weights, stats = _reroute_err_python(*args)
    if not refill:
        return new_ids, new_weights, stats
    # a secondary slot is dropped iff the op zeroed a weight; the step runs P and what it kept
    drop = (new_weights[:, num_primary:] == 0) & (topk_weights[:, num_primary:] != 0)  # [T, K-S]
    loaded = primary.clone()
    loaded[new_ids[new_weights != 0].long()] = True  # [E]
    new_ids, new_weights = refill_dropped(
        new_ids, new_weights, drop, loaded, router_scores, topk_ids, topk_weights
    )
    if renormalize:
        new_weights = renormalize_weights(new_weights, topk_weights)
    return new_ids, new_weights, stats


def reroute_err_with_stats(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    error: torch.Tensor,
    num_primary: int,
    tolerance: float = 1.0,
    keep_cost: float = float("inf"),
    max_distinct: int | None = None,
    renormalize: bool = False,
    primary: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
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
        renormalize: rescale every token's weights to their original sum.
        primary: optional [E] bool primary set (the OR over an expert-parallel group);
            default: P from the first S slots of `topk_ids`.
        router_scores: optional [T, E] float post-activation router scores: refill dropped slots
            from the loaded experts by score, as OEA fills (see `sere_err_reference`).
    Returns:
        (new topk_ids [T, K] same dtype, new topk_weights [T, K] same dtype, stats [6] int64 in
        ERR_STAT_FIELDS order: distinct_before, distinct_after, num_primary_experts,
        rerouted_slots, critical_slots (kept critical slots), dropped_slots (before a refill)).
        Ids equal the reference's exactly; weights too without `renormalize` (with it, up to
        float32 rounding of the per-token sums).
    Raises:
        ValueError / TypeError naming the argument. On CPU, ids outside [0, E) raise. On CUDA
        they cannot be checked without a sync: such an id is left unchanged (a drop copies the
        slot-0 id as it is) and counted in no distinct-expert statistic. The CUDA op handles
        T * K <= 8192 slots (one thread block) and E <= 4096; larger calls raise.
        A NaN among a row's errors to P makes that expert unsubstitutable (error +inf), as in
        the reference.
    """
    return _dispatch_err(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary,
        router_scores,
    )


def reroute_err(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    error: torch.Tensor,
    num_primary: int,
    tolerance: float = 1.0,
    keep_cost: float = float("inf"),
    max_distinct: int | None = None,
    renormalize: bool = False,
    primary: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-aware re-routing: (new topk_ids [T, K], new topk_weights [T, K]), same dtypes.

    Arguments as in `reroute_err_with_stats`.
    """
    new_ids, new_weights, _ = _dispatch_err(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary,
        router_scores,
    )
    return new_ids, new_weights


def primary_mask(topk_ids: torch.Tensor, num_experts: int, num_primary: int) -> torch.Tensor:
    """P = {topk_ids[t, s] : s < num_primary} as an [E] bool mask; OR it across an EP group.

    Args:
        topk_ids: [T, K] int32/int64, contiguous, ids in [0, E).
        num_experts: E >= 1.
        num_primary: S, 1 <= S < K.
    """
    if topk_ids.device.type in _COMPILED_DEVICE_TYPES:
        return torch.ops.sere.primary_mask(topk_ids, num_experts, num_primary)
    _warn_fallback(topk_ids.device, stacklevel=2)
    _check_topk_ids(topk_ids, num_primary)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if _can_sync(topk_ids.device):
        _check_values(topk_ids, num_experts, None)
    return _primary_mask_reference(topk_ids, num_experts, num_primary)


if HAS_COMPILED_OP:

    @torch.library.register_fake("sere::reroute")
    def _reroute_fake(topk_ids, similarity, num_primary, threshold, primary=None):
        _check_reroute_args(topk_ids, similarity, num_primary, threshold, primary)
        stats = topk_ids.new_empty((len(STAT_FIELDS),), dtype=torch.int64)  # [5]
        return torch.empty_like(topk_ids), stats

    @torch.library.register_fake("sere::primary_mask")
    def _primary_mask_fake(topk_ids, num_experts, num_primary):
        _check_topk_ids(topk_ids, num_primary)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        return topk_ids.new_empty((num_experts,), dtype=torch.bool)  # [E]


if _HAS_ERR_OP:

    @torch.library.register_fake("sere::reroute_err")
    def _reroute_err_fake(
        topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary=None
    ):
        _check_reroute_err_args(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, primary)
        stats = topk_ids.new_empty((len(ERR_STAT_FIELDS),), dtype=torch.int64)  # [6]
        return torch.empty_like(topk_ids), torch.empty_like(topk_weights), stats
