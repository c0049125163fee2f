// The fill step shared by the CPU kernels of sere::oea (oea_cpu.cpp) and of sere::reroute_err's
// refill (reroute_err_cpu.cpp, refill_token below): for one token, the loaded experts it has not
// chosen yet and may use (the allowed row of node-aware routing, docs/spec.md §21), best router
// score first (sere.reference.oea_reference / refill_dropped).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// NOTE: order. The reference sorts the masked scores with torch.sort(descending=True,
// stable=True), which puts NaN before every number and keeps the lower id first among equal
// scores; a candidate whose score is NaN takes its place in that order but never fills a slot
// (NaN > -inf is False). Experts at -inf (and those not available) sort after every candidate
// and never fill: they are left out here.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reroute_cpu_common.h"

namespace sere {

// [T, E] router scores of any of the float dtypes, read as float32 (a runtime switch per read
// instead of one more template dimension).
struct ScoreRows {
  const void* data = nullptr;  // nullptr: no scores
  at::ScalarType dtype = at::kFloat;
  int64_t num_experts = 0;

  float at(int64_t t, int64_t e) const {
    const int64_t i = t * num_experts + e;
    switch (dtype) {
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(data)[i]);
      case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
};

inline ScoreRows score_rows(const at::Tensor& scores) {
  return {scores.data_ptr(), scores.scalar_type(), scores.size(1)};
}

struct FillPick {
  int32_t id;
  float score;
  // Whether the pick fills its slot (a NaN score holds its rank but fills nothing).
  bool fills() const { return !std::isnan(score); }
};

// Whether (a, a_id) comes before (b, b_id) in the reference's stable descending sort.
inline bool fills_before(float a, int32_t a_id, float b, int32_t b_id) {
  const bool a_nan = std::isnan(a);
  const bool b_nan = std::isnan(b);
  if (a_nan != b_nan) {
    return a_nan;
  }
  if (!a_nan && a != b) {
    return a > b;
  }
  return a_id < b_id;
}

// The first `count` candidates of token t in that order: experts of `loaded_ids` (ascending)
// that the token may use (`row`, nullptr: all), with excluded_stamp[e] != stamp and a score other
// than -inf. Writes picks[0..n), returns n.
inline int64_t pick_fill_candidates(
    const ScoreRows& scores,
    int64_t t,
    const std::vector<int32_t>& loaded_ids,
    const bool* row,                             // [E] the token's allowed experts, or nullptr
    const std::vector<int64_t>& excluded_stamp,  // [E]
    int64_t stamp,
    int64_t count,
    FillPick* picks) {                           // [count]
  int64_t num_picks = 0;
  if (count <= 0) {
    return 0;
  }
  for (const int32_t e : loaded_ids) {
    if (excluded_stamp[e] == stamp || !may_use(row, e)) {
      continue;
    }
    const float score = scores.at(t, e);
    if (score == -std::numeric_limits<float>::infinity()) {
      continue;
    }
    if (num_picks == count && !fills_before(score, e, picks[count - 1].score, picks[count - 1].id)) {
      continue;
    }
    // insertion into the sorted picks (the last one falls off when full)
    int64_t j = num_picks < count ? num_picks++ : count - 1;
    while (j > 0 && fills_before(score, e, picks[j - 1].score, picks[j - 1].id)) {
      picks[j] = picks[j - 1];
      --j;
    }
    picks[j] = {e, score};
  }
  return num_picks;
}

// max(x, 1e-20f) as torch's clamp_min: a NaN stays NaN.
inline float clamp_min_tiny(float x) {
  constexpr float kTiny = 1e-20f;
  return x < kTiny ? kTiny : x;
}

// Refill of token t (sere.reference.refill_dropped): its j-th live dropped slot takes the j-th
// loaded expert it may use that its new ids do not hold yet, best router score first, with weight
// score x (sum of its top-k weights / sum of their scores); a slot without one stays dropped.
template <typename IdT, typename WeightT>
void refill_token(
    const IdT* topk_ids,                  // [T, K]
    const WeightT* topk_weights,          // [T, K]
    const ScoreRows& scores,              // [T, E]
    const std::vector<int32_t>& loaded_ids,
    const bool* allowed,                  // [E] token t's allowed experts, or nullptr
    const std::vector<int64_t>& live_drops,  // slots s of token t, ascending
    int64_t t,
    int64_t top_k,
    IdT* new_ids,                         // [T, K]
    WeightT* new_weights,                 // [T, K]
    std::vector<int64_t>& excluded,       // [E] scratch
    std::vector<FillPick>& picks) {       // [K] scratch
  const int64_t row = t * top_k;
  float weight_sum = 0.0f;
  float score_sum = 0.0f;
  for (int64_t s = 0; s < top_k; ++s) {
    excluded[new_ids[row + s]] = t;
    weight_sum += static_cast<float>(topk_weights[row + s]);
    score_sum += scores.at(t, topk_ids[row + s]);
  }
  const float scale = weight_sum / clamp_min_tiny(score_sum);  // weight per unit of router score
  const int64_t count = static_cast<int64_t>(live_drops.size());
  const int64_t num_picks = pick_fill_candidates(scores, t, loaded_ids, allowed, excluded, t, count, picks.data());
  for (int64_t j = 0; j < num_picks; ++j) {
    if (picks[j].fills()) {
      new_ids[row + live_drops[j]] = static_cast<IdT>(picks[j].id);
      new_weights[row + live_drops[j]] = static_cast<WeightT>(picks[j].score * scale);
    }
  }
}

}  // namespace sere
