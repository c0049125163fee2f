// Torch glue of the CUDA kernels (reroute_cuda.cu, reroute_err_cuda.cu): checks, fixed-size outputs allocated on the
// tensor's device, launch on the current stream. Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the stream behind at::cuda::getCurrentCUDAStream, minus cuBLAS headers
#include <torch/library.h>

#include <tuple>

#include "reroute_checks.h"
#include "reroute_cuda.cuh"
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

template <typename IdT, typename SimT>
cudaError_t launch(
    const at::Tensor& topk_ids,
    at::Tensor& new_ids,
    const at::Tensor& similarity,
    const bool* primary,
    int num_primary,
    bool use_threshold,
    float threshold,
    at::Tensor& stats,
    void* workspace,
    cudaStream_t stream) {
  return launch_reroute<IdT, SimT>(
      topk_ids.data_ptr<IdT>(), new_ids.data_ptr<IdT>(),
      reinterpret_cast<const SimT*>(similarity.data_ptr()), primary, topk_ids.size(0),
      static_cast<int>(topk_ids.size(1)), num_primary, static_cast<int>(similarity.size(0)),
      use_threshold, threshold, stats.data_ptr<int64_t>(), workspace, stream);
}

template <typename IdT>
cudaError_t launch_for_ids(
    const at::Tensor& topk_ids,
    at::Tensor& new_ids,
    const at::Tensor& similarity,
    const bool* primary,
    int num_primary,
    bool use_threshold,
    float threshold,
    at::Tensor& stats,
    void* workspace,
    cudaStream_t stream) {
  switch (similarity.scalar_type()) {
    case at::kFloat:
      return launch<IdT, float>(
          topk_ids, new_ids, similarity, primary, num_primary, use_threshold, threshold, stats,
          workspace, stream);
    case at::kHalf:  // at::Half and __half share one 16-bit layout
      return launch<IdT, __half>(
          topk_ids, new_ids, similarity, primary, num_primary, use_threshold, threshold, stats,
          workspace, stream);
    case at::kBFloat16:  // at::BFloat16 and __nv_bfloat16 share one 16-bit layout
      return launch<IdT, __nv_bfloat16>(
          topk_ids, new_ids, similarity, primary, num_primary, use_threshold, threshold, stats,
          workspace, stream);
    default:
      TORCH_CHECK(false, "unreachable: similarity dtype was checked");
      return cudaErrorInvalidValue;
  }
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
  void* workspace_ptr = workspace_bytes > 0 ? workspace.data_ptr() : nullptr;
  const bool* primary_ptr = primary.has_value() ? primary->data_ptr<bool>() : nullptr;
  // Spec: rho > 0 enables preservation; sim is compared with float32(rho).
  const bool use_threshold = threshold > 0.0;
  const float threshold_f32 = static_cast<float>(threshold);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = topk_ids.scalar_type() == at::kInt
      ? launch_for_ids<int32_t>(
            topk_ids, new_ids, similarity, primary_ptr, static_cast<int>(num_primary),
            use_threshold, threshold_f32, stats, workspace_ptr, stream)
      : launch_for_ids<int64_t>(
            topk_ids, new_ids, similarity, primary_ptr, static_cast<int>(num_primary),
            use_threshold, threshold_f32, stats, workspace_ptr, stream);
  TORCH_CHECK(status == cudaSuccess, "sere::reroute CUDA launch failed: ", cudaGetErrorString(status));
  return {new_ids, stats};
}

at::Tensor primary_mask_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t num_primary) {
  check_primary_mask_args(topk_ids, num_experts, num_primary);
  check_cuda_sizes(topk_ids, num_experts);
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor mask = at::empty({num_experts}, topk_ids.options().dtype(at::kBool));  // [E]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = topk_ids.scalar_type() == at::kInt
      ? launch_primary_mask<int32_t>(
            topk_ids.data_ptr<int32_t>(), mask.data_ptr<bool>(), topk_ids.size(0),
            static_cast<int>(topk_ids.size(1)), static_cast<int>(num_primary),
            static_cast<int>(num_experts), stream)
      : launch_primary_mask<int64_t>(
            topk_ids.data_ptr<int64_t>(), mask.data_ptr<bool>(), topk_ids.size(0),
            static_cast<int>(topk_ids.size(1)), static_cast<int>(num_primary),
            static_cast<int>(num_experts), stream);
  TORCH_CHECK(status == cudaSuccess, "sere::primary_mask CUDA launch failed: ", cudaGetErrorString(status));
  return mask;
}

