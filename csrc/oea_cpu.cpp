// CPU kernel of sere::oea, Opportunistic Expert Activation (sere.reference.oea_reference).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// Pass 1 checks every id and builds P (or takes the caller's mask). Pass 2, per token: its S
// primary slots stay; its K - S other slots take the experts of P it has not chosen among its
// first S, best router score first (fill_cpu.h); with an allowed mask (node-aware routing,
// docs/spec.md §21) only those of P_t = P & allowed[t]; a slot left without one repeats the token's
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
#include "op_entry.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

// Token t's K - S filled slots (ids into out, router scores into raw[S..K)); returns how many
// were left unfilled (the slot-0 expert, score 0).
template <typename IdT>
int64_t fill_token(
    const IdT* row,                  // [K] the token's ids
    const ScoreRows& scores,         // [T, E]
    const std::vector<int32_t>& primary_ids,
    const bool* allowed,             // [E] the token's allowed experts, or nullptr
    int64_t t,
    const SlotDims& dims,
    std::vector<int64_t>& excluded,  // [E] == t: among token t's primaries
    std::vector<FillPick>& picks,    // [K - S] scratch
    IdT* out,                        // [K]
    float* raw) {                    // [K]
  for (int64_t s = 0; s < dims.num_primary; ++s) {
    out[s] = row[s];
    raw[s] = scores.at(t, row[s]);
    excluded[row[s]] = t;
  }
  const int64_t width = dims.top_k - dims.num_primary;
  const int64_t num_picks = pick_fill_candidates(scores, t, primary_ids, allowed, excluded, t, width, picks.data());
  int64_t unfilled = 0;
  for (int64_t j = 0; j < width; ++j) {
    const int64_t s = dims.num_primary + j;
    const bool fills = j < num_picks && picks[j].fills();
    out[s] = fills ? static_cast<IdT>(picks[j].id) : row[0];  // unfilled: slot 0 with weight 0
    raw[s] = fills ? picks[j].score : 0.0f;
    unfilled += !fills;
  }
  return unfilled;
}

template <typename IdT, typename WeightT>
void oea_kernel(
    const SlotDims& dims,
    const IdT* topk_ids,          // [T, K]
    const WeightT* topk_weights,  // [T, K]
    const ScoreRows& scores,      // [T, E]
    const bool* primary,          // [E] or nullptr
    const bool* allowed,          // [T, E] or nullptr
    IdT* new_ids,                 // [T, K]
    WeightT* new_weights,         // [T, K]
    int64_t* stats) {             // [6]
  check_ids_in_range(topk_ids, dims);
  std::vector<uint8_t> flags(dims.num_experts, 0);  // [E]
  const std::vector<int32_t> primary_ids = mark_before_and_primary(topk_ids, primary, dims, flags);  // P ascending

  const int64_t top_k = dims.top_k;
  std::vector<FillPick> picks(top_k - dims.num_primary);
  std::vector<float> raw(top_k);                        // [K] the token's new scores before rescaling
  std::vector<int64_t> excluded(dims.num_experts, -1);  // [E] == t: among token t's primaries
  int64_t rerouted_slots = 0;
  int64_t dropped_slots = 0;
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    const IdT* row = topk_ids + t * top_k;  // [K]
    IdT* out = new_ids + t * top_k;         // [K]
    const bool* allowed_t = allowed_row(allowed, t, dims.num_experts);  // [E] or nullptr
    dropped_slots += fill_token(row, scores, primary_ids, allowed_t, t, dims, excluded, picks, out, raw.data());
    float weight_sum = 0.0f;
    float raw_sum = 0.0f;
    for (int64_t s = 0; s < top_k; ++s) {
      weight_sum += static_cast<float>(topk_weights[t * top_k + s]);
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

IdsWeightsAndStats oea_cpu(const OeaCall& call) {
  at::Tensor new_ids, new_weights, stats;  // [T, K], [T, K], [6]
  std::tie(new_ids, new_weights, stats) = empty_weighted_outputs(call.topk_ids, call.topk_weights);
  const SlotDims dims = slot_dims(call.topk_ids, call.num_primary, call.num_experts());
  const ScoreRows scores = score_rows(call.router_scores);
  dispatch_ids(call.topk_ids, [&](auto id_tag) {
    dispatch_float(call.topk_weights, "topk_weights", [&](auto weight_tag) {
      using IdT = decltype(id_tag);
      using WeightT = decltype(weight_tag);
      oea_kernel<IdT, WeightT>(
          dims, call.topk_ids.data_ptr<IdT>(), call.topk_weights.data_ptr<WeightT>(), scores,
          primary_data(call.primary), allowed_mask_data(call.allowed), new_ids.data_ptr<IdT>(),
          new_weights.data_ptr<WeightT>(), stats.data_ptr<int64_t>());
    });
  });
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("oea", &oea_entry<oea_cpu>);
}

}  // namespace sere
