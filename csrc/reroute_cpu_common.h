// Bookkeeping shared by the CPU kernels (reroute_cpu.cpp, reroute_err_cpu.cpp, oea_cpu.cpp): the
// sizes, the id range check, the per-expert flags, the first pass that builds P and the per-token
// rows of the optional allowed mask (node-aware routing, docs/spec.md §21).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sere {

// The sizes every CPU kernel loops over.
struct SlotDims {
  int64_t num_tokens;   // T
  int64_t top_k;        // K
  int64_t num_primary;  // S
  int64_t num_experts;  // E
  int64_t num_slots() const { return num_tokens * top_k; }
};

inline SlotDims slot_dims(const at::Tensor& topk_ids, int64_t num_primary, int64_t num_experts) {
  return {topk_ids.size(0), topk_ids.size(1), num_primary, num_experts};
}

// Per-expert flags, one byte each; a kernel may add its own bits above kSeenAfter.
constexpr uint8_t kInPrimary = 1;
constexpr uint8_t kSeenBefore = 2;
constexpr uint8_t kSeenAfter = 4;
constexpr int32_t kUnknown = -1;

template <typename IdT>
void check_ids_in_range(const IdT* ids, const SlotDims& dims) {  // [T, K]
  for (int64_t i = 0; i < dims.num_slots(); ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(
        e >= 0 && e < dims.num_experts, "topk_ids[", i / dims.top_k, ", ", i % dims.top_k, "] = ", e,
        " is outside [0, num_experts=", dims.num_experts, ")");
  }
}

// First pass over ids already in range: kSeenBefore for every slot's expert, kInPrimary for P
// (the caller's [E] mask, or the experts of the first S slots of every token when `primary` is
// nullptr). Returns P in ascending id order.
template <typename IdT>
std::vector<int32_t> mark_before_and_primary(
    const IdT* topk_ids,  // [T, K]
    const bool* primary,  // [E] or nullptr
    const SlotDims& dims,
    std::vector<uint8_t>& flags) {  // [E]
  for (int64_t i = 0; i < dims.num_slots(); ++i) {
    flags[topk_ids[i]] |= kSeenBefore;
  }
  if (primary != nullptr) {
    for (int64_t e = 0; e < dims.num_experts; ++e) {
      flags[e] |= primary[e] ? kInPrimary : 0;
    }
  } else {
    for (int64_t t = 0; t < dims.num_tokens; ++t) {
      for (int64_t s = 0; s < dims.num_primary; ++s) {
        flags[topk_ids[t * dims.top_k + s]] |= kInPrimary;
      }
    }
  }
  std::vector<int32_t> primary_ids;  // P in ascending id order
  primary_ids.reserve(dims.num_experts);
  for (int64_t e = 0; e < dims.num_experts; ++e) {
    if (flags[e] & kInPrimary) {
      primary_ids.push_back(static_cast<int32_t>(e));
    }
  }
  return primary_ids;
}

// The data of the optional [T, E] bool allowed mask (node-aware routing, docs/spec.md §21), or
// nullptr: every expert allowed (the plain policy).
inline const bool* allowed_mask_data(const std::optional<at::Tensor>& allowed) {
  return allowed.has_value() ? allowed->data_ptr<bool>() : nullptr;
}

// Token t's [E] row of the allowed mask, or nullptr (no mask: every expert allowed).
inline const bool* allowed_row(const bool* allowed, int64_t t, int64_t num_experts) {
  return allowed == nullptr ? nullptr : allowed + t * num_experts;
}

// Whether a token with this allowed row (nullptr: no mask) may use expert e.
inline bool may_use(const bool* row, int64_t e) {
  return row == nullptr || row[e];
}

// Whether e is in the token's own primary set P_t = P & allowed[t] (P without a mask).
inline bool in_token_primary(const std::vector<uint8_t>& flags, const bool* row, int64_t e) {
  return (flags[e] & kInPrimary) && may_use(row, e);
}

// stats[0] = distinct_before, stats[1] = distinct_after (sere.reference.STAT_FIELDS order).
inline void write_distinct_counts(const std::vector<uint8_t>& flags, int64_t* stats) {
  int64_t distinct_before = 0;
  int64_t distinct_after = 0;
  for (const uint8_t f : flags) {
    distinct_before += (f & kSeenBefore) != 0;
    distinct_after += (f & kSeenAfter) != 0;
  }
  stats[0] = distinct_before;
  stats[1] = distinct_after;
}

}  // namespace sere