// Dtype dispatch of launch_reroute_err: at::Half / at::BFloat16 share the 16-bit layouts of
// __half / __nv_bfloat16.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> reroute_err_cuda(
    const at::Tensor& topk_ids,
    const at::Tensor& topk_weights,
    const at::Tensor& error,
    int64_t num_primary,
    double tolerance,
    double keep_cost,
    int64_t max_distinct,
    bool renormalize,
    const std::optional<at::Tensor>& primary) {
  check_reroute_err_args(topk_ids, topk_weights, error, num_primary, tolerance, keep_cost, primary);
  const int64_t num_experts = error.size(0);
  TORCH_CHECK_VALUE(
      num_experts <= kCudaMaxExperts, "error has num_experts=", num_experts,
      "; the CUDA op supports at most ", kCudaMaxExperts);
  // NOTE: no multi-block path: the CUDA op is for decode-sized steps (one thread block).
  TORCH_CHECK_VALUE(
      topk_ids.numel() <= kSingleBlockMaxSlots,
      "sere::reroute_err on CUDA supports num_tokens * top_k <= ", kSingleBlockMaxSlots,
      " (one thread block, decode sizes), got topk_ids shape ", topk_ids.sizes(),
      "; skip re-routing for such steps (prefill) or run them on CPU");
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());                 // [T, K]
  at::Tensor new_weights = at::empty(topk_weights.sizes(), topk_weights.options());     // [T, K]
  at::Tensor stats = at::empty({kNumErrStats}, topk_ids.options().dtype(at::kLong));  // [6]
  const bool* primary_ptr = primary.has_value() ? primary->data_ptr<bool>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;

  const auto run = [&](auto id_tag, auto weight_tag, auto err_tag) {
    using IdT = decltype(id_tag);
    using WeightT = typename CudaType<decltype(weight_tag)>::type;
    using ErrT = typename CudaType<decltype(err_tag)>::type;
    status = launch_reroute_err<IdT, WeightT, ErrT>(
        topk_ids.data_ptr<IdT>(), reinterpret_cast<const WeightT*>(topk_weights.data_ptr()),
        reinterpret_cast<const ErrT*>(error.data_ptr()), primary_ptr, new_ids.data_ptr<IdT>(),
        reinterpret_cast<WeightT*>(new_weights.data_ptr()), stats.data_ptr<int64_t>(),
        topk_ids.size(0), static_cast<int>(topk_ids.size(1)), static_cast<int>(num_primary),
        static_cast<int>(num_experts), static_cast<float>(tolerance), static_cast<float>(keep_cost),
        max_distinct, renormalize, stream);
  };
  const auto with_err = [&](auto id_tag, auto weight_tag) {
    switch (error.scalar_type()) {
      case at::kFloat: run(id_tag, weight_tag, float{}); break;
      case at::kBFloat16: run(id_tag, weight_tag, at::BFloat16{}); break;
      case at::kHalf: run(id_tag, weight_tag, at::Half{}); break;
      default: TORCH_CHECK(false, "unreachable: error dtype was checked");
    }
  };
  const auto with_weights = [&](auto id_tag) {
    switch (topk_weights.scalar_type()) {
      case at::kFloat: with_err(id_tag, float{}); break;
      case at::kBFloat16: with_err(id_tag, at::BFloat16{}); break;
      case at::kHalf: with_err(id_tag, at::Half{}); break;
      default: TORCH_CHECK(false, "unreachable: topk_weights dtype was checked");
    }
  };
  if (topk_ids.scalar_type() == at::kInt) {
    with_weights(int32_t{});
  } else {
    with_weights(int64_t{});
  }
  TORCH_CHECK(status == cudaSuccess, "sere::reroute_err CUDA launch failed: ", cudaGetErrorString(status));
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CUDA, m) {
  m.impl("reroute", &reroute_cuda);
  m.impl("reroute_err", &reroute_err_cuda);
  m.impl("primary_mask", &primary_mask_cuda);
}

}  // namespace sere
