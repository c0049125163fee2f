// Torch glue of the CUDA kernels (reroute_cuda.cu, reroute_err_cuda.cu, oea_cuda.cu): checks,
// fixed-size outputs allocated on the tensor's device, launch on the current stream. Built only
// against a CUDA torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the stream behind at::cuda::getCurrentCUDAStream, minus cuBLAS headers
#include <torch/library.h>

#include <tuple>

#include "reroute_checks.h"
#include "reroute_cuda.cuh"
#include "reroute_dispatch.h"
#include "oea_cuda.cuh"
#include "reroute_err_cuda.cuh"

namespace sere {
namespace {

void check_cuda_sizes(const at::Tensor& topk_ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(
      num_experts <= kCudaMaxExperts, "similarity has num_experts=", num_experts,
      "; the CUDA op supports at most ", kCudaMaxExperts);
  TORCH_CHECK_VALUE(
      topk_ids.size(1) <= (int64_t{1} << 30) && topk_ids.size(0) <= (int64_t{1} << 40),
      "topk_ids shape ", topk_ids.sizes(), " is too large for the CUDA op");
}

// The CUDA type of a dispatch tag: at::Half / at::BFloat16 share the 16-bit layouts of __half /
// __nv_bfloat16.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The one-block kernels (reroute_err, oea) run decode-sized steps only.
void check_single_block(const at::Tensor& topk_ids, int64_t num_experts, const char* op, const char* matrix) {
  TORCH_CHECK_VALUE(
      num_experts <= kCudaMaxExperts, matrix, " has num_experts=", num_experts,
      "; the CUDA op supports at most ", kCudaMaxExperts);
  // NOTE: no multi-block path: the CUDA op is for decode-sized steps (one thread block).
  TORCH_CHECK_VALUE(
      topk_ids.numel() <= kSingleBlockMaxSlots,
      op, " on CUDA supports num_tokens * top_k <= ", kSingleBlockMaxSlots,
      " (one thread block, decode sizes), got topk_ids shape ", topk_ids.sizes(),
      "; skip re-routing for such steps (prefill) or run them on CPU");
}

// The router scores as the kernels read them, or no scores.
ScoreView score_view(const std::optional<at::Tensor>& scores) {
  if (!scores.has_value()) {
    return {nullptr, kScoreFloat32, 0};
  }
  const auto dtype = scores->scalar_type();
  return {scores->data_ptr(),
          dtype == at::kHalf ? kScoreFloat16 : dtype == at::kBFloat16 ? kScoreBFloat16 : kScoreFloat32,
          static_cast<int>(scores->size(1))};
}

std::tuple<at::Tensor, at::Tensor> reroute_cuda(
    const at::Tensor& topk_ids,
    const at::Tensor& similarity,
    int64_t num_primary,
    double threshold,
    const std::optional<at::Tensor>& primary) {
  check_reroute_args(topk_ids, similarity, num_primary, threshold, primary);
  const int64_t num_experts = similarity.size(0);
  check_cuda_sizes(topk_ids, num_experts);
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());            // [T, K]
  at::Tensor stats = at::empty({kNumStats}, topk_ids.options().dtype(at::kLong));  // [5]
  const size_t workspace_bytes = reroute_workspace_bytes(
      topk_ids.size(0), static_cast<int>(topk_ids.size(1)), static_cast<int>(num_experts));
  at::Tensor workspace;  // fixed size for the shape: no data-dependent allocation
  if (workspace_bytes > 0) {
    workspace = at::empty(
        {static_cast<int64_t>(workspace_bytes)}, topk_ids.options().dtype(at::kByte));
  }
  // Spec: rho > 0 enables preservation; sim is compared with float32(rho).
  const bool use_threshold = threshold > 0.0;
  const float threshold_f32 = static_cast<float>(threshold);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(similarity, "similarity", [&](auto sim_tag) {
      using IdT = decltype(id_tag);
      using SimT = typename CudaType<decltype(sim_tag)>::type;
      status = launch_reroute<IdT, SimT>(
          {.topk_ids = topk_ids.data_ptr<IdT>(),
           .new_ids = new_ids.data_ptr<IdT>(),
           .similarity = reinterpret_cast<const SimT*>(similarity.data_ptr()),
           .primary = primary_data(primary),
           .num_tokens = topk_ids.size(0),
           .top_k = static_cast<int>(topk_ids.size(1)),
           .num_primary = static_cast<int>(num_primary),
           .num_experts = static_cast<int>(num_experts),
           .use_threshold = use_threshold,
           .threshold = threshold_f32,
           .stats = stats.data_ptr<int64_t>(),
           .workspace = workspace_bytes > 0 ? workspace.data_ptr() : nullptr},
          stream);
    });
  });
  TORCH_CHECK(status == cudaSuccess, "sere::reroute CUDA launch failed: ", cudaGetErrorString(status));
  return {new_ids, stats};
}

