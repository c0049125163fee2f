// CPU kernel of sere::reroute_err: error-aware re-routing (sere.reference.sere_err_reference).
//
// Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
// Pass 1 checks every id and builds P and the "before" set. Pass 2 finds, once per expert that
// appears as a non-primary secondary, its best substitute p* = argmin_{p in P} error[e, p]
// (at most E * |P| reads), marks the slots whose cost exceeds keep_cost and, with a budget,
// sums their cost per expert in row-major slot order (the order of the reference's
// index_put_(accumulate=True)) and keeps the max_distinct - |P| experts of largest summed cost.
// Pass 3 decides every slot (keep / substitute / drop), refills a token's dropped slots from the
// loaded experts by router score when `router_scores` is given (fill_cpu.h), renormalises, and
// writes ids, weights and statistics (dropped_slots counts the drops before the refill).
// With an allowed mask (node-aware routing, docs/spec.md §21) token t's P is P_t = P & allowed[t]:
// its substitutes are searched per slot, a keep candidate must be allowed, the budget still
// counts the global |P|, and the refill draws only from the loaded experts the token may use.
//
// NOTE: exactness. The arithmetic repeats the reference's float32 steps: errors and weights are
// widened to float32, cost = w * min(c, 1) is rounded before it is compared or summed (setup.py
// compiles with -ffp-contract=off: no fused multiply-add), tolerance and keep_cost are rounded
// to float32 before the comparisons, as torch does with a Python scalar. A NaN among a row's
// errors to P makes the row unusable (error +inf: never substituted), like the reference.
// Single-threaded on purpose: at decode sizes a parallel_for costs more than the work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "fill_cpu.h"
#include "op_entry.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

// p* and error[e, p*] for one expert; err = +inf when P is empty, no error to P is below +inf, or
// one of them is NaN (the reference's min() propagates NaN, which it maps to +inf).
struct Substitute {
  int32_t id = kUnknown;
  float err = std::numeric_limits<float>::infinity();
};

// Only the p that the token may use (`allowed`, nullptr: every p) are read.
template <typename ErrT>
Substitute best_substitute(
    const ErrT* error, int64_t num_experts, const std::vector<int32_t>& primary_ids, const bool* allowed, int32_t e) {
  const ErrT* row = error + static_cast<int64_t>(e) * num_experts;  // [E]
  Substitute best;
  best.id = 0;
  for (const int32_t p : primary_ids) {  // ascending: strict < keeps the lowest id among ties
    if (!may_use(allowed, p)) {
      continue;
    }
    const float value = static_cast<float>(row[p]);
    if (std::isnan(value)) {
      best.err = std::numeric_limits<float>::infinity();
      return best;
    }
    if (value < best.err) {
      best.err = value;
      best.id = p;
    }
  }
  return best;
}

// Every weight of one token rescaled to its original sum (sere.reference.renormalize_weights).
template <typename WeightT>
void renormalize_token(const WeightT* topk_weights, WeightT* new_weights, int64_t top_k) {  // [K], [K]
  float old_sum = 0.0f;
  float new_sum = 0.0f;
  for (int64_t s = 0; s < top_k; ++s) {
    old_sum += static_cast<float>(topk_weights[s]);
    new_sum += static_cast<float>(new_weights[s]);
  }
  const float scale = old_sum / new_sum;
  for (int64_t s = 0; s < top_k; ++s) {
    new_weights[s] = static_cast<WeightT>(static_cast<float>(new_weights[s]) * scale);
  }
}

// The options of one call, scalars as the kernel compares them.
struct ErrOptions {
  float tolerance;          // float32(tolerance), in (0, 1]
  float keep_cost;          // float32(keep_cost), >= 0 or +inf
  int64_t max_distinct;     // <= 0: no budget
  bool renormalize;
  const ScoreRows* scores;  // [T, E] router scores, or nullptr: no refill
  const bool* allowed;      // [T, E] node-aware allowed mask, or nullptr: every expert
};

// One sere::reroute_err call: the passes share P, the per-expert flags and the lazy substitutes.
template <typename IdT, typename WeightT, typename ErrT>
class ErrRerouter {
 public:
  ErrRerouter(const SlotDims& dims, const IdT* topk_ids, const WeightT* topk_weights, const ErrT* error,
              const bool* primary, const ErrOptions& options)
      : dims_(dims), topk_ids_(topk_ids), topk_weights_(topk_weights), error_(error), options_(options),
        flags_(dims.num_experts, 0), subs_(options.allowed == nullptr ? dims.num_experts : 0) {
    check_ids_in_range(topk_ids, dims);
    primary_ids_ = mark_before_and_primary(topk_ids, primary, dims, flags_);  // pass 1
  }

