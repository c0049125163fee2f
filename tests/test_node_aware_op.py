"""The compiled ops with node-aware routing's `allowed` [T, E] mask (docs/spec.md §21), against a
per-token loop oracle written here (with tests/oracle.py's helpers; nothing of sere.locality or
sere.reference): random sweeps over T, S, masks (all-False rows, all-True rows and masks), every
policy, int32/int64 ids, float32/bfloat16 matrices, own and external P. Plus the checks of
`allowed`, opcheck, and torch.compile(fullgraph=True) against eager.

Shape legend: T tokens, K top-k slots, E experts, S num_primary.
"""

import pytest
import torch
from oracle import INF, as_rows, best_substitute, f32, fill_order, most_similar_primary, primary_set, refill

import sere.ops

pytestmark = [
    pytest.mark.usefixtures("compiled_op", "one_thread"),  # fails, never skips, without sere._C
    # raised inside torch by opcheck's TorchScript checks, not by this project
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

NUM_EXPERTS, TOP_K = 64, 8

# ----------------------------------------------------------------------------- the loop oracle


def loop_sere(ids, sim, S, rho, P, allowed):
    """§21 sere: a secondary outside P_t = P & allowed[t] goes to its most similar member of P_t;
    kept when P_t offers nothing, or (rho > 0) as a critical expert the token may use. Returns
    ([T][K] ids, critical = secondary slots whose output expert is not in P)."""
    out, critical = [list(row) for row in ids], 0
    for t, row in enumerate(ids):
        token_p = {p for p in P if allowed[t][p]}
        for s in range(S, len(row)):
            e = row[s]
            if e not in token_p:
                best, value = most_similar_primary(sim[e], token_p)
                critical_keep = rho > 0 and allowed[t][e] and best is not None and value < f32(rho)
                out[t][s] = e if best is None or critical_keep else best
            critical += out[t][s] not in P
    return out, critical


def loop_oea(ids, weights, scores, S, P, allowed):
    """§21 oea: the head stays; the other slots take P_t minus the head by router score; unfilled
    slots repeat slot 0 with score 0; scores rescaled to the token's weight sum."""
    out_ids, out_w, unfilled = [], [], 0
    for t, row in enumerate(ids):
        head, width = row[:S], len(row) - S
        order = fill_order(scores[t], [p for p in sorted(P) if allowed[t][p] and p not in head])[:width]
        missing = width - len(order)
        unfilled += missing
        raw = [scores[t][e] for e in head + order] + [0.0] * missing
        scale = sum(weights[t]) / max(sum(raw), 1e-20)
        out_ids.append(head + order + [row[0]] * missing)
        out_w.append([r * scale for r in raw])
    return out_ids, out_w, 0, unfilled


def loop_sere_err(ids, weights, error, S, P, allowed, tolerance, keep_cost, max_distinct, renormalize, scores):
    """§21 sere-err: §9 with P_t; a keep candidate must be allowed; the budget counts the global
    |P|; the refill draws from (P | kept experts) & allowed[t]. Returns (ids, weights, critical, dropped)."""
    slots = {}  # (t, s) -> (p*, error, cost) for the secondary slots outside P_t
    for t, row in enumerate(ids):
        token_p = {p for p in P if allowed[t][p]}
        for s in range(S, len(row)):
            if row[s] not in token_p:
                best, c = best_substitute(error[row[s]], token_p)
                slots[t, s] = (best, c, f32(weights[t][s] * min(c, 1.0)))
    kept = {(t, s) for (t, s), (_, _, cost) in slots.items() if allowed[t][ids[t][s]] and cost > f32(keep_cost)}
    if max_distinct is not None:
        mass = {}
        for t, s in sorted(kept):  # row-major, float32 sums
            mass[ids[t][s]] = f32(mass.get(ids[t][s], 0.0) + slots[t, s][2])
        chosen = set(sorted(mass, key=lambda e: (-mass[e], e))[: max(0, max_distinct - len(P))])
        kept = {(t, s) for t, s in kept if ids[t][s] in chosen}
    approximated = sorted(set(slots) - kept)  # substituted (error < tolerance) or dropped
    dropped = [(t, s) for t, s in approximated if not slots[t, s][1] < f32(tolerance)]
    out_ids, out_w = [list(row) for row in ids], [list(row) for row in weights]
    for t, s in approximated:
        out_ids[t][s] = ids[t][0] if (t, s) in dropped else slots[t, s][0]
    for t, s in dropped:
        out_w[t][s] = 0.0
    if scores is not None:  # token by token: its loaded set is (P | kept experts) & allowed[t]
        loaded = P | {ids[t][s] for t, s in kept}
        for t in range(len(ids)):
            live = [(tt, s) for tt, s in dropped if tt == t and weights[t][s] != 0]
            refill(out_ids, out_w, live, {e for e in loaded if allowed[t][e]}, scores, ids, weights)
    if renormalize:
        out_w = [[w * sum(old) / sum(new) for w in new] for new, old in zip(out_w, weights)]
    return out_ids, out_w, len(kept), len(dropped)


def loop_stats(ids, new_ids, P, critical, dropped):
    """The [6] statistics of docs/spec.md §11."""
    changed = sum(a != b for row_a, row_b in zip(ids, new_ids) for a, b in zip(row_a, row_b))
    distinct = [len({e for row in x for e in row}) for x in (ids, new_ids)]
    return distinct + [len(P), changed, critical, dropped]


# ------------------------------------------------------------------------------ random inputs


def sample(seed, num_tokens, id_dtype, matrix_dtype, external_primary):
    """ids/weights [T, K] sorted, router scores [T, E], a similarity-or-error matrix [E, E] in
    [0, 1.2) with a zero diagonal, an allowed mask [T, E] whose rows cycle through densities 0
    (all False), 0.3, 0.7 and 1 (all True), and P (None: the first S slots)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=gen).softmax(1)  # [T, E]
    weights, ids = scores.topk(TOP_K, dim=1)  # [T, K] descending
    matrix = (torch.rand(NUM_EXPERTS, NUM_EXPERTS, generator=gen) * 1.2).fill_diagonal_(0.0).to(matrix_dtype)
    density = torch.tensor([0.0, 0.3, 0.7, 1.0])[(torch.arange(num_tokens) + seed) % 4]  # [T]
    allowed = torch.rand(num_tokens, NUM_EXPERTS, generator=gen) < density[:, None]  # [T, E] bool
    primary = torch.rand(NUM_EXPERTS, generator=gen) < 0.3 if external_primary else None  # [E]
    return ids.to(id_dtype), weights / weights.sum(1, keepdim=True), scores, matrix, allowed, primary


# name -> (policy, options); max_distinct is |P| + the given extra
CASES = {
    "sere-rho0": ("sere", {"threshold": 0.0}),
    "sere-rho0.6": ("sere", {"threshold": 0.6}),
    "oea": ("oea", {}),
    "err": ("sere-err", {"tolerance": 0.3}),
    "err-keep": ("sere-err", {"tolerance": 0.3, "keep_cost": 0.03}),
    "err-budget": ("sere-err", {"tolerance": 0.3, "keep_cost": 0.03, "budget_extra": 3}),
    "err-refill": ("sere-err", {"tolerance": 0.3, "keep_cost": 0.03, "refill": True}),
    "err-renorm": ("sere-err", {"tolerance": 0.5, "renormalize": True}),
    "err-all": ("sere-err", {"tolerance": 0.3, "keep_cost": 0.02, "budget_extra": 2, "refill": True,
                             "renormalize": True}),
}


def run_op(policy, opts, ids, weights, scores, matrix, S, primary, allowed, P):
    """(ids, weights, stats [6]) of the compiled op for one case."""
    if policy == "sere":
        threshold = opts["threshold"]
        new_ids, new_w, stats = sere.ops.reroute_with_stats(ids, weights, matrix, S, threshold, primary, allowed)
        return new_ids, new_w, torch.cat([stats, stats.new_zeros(1)])
    if policy == "oea":
        return sere.ops.oea_with_stats(ids, weights, scores, S, primary, allowed)
    max_distinct = len(P) + opts["budget_extra"] if "budget_extra" in opts else None
    return sere.ops.reroute_err_with_stats(
        ids, weights, matrix, S, opts["tolerance"], opts.get("keep_cost", INF), max_distinct,
        opts.get("renormalize", False), primary, scores if opts.get("refill") else None, allowed=allowed,
    )


def run_loop(policy, opts, ids, weights, scores, matrix, S, P, allowed):
    """(ids, weights, stats [6]) of the loop oracle for one case, as lists."""
    if policy == "sere":
        new_ids, critical = loop_sere(ids, matrix, S, opts["threshold"], P, allowed)
        return new_ids, weights, loop_stats(ids, new_ids, P, critical, 0)
    if policy == "oea":
        new_ids, new_w, critical, dropped = loop_oea(ids, weights, scores, S, P, allowed)
    else:
        max_distinct = len(P) + opts["budget_extra"] if "budget_extra" in opts else None
        new_ids, new_w, critical, dropped = loop_sere_err(
            ids, weights, matrix, S, P, allowed, opts["tolerance"], opts.get("keep_cost", INF), max_distinct,
            opts.get("renormalize", False), scores if opts.get("refill") else None,
        )
    return new_ids, new_w, loop_stats(ids, new_ids, P, critical, dropped)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_primary", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_ops_with_allowed_match_the_loop_oracle(case, num_primary, num_tokens):
    policy, opts = CASES[case]
    for seed in range(4):
        for id_dtype, matrix_dtype in ((torch.int32, torch.float32), (torch.int64, torch.bfloat16)):
            ids, weights, scores, matrix, allowed, primary = sample(
                seed, num_tokens, id_dtype, matrix_dtype, external_primary=seed % 2 == 1
            )
            P = primary_set(ids, num_primary, primary)
            got_ids, got_w, got_stats = run_op(policy, opts, ids, weights, scores, matrix, num_primary, primary,
                                               allowed, P)
            want_ids, want_w, want_stats = run_loop(
                policy, opts, as_rows(ids), as_rows(weights), as_rows(scores), as_rows(matrix), num_primary, P,
                as_rows(allowed),
            )
            where = f"{case} S={num_primary} T={num_tokens} seed={seed} {id_dtype} {matrix_dtype}"
            assert got_ids.dtype == id_dtype and got_ids.tolist() == want_ids, where
            assert got_stats.tolist() == want_stats, f"{where}: {got_stats.tolist()} != {want_stats}"
            torch.testing.assert_close(got_w, torch.tensor(want_w), rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_all_true_mask_equals_no_mask(case):
    policy, opts = CASES[case]
    ids, weights, scores, matrix, _, primary = sample(7, 64, torch.int64, torch.bfloat16, external_primary=False)
    P = primary_set(ids, 2, primary)
    everything = torch.ones(64, NUM_EXPERTS, dtype=torch.bool)
    with_mask = run_op(policy, opts, ids, weights, scores, matrix, 2, primary, everything, P)
    without = run_op(policy, opts, ids, weights, scores, matrix, 2, primary, None, P)
    for a, b in zip(with_mask, without):
        assert torch.equal(a, b), case


# ------------------------------------------------------------------------------ argument checks

OPS = {  # name -> a valid call (T = 2, K = 3, E = 4, S = 1) taking `allowed`
    "reroute": lambda allowed: sere.ops.reroute_with_stats(
        torch.tensor([[0, 1, 2], [3, 0, 1]]), torch.rand(2, 3), torch.rand(4, 4), 1, 0.0, None, allowed),
    "reroute_err": lambda allowed: sere.ops.reroute_err_with_stats(
        torch.tensor([[0, 1, 2], [3, 0, 1]]), torch.rand(2, 3), torch.rand(4, 4), 1, allowed=allowed),
    "oea": lambda allowed: sere.ops.oea_with_stats(
        torch.tensor([[0, 1, 2], [3, 0, 1]]), torch.rand(2, 3), torch.rand(2, 4), 1, None, allowed),
}

BAD_ALLOWED = [
    ("uint8", torch.ones(2, 4, dtype=torch.uint8), TypeError, r"allowed must be bool, got uint8"),
    ("int64", torch.ones(2, 4, dtype=torch.int64), TypeError, r"allowed must be bool, got int64"),
    ("too_many_experts", torch.ones(2, 5, dtype=torch.bool), ValueError,
     r"allowed must be a 2-D \[num_tokens=2, num_experts=4\] mask, got shape \[2, 5\]"),
    ("too_many_tokens", torch.ones(3, 4, dtype=torch.bool), ValueError,
     r"allowed must be a 2-D \[num_tokens=2, num_experts=4\] mask, got shape \[3, 4\]"),
    ("1d", torch.ones(4, dtype=torch.bool), ValueError, r"allowed must be a 2-D .* got shape \[4\]"),
    ("not_contiguous", torch.ones(4, 2, dtype=torch.bool).t(), ValueError, r"allowed must be contiguous"),
    ("other_device", torch.ones(2, 4, dtype=torch.bool, device="meta"), ValueError,
     r"allowed must be on the device of topk_ids \(cpu\), got meta"),
]


@pytest.mark.parametrize(("allowed", "exc", "pattern"), [c[1:] for c in BAD_ALLOWED], ids=[c[0] for c in BAD_ALLOWED])
@pytest.mark.parametrize("op", list(OPS))
def test_bad_allowed_is_named(op, allowed, exc, pattern):
    with pytest.raises(exc, match=pattern):
        OPS[op](allowed)


# ------------------------------------------------------------------------ opcheck, torch.compile


def _op_args(num_tokens, seed):
    ids, weights, scores, matrix, allowed, _ = sample(seed, num_tokens, torch.int32, torch.bfloat16, False)
    return ids, weights, scores, matrix, allowed


def test_opcheck_with_allowed():
    ids, weights, scores, matrix, allowed = _op_args(9, seed=3)
    torch.library.opcheck(torch.ops.sere.reroute.default, (ids, matrix, 2, 0.5, None, allowed))
    torch.library.opcheck(
        torch.ops.sere.reroute_err.default, (ids, weights, matrix, 2, 0.3, 0.02, 20, True, None, scores, allowed)
    )
    torch.library.opcheck(torch.ops.sere.oea.default, (ids, weights, scores, 2, None, allowed))


def test_torch_compile_fullgraph_with_allowed_equals_eager():
    def route_step(ids, weights, scores, matrix, allowed):  # the three ops in one graph
        sere_out = sere.ops.reroute_with_stats(ids, weights, matrix, 2, 0.5, None, allowed)
        err_out = sere.ops.reroute_err_with_stats(ids, weights, matrix, 2, 0.3, 0.02, 20, True, None, scores, allowed)
        oea_out = sere.ops.oea_with_stats(ids, weights, scores, 2, None, allowed)
        return (sere_out[0], sere_out[2], *err_out, *oea_out)

    compiled = torch.compile(route_step, fullgraph=True, dynamic=True)
    for num_tokens in (5, 64):  # two batch sizes through one dynamic graph
        args = _op_args(num_tokens, seed=num_tokens)
        for got, want in zip(compiled(*args), route_step(*args)):
            assert torch.equal(got, want), num_tokens
