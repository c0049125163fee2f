// Argument checks shared by every backend of the sere ops (CPU and CUDA). Each message names the
// argument; the fake kernels of sere/ops.py only propagate shapes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sere {

// Length of the stats vector returned by sere::reroute (sere.reference.STAT_FIELDS).
constexpr int64_t kNumStats = 5;
// Length of the stats vector returned by sere::reroute_err: STAT_FIELDS + ("dropped_slots",)
// (sere.ops.ERR_STAT_FIELDS).
constexpr int64_t kNumErrStats = 6;
// Length of the stats vector returned by sere::oea (the same six fields; critical_slots is 0).
constexpr int64_t kNumOeaStats = 6;

// Shape, dtype, device and contiguity of every argument of sere::reroute. The range of the ids
// is left to the backend (checked on CPU; a GPU cannot check it without a host sync).
void check_reroute_args(
    const at::Tensor& topk_ids,
    const at::Tensor& similarity,
    int64_t num_primary,
    double threshold,
    const std::optional<at::Tensor>& primary);

// Shape, dtype, device and contiguity of every argument of sere::reroute_err, and the ranges of
// tolerance (0, 1] and keep_cost (>= 0, inf allowed). max_distinct needs no check (<= 0: no budget).
void check_reroute_err_args(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& error,
    int64_t num_primary,
    double tolerance,
    double keep_cost,
    const std::optional<at::Tensor>& primary);

// Shape, dtype, device and contiguity of every argument of sere::oea; E = router_scores.size(1).
void check_oea_args(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& router_scores,
    int64_t num_primary,
    const std::optional<at::Tensor>& primary);

// The optional [T, E] router scores of sere::reroute_err (refill of the dropped slots).
void check_refill_scores(
    const std::optional<at::Tensor>& router_scores, const at::Tensor& topk_ids, int64_t num_experts);

// Arguments of sere::primary_mask (same rules for topk_ids and num_primary).
void check_primary_mask_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary);

}  // namespace sere
