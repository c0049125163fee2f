// The arguments of the sere ops, one struct per op, and their checks, shared by every backend
// (CPU and CUDA). op_entry.h packs a call into its struct and checks it once, before any kernel
// runs. Each message names the argument; the fake kernels of sere/ops.py only propagate shapes.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sere {

// Length of the stats vector returned by sere::reroute (sere.reference.STAT_FIELDS).
constexpr int64_t kNumStats = 5;
// Length of the stats vector returned by sere::reroute_err and sere::oea: STAT_FIELDS +
// ("dropped_slots",) (sere.ops.ERR_STAT_FIELDS; critical_slots is 0 for oea).
constexpr int64_t kNumErrStats = 6;

// The arguments of each op as its schema declares them (sere_ops.cpp). The references live as
// long as the op call: a struct is built, checked and used within it.
//
// The arguments of every re-routing op: the slots and P.
struct SlotsCall {
  const at::Tensor& topk_ids;                // [T, K] int32/int64
  int64_t num_primary;                       // S
  const std::optional<at::Tensor>& primary;  // [E] bool, or none: P from the first S slots
  const std::optional<at::Tensor>& allowed;  // [T, E] bool, or none: node-aware routing
                                             // (docs/spec.md §21), token t's P is P & allowed[t]
};

// sere::reroute (policy `sere`, docs/spec.md §6).
struct RerouteCall : SlotsCall {
  const at::Tensor& similarity;  // [E, E] float32/bfloat16/float16
  double threshold;              // rho in [0, 1]
  int64_t num_experts() const { return similarity.size(0); }
};

// sere::reroute_err (policy `sere-err`): the substitution errors decide keep / substitute /
// drop; the optional router scores refill the dropped slots.
struct RerouteErrCall : SlotsCall {
  const at::Tensor& topk_weights;                  // [T, K] float32/bfloat16/float16
  const at::Tensor& error;                         // [E, E] float32/bfloat16/float16
  double tolerance;                                // (0, 1]
  double keep_cost;                                // >= 0, inf allowed
  int64_t max_distinct;                            // <= 0: no budget
  bool renormalize;
  const std::optional<at::Tensor>& router_scores;  // [T, E]: refill the dropped slots
  int64_t num_experts() const { return error.size(0); }
};

// sere::oea (policy `oea`); E = router_scores.size(1).
struct OeaCall : SlotsCall {
  const at::Tensor& topk_weights;   // [T, K] float32/bfloat16/float16
  const at::Tensor& router_scores;  // [T, E] float32/bfloat16/float16
  int64_t num_experts() const { return router_scores.size(1); }
};

// sere::primary_mask: P as an [E] bool mask.
struct PrimaryMaskCall {
  const at::Tensor& topk_ids;  // [T, K] int32/int64
  int64_t num_experts;         // E >= 1
  int64_t num_primary;         // S
};

// Shape, dtype, device and contiguity of every argument, and the ranges of the scalars
// (threshold [0, 1]; tolerance (0, 1]; keep_cost >= 0, inf allowed; num_experts >= 1).
// max_distinct needs no check (<= 0: no budget). The range of the ids is left to the backend
// (checked on CPU; a GPU cannot check it without a host sync).
void check_args(const RerouteCall& call);
void check_args(const RerouteErrCall& call);
void check_args(const OeaCall& call);
void check_args(const PrimaryMaskCall& call);

}  // namespace sere
