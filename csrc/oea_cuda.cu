// CUDA kernel of sere::oea (Opportunistic Expert Activation, sere.reference.oea_reference).
// Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// ONE launch of one block (decode sizes, T * K <= kSingleBlockMaxSlots): the block builds P and
// the "before" set in shared memory; then a warp per token picks, one round per slot, the next
// expert of P (node-aware: of the token's P_t = P & allowed[t]) that the token has not among its
// S primaries, best router score first
// (fill_cuda.cuh); lane 0 writes the token's K ids and weights (router scores rescaled to the
// token's original weight sum, summed left to right) and counts its statistics.
//
// NOTE: exactness. Sums, the scale and the products use __fadd_rn / __fdiv_rn / __fmul_rn
// (never fused into an FMA).
#include "oea_cuda.cuh"

#include "fill_cuda.cuh"
#include "reroute_common.cuh"

namespace sere {
namespace {

constexpr int kThreads = 1024;
constexpr int kStats = 6;  // sere.ops.ERR_STAT_FIELDS

// Token t's K ids and weights, by lane 0 of its warp once the picks are written: a secondary
// slot holding the slot-0 expert was not filled (a pick never repeats one of the S primaries).
// Adds the token's rerouted and unfilled slots to counts[0], counts[1].
template <typename IdT, typename WeightT>
__device__ void write_token(
    const IdT* __restrict__ topk_ids,          // [T, K]
    const WeightT* __restrict__ topk_weights,  // [T, K]
    const ScoreView& scores,                   // [T, E]
    IdT* __restrict__ new_ids,                 // [T, K], picks written
    WeightT* __restrict__ new_weights,         // [T, K]
    int64_t t,
    int top_k,
    int num_primary,
    int num_experts,
    unsigned char* after,                      // [E]
    unsigned (&counts)[2]) {
  const int64_t row = t * top_k;
  const IdT head = topk_ids[row];
  const auto raw_of = [&](int s) {  // the slot's router score, 0 when unfilled or invalid
    const IdT e = new_ids[row + s];
    const bool unfilled = s >= num_primary && e == head;
    return unfilled || !valid_id(e, num_experts) ? 0.0f : score_at(scores, t, static_cast<int>(e));
  };
  float weight_sum = 0.0f;
  float raw_sum = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    weight_sum = __fadd_rn(weight_sum, to_float(topk_weights[row + s]));
    raw_sum = __fadd_rn(raw_sum, raw_of(s));
  }
  const float scale = __fdiv_rn(weight_sum, clamp_min_tiny(raw_sum));
  for (int s = 0; s < top_k; ++s) {
    const IdT e = new_ids[row + s];
    new_weights[row + s] = from_float<WeightT>(__fmul_rn(raw_of(s), scale));
    counts[0] += e != topk_ids[row + s];
    counts[1] += s >= num_primary && e == head;
    if (valid_id(e, num_experts)) {
      after[e] = 1;
    }
  }
}

template <typename IdT, typename WeightT>
__global__ void __launch_bounds__(kThreads) oea_kernel(OeaArgs<IdT, WeightT> args) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int num_experts = args.num_experts;
  const int top_k = args.top_k;
  const int num_primary = args.num_primary;
  unsigned char* in_primary = smem;                // [E]
  unsigned char* before = in_primary + num_experts;  // [E]
  unsigned char* after = before + num_experts;       // [E]
  unsigned char* needed = after + num_experts;       // [E] (mark_slots' secondary set, unused)
  __shared__ unsigned long long totals[kStats];      // ERR_STAT_FIELDS order

  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    in_primary[e] = args.primary != nullptr ? args.primary[e] : 0;
    before[e] = 0;
    after[e] = 0;
    needed[e] = 0;
  }
  if (tid < kStats) {
    totals[tid] = 0;
  }
  __syncthreads();
  mark_slots(args.topk_ids, args.primary, args.num_tokens * top_k, top_k, num_primary, num_experts, in_primary,
             before, needed);
  __syncthreads();

  const int lane = tid % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  unsigned counts[2] = {0, 0};  // rerouted, unfilled (lane 0 of each warp)
  for (int64_t t = tid / kWarpSize; t < args.num_tokens; t += num_warps) {  // warp-uniform
    const IdT* row = args.topk_ids + t * top_k;  // [K]
    IdT* out = args.new_ids + t * top_k;         // [K]
    const auto is_loaded = [&](int e) { return in_primary[e] != 0; };
    const auto is_excluded = [&](int e) {  // among the token's primaries
      for (int s = 0; s < num_primary; ++s) {
        if (row[s] == static_cast<IdT>(e)) {
          return true;
        }
      }
      return false;
    };
    const auto on_pick = [&](int j, int e, float score) {
      if (lane == 0) {
        out[num_primary + j] = isnan(score) ? row[0] : static_cast<IdT>(e);
      }
    };
    const int width = top_k - num_primary;
    const int num_picks = within_allowed(
        allowed_row_of(args.allowed, t, num_experts), is_loaded, [&](const auto& is_loaded_here) {
          return warp_fill_picks(args.router_scores, t, num_experts, width, is_loaded_here, is_excluded, on_pick);
        });
    if (lane == 0) {
      for (int s = 0; s < top_k; ++s) {
        if (s < num_primary || s >= num_primary + num_picks) {
          out[s] = s < num_primary ? row[s] : row[0];  // primaries stay; unfilled: slot 0
        }
      }
      write_token(args.topk_ids, args.topk_weights, args.router_scores, args.new_ids, args.new_weights, t, top_k,
                  num_primary, num_experts, after, counts);
    }
    __syncwarp();
  }
  const unsigned zero = 0;
  add_to_totals({counts[0], zero, counts[1]}, &totals[3]);  // critical_slots stays 0
  __syncthreads();
  add_distinct_counts(before, after, in_primary, num_experts, totals);
  __syncthreads();
  if (tid < kStats) {
    args.stats[tid] = static_cast<int64_t>(totals[tid]);
  }
}

}  // namespace

template <typename IdT, typename WeightT>
cudaError_t launch_oea(const OeaArgs<IdT, WeightT>& args, cudaStream_t stream) {
  if (args.num_tokens < 0 || args.top_k < 2 || args.num_tokens * args.top_k > kSingleBlockMaxSlots ||
      args.num_experts < 1 || args.num_experts > kCudaMaxExperts) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = 4 * static_cast<size_t>(args.num_experts);  // <= 16 KiB: no opt-in needed
  oea_kernel<IdT, WeightT><<<1, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t launch_oea<int32_t, float>(const OeaArgs<int32_t, float>&, cudaStream_t);
template cudaError_t launch_oea<int32_t, __half>(const OeaArgs<int32_t, __half>&, cudaStream_t);
template cudaError_t launch_oea<int32_t, __nv_bfloat16>(const OeaArgs<int32_t, __nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_oea<int64_t, float>(const OeaArgs<int64_t, float>&, cudaStream_t);
template cudaError_t launch_oea<int64_t, __half>(const OeaArgs<int64_t, __half>&, cudaStream_t);
template cudaError_t launch_oea<int64_t, __nv_bfloat16>(const OeaArgs<int64_t, __nv_bfloat16>&, cudaStream_t);

}  // namespace sere