at::Tensor primary_mask_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary) {
  check_primary_mask_args(topk_ids, num_experts, num_primary);
  check_cuda_sizes(topk_ids, num_experts);
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor mask = at::empty({num_experts}, topk_ids.options().dtype(at::kBool));  // [E]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  dispatch_ids(topk_ids, [&](auto id_tag) {
    using IdT = decltype(id_tag);
    status = launch_primary_mask<IdT>(
        topk_ids.data_ptr<IdT>(), mask.data_ptr<bool>(), topk_ids.size(0),
        static_cast<int>(topk_ids.size(1)), static_cast<int>(num_primary),
        static_cast<int>(num_experts), stream);
  });
  TORCH_CHECK(status == cudaSuccess, "sere::primary_mask CUDA launch failed: ", cudaGetErrorString(status));
  return mask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reroute_err_cuda(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& error,
    int64_t num_primary,
    double tolerance,
    double keep_cost,
    int64_t max_distinct,
    bool renormalize,
    const std::optional<at::Tensor>& primary,
    const std::optional<at::Tensor>& router_scores) {
  check_reroute_err_args(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, primary);
  const int64_t num_experts = error.size(0);
  check_refill_scores(router_scores, topk_ids, num_experts);
  check_single_block(topk_ids, num_experts, "sere::reroute_err", "error");
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());                 // [T, K]
  at::Tensor new_weights = at::empty(topk_weights.sizes(), topk_weights.options());     // [T, K]
  at::Tensor stats = at::empty({kNumErrStats}, topk_ids.options().dtype(at::kLong));  // [6]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(topk_weights, "topk_weights", [&](auto weight_tag) {
      dispatch_float(error, "error", [&](auto err_tag) {
        using IdT = decltype(id_tag);
        using WeightT = typename CudaType<decltype(weight_tag)>::type;
        using ErrT = typename CudaType<decltype(err_tag)>::type;
        status = launch_reroute_err<IdT, WeightT, ErrT>(
            {.topk_ids = topk_ids.data_ptr<IdT>(),
             .topk_weights = reinterpret_cast<const WeightT*>(topk_weights.data_ptr()),
             .error = reinterpret_cast<const ErrT*>(error.data_ptr()),
             .primary = primary_data(primary),
             .new_ids = new_ids.data_ptr<IdT>(),
             .new_weights = reinterpret_cast<WeightT*>(new_weights.data_ptr()),
             .stats = stats.data_ptr<int64_t>(),
             .num_tokens = topk_ids.size(0),
             .top_k = static_cast<int>(topk_ids.size(1)),
             .num_primary = static_cast<int>(num_primary),
             .num_experts = static_cast<int>(num_experts),
             .tolerance = static_cast<float>(tolerance),
             .keep_cost = static_cast<float>(keep_cost),
             .max_distinct = max_distinct,
             .renormalize = renormalize,
             .router_scores = score_view(router_scores)},
            stream);
      });
    });
  });
  TORCH_CHECK(status == cudaSuccess, "sere::reroute_err CUDA launch failed: ", cudaGetErrorString(status));
  return {new_ids, new_weights, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> oea_cuda(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& router_scores,
    int64_t num_primary,
    const std::optional<at::Tensor>& primary) {
  check_oea_args(topk_ids, topk_weights, router_scores, num_primary, primary);
  const int64_t num_experts = router_scores.size(1);
  check_single_block(topk_ids, num_experts, "sere::oea", "router_scores");
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());              // [T, K]
  at::Tensor new_weights = at::empty(topk_weights.sizes(), topk_weights.options());  // [T, K]
  at::Tensor stats = at::empty({kNumOeaStats}, topk_ids.options().dtype(at::kLong));  // [6]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(topk_weights, "topk_weights", [&](auto weight_tag) {
      using IdT = decltype(id_tag);
      using WeightT = typename CudaType<decltype(weight_tag)>::type;
      status = launch_oea<IdT, WeightT>(
          {.topk_ids = topk_ids.data_ptr<IdT>(),
           .topk_weights = reinterpret_cast<const WeightT*>(topk_weights.data_ptr()),
           .router_scores = score_view(router_scores),
           .primary = primary_data(primary),
           .new_ids = new_ids.data_ptr<IdT>(),
           .new_weights = reinterpret_cast<WeightT*>(new_weights.data_ptr()),
           .stats = stats.data_ptr<int64_t>(),
           .num_tokens = topk_ids.size(0),
           .top_k = static_cast<int>(topk_ids.size(1)),
           .num_primary = static_cast<int>(num_primary),
           .num_experts = static_cast<int>(num_experts)},
          stream);
    });
  });
  TORCH_CHECK(status == cudaSuccess, "sere::oea CUDA launch failed: ", cudaGetErrorString(status));
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CUDA, m) {
  m.impl("reroute", &reroute_cuda);
  m.impl("reroute_err", &reroute_err_cuda);
  m.impl("primary_mask", &primary_mask_cuda);
  m.impl("oea", &oea_cuda);
}

}  // namespace sere
