// Dtype dispatch shared by the torch-side implementations of the sere ops (reroute_cpu.cpp,
// reroute_err_cpu.cpp, reroute_cuda_glue.cpp). The dtypes were checked before (reroute_checks.h):
// the default branches are unreachable.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>

namespace sere {

// fn(IdT{}) with IdT the C++ type of topk_ids: int32_t or int64_t.
template <typename Fn>
void dispatch_ids(const at::Tensor& topk_ids, const Fn& fn) {
  if (topk_ids.scalar_type() == at::kInt) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

// fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor: float, at::BFloat16 or
// at::Half. `name` names the tensor in the (unreachable) error.
template <typename Fn>
void dispatch_float(const at::Tensor& tensor, const char* name, const Fn& fn) {
  switch (tensor.scalar_type()) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, "unreachable: ", name, " dtype was checked");
  }
}

// The data of the optional [E] bool primary mask, or nullptr (P from the first S slots).
inline const bool* primary_data(const std::optional<at::Tensor>& primary) {
  return primary.has_value() ? primary->data_ptr<bool>() : nullptr;
}

}  // namespace sere
