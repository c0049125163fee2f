// CUDA kernels of sere::reroute and sere::primary_mask (docs/spec.md §6). Toolkit only.
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
//
// Decode sizes (T * K <= kSingleBlockMaxSlots): ONE launch of one block that builds P, the
// "before" set and the set of secondary experts in shared memory, computes the nearest primary of
// each needed expert (a warp per expert), rewrites the slots and writes the statistics.
// Larger batches: TWO launches. prepare_kernel (one block) builds P from the T * S primary slots,
// computes the target of every expert and zeroes the workspace; slot_kernel (a grid over the
// slots) rewrites them, and its last block to finish (threadfence-reduction pattern) sums the
// per-expert flags into the statistics. No memset, no host sync, fixed-size workspace.
// Node-aware (args.allowed, docs/spec.md §21): the target depends on the token's P_t = P &
// allowed[t], so no per-expert table: both paths rewrite a slot per warp (token_target_warp).
#include "reroute_cuda.cuh"

#include <math.h>

#include "reroute_common.cuh"

namespace sere {
namespace {

constexpr int kSingleBlockThreads = 1024;
constexpr int kPrepareThreads = 1024;
constexpr int kSlotThreads = 256;
constexpr int kSlotsPerThread = 8;
constexpr int64_t kSlotsPerBlock = int64_t{kSlotThreads} * kSlotsPerThread;
constexpr size_t kWorkspaceHeader = 32;  // 2 x u64 counters, u32 ticket, padding

// New expert for an expert e outside P_t (P_t = P & allowed_row, or P without a row), computed by
// one whole warp (call warp-uniformly): p* = argmax_{p in P_t} sim[e, p] with ties to the lowest
// id, or e itself (kept) when P_t is empty, when the maximum is -inf or NaN (a NaN entry to P_t
// makes the reference's max NaN: warp vote), or when use_threshold, sim[e, p*] < threshold and e
// is allowed (a critical expert; one on a unit the token may not use is re-routed anyway).
template <typename IdT, typename SimT>
__device__ int nearest_primary_warp(
    const RerouteArgs<IdT, SimT>& args, const unsigned char* in_primary, const bool* allowed_row, int e) {
  float best;
  int best_id;
  const bool saw_nan = warp_best_over_primary</*kLargest=*/true>(
      args.similarity + static_cast<int64_t>(e) * args.num_experts, in_primary, allowed_row, args.num_experts, best,
      best_id);
  const bool is_allowed = allowed_row == nullptr || allowed_row[e];
  if (saw_nan || best_id == args.num_experts || (args.use_threshold && best < args.threshold && is_allowed)) {
    return e;  // nothing loaded or comparable, or a critical expert: kept
  }
  return best_id;
}

// Node-aware target of slot i holding the valid id e, by one whole warp: e when it is in the
// token's P_t, else nearest_primary_warp over P_t.
template <typename IdT, typename SimT>
__device__ int token_target_warp(
    const RerouteArgs<IdT, SimT>& args, const unsigned char* in_primary, int64_t i, int e) {
  const bool* allowed_row = allowed_row_of(args.allowed, i / args.top_k, args.num_experts);  // [E]
  return in_primary[e] && allowed_row[e] ? e : nearest_primary_warp(args, in_primary, allowed_row, e);
}

struct Workspace {
  unsigned long long* counters;  // [2] rerouted_slots, critical_slots
  unsigned* ticket;              // blocks of slot_kernel that have finished
  int* target;                   // [E] new expert of every expert (itself when in P or kept)
  unsigned char* in_primary;     // [E]
  unsigned char* before;         // [E] seen in topk_ids
  unsigned char* after;          // [E] seen in new_ids
};

Workspace carve_workspace(void* base, int num_experts) {
  char* bytes = static_cast<char*>(base);
  Workspace ws;
  ws.counters = reinterpret_cast<unsigned long long*>(bytes);
  ws.ticket = reinterpret_cast<unsigned*>(bytes + 2 * sizeof(unsigned long long));
  ws.target = reinterpret_cast<int*>(bytes + kWorkspaceHeader);
  ws.in_primary = reinterpret_cast<unsigned char*>(ws.target + num_experts);
  ws.before = ws.in_primary + num_experts;
  ws.after = ws.before + num_experts;
  return ws;
}

// Rewrites the slots [first, end) (rewrite_slots, reroute_common.cuh). Node-aware: a warp per
// slot, against its token's P_t; else a thread per slot through the per-expert table target.
template <typename IdT, typename SimT>
__device__ __forceinline__ void rewrite_block_slots(
    const RerouteArgs<IdT, SimT>& args,
    int64_t first,
    int64_t end,
    const int* target,                 // [E], unused when node-aware
    const unsigned char* in_primary,   // [E]
    unsigned char* before,             // [E] or nullptr
    unsigned char* after,              // [E]
    unsigned long long* counts) {      // [2]
  if (args.allowed != nullptr) {  // block-uniform
    const auto target_of = [&](int64_t i, IdT e) {
      return token_target_warp(args, in_primary, i, static_cast<int>(e));
    };
    rewrite_slots</*kWarpPerSlot=*/true>(args, first, end, target_of, in_primary, before, after, counts);
  } else {
    const auto target_of = [&](int64_t, IdT e) { return in_primary[e] ? static_cast<int>(e) : target[e]; };
    rewrite_slots</*kWarpPerSlot=*/false>(args, first, end, target_of, in_primary, before, after, counts);
  }
}

template <typename IdT, typename SimT>
__global__ void __launch_bounds__(kSingleBlockThreads) single_block_kernel(RerouteArgs<IdT, SimT> args) {
  const int num_experts = args.num_experts;
  const int top_k = args.top_k;
  const bool* primary = args.primary;  // [E] or nullptr
  extern __shared__ __align__(16) unsigned char smem[];
  int* target = reinterpret_cast<int*>(smem);                      // [E]
  unsigned char* in_primary = smem + sizeof(int) * num_experts;    // [E]
  unsigned char* before = in_primary + num_experts;                // [E]
  unsigned char* after = before + num_experts;                     // [E]
  unsigned char* needed = after + num_experts;                     // [E] secondary somewhere
  __shared__ unsigned long long totals[5];                         // STAT_FIELDS order

  const int tid = threadIdx.x;
  const int64_t num_slots = args.num_tokens * top_k;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    in_primary[e] = primary != nullptr ? primary[e] : 0;
    before[e] = 0;
    after[e] = 0;
    needed[e] = 0;
  }
  if (tid < 5) {
    totals[tid] = 0;
  }
  __syncthreads();

