// CUDA kernel of sere::reroute_err (error-aware re-routing, sere.reference.sere_err_reference).
// Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// ONE launch of one block (decode sizes, T * K <= kSingleBlockMaxSlots), everything in shared
// memory: P, the "before" set and the experts that appear as secondaries; the best substitute
// p* = argmin_{p in P} error[e, p] of each such expert (a warp per expert; node-aware, over the
// token's P_t = P & allowed[t], of each such slot, a warp per token); the slots whose
// weighted error exceeds keep_cost (critical candidates); with a budget that leaves out some
// candidate experts, a deterministic ranking (below); then every slot is decided, the weights
// renormalised per token and the statistics written.
//
// Budget ranking, exact and deterministic: err_budget.cuh. Its sorts run only when the budget
// actually excludes a candidate expert.
//
// NOTE: exactness. Costs and sums use __fmul_rn / __fadd_rn (never fused into an FMA), so each
// float32 step rounds like the reference's separate torch ops.
#include "reroute_err_cuda.cuh"

#include <math.h>

#include "err_budget.cuh"
#include "fill_cuda.cuh"
#include "reroute_common.cuh"

namespace sere {
namespace {

constexpr int kThreads = 1024;
constexpr int kStats = 6;  // sere.ops.ERR_STAT_FIELDS
constexpr size_t kDefaultMaxSharedBytes = 48 * 1024;       // above it a kernel must opt in

// p* = argmin_{p in P_t} error[e, p] (ties: lowest id; P_t = P & allowed_row, or P without a
// row) and its error, by one whole warp (call warp-uniformly), written to *err_out, *id_out; the
// error is +inf when P_t is empty, no entry is below +inf, or one is NaN.
template <typename ErrT>
__device__ void best_substitute_warp(
    const ErrT* __restrict__ error,   // [E, E]
    const unsigned char* in_primary,  // [E]
    const bool* allowed_row,          // [E] or nullptr
    int e,
    int num_experts,
    float* err_out,
    int* id_out) {
  float best;
  int best_p;
  const bool saw_nan = warp_best_over_primary</*kLargest=*/false>(
      error + static_cast<int64_t>(e) * num_experts, in_primary, allowed_row, num_experts, best, best_p);
  if (threadIdx.x % kWarpSize == 0) {
    *err_out = (saw_nan || best_p == num_experts) ? INFINITY : best;
    *id_out = best_p == num_experts ? 0 : best_p;
  }
}

// The best substitutes (best_substitute_warp) of the secondary slots outside their token's P_t:
// per expert e, a warp per expert that is a secondary somewhere (needed) outside P; node-aware,
// per slot i, a warp per token (P_t depends on the token).
template <typename IdT, typename ErrT>
__device__ void find_substitutes(
    const IdT* __restrict__ topk_ids,  // [T, K]
    const ErrT* __restrict__ error,    // [E, E]
    const bool* allowed,               // [T, E] or nullptr
    const unsigned char* in_primary,   // [E]
    const unsigned char* needed,       // [E]
    int num_tokens,
    int top_k,
    int num_primary,
    int num_experts,
    float* best_err,                   // [E], node-aware [T * K]
    int* best_id) {                    // [E], node-aware [T * K]
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  if (allowed == nullptr) {
    for (int e = warp; e < num_experts; e += num_warps) {
      if (needed[e] && !in_primary[e]) {  // warp-uniform
        best_substitute_warp(error, in_primary, nullptr, e, num_experts, &best_err[e], &best_id[e]);
      }
    }
    return;
  }
  for (int t = warp; t < num_tokens; t += num_warps) {  // warp-uniform
    const bool* allowed_row = allowed_row_of(allowed, t, num_experts);  // [E]
    for (int i = t * top_k + num_primary; i < (t + 1) * top_k; ++i) {
      const IdT e = topk_ids[i];
      if (valid_id(e, num_experts) && !(in_primary[e] && allowed_row[e])) {
        best_substitute_warp(error, in_primary, allowed_row, static_cast<int>(e), num_experts, &best_err[i],
                             &best_id[i]);
      }
    }
  }
}

template <typename IdT, typename WeightT, typename ErrT>
__global__ void __launch_bounds__(kThreads) reroute_err_kernel(
    const IdT* __restrict__ topk_ids,          // [T, K]
    const WeightT* __restrict__ topk_weights,  // [T, K]
    const ErrT* __restrict__ error,            // [E, E]
    const bool* __restrict__ primary,          // [E] or nullptr
    const bool* __restrict__ allowed,          // [T, E] or nullptr: node-aware
    IdT* __restrict__ new_ids,                 // [T, K]
    WeightT* __restrict__ new_weights,         // [T, K]
    int64_t* __restrict__ stats,               // [6]
    int num_tokens,
    int top_k,
    int num_primary,
    int num_experts,
    float tolerance,
    float keep_cost,
    int max_distinct,                          // <= 0: no budget
    bool renormalize,
    ScoreView router_scores) {                 // [T, E], or data nullptr: no refill
  extern __shared__ __align__(16) unsigned char smem[];
  const int num_slots = num_tokens * top_k;
  const bool use_budget = max_distinct > 0;
  const SmemLayout layout = smem_layout(num_slots, num_experts, use_budget, allowed != nullptr);
  uint32_t* slot_keys = reinterpret_cast<uint32_t*>(smem);                       // [pow2(T*K)]
  unsigned long long* expert_keys = reinterpret_cast<unsigned long long*>(smem);  // [pow2(E)], later
  float* best_err = reinterpret_cast<float*>(smem + layout.best_err);            // [E] / [T * K]
  float* mass = reinterpret_cast<float*>(smem + layout.mass);                    // [E]
  int* best_id = reinterpret_cast<int*>(smem + layout.best_id);                  // [E] / [T * K]
  unsigned char* in_primary = smem + layout.flags;                               // [E]
  unsigned char* before = in_primary + num_experts;                              // [E]
  unsigned char* after = before + num_experts;                                   // [E]
  unsigned char* needed = after + num_experts;   // [E] a secondary somewhere
  unsigned char* keep = needed + num_experts;    // [E] its costly slots keep it (critical)
  __shared__ unsigned long long totals[kStats];  // ERR_STAT_FIELDS order
  __shared__ int num_candidates;
  __shared__ int num_primary_experts;

  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const auto is_allowed = [&](int i, int e) {  // slot i's token may use e (always without a mask)
    return allowed == nullptr || allowed[static_cast<int64_t>(i / top_k) * num_experts + e];
  };
  const auto substitute = [&](int i, int e) { return allowed == nullptr ? e : i; };  // best_err / best_id index
  const auto is_outside = [&](int i, IdT e) {  // a secondary slot with a valid id outside its token's P_t
    return i % top_k >= num_primary && valid_id(e, num_experts) &&
           !(in_primary[e] && is_allowed(i, static_cast<int>(e)));
  };
  const auto cost_of = [&](int i, int e) { return slot_cost(topk_weights, best_err, i, substitute(i, e)); };
  const auto is_candidate = [&](int i, IdT e) {  // of a slot outside P_t: cost above keep_cost, e allowed
    return is_allowed(i, static_cast<int>(e)) && cost_of(i, static_cast<int>(e)) > keep_cost;
  };

  for (int e = tid; e < num_experts; e += blockDim.x) {
    in_primary[e] = primary != nullptr ? primary[e] : 0;
    before[e] = 0;
    after[e] = 0;
    needed[e] = 0;
    keep[e] = 0;
    mass[e] = 0.0f;
  }
  if (use_budget) {
    const int num_keys = next_pow2(num_slots);
    for (int j = tid; j < num_keys; j += blockDim.x) {
      slot_keys[j] = kNoSlot;
    }
  }
  if (tid < kStats) {
    totals[tid] = 0;
  }
  if (tid == 0) {
    num_candidates = 0;
    num_primary_experts = 0;
  }
  __syncthreads();

  mark_slots(topk_ids, primary, num_slots, top_k, num_primary, num_experts, in_primary, before, needed);
  __syncthreads();

  find_substitutes(topk_ids, error, allowed, in_primary, needed, num_tokens, top_k, num_primary, num_experts, best_err,
                   best_id);
  __syncthreads();

  // Critical candidates: secondary slots outside P_t whose cost exceeds keep_cost.
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const IdT e = topk_ids[i];
    if (is_outside(i, e) && is_candidate(i, e)) {
      keep[e] = 1;
      if (use_budget) {
        slot_keys[i] = (static_cast<uint32_t>(e) << kSlotBits) | static_cast<uint32_t>(i);
      }
    }
  }
  __syncthreads();

