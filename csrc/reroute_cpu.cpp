// CPU kernels of sere::reroute and sere::primary_mask (docs/spec.md §6).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// One pass over the slots builds P (or takes the caller's mask) and checks every id; a second
// pass rewrites the secondary slots. The nearest primary of an expert is computed lazily, only
// for experts that actually appear as non-primary secondaries (at most E * |P| reads). With an
// allowed mask (node-aware routing, docs/spec.md §21) each token has its own P_t = P & allowed[t]:
// the nearest primary is then searched per slot (at most T * (K - S) * |P| reads).
// Single-threaded on purpose: at decode sizes (T * K <= a few thousand slots) a parallel_for
// costs more than the work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "op_entry.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

// The slot's new expert: p* = argmax_{p in P} sim[e, p] over the p the token may use (`row`,
// nullptr: every p; ties: lowest id, P scanned ascending), or e itself (kept) when no such p
// exists, when the maximum is -inf or NaN (a NaN entry to P makes the reference's max NaN), or
// when use_threshold and sim[e, p*] < threshold.
template <typename SimT>
int32_t nearest_primary(
    const SimT* similarity,
    int64_t num_experts,
    const std::vector<int32_t>& primary_ids,
    const bool* row,  // [E] the token's allowed experts, or nullptr
    int32_t e,
    bool use_threshold,
    float threshold) {
  const SimT* sim_row = similarity + static_cast<int64_t>(e) * num_experts;  // [E]
  float best = -std::numeric_limits<float>::infinity();
  int32_t best_id = e;
  for (const int32_t p : primary_ids) {
    if (!may_use(row, p)) {
      continue;
    }
    const float value = static_cast<float>(sim_row[p]);
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
    const SlotDims& dims,
    const IdT* topk_ids,     // [T, K]
    IdT* new_ids,            // [T, K]
    const SimT* similarity,  // [E, E]
    const bool* primary,     // [E] or nullptr
    const bool* allowed,     // [T, E] or nullptr
    bool use_threshold,
    float threshold,
    int64_t* stats) {        // [5]
  check_ids_in_range(topk_ids, dims);
  std::vector<uint8_t> flags(dims.num_experts, 0);  // [E] kInPrimary | kSeenBefore | kSeenAfter
  const std::vector<int32_t> primary_ids = mark_before_and_primary(topk_ids, primary, dims, flags);  // P ascending

  std::vector<int32_t> target(allowed == nullptr ? dims.num_experts : 0, kUnknown);  // [E] new expert of e
  int64_t rerouted_slots = 0;
  int64_t critical_slots = 0;
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    const bool* row = allowed_row(allowed, t, dims.num_experts);  // [E] or nullptr
    for (int64_t s = 0; s < dims.top_k; ++s) {
      const int64_t i = t * dims.top_k + s;
      const int32_t e = static_cast<int32_t>(topk_ids[i]);
      int32_t new_e = e;
      if (s >= dims.num_primary && !in_token_primary(flags, row, e)) {
        // A critical expert must be one the token may use (docs/spec.md §21).
        const bool keep_critical = use_threshold && may_use(row, e);
        if (row == nullptr && target[e] != kUnknown) {
          new_e = target[e];  // the same for every token without a mask
        } else {
          new_e = nearest_primary(similarity, dims.num_experts, primary_ids, row, e, keep_critical, threshold);
          if (row == nullptr) {
            target[e] = new_e;
          }
        }
        rerouted_slots += new_e != e;
        critical_slots += !(flags[new_e] & kInPrimary);  // kept on an expert outside P (docs/spec.md §11)
      }
      new_ids[i] = static_cast<IdT>(new_e);
      flags[new_e] |= kSeenAfter;
    }
  }

  write_distinct_counts(flags, stats);
  stats[2] = static_cast<int64_t>(primary_ids.size());
  stats[3] = rerouted_slots;
  stats[4] = critical_slots;
}

IdsAndStats reroute_cpu(const RerouteCall& call) {
  const at::Tensor& topk_ids = call.topk_ids;
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());  // [T, K]
  at::Tensor stats = empty_stats(topk_ids, kNumStats);                  // [5]
  const SlotDims dims = slot_dims(topk_ids, call.num_primary, call.num_experts());
  // Spec: rho > 0 enables preservation; sim is compared with float32(rho).
  const bool use_threshold = call.threshold > 0.0;
  const float threshold_f32 = static_cast<float>(call.threshold);
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(call.similarity, "similarity", [&](auto sim_tag) {
      using IdT = decltype(id_tag);
      using SimT = decltype(sim_tag);
      reroute_kernel<IdT, SimT>(
          dims, topk_ids.data_ptr<IdT>(), new_ids.data_ptr<IdT>(), call.similarity.data_ptr<SimT>(),
          primary_data(call.primary), allowed_mask_data(call.allowed), use_threshold, threshold_f32,
          stats.data_ptr<int64_t>());
    });
  });
  return {new_ids, stats};
}

at::Tensor primary_mask_cpu(const PrimaryMaskCall& call) {
  const at::Tensor& topk_ids = call.topk_ids;
  at::Tensor mask = at::zeros({call.num_experts}, topk_ids.options().dtype(at::kBool));  // [E]
  const SlotDims dims = slot_dims(topk_ids, call.num_primary, call.num_experts);
  dispatch_ids(topk_ids, [&](auto id_tag) {
    using IdT = decltype(id_tag);
    const IdT* ids = topk_ids.data_ptr<IdT>();  // [T, K]
    check_ids_in_range(ids, dims);
    bool* out = mask.data_ptr<bool>();          // [E]
    for (int64_t i = 0; i < dims.num_slots(); ++i) {
      if (i % dims.top_k < dims.num_primary) {
        out[ids[i]] = true;
      }
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("reroute", &reroute_entry<reroute_cpu>);
  m.impl("primary_mask", &primary_mask_entry<primary_mask_cpu>);
}

}  // namespace sere
