// Device helpers shared by the SERE CUDA kernels (reroute_cuda.cu, reroute_err_cuda.cu,
// oea_cuda.cu). Toolkit only, like the kernels (no torch); the torch glue never includes it.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// Block-level helpers stride over their range with blockDim.x and must be called by every thread
// of the block (their warp shuffles name all 32 lanes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cstdint>

#include "reroute_cuda.cuh"

namespace sere {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// A float32 value stored as T, rounded to nearest.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ unsigned warp_sum(unsigned value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

template <typename IdT>
__device__ __forceinline__ bool valid_id(IdT e, int num_experts) {
  return e >= 0 && e < static_cast<IdT>(num_experts);
}

// Reduces every lane's (best, best_id) to the warp's best, in every lane: the largest value
// (kLargest) or the smallest, ties to the lowest id. NaN never compares better.
template <bool kLargest>
__device__ __forceinline__ void warp_best(float& best, int& best_id) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, best, offset);
    const int other_id = __shfl_xor_sync(kFullMask, best_id, offset);
    if ((kLargest ? other > best : other < best) || (other == best && other_id < best_id)) {
      best = other;
      best_id = other_id;
    }
  }
}

// Token t's row of the node-aware mask (SlotArgs::allowed, [T, E]), or nullptr without one.
__device__ __forceinline__ const bool* allowed_row_of(const bool* allowed, int64_t t, int num_experts) {
  return allowed == nullptr ? nullptr : allowed + t * num_experts;
}

// fn(member) with member(e) = is_member(e), restricted to allowed_row[e] when a row is given
// (node-aware routing: P becomes the token's P_t): the nullptr test runs once, not per expert.
template <typename Member, typename Fn>
__device__ __forceinline__ auto within_allowed(const bool* allowed_row, const Member& is_member, const Fn& fn) {
  if (allowed_row == nullptr) {
    return fn(is_member);
  }
  return fn([&](int e) { return is_member(e) && allowed_row[e]; });
}

// The best entry of `row` over P (P_t = P & allowed_row when a row is given), by one whole warp
// (call warp-uniformly): the largest value (kLargest) or the smallest, ties to the lowest id, in
// every lane; best_id = num_experts when the set is empty or no entry compares. Returns, in every
// lane, whether an entry to the set is NaN.
template <bool kLargest, typename T>
__device__ __forceinline__ bool warp_best_over_primary(
    const T* __restrict__ row,        // [E]
    const unsigned char* in_primary,  // [E]
    const bool* allowed_row,          // [E] or nullptr
    int num_experts,
    float& best,
    int& best_id) {
  const auto is_primary = [&](int p) { return in_primary[p] != 0; };
  return within_allowed(allowed_row, is_primary, [&](const auto& in_set) {
    best = kLargest ? -INFINITY : INFINITY;
    best_id = num_experts;  // none yet
    bool saw_nan = false;
    for (int p = threadIdx.x % kWarpSize; p < num_experts; p += kWarpSize) {  // ascending: strict keeps the lowest id
      if (in_set(p)) {
        const float value = to_float(row[p]);
        saw_nan |= isnan(value);
        if (kLargest ? value > best : value < best) {  // never true for NaN
          best = value;
          best_id = p;
        }
      }
    }
    warp_best<kLargest>(best, best_id);
    return __any_sync(kFullMask, saw_nan);
  });
}

// totals[j] += the block's sum of counts[j], in order: warp sums, then one atomicAdd per warp.
template <int N>
__device__ __forceinline__ void add_to_totals(const unsigned (&counts)[N], unsigned long long* totals) {
  unsigned sums[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    sums[j] = warp_sum(counts[j]);
  }
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      atomicAdd(&totals[j], static_cast<unsigned long long>(sums[j]));
    }
  }
}

