// The fill step shared by the CUDA kernels of sere::oea (oea_cuda.cu) and of sere::reroute_err's
// refill (reroute_err_cuda.cu): for one token, the loaded experts it has not chosen yet, best
// router score first (sere.reference.oea_reference / refill_dropped); and reroute_err's refill
// and renormalisation of the weights. Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// NOTE: order, as fill_cpu.h: the reference's stable descending torch.sort puts NaN first and
// the lower id first among equal scores; a NaN candidate holds its rank but fills nothing;
// experts at -inf never fill and are left out.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "reroute_common.cuh"
#include "reroute_cuda.cuh"

namespace sere {

// Router score [t, e] of a ScoreView (reroute_cuda.cuh), read as float32.
__device__ __forceinline__ float score_at(const ScoreView& scores, int64_t t, int e) {
  const int64_t i = t * scores.num_experts + e;
  switch (scores.dtype) {
    case kScoreFloat16: return __half2float(static_cast<const __half*>(scores.data)[i]);
    case kScoreBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(scores.data)[i]);
    default: return static_cast<const float*>(scores.data)[i];
  }
}

// Whether (a, a_id) comes before (b, b_id) in the reference's stable descending sort.
__device__ __forceinline__ bool fills_before(float a, int a_id, float b, int b_id) {
  const bool a_nan = isnan(a);
  const bool b_nan = isnan(b);
  if (a_nan != b_nan) {
    return a_nan;
  }
  if (!a_nan && a != b) {
    return a > b;
  }
  return a_id < b_id;
}

// Reduces every lane's candidate (found, score, id) to the warp's first in fill order, in
// every lane.
__device__ __forceinline__ void warp_first_fill(bool& found, float& score, int& id) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const bool other_found = __shfl_xor_sync(kFullMask, found, offset);
    const float other = __shfl_xor_sync(kFullMask, score, offset);
    const int other_id = __shfl_xor_sync(kFullMask, id, offset);
    if (other_found && (!found || fills_before(other, other_id, score, id))) {
      found = true;
      score = other;
      id = other_id;
    }
  }
}

// Token t's first `count` fill candidates in order, one round each, by one whole warp (call
// warp-uniformly): the experts e with is_loaded(e), !is_excluded(e) and a score other than
// -inf. on_pick(j, id, score) runs in every lane for the j-th candidate found (fills or not:
// a NaN score fills nothing); returns the number found.
template <typename Loaded, typename Excluded, typename OnPick>
__device__ int warp_fill_picks(
    const ScoreView& scores,
    int64_t t,
    int num_experts,
    int count,
    const Loaded& is_loaded,
    const Excluded& is_excluded,
    const OnPick& on_pick) {
  const int lane = threadIdx.x % kWarpSize;
  bool has_prev = false;
  float prev = 0.0f;
  int prev_id = 0;
  for (int j = 0; j < count; ++j) {
    bool found = false;
    float best = 0.0f;
    int best_id = num_experts;
    for (int e = lane; e < num_experts; e += kWarpSize) {
      if (!is_loaded(e)) {
        continue;
      }
      const float score = score_at(scores, t, e);
      if (score == -INFINITY || (has_prev && !fills_before(prev, prev_id, score, e)) ||
          (found && !fills_before(score, e, best, best_id)) || is_excluded(e)) {
        continue;  // never fills, already picked, not better, or chosen by the token already
      }
      found = true;
      best = score;
      best_id = e;
    }
    warp_first_fill(found, best, best_id);
    if (!found) {  // warp-uniform
      return j;
    }
    on_pick(j, best_id, best);
    has_prev = true;
    prev = best;
    prev_id = best_id;
  }
  return count;
}

// max(x, 1e-20f) as torch's clamp_min: a NaN stays NaN.
__device__ __forceinline__ float clamp_min_tiny(float x) { return x < 1e-20f ? 1e-20f : x; }

// Refill of token t by one whole warp (sere.reference.refill_dropped; call warp-uniformly):
// its j-th dropped slot with a nonzero weight takes the j-th loaded expert that its new ids do
// not hold yet, best router score first, with weight score x (sum of its top-k weights / sum of
// their scores); a slot without one (or with a NaN score) stays dropped.
template <typename IdT, typename WeightT, typename Loaded, typename Dropped>
__device__ void refill_token(
    const IdT* __restrict__ topk_ids,          // [T, K]
    const WeightT* __restrict__ topk_weights,  // [T, K]
    const ScoreView& scores,                   // [T, E]
    IdT* new_ids,                              // [T, K], decided
    WeightT* new_weights,                      // [T, K], decided
    int t,
    int top_k,
    int num_experts,
    const Loaded& is_loaded,
    const Dropped& is_dropped) {               // is_dropped(slot index i)
  const int row = t * top_k;
  const auto is_live = [&](int s) { return is_dropped(row + s) && to_float(topk_weights[row + s]) != 0.0f; };
  int count = 0;
  float weight_sum = 0.0f;
  float score_sum = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    count += is_live(s);
    const IdT e = topk_ids[row + s];
    weight_sum = __fadd_rn(weight_sum, to_float(topk_weights[row + s]));
    score_sum = __fadd_rn(score_sum, valid_id(e, num_experts) ? score_at(scores, t, static_cast<int>(e)) : 0.0f);
  }
  if (count == 0) {
    return;
  }
  const float scale = __fdiv_rn(weight_sum, clamp_min_tiny(score_sum));  // weight per unit of score
  const auto is_excluded = [&](int e) {  // chosen by the token already (before the refill)
    for (int s = 0; s < top_k; ++s) {
      if (!is_live(s) && new_ids[row + s] == static_cast<IdT>(e)) {  // lane 0 writes only live slots
        return true;
      }
    }
    return false;
  };
  const auto on_pick = [&](int j, int e, float score) {
    if (threadIdx.x % kWarpSize != 0 || isnan(score)) {
      return;
    }
    for (int s = 0, rank = 0; s < top_k; ++s) {
      if (is_live(s) && rank++ == j) {
        new_ids[row + s] = static_cast<IdT>(e);
        new_weights[row + s] = from_float<WeightT>(__fmul_rn(score, scale));
      }
    }
  };
  warp_fill_picks(scores, t, num_experts, count, is_loaded, is_excluded, on_pick);
}

// Every token's weights rescaled to its original sum (sere.reference.renormalize_weights).
template <typename WeightT>
__device__ void renormalize_tokens(
    const WeightT* __restrict__ topk_weights,  // [T, K]
    WeightT* new_weights,                      // [T, K]
    int num_tokens,
    int top_k) {
  for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    const int64_t row = static_cast<int64_t>(t) * top_k;
    float old_sum = 0.0f;
    float new_sum = 0.0f;
    for (int s = 0; s < top_k; ++s) {
      old_sum = __fadd_rn(old_sum, to_float(topk_weights[row + s]));
      new_sum = __fadd_rn(new_sum, to_float(new_weights[row + s]));
    }
    const float scale = __fdiv_rn(old_sum, new_sum);
    for (int s = 0; s < top_k; ++s) {
      new_weights[row + s] = from_float<WeightT>(__fmul_rn(to_float(new_weights[row + s]), scale));
    }
  }
}

}  // namespace sere