  mark_slots(args.topk_ids, primary, num_slots, top_k, args.num_primary, num_experts, in_primary, before, needed);
  __syncthreads();

  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int e = warp; e < num_experts; e += num_warps) {
    if (args.allowed == nullptr && needed[e] && !in_primary[e]) {  // warp-uniform; node-aware: no table
      const int new_e = nearest_primary_warp(args, in_primary, nullptr, e);
      if (tid % kWarpSize == 0) {
        target[e] = new_e;
      }
    }
  }
  __syncthreads();

  // before was marked by the first pass
  rewrite_block_slots(args, 0, num_slots, target, in_primary, nullptr, after, &totals[3]);
  __syncthreads();

  add_distinct_counts(before, after, in_primary, num_experts, totals);
  __syncthreads();
  if (tid < 5) {
    args.stats[tid] = static_cast<int64_t>(totals[tid]);
  }
}

// One block: P from the primary slots, the target of every expert, a zeroed workspace.
template <typename IdT, typename SimT>
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(RerouteArgs<IdT, SimT> args, Workspace ws) {
  const int num_experts = args.num_experts;
  const bool* primary = args.primary;  // [E] or nullptr
  extern __shared__ __align__(16) unsigned char in_primary[];  // [E]
  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    in_primary[e] = primary != nullptr ? primary[e] : 0;
    ws.before[e] = 0;
    ws.after[e] = 0;
  }
  if (tid == 0) {
    ws.counters[0] = 0;
    ws.counters[1] = 0;
    *ws.ticket = 0;
  }
  __syncthreads();
  if (primary == nullptr) {
    mark_primary_slots(args, in_primary);
  }
  __syncthreads();
  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int e = warp; e < num_experts; e += num_warps) {
    const bool is_primary = in_primary[e] != 0;  // warp-uniform
    const int new_e = is_primary || args.allowed != nullptr  // node-aware: no table
        ? e
        : nearest_primary_warp(args, in_primary, nullptr, e);
    if (tid % kWarpSize == 0) {
      ws.target[e] = new_e;
      ws.in_primary[e] = is_primary;
    }
  }
}

