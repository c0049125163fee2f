// The C++ signatures of the sere ops (schemas: sere_ops.cpp), written once for every backend.
// Each entry packs its arguments into the op's call struct, checks them (reroute_checks.h) and
// runs the backend's implementation on the checked call:
//
//     m.impl("reroute", &reroute_entry<reroute_cpu>);   // reroute_cpu(const RerouteCall&)
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "reroute_checks.h"

namespace sere {

using IdsAndStats = std::tuple<at::Tensor, at::Tensor>;                      // new_ids, stats
using IdsWeightsAndStats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;   // + new_weights

// [n] int64 statistics on the device of topk_ids (any contents: the kernel writes them all).
inline at::Tensor empty_stats(const at::Tensor& topk_ids, int64_t n) {
  return at::empty({n}, topk_ids.options().dtype(at::kLong));
}

// new_ids [T, K] like topk_ids, new_weights [T, K] like topk_weights, stats [kNumErrStats].
inline IdsWeightsAndStats empty_weighted_outputs(const at::Tensor& topk_ids, const at::Tensor& topk_weights) {
  return {at::empty(topk_ids.sizes(), topk_ids.options()), at::empty(topk_weights.sizes(), topk_weights.options()),
          empty_stats(topk_ids, kNumErrStats)};
}

template <IdsAndStats (*Run)(const RerouteCall&)>
IdsAndStats reroute_entry(
    const at::Tensor& topk_ids, const at::Tensor& similarity, int64_t num_primary, double threshold,
    const std::optional<at::Tensor>& primary, const std::optional<at::Tensor>& allowed) {
  const RerouteCall call{{topk_ids, num_primary, primary, allowed}, similarity, threshold};
  check_args(call);
  return Run(call);
}

template <IdsWeightsAndStats (*Run)(const RerouteErrCall&)>
IdsWeightsAndStats reroute_err_entry(
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& error, int64_t num_primary,
    double tolerance, double keep_cost, int64_t max_distinct, bool renormalize,
    const std::optional<at::Tensor>& primary, const std::optional<at::Tensor>& router_scores,
    const std::optional<at::Tensor>& allowed) {
  const RerouteErrCall call{
      {topk_ids, num_primary, primary, allowed}, topk_weights, error, tolerance, keep_cost, max_distinct, renormalize,
      router_scores};
  check_args(call);
  return Run(call);
}

template <IdsWeightsAndStats (*Run)(const OeaCall&)>
IdsWeightsAndStats oea_entry(
    const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& router_scores,
    int64_t num_primary, const std::optional<at::Tensor>& primary, const std::optional<at::Tensor>& allowed) {
  const OeaCall call{{topk_ids, num_primary, primary, allowed}, topk_weights, router_scores};
  check_args(call);
  return Run(call);
}

template <at::Tensor (*Run)(const PrimaryMaskCall&)>
at::Tensor primary_mask_entry(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary) {
  const PrimaryMaskCall call{topk_ids, num_experts, num_primary};
  check_args(call);
  return Run(call);
}

}  // namespace sere
