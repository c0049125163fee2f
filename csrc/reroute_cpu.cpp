// CPU kernels of sere::reroute and sere::primary_mask (docs/spec.md §6).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// One pass over the slots builds P (or takes the caller's mask) and checks every id; a second
// pass rewrites the secondary slots. The nearest primary of an expert is computed lazily, only
// for experts that actually appear as non-primary secondaries (at most E * |P| reads).
// Single-threaded on purpose: at decode sizes (T * K <= a few thousand slots) a parallel_for
// costs more than the work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "reroute_checks.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

// The slot's new expert: p* = argmax_{p in P} sim[e, p] (ties: lowest id, P scanned ascending),
// or e itself (kept) when P is empty, when the maximum is -inf or NaN (a NaN entry to P makes
// the reference's max NaN), or when use_threshold and sim[e, p*] < threshold.
template <typename SimT>
int32_t nearest_primary(
    const SimT* similarity,
    int64_t num_experts,
    const std::vector<int32_t>& primary_ids,
    int32_t e,
    bool use_threshold,
    float threshold) {
  const SimT* row = similarity + static_cast<int64_t>(e) * num_experts;  // [E]
  float best = -std::numeric_limits<float>::infinity();
  int32_t best_id = e;
  for (const int32_t p : primary_ids) {
    const float value = static_cast<float>(row[p]);
    if (std::isnan(value)) {
      return e;
    }
    if (value > best) {
      best = value;
      best_id = p;
    }
  }
  if (use_threshold && best < threshold) {
    return e;  // critical expert: nothing similar enough is loaded
  }
  return best_id;
}

template <typename IdT, typename SimT>
void reroute_kernel(
    const IdT* topk_ids,       // [T, K]
    IdT* new_ids,              // [T, K]
    const SimT* similarity,    // [E, E]
    const bool* primary,       // [E] or nullptr
    int64_t num_tokens,
    int64_t top_k,
    int64_t num_primary,
    int64_t num_experts,
    bool use_threshold,
    float threshold,
    int64_t* stats) {          // [5]
  const int64_t num_slots = num_tokens * top_k;
  check_ids_in_range(topk_ids, num_slots, top_k, num_experts);

  std::vector<uint8_t> flags(num_experts, 0);  // [E] kInPrimary | kSeenBefore | kSeenAfter
  const std::vector<int32_t> primary_ids =  // P in ascending id order
      mark_before_and_primary(topk_ids, primary, num_tokens, top_k, num_primary, num_experts, flags);

  std::vector<int32_t> target(num_experts, kUnknown);  // [E] new expert of a non-primary e
  int64_t rerouted_slots = 0;
  int64_t critical_slots = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const IdT* row = topk_ids + t * top_k;  // [K]
    IdT* out = new_ids + t * top_k;         // [K]
    for (int64_t s = 0; s < num_primary; ++s) {
      out[s] = row[s];
      flags[row[s]] |= kSeenAfter;
    }
    for (int64_t s = num_primary; s < top_k; ++s) {
      const int32_t e = static_cast<int32_t>(row[s]);
      int32_t new_e = e;
      if (!(flags[e] & kInPrimary)) {
        if (target[e] == kUnknown) {
          target[e] = nearest_primary(similarity, num_experts, primary_ids, e, use_threshold, threshold);
        }
        new_e = target[e];
        rerouted_slots += new_e != e;
        critical_slots += new_e == e;  // kept on an expert outside P
      }
      out[s] = static_cast<IdT>(new_e);
      flags[new_e] |= kSeenAfter;
    }
  }

  write_distinct_counts(flags, stats);
  stats[2] = static_cast<int64_t>(primary_ids.size());
  stats[3] = rerouted_slots;
  stats[4] = critical_slots;
}

std::tuple<at::Tensor, at::Tensor> reroute_cpu(
    const at::Tensor& topk_ids,
    const at::Tensor& similarity,
    int64_t num_primary,
    double threshold,
    const std::optional<at::Tensor>& primary) {
  check_reroute_args(topk_ids, similarity, num_primary, threshold, primary);
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());  // [T, K]
  at::Tensor stats = at::empty({kNumStats}, topk_ids.options().dtype(at::kLong));  // [5]
  const bool* primary_ptr = primary_data(primary);
  // Spec: rho > 0 enables preservation; sim is compared with float32(rho).
  const bool use_threshold = threshold > 0.0;
  const float threshold_f32 = static_cast<float>(threshold);
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(similarity, "similarity", [&](auto sim_tag) {
      using IdT = decltype(id_tag);
      using SimT = decltype(sim_tag);
      reroute_kernel<IdT, SimT>(
          topk_ids.data_ptr<IdT>(), new_ids.data_ptr<IdT>(), similarity.data_ptr<SimT>(), primary_ptr,
          topk_ids.size(0), topk_ids.size(1), num_primary, similarity.size(0), use_threshold,
          threshold_f32, stats.data_ptr<int64_t>());
    });
  });
  return {new_ids, stats};
}

template <typename IdT>
void primary_mask_kernel(
    const IdT* topk_ids, bool* mask, int64_t num_tokens, int64_t top_k, int64_t num_primary,
    int64_t num_experts) {
  check_ids_in_range(topk_ids, num_tokens * top_k, top_k, num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t s = 0; s < num_primary; ++s) {
      mask[topk_ids[t * top_k + s]] = true;
    }
  }
}

at::Tensor primary_mask_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary) {
  check_primary_mask_args(topk_ids, num_experts, num_primary);
  at::Tensor mask = at::zeros({num_experts}, topk_ids.options().dtype(at::kBool));  // [E]
  dispatch_ids(topk_ids, [&](auto id_tag) {
    using IdT = decltype(id_tag);
    primary_mask_kernel(
        topk_ids.data_ptr<IdT>(), mask.data_ptr<bool>(), topk_ids.size(0), topk_ids.size(1),
        num_primary, num_experts);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("reroute", &reroute_cpu);
  m.impl("primary_mask", &primary_mask_cpu);
}

}  // namespace sere
