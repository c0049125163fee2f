#include "reroute_checks.h"

#include <c10/util/Exception.h>

#include <string>

namespace sere {
namespace {

// "float32", "int64", ...: the spelling of Python's str(torch.dtype) without "torch.".
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

void check_topk_ids(const at::Tensor& topk_ids, int64_t num_primary) {
  TORCH_CHECK_VALUE(
      topk_ids.dim() == 2, "topk_ids must be 2-D [num_tokens, top_k], got shape ", topk_ids.sizes());
  TORCH_CHECK_TYPE(
      topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
      "topk_ids must be int32 or int64, got ", dtype_name(topk_ids.scalar_type()));
  TORCH_CHECK_VALUE(topk_ids.is_contiguous(), "topk_ids must be contiguous");
  const int64_t top_k = topk_ids.size(1);
  TORCH_CHECK_VALUE(
      num_primary >= 1 && num_primary < top_k,
      "num_primary must be in [1, top_k=", top_k, "), got ", num_primary);
}

// A square [num_experts, num_experts] float32/bfloat16/float16 matrix on the device of topk_ids.
void check_expert_matrix(const at::Tensor& matrix, const char* name, const at::Tensor& topk_ids) {
  TORCH_CHECK_VALUE(
      matrix.device() == topk_ids.device(), name, " must be on the device of topk_ids (",
      topk_ids.device(), "), got ", matrix.device());
  TORCH_CHECK_VALUE(
      matrix.dim() == 2 && matrix.size(0) == matrix.size(1) && matrix.size(0) >= 1,
      name, " must be a square [num_experts, num_experts] matrix with num_experts >= 1, "
      "got shape ", matrix.sizes());
  const auto dtype = matrix.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      name, " must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(matrix.is_contiguous(), name, " must be contiguous");
}

// A bool mask of the given sizes, contiguous, on the device of topk_ids; shape_text() describes
// the sizes in the message (called only when the check fails).
template <typename ShapeText>
void check_mask(
    const at::Tensor& mask, const char* name, const at::Tensor& topk_ids, at::IntArrayRef sizes,
    const ShapeText& shape_text) {
  TORCH_CHECK_VALUE(
      mask.device() == topk_ids.device(), name, " must be on the device of topk_ids (",
      topk_ids.device(), "), got ", mask.device());
  TORCH_CHECK_VALUE(mask.sizes() == sizes, name, " must be a ", shape_text(), " mask, got shape ", mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, name, " must be bool, got ", dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(mask.is_contiguous(), name, " must be contiguous");
}

// The optional [E] bool primary mask.
void check_primary(
    const std::optional<at::Tensor>& primary, const at::Tensor& topk_ids, int64_t num_experts) {
  if (primary.has_value()) {
    check_mask(*primary, "primary", topk_ids, {num_experts},
               [&] { return c10::str("1-D [num_experts=", num_experts, "]"); });
  }
}

// The optional [T, E] bool allowed mask (node-aware routing, docs/spec.md §21).
void check_allowed(
    const std::optional<at::Tensor>& allowed, const at::Tensor& topk_ids, int64_t num_experts) {
  const int64_t num_tokens = topk_ids.size(0);
  if (allowed.has_value()) {
    check_mask(*allowed, "allowed", topk_ids, {num_tokens, num_experts},
               [&] { return c10::str("2-D [num_tokens=", num_tokens, ", num_experts=", num_experts, "]"); });
  }
}

// A [T, E] float32/bfloat16/float16 contiguous score matrix on the device of topk_ids.
void check_scores(const at::Tensor& scores, const at::Tensor& topk_ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(
      scores.device() == topk_ids.device(), "router_scores must be on the device of topk_ids (",
      topk_ids.device(), "), got ", scores.device());
  TORCH_CHECK_VALUE(
      scores.dim() == 2 && scores.size(0) == topk_ids.size(0) && scores.size(1) == num_experts,
      "router_scores must be [num_tokens=", topk_ids.size(0), ", num_experts=", num_experts,
      "], got ", scores.sizes());
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
      "router_scores must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(scores.is_contiguous(), "router_scores must be contiguous");
}

// [T, K] float32/bfloat16/float16 contiguous weights like topk_ids.
void check_topk_weights(const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  TORCH_CHECK_VALUE(
      topk_weights.device() == topk_ids.device(), "topk_weights must be on the device of topk_ids (",
      topk_ids.device(), "), got ", topk_weights.device());
  TORCH_CHECK_VALUE(
      topk_weights.sizes() == topk_ids.sizes(), "topk_weights must have the shape of topk_ids ",
      topk_ids.sizes(), ", got ", topk_weights.sizes());
  const auto weight_dtype = topk_weights.scalar_type();
  TORCH_CHECK_TYPE(
      weight_dtype == at::kFloat || weight_dtype == at::kBFloat16 || weight_dtype == at::kHalf,
      "topk_weights must be float32, bfloat16 or float16, got ", dtype_name(weight_dtype));
  TORCH_CHECK_VALUE(topk_weights.is_contiguous(), "topk_weights must be contiguous");
}

}  // namespace

void check_args(const RerouteCall& call) {
  check_topk_ids(call.topk_ids, call.num_primary);
  check_expert_matrix(call.similarity, "similarity", call.topk_ids);
  TORCH_CHECK_VALUE(
      call.threshold >= 0.0 && call.threshold <= 1.0, "threshold must be in [0, 1], got ", call.threshold);
  check_primary(call.primary, call.topk_ids, call.num_experts());
  check_allowed(call.allowed, call.topk_ids, call.num_experts());
}

void check_args(const RerouteErrCall& call) {
  check_topk_ids(call.topk_ids, call.num_primary);
  check_topk_weights(call.topk_weights, call.topk_ids);
  check_expert_matrix(call.error, "error", call.topk_ids);
  TORCH_CHECK_VALUE(
      call.tolerance > 0.0 && call.tolerance <= 1.0, "tolerance must be in (0, 1], got ", call.tolerance);
  // NaN fails this check too; +inf (never keep) passes.
  TORCH_CHECK_VALUE(call.keep_cost >= 0.0, "keep_cost must be >= 0 (inf: never keep), got ", call.keep_cost);
  check_primary(call.primary, call.topk_ids, call.num_experts());
  if (call.router_scores.has_value()) {
    check_scores(*call.router_scores, call.topk_ids, call.num_experts());
  }
  check_allowed(call.allowed, call.topk_ids, call.num_experts());
}

void check_args(const OeaCall& call) {
  check_topk_ids(call.topk_ids, call.num_primary);
  check_topk_weights(call.topk_weights, call.topk_ids);
  TORCH_CHECK_VALUE(
      call.router_scores.dim() == 2 && call.router_scores.size(1) >= 1,
      "router_scores must be 2-D [num_tokens, num_experts] with num_experts >= 1, got shape ",
      call.router_scores.sizes());
  check_scores(call.router_scores, call.topk_ids, call.num_experts());
  check_primary(call.primary, call.topk_ids, call.num_experts());
  check_allowed(call.allowed, call.topk_ids, call.num_experts());
}

void check_args(const PrimaryMaskCall& call) {
  check_topk_ids(call.topk_ids, call.num_primary);
  TORCH_CHECK_VALUE(call.num_experts >= 1, "num_experts must be >= 1, got ", call.num_experts);
}

}  // namespace sere
