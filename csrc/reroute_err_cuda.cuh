// Launcher of the sere::reroute_err CUDA kernel (error-aware re-routing,
// sere.reference.sere_err_reference). Toolkit only, like reroute_cuda.cuh: raw pointers and a
// stream, so that reroute_err_cuda.cu compiles on its own (csrc/check_cuda_compile.sh).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// One launch of one thread block on `stream`: no host sync, no allocation, graph-capturable.
// Sizes: T * K <= kSingleBlockMaxSlots and E <= kCudaMaxExperts (reroute_cuda.cuh); there is no
// multi-block path (decode sizes only): the torch glue rejects larger calls.
//
// NOTE: ids cannot be range-checked on the GPU without a host sync. An id outside [0, E) joins
// no set, is left unchanged with its weight, and is counted in no distinct-expert statistic; a
// drop copies the slot-0 id as it is. The CPU op rejects such ids.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "reroute_cuda.cuh"

namespace sere {

// Arguments of launch_reroute_err; stats: [6] distinct_before, distinct_after,
// num_primary_experts, rerouted_slots, critical_slots, dropped_slots (sere.ops.ERR_STAT_FIELDS).
template <typename IdT, typename WeightT, typename ErrT>
struct RerouteErrArgs : WeightedSlotArgs<IdT, WeightT> {
  const ErrT* error;        // [E, E], ErrT = float, __half or __nv_bfloat16, compared in float32
  float tolerance;          // float32(tolerance) in (0, 1]
  float keep_cost;          // float32(keep_cost) >= 0 or +inf
  int64_t max_distinct;     // <= 0: no budget
  bool renormalize;
  ScoreView router_scores;  // [T, E], or data nullptr: no refill of the dropped slots
};

// Error-aware re-routing, exact like the reference (ids and weights; renormalised weights up to
// float32 rounding of the per-token sums). Returns cudaErrorInvalidValue for sizes beyond the
// limits above, else cudaGetLastError() after the launch (or the error of raising the kernel's
// shared-memory limit for large E).
template <typename IdT, typename WeightT, typename ErrT>
cudaError_t launch_reroute_err(const RerouteErrArgs<IdT, WeightT, ErrT>& args, cudaStream_t stream);

}  // namespace sere