  // Pass 2: critical candidates (cost > keep_cost, on an expert the token may use), and the
  // budget among their experts: kKept.
  void mark_kept() {
    const bool use_budget = options_.max_distinct > 0;
    std::vector<float> mass(use_budget ? dims_.num_experts : 0, 0.0f);  // [E] summed cost per expert
    for (int64_t i = 0; i < dims_.num_slots(); ++i) {
      if (!is_secondary_outside_p(i)) {
        continue;
      }
      const int32_t e = static_cast<int32_t>(topk_ids_[i]);
      const float cost = cost_of(i, substitute_of(i, e));
      if (cost > options_.keep_cost && may_use(row_of(i), e)) {
        flags_[e] |= kCandidate;
        if (use_budget) {
          mass[e] += cost;
        }
      }
    }
    std::vector<int32_t> candidates;  // experts that some slot wants to keep, ascending id
    for (int64_t e = 0; e < dims_.num_experts; ++e) {
      if (flags_[e] & kCandidate) {
        candidates.push_back(static_cast<int32_t>(e));
      }
    }
    const int64_t num_primary_experts = static_cast<int64_t>(primary_ids_.size());
    const int64_t budget = use_budget ? std::max<int64_t>(0, options_.max_distinct - num_primary_experts)
                                      : static_cast<int64_t>(candidates.size());
    if (static_cast<int64_t>(candidates.size()) > budget) {
      // Largest summed cost first, ties to the lowest id (the reference's stable descending sort).
      // Every candidate's mass is > keep_cost >= 0, so none ties with the other experts' zero.
      std::partial_sort(
          candidates.begin(), candidates.begin() + budget, candidates.end(),
          [&](int32_t a, int32_t b) { return mass[a] > mass[b] || (mass[a] == mass[b] && a < b); });
      candidates.resize(budget);
    }
    for (const int32_t e : candidates) {
      flags_[e] |= kKept;
    }
  }

  // Pass 3: decide every slot, refill each token's dropped slots, renormalise, write the stats.
  void decide(IdT* new_ids, WeightT* new_weights, int64_t* stats) {  // [T, K], [T, K], [6]
    std::vector<int32_t> loaded_ids;  // P and the kept critical experts, ascending (refill only)
    for (int64_t e = 0; options_.scores != nullptr && e < dims_.num_experts; ++e) {
      if (flags_[e] & (kInPrimary | kKept)) {
        loaded_ids.push_back(static_cast<int32_t>(e));
      }
    }
    std::vector<int64_t> excluded(options_.scores != nullptr ? dims_.num_experts : 0, -1);  // [E] refill scratch
    std::vector<FillPick> picks(dims_.top_k);                                           // [K] refill scratch
    std::vector<int64_t> live_drops;  // the token's dropped slots with a nonzero weight
    live_drops.reserve(dims_.top_k);
    const int64_t top_k = dims_.top_k;
    int64_t rerouted_slots = 0;
    for (int64_t t = 0; t < dims_.num_tokens; ++t) {
      decide_token(t, new_ids, new_weights, live_drops);
      if (options_.scores != nullptr && !live_drops.empty()) {
        refill_token(topk_ids_, topk_weights_, *options_.scores, loaded_ids,
                     allowed_row(options_.allowed, t, dims_.num_experts), live_drops, t, top_k, new_ids,
                     new_weights, excluded, picks);
      }
      for (int64_t i = t * top_k; i < (t + 1) * top_k; ++i) {
        rerouted_slots += new_ids[i] != topk_ids_[i];
        flags_[new_ids[i]] |= kSeenAfter;
      }
      if (options_.renormalize) {
        renormalize_token(topk_weights_ + t * top_k, new_weights + t * top_k, top_k);
      }
    }
    write_distinct_counts(flags_, stats);
    stats[2] = static_cast<int64_t>(primary_ids_.size());
    stats[3] = rerouted_slots;
    stats[4] = critical_slots_;
    stats[5] = dropped_slots_;
  }

 private:
  // Per-expert flags of this kernel, above those of reroute_cpu_common.h.
  static constexpr uint8_t kCandidate = 8;  // some slot of this expert costs more than keep_cost
  static constexpr uint8_t kKept = 16;      // ... and the expert fits in the budget: those slots keep it

  // The [E] allowed row of slot i's token, or nullptr (no mask).
  const bool* row_of(int64_t i) const {
    return allowed_row(options_.allowed, i / dims_.top_k, dims_.num_experts);
  }

