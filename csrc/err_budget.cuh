// The budget of sere::reroute_err's CUDA kernel (reroute_err_cuda.cu): which critical candidate
// experts keep their slots when max_distinct leaves room for fewer of them. Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// Exact and deterministic: the reference sums each expert's candidate costs in row-major slot
// order (index_put_ with accumulate), so the candidate slots are sorted by the key (expert id,
// slot index) with an in-block bitonic sort and one thread per expert adds its run of slots in
// that order (float32, no atomics). The experts are then bitonic-sorted by (summed cost
// descending, id ascending) and the first max_distinct - |P| keep their slots.
#pragma once

#include <cuda_runtime.h>

#include <stdint.h>

#include "reroute_common.cuh"
#include "reroute_cuda.cuh"

namespace sere {

// Slot keys: expert id above kSlotBits bits of slot index (T * K <= 2^kSlotBits).
constexpr int kSlotBits = 13;
constexpr uint32_t kSlotMask = (1u << kSlotBits) - 1;
constexpr uint32_t kNoSlot = 0xffffffffu;                  // sorts last; its expert is no expert
constexpr unsigned long long kNoExpert = ~0ull;            // sorts last
static_assert(kSingleBlockMaxSlots <= (int64_t{1} << kSlotBits), "slot index must fit kSlotBits");
static_assert(kCudaMaxExperts <= (1 << (32 - kSlotBits - 1)), "expert id must fit a slot key");

__host__ __device__ inline int next_pow2(int n) {
  int p = 1;
  while (p < n) {
    p <<= 1;
  }
  return p;
}

// torch's clamp_max(x, 1) for a non-NaN x.
__device__ __forceinline__ float clamp_max_one(float x) { return x < 1.0f ? x : 1.0f; }

// Ascending in-place bitonic sort of `len` (a power of two) keys by the whole block (call
// block-uniformly, after a __syncthreads that published the keys; returns after another).
template <typename KeyT>
__device__ void bitonic_sort(KeyT* keys, int len) {
  for (int size = 2; size <= len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const KeyT a = keys[i];
          const KeyT b = keys[partner];
          const bool ascending = (i & size) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t{15}; }

// Byte offsets of reroute_err's dynamic shared memory; the sort buffer (only with a budget) holds
// first the [pow2(T * K)] uint32 slot keys, then the [pow2(E)] uint64 expert keys. The best
// substitutes are per expert, or per slot when node-aware (P_t, hence p*, depends on the token).
struct SmemLayout {
  size_t best_err;  // [E] float, node-aware [T * K]
  size_t mass;      // [E] float
  size_t best_id;   // [E] int, node-aware [T * K]
  size_t flags;     // 5 x [E] bytes: in_primary, before, after, needed, keep
  size_t total;
};

__host__ __device__ inline SmemLayout smem_layout(int num_slots, int num_experts, bool use_budget, bool node_aware) {
  const size_t slot_keys = sizeof(uint32_t) * static_cast<size_t>(next_pow2(num_slots));
  const size_t expert_keys = sizeof(unsigned long long) * static_cast<size_t>(next_pow2(num_experts));
  const size_t per_expert = align16(sizeof(float) * static_cast<size_t>(num_experts));
  const size_t per_substitute = node_aware ? align16(sizeof(float) * static_cast<size_t>(num_slots)) : per_expert;
  SmemLayout layout;
  layout.best_err = use_budget ? align16(slot_keys > expert_keys ? slot_keys : expert_keys) : 0;
  layout.mass = layout.best_err + per_substitute;
  layout.best_id = layout.mass + per_expert;
  layout.flags = layout.best_id + per_substitute;
  layout.total = layout.flags + align16(5 * static_cast<size_t>(num_experts));
  return layout;
}

// The weighted error of approximating slot i by the substitute whose error is best_err[j] (j: its
// expert, or the slot when node-aware): float32(w) * min(c, 1), rounded.
template <typename WeightT>
__device__ __forceinline__ float slot_cost(const WeightT* __restrict__ topk_weights, const float* best_err, int i,
                                           int j) {
  return __fmul_rn(to_float(topk_weights[i]), clamp_max_one(best_err[j]));
}

// The budget (call block-uniformly, after the candidates were marked in keep and slot_keys):
// when the max_distinct - |P| experts it leaves room for are fewer than the candidate experts,
// keep[e] stays only for those of largest summed cost (ties: lowest id), summed in row-major slot
// order; cost_of(i, e) is candidate slot i's cost. |P| is the whole mask's size, node-aware too.
// The sort buffer holds first the slot keys, then the expert keys.
template <typename CostOf>
__device__ void apply_budget(
    const CostOf& cost_of,                     // (slot index, expert) -> float cost
    const unsigned char* in_primary,           // [E]
    uint32_t* slot_keys,                       // [pow2(T*K)]
    unsigned long long* expert_keys,           // [pow2(E)], the same buffer
    float* mass,                               // [E] zeroed
    unsigned char* keep,                       // [E]
    int num_slots,
    int num_experts,
    int max_distinct,
    int* num_candidates,                       // shared, zeroed
    int* num_primary_experts) {                // shared, zeroed
  const int tid = threadIdx.x;
  unsigned count_candidates = 0;
  unsigned count_primary = 0;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    count_candidates += keep[e];
    count_primary += in_primary[e];
  }
  count_candidates = warp_sum(count_candidates);
  count_primary = warp_sum(count_primary);
  if (tid % kWarpSize == 0) {
    atomicAdd(num_candidates, static_cast<int>(count_candidates));
    atomicAdd(num_primary_experts, static_cast<int>(count_primary));
  }
  __syncthreads();
  const int room = max_distinct - *num_primary_experts;
  const int budget = room > 0 ? room : 0;
  if (*num_candidates > budget) {  // block-uniform: the budget excludes some candidate
    const int num_keys = next_pow2(num_slots);
    bitonic_sort(slot_keys, num_keys);
    // Each run of one expert's slots, summed in ascending slot order by its first thread.
    for (int j = tid; j < num_keys; j += blockDim.x) {
      const uint32_t key = slot_keys[j];
      const uint32_t e = key >> kSlotBits;
      if (key == kNoSlot || (j > 0 && (slot_keys[j - 1] >> kSlotBits) == e)) {
        continue;
      }
      float sum = 0.0f;
      for (int k = j; k < num_keys && slot_keys[k] != kNoSlot && (slot_keys[k] >> kSlotBits) == e; ++k) {
        sum = __fadd_rn(sum, cost_of(static_cast<int>(slot_keys[k] & kSlotMask), static_cast<int>(e)));
      }
      mass[e] = sum;
    }
    __syncthreads();  // slot keys read: the buffer now takes the expert keys
    // mass > keep_cost >= 0, so its bits order like its value; ~bits: largest first.
    const int num_expert_keys = next_pow2(num_experts);
    for (int e = tid; e < num_expert_keys; e += blockDim.x) {
      expert_keys[e] = e < num_experts && keep[e]
          ? (static_cast<unsigned long long>(~__float_as_uint(mass[e])) << 32) | static_cast<unsigned>(e)
          : kNoExpert;
    }
    __syncthreads();
    bitonic_sort(expert_keys, num_expert_keys);
    for (int e = tid; e < num_experts; e += blockDim.x) {
      keep[e] = 0;
    }
    __syncthreads();
    for (int j = tid; j < budget; j += blockDim.x) {  // budget < num_candidates: all real keys
      keep[expert_keys[j] & 0xffffffffull] = 1;
    }
    __syncthreads();
  }
}

}  // namespace sere
