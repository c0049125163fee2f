// Argument checks shared by every backend of the sere ops. Each message names the argument and
// matches, word for word, the Python checks of sere/ops.py (the reference fallback path).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sere {

// Length of the stats vector returned by sere::reroute (sere.reference.STAT_FIELDS).
constexpr int64_t kNumStats = 5;

// Shape, dtype, device and contiguity of every argument of sere::reroute. The range of the ids
// is left to the backend (checked on CPU; a GPU cannot check it without a host sync).
void check_reroute_args(
    const at::Tensor& topk_ids,
    const at::Tensor& similarity,
    int64_t num_primary,
    double threshold,
    const std::optional<at::Tensor>& primary);

// Arguments of sere::primary_mask (same rules for topk_ids and num_primary).
void check_primary_mask_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary);

}  // namespace sere