  if (use_budget) {
    apply_budget(cost_of, in_primary, slot_keys, expert_keys, mass, keep, num_slots, num_experts, max_distinct,
                 &num_candidates, &num_primary_experts);
  }

  // Decide every slot: keep (critical), substitute, or drop.
  const auto is_critical = [&](int i, IdT e) { return keep[e] && is_candidate(i, e); };
  const auto is_dropped = [&](int i) {  // a secondary outside P_t, neither kept nor substituted
    const IdT e = topk_ids[i];
    return is_outside(i, e) && !is_critical(i, e) && !(best_err[substitute(i, static_cast<int>(e))] < tolerance);
  };
  unsigned critical = 0;
  unsigned dropped = 0;
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const int t = i / top_k;
    const IdT e = topk_ids[i];
    IdT new_e = e;
    WeightT weight = topk_weights[i];
    if (is_outside(i, e)) {
      const int j = substitute(i, static_cast<int>(e));
      if (is_critical(i, e)) {
        ++critical;
      } else if (best_err[j] < tolerance) {
        new_e = static_cast<IdT>(best_id[j]);
      } else {
        new_e = topk_ids[static_cast<int64_t>(t) * top_k];  // the token's slot-0 expert ...
        weight = from_float<WeightT>(0.0f);                  // ... with weight 0: a no-op
        ++dropped;
      }
    }
    new_ids[i] = new_e;
    new_weights[i] = weight;
  }

