// CPU kernel of sere::oea, Opportunistic Expert Activation (sere.reference.oea_reference).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// Pass 1 checks every id and builds P (or takes the caller's mask). Pass 2, per token: its S
// primary slots stay; its K - S other slots take the experts of P it has not chosen among its
// first S, best router score first (fill_cpu.h); a slot left without one repeats the token's
// slot-0 expert with weight 0. The new weights are the router scores of the K experts rescaled
// to the token's original weight sum.
//
// NOTE: exactness. Scores and weights are widened to float32 like the reference; the per-token
// sums are summed left to right, so the weights match the reference up to float32 rounding of
// those sums (the ids exactly).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "fill_cpu.h"
#include "reroute_checks.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

template <typename IdT, typename WeightT>
void oea_kernel(
    const IdT* topk_ids,          // [T, K]
    const WeightT* topk_weights,  // [T, K]
    const ScoreRows& scores,      // [T, E]
    const bool* primary,          // [E] or nullptr
    IdT* new_ids,                 // [T, K]
    WeightT* new_weights,         // [T, K]
    int64_t num_tokens,
    int64_t top_k,
    int64_t num_primary,
    int64_t num_experts,
    int64_t* stats) {             // [6]
  check_ids_in_range(topk_ids, num_tokens * top_k, top_k, num_experts);
  std::vector<uint8_t> flags(num_experts, 0);  // [E]
  const std::vector<int32_t> primary_ids =  // P in ascending id order
      mark_before_and_primary(topk_ids, primary, num_tokens, top_k, num_primary, num_experts, flags);

  const int64_t width = top_k - num_primary;  // K - S slots to fill per token
  std::vector<FillPick> picks(width);
  std::vector<float> raw(top_k);              // [K] the token's new scores before rescaling
  std::vector<int64_t> excluded(num_experts, -1);  // [E] == t: among token t's primaries
  int64_t rerouted_slots = 0;
  int64_t dropped_slots = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const IdT* row = topk_ids + t * top_k;   // [K]
    IdT* out = new_ids + t * top_k;          // [K]
    float weight_sum = 0.0f;
    for (int64_t s = 0; s < top_k; ++s) {
      weight_sum += static_cast<float>(topk_weights[t * top_k + s]);
    }
    for (int64_t s = 0; s < num_primary; ++s) {
      out[s] = row[s];
      raw[s] = scores.at(t, row[s]);
      excluded[row[s]] = t;
    }
    const int64_t num_picks = pick_fill_candidates(scores, t, primary_ids, excluded, t, width, picks.data());
    for (int64_t j = 0; j < width; ++j) {
      const int64_t s = num_primary + j;
      const bool fills = j < num_picks && picks[j].fills();
      out[s] = fills ? static_cast<IdT>(picks[j].id) : row[0];  // unfilled: slot 0 with weight 0
      raw[s] = fills ? picks[j].score : 0.0f;
      dropped_slots += !fills;
    }
    float raw_sum = 0.0f;
    for (int64_t s = 0; s < top_k; ++s) {
      raw_sum += raw[s];
      rerouted_slots += out[s] != row[s];
      flags[out[s]] |= kSeenAfter;
    }
    const float scale = weight_sum / clamp_min_tiny(raw_sum);
    for (int64_t s = 0; s < top_k; ++s) {
      new_weights[t * top_k + s] = static_cast<WeightT>(raw[s] * scale);
    }
  }

  write_distinct_counts(flags, stats);
  stats[2] = static_cast<int64_t>(primary_ids.size());
  stats[3] = rerouted_slots;
  stats[4] = 0;  // OEA keeps no expert outside P
  stats[5] = dropped_slots;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> oea_cpu(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& router_scores,
    int64_t num_primary,
    const std::optional<at::Tensor>& primary) {
  check_oea_args(topk_ids, topk_weights, router_scores, num_primary, primary);
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());              // [T, K]
  at::Tensor new_weights = at::empty(topk_weights.sizes(), topk_weights.options());  // [T, K]
  at::Tensor stats = at::empty({kNumOeaStats}, topk_ids.options().dtype(at::kLong));  // [6]
  const ScoreRows scores = score_rows(router_scores);
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(topk_weights, "topk_weights", [&](auto weight_tag) {
      using IdT = decltype(id_tag);
      using WeightT = decltype(weight_tag);
      oea_kernel<IdT, WeightT>(
          topk_ids.data_ptr<IdT>(), topk_weights.data_ptr<WeightT>(), scores, primary_data(primary),
          new_ids.data_ptr<IdT>(), new_weights.data_ptr<WeightT>(), topk_ids.size(0), topk_ids.size(1),
          num_primary, router_scores.size(1), stats.data_ptr<int64_t>());
    });
  });
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("oea", &oea_cpu);
}

}  // namespace sere