// First pass over the slots [0, T * K): for every valid id e, before[e] = 1, then in_primary[e]
// = 1 for a slot < S when P comes from topk_ids (primary == nullptr), needed[e] = 1 (a secondary
// somewhere) for a slot >= S. IndexT: the kernel's slot index type.
template <typename IdT, typename IndexT>
__device__ __forceinline__ void mark_slots(
    const IdT* __restrict__ topk_ids,  // [T, K]
    const bool* primary,               // [E] or nullptr
    IndexT num_slots,
    int top_k,
    int num_primary,
    int num_experts,
    unsigned char* in_primary,         // [E]
    unsigned char* before,             // [E]
    unsigned char* needed) {           // [E]
  for (IndexT i = threadIdx.x; i < num_slots; i += blockDim.x) {
    const IdT e = topk_ids[i];
    if (!valid_id(e, num_experts)) {
      continue;
    }
    before[e] = 1;
    if (i % top_k < num_primary) {
      if (primary == nullptr) {
        in_primary[e] = 1;
      }
    } else {
      needed[e] = 1;
    }
  }
}

// totals[0..2] += the block's counts of experts seen before, seen after and in P (STAT_FIELDS
// distinct_before, distinct_after, num_primary_experts). FlagT: unsigned char, or volatile
// unsigned char for flags that other blocks wrote.
template <typename FlagT>
__device__ __forceinline__ void add_distinct_counts(
    const FlagT* before,              // [E]
    const FlagT* after,               // [E]
    const unsigned char* in_primary,  // [E]
    int num_experts,
    unsigned long long* totals) {     // [3]
  unsigned count_before = 0;
  unsigned count_after = 0;
  unsigned count_primary = 0;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    count_before += before[e];
    count_after += after[e];
    count_primary += in_primary[e];
  }
  add_to_totals({count_before, count_after, count_primary}, totals);
}

// P from the primary slots: flags[e] = 1 for every valid id e in a slot < S.
template <typename IdT, typename FlagT>
__device__ __forceinline__ void mark_primary_slots(const SlotArgs<IdT>& args, FlagT* flags) {  // [E]
  const int num_primary = args.num_primary;
  const int64_t num_primary_slots = args.num_tokens * num_primary;
  for (int64_t j = threadIdx.x; j < num_primary_slots; j += blockDim.x) {
    const IdT e = args.topk_ids[(j / num_primary) * args.top_k + j % num_primary];
    if (valid_id(e, args.num_experts)) {
      flags[e] = 1;
    }
  }
}

// sere::reroute's rewrite of the slots [first, end) (reroute_cuda.cu): a secondary slot whose id e
// is valid takes target_of(i, e) (e itself: unchanged), counted as rerouted when it changed and as
// critical when it kept an expert outside P. kWarpPerSlot: a whole warp per slot (target_of is a
// warp-level function, called by every lane; lane 0 writes), else a thread per slot. Marks
// after[new id] and, when `before` is given, before[e]; an invalid id is copied and marked
// nowhere. Adds the block's rerouted and critical slots to counts[0], counts[1].
template <bool kWarpPerSlot, typename IdT, typename TargetOf>
__device__ __forceinline__ void rewrite_slots(
    const SlotArgs<IdT>& args,
    int64_t first,
    int64_t end,
    const TargetOf& target_of,        // (slot index, id) -> new id
    const unsigned char* in_primary,  // [E]
    unsigned char* before,            // [E] or nullptr
    unsigned char* after,             // [E]
    unsigned long long* counts) {     // [2]
  const int64_t worker = kWarpPerSlot ? threadIdx.x / kWarpSize : threadIdx.x;
  const int64_t stride = kWarpPerSlot ? blockDim.x / kWarpSize : blockDim.x;
  const bool writes = !kWarpPerSlot || threadIdx.x % kWarpSize == 0;
  unsigned rerouted = 0;
  unsigned critical = 0;
  for (int64_t i = first + worker; i < end; i += stride) {  // warp-uniform with kWarpPerSlot
    const IdT e = args.topk_ids[i];
    IdT new_e = e;
    if (valid_id(e, args.num_experts)) {
      const bool secondary = i % args.top_k >= args.num_primary;
      if (secondary) {
        new_e = static_cast<IdT>(target_of(i, e));
      }
      if (writes) {
        if (before != nullptr) {
          before[e] = 1;
        }
        rerouted += new_e != e;
        critical += secondary && new_e == e && !in_primary[e];
        after[new_e] = 1;
      }
    }
    if (writes) {
      args.new_ids[i] = new_e;
    }
  }
  add_to_totals({rerouted, critical}, counts);
}

}  // namespace sere
