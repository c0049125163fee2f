// Torch glue of the CUDA kernels (reroute_cuda.cu, reroute_err_cuda.cu, oea_cuda.cu): the size
// limits of the CUDA ops, fixed-size outputs allocated on the tensor's device, the launchers'
// arguments, launch on the current stream. The arguments were checked before (op_entry.h).
// Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the stream behind at::cuda::getCurrentCUDAStream, minus cuBLAS headers
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "op_entry.h"
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

// The data of a float tensor as the CUDA type T (__half / __nv_bfloat16 share at::Half's /
// at::BFloat16's layout).
template <typename T>
T* cuda_data(const at::Tensor& tensor) {
  return reinterpret_cast<T*>(tensor.data_ptr());
}

// The slots, P, the node-aware mask, sizes and outputs of a checked call (RerouteCall,
// RerouteErrCall, OeaCall). No mask: a nullptr the kernels test, nothing allocated.
template <typename IdT, typename Call>
SlotArgs<IdT> slot_args(const Call& call, at::Tensor& new_ids, at::Tensor& stats) {
  const bool* allowed = call.allowed.has_value() ? call.allowed->template data_ptr<bool>() : nullptr;  // [T, E]
  return {call.topk_ids.template data_ptr<IdT>(), primary_data(call.primary), allowed, new_ids.data_ptr<IdT>(),
          stats.data_ptr<int64_t>(), call.topk_ids.size(0), static_cast<int>(call.topk_ids.size(1)),
          static_cast<int>(call.num_primary), static_cast<int>(call.num_experts())};
}

// ... and the weights (RerouteErrCall, OeaCall), written into the launcher's arguments.
template <typename IdT, typename WeightT, typename Call>
void set_weighted_args(
    WeightedSlotArgs<IdT, WeightT>& args, const Call& call, at::Tensor& new_ids, at::Tensor& new_weights,
    at::Tensor& stats) {
  static_cast<SlotArgs<IdT>&>(args) = slot_args<IdT>(call, new_ids, stats);
  args.topk_weights = cuda_data<const WeightT>(call.topk_weights);
  args.new_weights = cuda_data<WeightT>(new_weights);
}

// Runs `launch(stream)` (returns a cudaError_t) on the current stream of topk_ids' device.
template <typename Launch>
void launch_on_device(const at::Tensor& topk_ids, const char* op, const Launch& launch) {
  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  const cudaError_t status = launch(c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(status));
}

IdsAndStats reroute_cuda(const RerouteCall& call) {
  const at::Tensor& topk_ids = call.topk_ids;
  check_cuda_sizes(topk_ids, call.num_experts());
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());  // [T, K]
  at::Tensor stats = empty_stats(topk_ids, kNumStats);                  // [5]
  const size_t workspace_bytes = reroute_workspace_bytes(
      topk_ids.size(0), static_cast<int>(topk_ids.size(1)), static_cast<int>(call.num_experts()));
  at::Tensor workspace;  // fixed size for the shape: no data-dependent allocation
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, topk_ids.options().dtype(at::kByte));
  }
  launch_on_device(topk_ids, "sere::reroute", [&](cudaStream_t stream) {
    cudaError_t status = cudaSuccess;
    dispatch_ids(topk_ids, [&](auto id_tag) {
      dispatch_float(call.similarity, "similarity", [&](auto sim_tag) {
        using IdT = decltype(id_tag);
        using SimT = typename CudaType<decltype(sim_tag)>::type;
        RerouteArgs<IdT, SimT> args{};
        static_cast<SlotArgs<IdT>&>(args) = slot_args<IdT>(call, new_ids, stats);
        args.similarity = cuda_data<const SimT>(call.similarity);
        args.use_threshold = call.threshold > 0.0;  // spec: rho > 0 enables preservation ...
        args.threshold = static_cast<float>(call.threshold);  // ... sim is compared with float32(rho)
        args.workspace = workspace_bytes > 0 ? workspace.data_ptr() : nullptr;
        status = launch_reroute(args, stream);
      });
    });
    return status;
  });
  return {new_ids, stats};
}

