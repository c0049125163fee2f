// CPU kernels of sere::reroute and sere::primary_mask (SERE_SPEC section 2).
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

namespace sere {
namespace {

// Per-expert flags, one byte each.
constexpr uint8_t kInPrimary = 1;
constexpr uint8_t kSeenBefore = 2;
constexpr uint8_t kSeenAfter = 4;
constexpr int32_t kUnknown = -1;

template <typename IdT>
void check_ids_in_range(const IdT* ids, int64_t num_slots, int64_t top_k, int64_t num_experts) {
  for (int64_t i = 0; i < num_slots; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(
        e >= 0 && e < num_experts, "topk_ids[", i / top_k, ", ", i % top_k, "] = ", e,
        " is outside [0, num_experts=", num_experts, ")");
  }
}

// The slot's new expert: p* = argmax_{p in P} sim[e, p] (ties: lowest id, P scanned ascending),
// or e itself when P is empty or (use_threshold and sim[e, p*] < threshold).
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
    TORCH_CHECK_VALUE(
        std::isfinite(value), "similarity[", e, ", ", p, "] = ", value, " is not finite");
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
  for (int64_t i = 0; i < num_slots; ++i) {
    flags[topk_ids[i]] |= kSeenBefore;
  }
  if (primary != nullptr) {
    for (int64_t e = 0; e < num_experts; ++e) {
      flags[e] |= primary[e] ? kInPrimary : 0;
    }
  } else {
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t s = 0; s < num_primary; ++s) {
        flags[topk_ids[t * top_k + s]] |= kInPrimary;
      }
    }
  }
  std::vector<int32_t> primary_ids;  // P in ascending id order
  primary_ids.reserve(num_experts);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (flags[e] & kInPrimary) {
      primary_ids.push_back(static_cast<int32_t>(e));
    }
  }

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

  int64_t distinct_before = 0;
  int64_t distinct_after = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    distinct_before += (flags[e] & kSeenBefore) != 0;
    distinct_after += (flags[e] & kSeenAfter) != 0;
  }
  stats[0] = distinct_before;
  stats[1] = distinct_after;
  stats[2] = static_cast<int64_t>(primary_ids.size());
  stats[3] = rerouted_slots;
  stats[4] = critical_slots;
}

template <typename IdT>
void dispatch_similarity(
    const at::Tensor& topk_ids,
    at::Tensor& new_ids,
    const at::Tensor& similarity,
    const bool* primary,
    int64_t num_primary,
    bool use_threshold,
    float threshold,
    at::Tensor& stats) {
  const auto run = [&](auto sim_tag) {
    using SimT = decltype(sim_tag);
    reroute_kernel<IdT, SimT>(
        topk_ids.data_ptr<IdT>(), new_ids.data_ptr<IdT>(), similarity.data_ptr<SimT>(), primary,
        topk_ids.size(0), topk_ids.size(1), num_primary, similarity.size(0), use_threshold,
        threshold, stats.data_ptr<int64_t>());
  };
  switch (similarity.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "unreachable: similarity dtype was checked");
  }
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
  const bool* primary_ptr = primary.has_value() ? primary->data_ptr<bool>() : nullptr;
  // Spec: rho > 0 enables preservation; sim is compared with float32(rho).
  const bool use_threshold = threshold > 0.0;
  const float threshold_f32 = static_cast<float>(threshold);
  if (topk_ids.scalar_type() == at::kInt) {
    dispatch_similarity<int32_t>(
        topk_ids, new_ids, similarity, primary_ptr, num_primary, use_threshold, threshold_f32, stats);
  } else {
    dispatch_similarity<int64_t>(
        topk_ids, new_ids, similarity, primary_ptr, num_primary, use_threshold, threshold_f32, stats);
  }
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
  if (topk_ids.scalar_type() == at::kInt) {
    primary_mask_kernel(
        topk_ids.data_ptr<int32_t>(), mask.data_ptr<bool>(), topk_ids.size(0), topk_ids.size(1),
        num_primary, num_experts);
  } else {
    primary_mask_kernel(
        topk_ids.data_ptr<int64_t>(), mask.data_ptr<bool>(), topk_ids.size(0), topk_ids.size(1),
        num_primary, num_experts);
  }
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("reroute", &reroute_cpu);
  m.impl("primary_mask", &primary_mask_cpu);
}

}  // namespace sere
