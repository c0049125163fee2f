// Launchers of the SERE CUDA kernels. Needs only the CUDA toolkit (no torch): raw pointers and
// a stream, so that reroute_cuda.cu compiles on its own (csrc/check_cuda_compile.sh).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// Every launch is asynchronous on `stream`: no host sync, no allocation, graph-capturable.
//
// NOTE: ids cannot be range-checked on the GPU without a host sync. The kernels never read or
// write out of bounds: an id outside [0, E) joins no set, is left unchanged in new_ids and is
// counted in no statistic. The CPU op rejects such ids.
// NOTE: non-finite similarities follow the reference: an expert whose row has a NaN among its
// entries to P, or only -inf entries, keeps its place (counted as critical); +inf is a maximum.
// NOTE: node-aware routing (SlotArgs::allowed) reads the entries to P_t only; without `allowed`
// the kernels compute exactly as before: the same launches and memory, plus uniform nullptr tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sere {

// Largest E the CUDA kernels accept (their per-expert tables live in shared memory: 8 E bytes).
constexpr int kCudaMaxExperts = 4096;
// Up to this many slots (T * K) one block does everything in one launch; above it a prepare
// kernel (one block) and a slot kernel (many blocks) run: two launches.
constexpr int64_t kSingleBlockMaxSlots = 8192;

// The dtype of a ScoreView.
enum ScoreDtype : int { kScoreFloat32 = 0, kScoreFloat16 = 1, kScoreBFloat16 = 2 };

// [T, E] router scores of any of the float dtypes (sere::oea, sere::reroute_err's refill), read
// as float32 on the device (fill_cuda.cuh): a switch per read instead of a template dimension.
struct ScoreView {
  const void* data;  // [T, E] contiguous, or nullptr: no scores
  int dtype;         // ScoreDtype
  int num_experts;
};

// Bytes of the scratch buffer that launch_reroute needs (0 for the single-block path).
size_t reroute_workspace_bytes(int64_t num_tokens, int top_k, int num_experts);

// The arguments every launcher takes, device pointers and sizes: the slots, P and the outputs
// every op writes. The op's own arguments extend it (RerouteArgs, OeaArgs, RerouteErrArgs).
template <typename IdT>
struct SlotArgs {
  using Id = IdT;
  const IdT* topk_ids;  // [T, K], IdT = int32_t or int64_t, contiguous
  const bool* primary;  // [E], or nullptr: P from the first S slots of topk_ids
  const bool* allowed;  // [T, E] contiguous, or nullptr: node-aware routing (docs/spec.md §21),
                        // token t's primary set is P_t = P & allowed[t]
  IdT* new_ids;         // [T, K], contiguous, a buffer distinct from topk_ids
  int64_t* stats;       // [5] STAT_FIELDS (sere::reroute) or [6] ERR_STAT_FIELDS (the others)
  int64_t num_tokens;
  int top_k;
  int num_primary;
  int num_experts;
};

// ... and the weights of the ops that rewrite them (sere::oea, sere::reroute_err).
template <typename IdT, typename WeightT>
struct WeightedSlotArgs : SlotArgs<IdT> {
  using Weight = WeightT;
  const WeightT* topk_weights;  // [T, K], WeightT = float, __half or __nv_bfloat16, contiguous
  WeightT* new_weights;         // [T, K], contiguous, a buffer distinct from topk_weights
};

// Arguments of launch_reroute; stats: [5] distinct_before, distinct_after, num_primary_experts,
// rerouted_slots, critical_slots (sere.reference.STAT_FIELDS).
template <typename IdT, typename SimT>
struct RerouteArgs : SlotArgs<IdT> {
  const SimT* similarity;  // [E, E], SimT = float, __half or __nv_bfloat16, compared in float32
  bool use_threshold;      // rho > 0
  float threshold;         // float32(rho)
  void* workspace;         // reroute_workspace_bytes(...) bytes (any contents), or nullptr when 0
};

// SERE re-routing (docs/spec.md §6). Returns cudaGetLastError() after the launches.
template <typename IdT, typename SimT>
cudaError_t launch_reroute(const RerouteArgs<IdT, SimT>& args, cudaStream_t stream);

// P as an [E] bool mask (written in full, no prior zeroing needed): one launch. Reads the
// sizes and topk_ids of `slots` only.
template <typename IdT>
cudaError_t launch_primary_mask(const SlotArgs<IdT>& slots, bool* mask, cudaStream_t stream);

}  // namespace sere
