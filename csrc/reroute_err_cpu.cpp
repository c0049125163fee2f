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
#include "reroute_checks.h"
#include "reroute_cpu_common.h"
#include "reroute_dispatch.h"

namespace sere {
namespace {

// Per-expert flags of this kernel, above those of reroute_cpu_common.h.
constexpr uint8_t kCandidate = 8;  // some slot of this expert costs more than keep_cost
constexpr uint8_t kAllowed = 16;   // ... and the expert fits in the budget: those slots keep it

// p* and error[e, p*] for one expert; err = +inf when P is empty, no error to P is below +inf, or
// one of them is NaN (the reference's min() propagates NaN, which it maps to +inf).
struct Substitute {
  int32_t id = kUnknown;
  float err = std::numeric_limits<float>::infinity();
};

template <typename ErrT>
Substitute best_substitute(
    const ErrT* error, int64_t num_experts, const std::vector<int32_t>& primary_ids, int32_t e) {
  const ErrT* row = error + static_cast<int64_t>(e) * num_experts;  // [E]
  Substitute best;
  best.id = 0;
  for (const int32_t p : primary_ids) {  // ascending: strict < keeps the lowest id among ties
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

// Refill of token t (sere.reference.refill_dropped): its j-th live dropped slot takes the j-th
// loaded expert that its new ids do not hold yet, best router score first, with weight
// score x (sum of its top-k weights / sum of their scores); a slot without one stays dropped.
template <typename IdT, typename WeightT>
void refill_token(
    const IdT* topk_ids,                  // [T, K]
    const WeightT* topk_weights,          // [T, K]
    const ScoreRows& scores,              // [T, E]
    const std::vector<int32_t>& loaded_ids,
    const std::vector<int64_t>& live_drops,  // slots s of token t, ascending
    int64_t t,
    int64_t top_k,
    IdT* new_ids,                         // [T, K]
    WeightT* new_weights,                 // [T, K]
    std::vector<int64_t>& excluded,       // [E] scratch
    std::vector<FillPick>& picks) {       // [K] scratch
  const int64_t row = t * top_k;
  float weight_sum = 0.0f;
  float score_sum = 0.0f;
  for (int64_t s = 0; s < top_k; ++s) {
    excluded[new_ids[row + s]] = t;
    weight_sum += static_cast<float>(topk_weights[row + s]);
    score_sum += scores.at(t, topk_ids[row + s]);
  }
  const float scale = weight_sum / clamp_min_tiny(score_sum);  // weight per unit of router score
  const int64_t count = static_cast<int64_t>(live_drops.size());
  const int64_t num_picks = pick_fill_candidates(scores, t, loaded_ids, excluded, t, count, picks.data());
  for (int64_t j = 0; j < num_picks; ++j) {
    if (picks[j].fills()) {
      new_ids[row + live_drops[j]] = static_cast<IdT>(picks[j].id);
      new_weights[row + live_drops[j]] = static_cast<WeightT>(picks[j].score * scale);
    }
  }
}

template <typename IdT, typename WeightT, typename ErrT>
void reroute_err_kernel(
    const IdT* topk_ids,          // [T, K]
    const WeightT* topk_weights,  // [T, K]
    const ErrT* error,            // [E, E]
    const bool* primary,          // [E] or nullptr
    IdT* new_ids,                 // [T, K]
    WeightT* new_weights,         // [T, K]
    int64_t num_tokens,
    int64_t top_k,
    int64_t num_primary,
    int64_t num_experts,
    float tolerance,
    float keep_cost,
    int64_t max_distinct,
    bool renormalize,
    const ScoreRows* scores,      // [T, E] router scores, or nullptr: no refill
    int64_t* stats) {             // [6]
  const int64_t num_slots = num_tokens * top_k;
  check_ids_in_range(topk_ids, num_slots, top_k, num_experts);

  std::vector<uint8_t> flags(num_experts, 0);  // [E]
  const std::vector<int32_t> primary_ids =  // P in ascending id order
      mark_before_and_primary(topk_ids, primary, num_tokens, top_k, num_primary, num_experts, flags);

  std::vector<Substitute> subs(num_experts);  // [E], filled lazily for non-primary secondaries
  const auto substitute_of = [&](int32_t e) -> const Substitute& {
    if (subs[e].id == kUnknown) {
      subs[e] = best_substitute(error, num_experts, primary_ids, e);
    }
    return subs[e];
  };
  // The weighted error of approximating slot i (expert e): float32(w) * min(c, 1), rounded.
  const auto cost_of = [&](int64_t i, int32_t e) -> float {
    return static_cast<float>(topk_weights[i]) * std::min(substitute_of(e).err, 1.0f);
  };
  const auto is_secondary_outside_p = [&](int64_t i) {
    return i % top_k >= num_primary && !(flags[topk_ids[i]] & kInPrimary);
  };

  std::vector<int64_t> excluded(scores != nullptr ? num_experts : 0, -1);  // [E] refill scratch
  std::vector<FillPick> picks(top_k);                                    // [K] refill scratch

  // Pass 2: critical candidates (cost > keep_cost), and the budget among their experts.
  const bool use_budget = max_distinct > 0;
  std::vector<float> mass(use_budget ? num_experts : 0, 0.0f);  // [E] summed cost per expert
  for (int64_t i = 0; i < num_slots; ++i) {
    if (!is_secondary_outside_p(i)) {
      continue;
    }
    const int32_t e = static_cast<int32_t>(topk_ids[i]);
    const float cost = cost_of(i, e);
    if (cost > keep_cost) {
      flags[e] |= kCandidate;
      if (use_budget) {
        mass[e] += cost;
      }
    }
  }
  std::vector<int32_t> candidates;  // experts that some slot wants to keep, ascending id
  for (int64_t e = 0; e < num_experts; ++e) {
    if (flags[e] & kCandidate) {
      candidates.push_back(static_cast<int32_t>(e));
    }
  }
  const int64_t num_primary_experts = static_cast<int64_t>(primary_ids.size());
  const int64_t budget = use_budget ? std::max<int64_t>(0, max_distinct - num_primary_experts)
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
    flags[e] |= kAllowed;
  }

  // Pass 3: decide every slot, refill the token's dropped slots, renormalise.
  std::vector<int32_t> loaded_ids;  // P and the kept critical experts, ascending (refill only)
  if (scores != nullptr) {
    for (int64_t e = 0; e < num_experts; ++e) {
      if (flags[e] & (kInPrimary | kAllowed)) {
        loaded_ids.push_back(static_cast<int32_t>(e));
      }
    }
  }
  std::vector<int64_t> live_drops;  // the token's dropped slots with a nonzero weight
  live_drops.reserve(top_k);
  int64_t rerouted_slots = 0;
  int64_t critical_slots = 0;
  int64_t dropped_slots = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    live_drops.clear();
    for (int64_t s = 0; s < top_k; ++s) {
      const int64_t i = t * top_k + s;
      const int32_t e = static_cast<int32_t>(topk_ids[i]);
      int32_t new_e = e;
      WeightT weight = topk_weights[i];
      if (is_secondary_outside_p(i)) {
        const Substitute& sub = substitute_of(e);
        if ((flags[e] & kAllowed) && cost_of(i, e) > keep_cost) {
          ++critical_slots;  // kept: its expert is loaded for it
        } else if (sub.err < tolerance) {
          new_e = sub.id;
        } else {
          new_e = static_cast<int32_t>(topk_ids[t * top_k]);  // drop: the token's slot-0 expert
          weight = WeightT(0.0f);                             // with weight 0, an exact no-op
          ++dropped_slots;
          if (static_cast<float>(topk_weights[i]) != 0.0f) {  // a zero-weight slot stays as it is
            live_drops.push_back(s);
          }
        }
      }
      new_ids[i] = static_cast<IdT>(new_e);
      new_weights[i] = weight;
    }
    if (scores != nullptr && !live_drops.empty()) {
      refill_token(topk_ids, topk_weights, *scores, loaded_ids, live_drops, t, top_k, new_ids, new_weights,
                   excluded, picks);
    }
    for (int64_t s = 0; s < top_k; ++s) {
      const int64_t i = t * top_k + s;
      rerouted_slots += new_ids[i] != topk_ids[i];
      flags[new_ids[i]] |= kSeenAfter;
    }
    if (renormalize) {
      renormalize_token(topk_weights + t * top_k, new_weights + t * top_k, top_k);
    }
  }

  write_distinct_counts(flags, stats);
  stats[2] = num_primary_experts;
  stats[3] = rerouted_slots;
  stats[4] = critical_slots;
  stats[5] = dropped_slots;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reroute_err_cpu(
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
  check_refill_scores(router_scores, topk_ids, error.size(0));
  const std::optional<ScoreRows> scores =
      router_scores.has_value() ? std::optional<ScoreRows>(score_rows(*router_scores)) : std::nullopt;
  at::Tensor new_ids = at::empty(topk_ids.sizes(), topk_ids.options());              // [T, K]
  at::Tensor new_weights = at::empty(topk_weights.sizes(), topk_weights.options());  // [T, K]
  at::Tensor stats = at::empty({kNumErrStats}, topk_ids.options().dtype(at::kLong));  // [6]
  const bool* primary_ptr = primary_data(primary);
  // Compared in float32 like the reference compares a float32 tensor with a Python float.
  const float tolerance_f32 = static_cast<float>(tolerance);
  const float keep_cost_f32 = static_cast<float>(keep_cost);

  dispatch_ids(topk_ids, [&](auto id_tag) {
    dispatch_float(topk_weights, "topk_weights", [&](auto weight_tag) {
      dispatch_float(error, "error", [&](auto err_tag) {
        using IdT = decltype(id_tag);
        using WeightT = decltype(weight_tag);
        using ErrT = decltype(err_tag);
        reroute_err_kernel<IdT, WeightT, ErrT>(
            topk_ids.data_ptr<IdT>(), topk_weights.data_ptr<WeightT>(), error.data_ptr<ErrT>(),
            primary_ptr, new_ids.data_ptr<IdT>(), new_weights.data_ptr<WeightT>(), topk_ids.size(0),
            topk_ids.size(1), num_primary, error.size(0), tolerance_f32, keep_cost_f32, max_distinct,
            renormalize, scores.has_value() ? &*scores : nullptr, stats.data_ptr<int64_t>());
      });
    });
  });
  return {new_ids, new_weights, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(sere, CPU, m) {
  m.impl("reroute_err", &reroute_err_cpu);
}

}  // namespace sere