  if (router_scores.data != nullptr) {  // block-uniform
    __syncthreads();  // a token's new ids were written by several threads
    const auto is_loaded = [&](int e) { return in_primary[e] || keep[e]; };  // node-aware: on allowed units
    for (int t = warp; t < num_tokens; t += num_warps) {  // warp-uniform
      within_allowed(allowed_row_of(allowed, t, num_experts), is_loaded, [&](const auto& is_loaded_here) {
        refill_token(topk_ids, topk_weights, router_scores, new_ids, new_weights, t, top_k, num_experts,
                     is_loaded_here, is_dropped);
      });
    }
  }
  __syncthreads();  // every token's final ids are written
  unsigned rerouted = 0;
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const IdT new_e = new_ids[i];
    rerouted += new_e != topk_ids[i];
    if (valid_id(new_e, num_experts)) {
      after[new_e] = 1;
    }
  }

  if (renormalize) {  // every token, like the reference: scale = original sum / new sum
    renormalize_tokens(topk_weights, new_weights, num_tokens, top_k);
  }

  add_to_totals({rerouted, critical, dropped}, &totals[3]);
  __syncthreads();

  add_distinct_counts(before, after, in_primary, num_experts, totals);
  __syncthreads();
  if (tid < kStats) {
    stats[tid] = static_cast<int64_t>(totals[tid]);
  }
}

}  // namespace

template <typename IdT, typename WeightT, typename ErrT>
cudaError_t launch_reroute_err(const RerouteErrArgs<IdT, WeightT, ErrT>& args, cudaStream_t stream) {
  const int64_t num_tokens = args.num_tokens;
  const int num_experts = args.num_experts;
  if (num_tokens < 0 || args.top_k < 1 || num_tokens * args.top_k > kSingleBlockMaxSlots ||
      num_experts < 1 || num_experts > kCudaMaxExperts) {
    return cudaErrorInvalidValue;
  }
  // A budget of E + 1 or more never excludes a candidate (at most E - |P| of them): clamp to int.
  const int64_t max_distinct = args.max_distinct;
  const int budget = max_distinct <= 0 ? 0
      : static_cast<int>(max_distinct < num_experts + 1 ? max_distinct : num_experts + 1);
  const int num_slots = static_cast<int>(num_tokens * args.top_k);
  const size_t smem = smem_layout(num_slots, num_experts, budget > 0, args.allowed != nullptr).total;
  const auto kernel = reroute_err_kernel<IdT, WeightT, ErrT>;
  if (smem > kDefaultMaxSharedBytes) {
    // Not a stream operation: allowed during CUDA-graph capture.
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) {
      return status;
    }
  }
  kernel<<<1, kThreads, smem, stream>>>(
      args.topk_ids, args.topk_weights, args.error, args.primary, args.allowed, args.new_ids, args.new_weights,
      args.stats, static_cast<int>(num_tokens), args.top_k, args.num_primary, num_experts,
      args.tolerance, args.keep_cost, budget, args.renormalize, args.router_scores);
  return cudaGetLastError();
}

#define SERE_INSTANTIATE_REROUTE_ERR(IdT, WeightT, ErrT)       \
  template cudaError_t launch_reroute_err<IdT, WeightT, ErrT>( \
      const RerouteErrArgs<IdT, WeightT, ErrT>&, cudaStream_t);
#define SERE_INSTANTIATE_REROUTE_ERR_ERRORS(IdT, WeightT)      \
  SERE_INSTANTIATE_REROUTE_ERR(IdT, WeightT, float)            \
  SERE_INSTANTIATE_REROUTE_ERR(IdT, WeightT, __half)           \
  SERE_INSTANTIATE_REROUTE_ERR(IdT, WeightT, __nv_bfloat16)
#define SERE_INSTANTIATE_REROUTE_ERR_WEIGHTS(IdT)              \
  SERE_INSTANTIATE_REROUTE_ERR_ERRORS(IdT, float)              \
  SERE_INSTANTIATE_REROUTE_ERR_ERRORS(IdT, __half)             \
  SERE_INSTANTIATE_REROUTE_ERR_ERRORS(IdT, __nv_bfloat16)

SERE_INSTANTIATE_REROUTE_ERR_WEIGHTS(int32_t)
SERE_INSTANTIATE_REROUTE_ERR_WEIGHTS(int64_t)
#undef SERE_INSTANTIATE_REROUTE_ERR_WEIGHTS
#undef SERE_INSTANTIATE_REROUTE_ERR_ERRORS
#undef SERE_INSTANTIATE_REROUTE_ERR

}  // namespace sere
