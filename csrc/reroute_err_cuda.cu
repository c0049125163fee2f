// CUDA kernel of sere::reroute_err (error-aware re-routing, sere.reference.sere_err_reference).
// Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// ONE launch of one block (decode sizes, T * K <= kSingleBlockMaxSlots), everything in shared
// memory: P, the "before" set and the experts that appear as secondaries; the best substitute
// p* = argmin_{p in P} error[e, p] of each such expert (a warp per expert); the slots whose
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

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t{15}; }

// Byte offsets of the dynamic shared memory; the sort buffer (only with a budget) holds first
// the [pow2(T * K)] uint32 slot keys, then the [pow2(E)] uint64 expert keys.
struct SmemLayout {
  size_t best_err;  // [E] float
  size_t mass;      // [E] float
  size_t best_id;   // [E] int
  size_t flags;     // 5 x [E] bytes: in_primary, before, after, needed, keep
  size_t total;
};

__host__ __device__ inline SmemLayout smem_layout(int num_slots, int num_experts, bool use_budget) {
  const size_t slot_keys = sizeof(uint32_t) * static_cast<size_t>(next_pow2(num_slots));
  const size_t expert_keys = sizeof(unsigned long long) * static_cast<size_t>(next_pow2(num_experts));
  const size_t per_expert = align16(sizeof(float) * static_cast<size_t>(num_experts));
  SmemLayout layout;
  layout.best_err = use_budget ? align16(slot_keys > expert_keys ? slot_keys : expert_keys) : 0;
  layout.mass = layout.best_err + per_expert;
  layout.best_id = layout.mass + per_expert;
  layout.flags = layout.best_id + per_expert;
  layout.total = layout.flags + align16(5 * static_cast<size_t>(num_experts));
  return layout;
}

// p* = argmin_{p in P} error[e, p] (ties: lowest id) and its error, by one whole warp (call
// warp-uniformly); the error is +inf when P is empty, no entry is below +inf, or one is NaN.
template <typename ErrT>
__device__ void best_substitute_warp(
    const ErrT* __restrict__ error,   // [E, E]
    const unsigned char* in_primary,  // [E]
    int e,
    int num_experts,
    float* best_err,                  // [E]
    int* best_id) {                   // [E]
  float best;
  int best_p;
  const bool saw_nan = warp_best_over_primary</*kLargest=*/false>(
      error + static_cast<int64_t>(e) * num_experts, in_primary, num_experts, best, best_p);
  if (threadIdx.x % kWarpSize == 0) {
    best_err[e] = (saw_nan || best_p == num_experts) ? INFINITY : best;
    best_id[e] = best_p == num_experts ? 0 : best_p;
  }
}

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

template <typename IdT, typename WeightT, typename ErrT>
__global__ void __launch_bounds__(kThreads) reroute_err_kernel(
    const IdT* __restrict__ topk_ids,          // [T, K]
    const WeightT* __restrict__ topk_weights,  // [T, K]
    const ErrT* __restrict__ error,            // [E, E]
    const bool* __restrict__ primary,          // [E] or nullptr
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
  const SmemLayout layout = smem_layout(num_slots, num_experts, use_budget);
  uint32_t* slot_keys = reinterpret_cast<uint32_t*>(smem);                       // [pow2(T*K)]
  unsigned long long* expert_keys = reinterpret_cast<unsigned long long*>(smem);  // [pow2(E)], later
  float* best_err = reinterpret_cast<float*>(smem + layout.best_err);            // [E]
  float* mass = reinterpret_cast<float*>(smem + layout.mass);                    // [E]
  int* best_id = reinterpret_cast<int*>(smem + layout.best_id);                  // [E]
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
  const auto cost_of = [&](int i, int e) { return slot_cost(topk_weights, best_err, i, e); };

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

  for (int e = warp; e < num_experts; e += num_warps) {
    if (needed[e] && !in_primary[e]) {  // warp-uniform
      best_substitute_warp(error, in_primary, e, num_experts, best_err, best_id);
    }
  }
  __syncthreads();

  // Critical candidates: secondary slots outside P whose cost exceeds keep_cost.
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const IdT e = topk_ids[i];
    if (i % top_k >= num_primary && valid_id(e, num_experts) && !in_primary[e] &&
        cost_of(i, static_cast<int>(e)) > keep_cost) {
      keep[e] = 1;
      if (use_budget) {
        slot_keys[i] = (static_cast<uint32_t>(e) << kSlotBits) | static_cast<uint32_t>(i);
      }
    }
  }
  __syncthreads();

  if (use_budget) {
    apply_budget(topk_weights, best_err, in_primary, slot_keys, expert_keys, mass, keep, num_slots, num_experts,
                 max_distinct, &num_candidates, &num_primary_experts);
  }

  // Decide every slot: keep (critical), substitute, or drop.
  const auto is_critical = [&](int i, IdT e) { return keep[e] && cost_of(i, static_cast<int>(e)) > keep_cost; };
  const auto is_dropped = [&](int i) {  // a secondary outside P, neither kept nor substituted
    const IdT e = topk_ids[i];
    return i % top_k >= num_primary && valid_id(e, num_experts) && !in_primary[e] && !is_critical(i, e) &&
           !(best_err[e] < tolerance);
  };
  unsigned critical = 0;
  unsigned dropped = 0;
  for (int i = tid; i < num_slots; i += blockDim.x) {
    const int t = i / top_k;
    const IdT e = topk_ids[i];
    IdT new_e = e;
    WeightT weight = topk_weights[i];
    if (i - t * top_k >= num_primary && valid_id(e, num_experts) && !in_primary[e]) {
      if (is_critical(i, e)) {
        ++critical;
      } else if (best_err[e] < tolerance) {
        new_e = static_cast<IdT>(best_id[e]);
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
    const auto is_loaded = [&](int e) { return in_primary[e] || keep[e]; };
    for (int t = warp; t < num_tokens; t += num_warps) {  // warp-uniform
      refill_token(topk_ids, topk_weights, router_scores, new_ids, new_weights, t, top_k, num_experts, is_loaded,
                   is_dropped);
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
  const size_t smem = smem_layout(num_slots, num_experts, budget > 0).total;
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
      args.topk_ids, args.topk_weights, args.error, args.primary, args.new_ids, args.new_weights,
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