at::Tensor primary_mask_cuda(const PrimaryMaskCall& call) {
  const at::Tensor& topk_ids = call.topk_ids;
  check_cuda_sizes(topk_ids, call.num_experts);
  at::Tensor mask = at::empty({call.num_experts}, topk_ids.options().dtype(at::kBool));  // [E]
  launch_on_device(topk_ids, "sere::primary_mask", [&](cudaStream_t stream) {
    cudaError_t status = cudaSuccess;
    dispatch_ids(topk_ids, [&](auto id_tag) {
      using IdT = decltype(id_tag);
      const SlotArgs<IdT> slots{topk_ids.data_ptr<IdT>(), nullptr, nullptr, nullptr, nullptr, topk_ids.size(0),
                                static_cast<int>(topk_ids.size(1)), static_cast<int>(call.num_primary),
                                static_cast<int>(call.num_experts)};
      status = launch_primary_mask(slots, mask.data_ptr<bool>(), stream);
    });
    return status;
  });
  return mask;
}

// The frame of the weighted one-block ops (reroute_err, oea): size limits, outputs, and per
// (IdT, WeightT) `launch(base, stream)` with base the WeightedSlotArgs of the call.
template <typename Call, typename Launch>
IdsWeightsAndStats run_weighted_op(const Call& call, const char* op, const char* matrix, const Launch& launch) {
  check_single_block(call.topk_ids, call.num_experts(), op, matrix);
  at::Tensor new_ids, new_weights, stats;  // [T, K], [T, K], [6]
  std::tie(new_ids, new_weights, stats) = empty_weighted_outputs(call.topk_ids, call.topk_weights);
  launch_on_device(call.topk_ids, op, [&](cudaStream_t stream) {
    cudaError_t status = cudaSuccess;
    dispatch_ids(call.topk_ids, [&](auto id_tag) {
      dispatch_float(call.topk_weights, "topk_weights", [&](auto weight_tag) {
        WeightedSlotArgs<decltype(id_tag), typename CudaType<decltype(weight_tag)>::type> base{};
        set_weighted_args(base, call, new_ids, new_weights, stats);
        status = launch(base, stream);
      });
    });
    return status;
  });
  return {new_ids, new_weights, stats};
}

IdsWeightsAndStats reroute_err_cuda(const RerouteErrCall& call) {
  return run_weighted_op(call, "sere::reroute_err", "error", [&](const auto& base, cudaStream_t stream) {
    using Base = std::decay_t<decltype(base)>;
    cudaError_t status = cudaSuccess;
    dispatch_float(call.error, "error", [&](auto err_tag) {
      using ErrT = typename CudaType<decltype(err_tag)>::type;
      RerouteErrArgs<typename Base::Id, typename Base::Weight, ErrT> args{};
      static_cast<Base&>(args) = base;
      args.error = cuda_data<const ErrT>(call.error);
      args.tolerance = static_cast<float>(call.tolerance);
      args.keep_cost = static_cast<float>(call.keep_cost);
      args.max_distinct = call.max_distinct;
      args.renormalize = call.renormalize;
      args.router_scores = score_view(call.router_scores);
      status = launch_reroute_err(args, stream);
    });
    return status;
  });
}

IdsWeightsAndStats oea_cuda(const OeaCall& call) {
  return run_weighted_op(call, "sere::oea", "router_scores", [&](const auto& base, cudaStream_t stream) {
    using Base = std::decay_t<decltype(base)>;
    OeaArgs<typename Base::Id, typename Base::Weight> args{};
    static_cast<Base&>(args) = base;
    args.router_scores = score_view(call.router_scores);
    return launch_oea(args, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CUDA, m) {
  m.impl("reroute", &reroute_entry<reroute_cuda>);
  m.impl("reroute_err", &reroute_err_entry<reroute_err_cuda>);
  m.impl("primary_mask", &primary_mask_entry<primary_mask_cuda>);
  m.impl("oea", &oea_entry<oea_cuda>);
}

}  // namespace sere