  // p* and its error for slot i (expert e) over the token's P_t. Without a mask it depends on e
  // only and is filled lazily per expert; with one it is searched per slot.
  Substitute substitute_of(int64_t i, int32_t e) {
    if (options_.allowed != nullptr) {
      return best_substitute(error_, dims_.num_experts, primary_ids_, row_of(i), e);
    }
    if (subs_[e].id == kUnknown) {
      subs_[e] = best_substitute(error_, dims_.num_experts, primary_ids_, nullptr, e);
    }
    return subs_[e];
  }

  // The weighted error of approximating slot i by its substitute: float32(w) * min(c, 1), rounded.
  float cost_of(int64_t i, const Substitute& sub) const {
    return static_cast<float>(topk_weights_[i]) * std::min(sub.err, 1.0f);
  }

  // A secondary slot whose expert is not in the token's P_t (P without a mask).
  bool is_secondary_outside_p(int64_t i) const {
    return i % dims_.top_k >= dims_.num_primary && !in_token_primary(flags_, row_of(i), topk_ids_[i]);
  }

  // Token t's slots: keep (critical), substitute, or drop; live_drops gets its dropped slots
  // with a nonzero weight (a zero-weight slot stays as it is).
  void decide_token(int64_t t, IdT* new_ids, WeightT* new_weights, std::vector<int64_t>& live_drops) {
    live_drops.clear();
    for (int64_t s = 0; s < dims_.top_k; ++s) {
      const int64_t i = t * dims_.top_k + s;
      const int32_t e = static_cast<int32_t>(topk_ids_[i]);
      int32_t new_e = e;
      WeightT weight = topk_weights_[i];
      if (is_secondary_outside_p(i)) {
        const Substitute sub = substitute_of(i, e);
        if ((flags_[e] & kKept) && may_use(row_of(i), e) && cost_of(i, sub) > options_.keep_cost) {
          ++critical_slots_;  // kept: its expert is loaded for it
        } else if (sub.err < options_.tolerance) {
          new_e = sub.id;
        } else {
          new_e = static_cast<int32_t>(topk_ids_[t * dims_.top_k]);  // drop: the token's slot-0 expert
          weight = WeightT(0.0f);                                     // with weight 0, an exact no-op
          ++dropped_slots_;
          if (static_cast<float>(topk_weights_[i]) != 0.0f) {
            live_drops.push_back(s);
          }
        }
      }
      new_ids[i] = static_cast<IdT>(new_e);
      new_weights[i] = weight;
    }
  }

  const SlotDims dims_;
  const IdT* topk_ids_;          // [T, K]
  const WeightT* topk_weights_;  // [T, K]
  const ErrT* error_;            // [E, E]
  const ErrOptions options_;
  std::vector<uint8_t> flags_;   // [E]
  std::vector<Substitute> subs_; // [E] without an allowed mask
  std::vector<int32_t> primary_ids_;  // P in ascending id order
  int64_t critical_slots_ = 0;
  int64_t dropped_slots_ = 0;
};

IdsWeightsAndStats reroute_err_cpu(const RerouteErrCall& call) {
  const std::optional<ScoreRows> scores =
      call.router_scores.has_value() ? std::optional<ScoreRows>(score_rows(*call.router_scores)) : std::nullopt;
  at::Tensor new_ids, new_weights, stats;  // [T, K], [T, K], [6]
  std::tie(new_ids, new_weights, stats) = empty_weighted_outputs(call.topk_ids, call.topk_weights);
  const SlotDims dims = slot_dims(call.topk_ids, call.num_primary, call.num_experts());
  // Compared in float32 like the reference compares a float32 tensor with a Python float.
  const ErrOptions options{static_cast<float>(call.tolerance), static_cast<float>(call.keep_cost),
                           call.max_distinct, call.renormalize, scores.has_value() ? &*scores : nullptr,
                           allowed_mask_data(call.allowed)};
  dispatch_ids(call.topk_ids, [&](auto id_tag) {
    dispatch_float(call.topk_weights, "topk_weights", [&](auto weight_tag) {
      dispatch_float(call.error, "error", [&](auto err_tag) {
        using IdT = decltype(id_tag);
        using WeightT = decltype(weight_tag);
        using ErrT = decltype(err_tag);
        ErrRerouter<IdT, WeightT, ErrT> rerouter(
            dims, call.topk_ids.data_ptr<IdT>(), call.topk_weights.data_ptr<WeightT>(), call.error.data_ptr<ErrT>(),
            primary_data(call.primary), options);
        rerouter.mark_kept();
        rerouter.decide(new_ids.data_ptr<IdT>(), new_weights.data_ptr<WeightT>(), stats.data_ptr<int64_t>());
      });
    });
  });
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("reroute_err", &reroute_err_entry<reroute_err_cpu>);
}

}  // namespace sere