// A grid over the slots; the last block to finish writes the statistics.
template <typename IdT, typename SimT>
__global__ void __launch_bounds__(kSlotThreads) slot_kernel(RerouteArgs<IdT, SimT> args, Workspace ws) {
  const int num_experts = args.num_experts;
  extern __shared__ __align__(16) unsigned char smem[];
  int* target = reinterpret_cast<int*>(smem);                    // [E]
  unsigned char* in_primary = smem + sizeof(int) * num_experts;  // [E]
  unsigned char* before = in_primary + num_experts;              // [E] this block's slots
  unsigned char* after = before + num_experts;                   // [E] this block's slots
  __shared__ bool is_last_block;

  const int tid = threadIdx.x;
  for (int e = tid; e < num_experts; e += blockDim.x) {
    target[e] = ws.target[e];
    in_primary[e] = ws.in_primary[e];
    before[e] = 0;
    after[e] = 0;
  }
  __syncthreads();

  const int64_t num_slots = args.num_tokens * args.top_k;
  const int64_t begin = blockIdx.x * kSlotsPerBlock;
  const int64_t end = begin + kSlotsPerBlock < num_slots ? begin + kSlotsPerBlock : num_slots;
  rewrite_block_slots(args, begin, end, target, in_primary, before, after, ws.counters);
  __syncthreads();
  for (int e = tid; e < num_experts; e += blockDim.x) {
    if (before[e]) {
      ws.before[e] = 1;
    }
    if (after[e]) {
      ws.after[e] = 1;
    }
  }
  __threadfence();  // this block's flags and counters are visible before it takes a ticket
  __syncthreads();
  if (tid == 0) {
    is_last_block = atomicAdd(ws.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) {
    return;
  }
  __threadfence();

  __shared__ unsigned long long totals[3];
  if (tid < 3) {
    totals[tid] = 0;
  }
  __syncthreads();
  const volatile unsigned char* all_before = ws.before;
  const volatile unsigned char* all_after = ws.after;
  add_distinct_counts(all_before, all_after, in_primary, num_experts, totals);
  __syncthreads();
  if (tid == 0) {
    const volatile unsigned long long* counters = ws.counters;
    int64_t* stats = args.stats;  // [5]
    stats[0] = static_cast<int64_t>(totals[0]);
    stats[1] = static_cast<int64_t>(totals[1]);
    stats[2] = static_cast<int64_t>(totals[2]);
    stats[3] = static_cast<int64_t>(counters[0]);
    stats[4] = static_cast<int64_t>(counters[1]);
  }
}

template <typename IdT>
__global__ void __launch_bounds__(kSingleBlockThreads) primary_mask_kernel(SlotArgs<IdT> slots, bool* mask) {
  for (int e = threadIdx.x; e < slots.num_experts; e += blockDim.x) {
    mask[e] = false;
  }
  __syncthreads();  // the zeroes land before any thread sets a bit
  mark_primary_slots(slots, mask);
}

}  // namespace

size_t reroute_workspace_bytes(int64_t num_tokens, int top_k, int num_experts) {
  if (num_tokens * top_k <= kSingleBlockMaxSlots) {
    return 0;
  }
  return kWorkspaceHeader + (sizeof(int) + 3) * static_cast<size_t>(num_experts);
}

template <typename IdT, typename SimT>
cudaError_t launch_reroute(const RerouteArgs<IdT, SimT>& args, cudaStream_t stream) {
  const int64_t num_slots = args.num_tokens * args.top_k;
  if (num_slots <= kSingleBlockMaxSlots) {
    const size_t smem = (sizeof(int) + 4) * static_cast<size_t>(args.num_experts);
    single_block_kernel<IdT, SimT><<<1, kSingleBlockThreads, smem, stream>>>(args);
    return cudaGetLastError();
  }
  const Workspace ws = carve_workspace(args.workspace, args.num_experts);
  prepare_kernel<IdT, SimT><<<1, kPrepareThreads, static_cast<size_t>(args.num_experts), stream>>>(args, ws);
  const int64_t num_blocks = (num_slots + kSlotsPerBlock - 1) / kSlotsPerBlock;
  const size_t smem = (sizeof(int) + 3) * static_cast<size_t>(args.num_experts);
  slot_kernel<IdT, SimT><<<static_cast<unsigned>(num_blocks), kSlotThreads, smem, stream>>>(args, ws);
  return cudaGetLastError();
}

template <typename IdT>
cudaError_t launch_primary_mask(const SlotArgs<IdT>& slots, bool* mask, cudaStream_t stream) {
  primary_mask_kernel<IdT><<<1, kSingleBlockThreads, 0, stream>>>(slots, mask);
  return cudaGetLastError();
}

#define SERE_INSTANTIATE_REROUTE(IdT, SimT) \
  template cudaError_t launch_reroute<IdT, SimT>(const RerouteArgs<IdT, SimT>&, cudaStream_t);

SERE_INSTANTIATE_REROUTE(int32_t, float)
SERE_INSTANTIATE_REROUTE(int32_t, __half)
SERE_INSTANTIATE_REROUTE(int32_t, __nv_bfloat16)
SERE_INSTANTIATE_REROUTE(int64_t, float)
SERE_INSTANTIATE_REROUTE(int64_t, __half)
SERE_INSTANTIATE_REROUTE(int64_t, __nv_bfloat16)
#undef SERE_INSTANTIATE_REROUTE

template cudaError_t launch_primary_mask<int32_t>(const SlotArgs<int32_t>&, bool*, cudaStream_t);
template cudaError_t launch_primary_mask<int64_t>(const SlotArgs<int64_t>&, bool*, cudaStream_t);

}  // namespace sere
