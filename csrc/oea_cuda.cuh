// Launcher of the sere::oea CUDA kernel (Opportunistic Expert Activation,
// sere.reference.oea_reference). Toolkit only, like reroute_cuda.cuh: raw pointers and a stream,
// so that oea_cuda.cu compiles on its own (csrc/check_cuda_compile.sh).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// One launch of one thread block on `stream`: no host sync, no allocation, graph-capturable.
// Sizes: T * K <= kSingleBlockMaxSlots and E <= kCudaMaxExperts (reroute_cuda.cuh): decode
// sizes; the torch glue rejects larger calls.
//
// NOTE: ids cannot be range-checked on the GPU without a host sync. An id outside [0, E) joins
// no set and is counted in no distinct-expert statistic; as a primary slot it keeps its place
// with router score 0; as slot 0 it is what an unfilled slot repeats. The CPU op rejects such ids.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "reroute_cuda.cuh"

namespace sere {

// Arguments of launch_oea; stats: [6] sere.ops.ERR_STAT_FIELDS order (critical_slots 0).
template <typename IdT, typename WeightT>
struct OeaArgs : WeightedSlotArgs<IdT, WeightT> {
  ScoreView router_scores;  // [T, E], contiguous
};

// OEA: ids exactly like the reference, weights up to float32 rounding of the per-token sums.
// Returns cudaErrorInvalidValue for sizes beyond the limits above, else cudaGetLastError().
template <typename IdT, typename WeightT>
cudaError_t launch_oea(const OeaArgs<IdT, WeightT>& args, cudaStream_t stream);

}  // namespace sere
