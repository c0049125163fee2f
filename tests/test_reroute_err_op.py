"""The compiled `sere::reroute_err` op (policy `sere-err`) against `sere_err_reference`.

Hand cases with their statistics, a sweep of the compiled op against the reference, errors that
name the argument (same message on the compiled and the Python path), `torch.library.opcheck`,
`torch.compile(fullgraph=True)`; then, with marker `gpu` (skipped without a CUDA device), the
CUDA op against the reference, inside a captured CUDA graph too.
"""

import math
import random
import warnings

import pytest
import torch

import sere.ops
from sere.ops import ERR_STAT_FIELDS
from sere.reference import STAT_FIELDS, primary_mask, sere_err_reference

INF = math.inf
SINGLE_BLOCK_MAX_SLOTS = 8192  # kSingleBlockMaxSlots in csrc/reroute_cuda.cuh
CUDA_MAX_EXPERTS = 4096  # kCudaMaxExperts

needs_op = pytest.mark.usefixtures("compiled_op")  # fails, never skips, without sere._C
# raised inside torch by opcheck's TorchScript checks, not by this project
ignore_jit_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(params=["compiled", "python"])
def err_path(request, monkeypatch):
    """`sere.ops.reroute_err*` through the compiled op, or forced onto the Python fallback."""
    if request.param == "compiled":
        request.getfixturevalue("compiled_op")
    else:
        monkeypatch.setattr(sere.ops, "_COMPILED_ERR_DEVICE_TYPES", frozenset())
        monkeypatch.setattr(sere.ops, "_warned_err_fallback", True)  # the warning has its own test
    return request.param


def _error(num_experts, entries):
    """Substitution errors: 1 (as bad as dropping) except the listed (i, j) pairs; diagonal 0."""
    error = torch.ones(num_experts, num_experts)
    error.fill_diagonal_(0.0)
    for (i, j), value in entries.items():
        error[i, j] = value
    return error


def test_stat_fields_extend_the_reroute_ones():
    assert ERR_STAT_FIELDS == STAT_FIELDS + ("dropped_slots",)


def test_substitute_drop_and_keep_by_hand(err_path):
    # E = 5, S = 1, P = {0, 1}, tolerance 0.5, keep_cost 0.5. Secondaries:
    #   2: best error 0.2 (to 1) -> substitute by 1
    #   3: best error 0.9 (to 0) -> drop (slot-0 expert, weight 0)
    #   4: best error 0.95, weight 0.6: cost 0.57 > 0.5 -> critical, kept
    #   token 0: [0 | 2 3]  w [.5 .3 .2]   ->  [0 | 1 0]  w [.5 .3 0]
    #   token 1: [1 | 4 2]  w [.2 .6 .2]   ->  [1 | 4 1]  w [.2 .6 .2]
    # stats: before {0..4} = 5, after {0, 1, 4} = 3, |P| = 2, rerouted 3, critical 1, dropped 1
    ids = torch.tensor([[0, 2, 3], [1, 4, 2]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    error = _error(5, {(2, 1): 0.2, (3, 0): 0.9, (4, 1): 0.95})
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5)
    assert new_ids.tolist() == [[0, 1, 0], [1, 4, 1]]
    assert torch.equal(new_w, torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.6, 0.2]]))
    assert stats.tolist() == [5, 3, 2, 3, 1, 1]
    # budget of 2 distinct experts (= |P|): no room for 4, whose error 0.95 >= 0.5 drops it
    #   token 1: [1 | 4 2]  ->  [1 | 1 1]  w [.2 0 .2]; after {0, 1}, rerouted 4, dropped 2
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, max_distinct=2
    )
    assert new_ids.tolist() == [[0, 1, 0], [1, 1, 1]]
    assert torch.equal(new_w, torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.0, 0.2]]))
    assert stats.tolist() == [5, 2, 2, 4, 0, 2]
    # renormalised: token 0 lost 0.2 of its weight 1.0, token 1 nothing
    new_ids, new_w = sere.ops.reroute_err(ids, weights, error, 1, tolerance=0.5, keep_cost=0.5, renormalize=True)
    torch.testing.assert_close(new_w, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0], [0.2, 0.6, 0.2]]))


def test_budget_keeps_the_largest_summed_cost_ties_to_the_lowest_id(err_path):
    # E = 5, S = 1, P = {0}, every error 1 (cost = weight), keep_cost 0.1, tolerance 1 (no
    # substitute: approximated slots drop). Summed cost: expert 1: .25 + .25 = .5, expert 2: .5,
    # expert 3: .75, expert 4: .2. max_distinct 3 -> room for 2 of them: 3 (.75), then 1 and 2
    # tie at .5 -> 1 (lower id). Expert 2 and 4 are dropped.
    #   [0 | 1]  [0 | 1]  [0 | 2]  [0 | 3]  [0 | 4]   ->   [0 | 1]  [0 | 1]  [0 | 0]  [0 | 3]  [0 | 0]
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3], [0, 4]], dtype=torch.int32)
    weights = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.8, 0.2]])
    error = _error(5, {})
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(
        ids, weights, error, 1, tolerance=1.0, keep_cost=0.1, max_distinct=3
    )
    assert new_ids.tolist() == [[0, 1], [0, 1], [0, 0], [0, 3], [0, 0]]
    assert new_w[:, 1].tolist() == [0.25, 0.25, 0.0, 0.75, 0.0]
    assert stats.tolist() == [5, 3, 1, 2, 3, 2]
    expected = sere_err_reference(ids, weights, error, 1, 1.0, 0.1, 3)
    assert torch.equal(new_ids, expected[0]) and torch.equal(new_w, expected[1])


def test_external_primary_and_nan_errors(err_path):
    # External P = {1, 2}; S = 1. Row 3 of `error` has a NaN among its errors to P: expert 3 is
    # unsubstitutable (error +inf) and is dropped, onto the token's slot-0 expert 0, which is not
    # in P: it stays and counts as neither critical nor kept.
    #   [0 | 3 1]  ->  [0 | 0 1]  w [.5 0 .2];   [2 | 4 0]  ->  [2 | 1 1]   (4 -> 1 at 0.25, 0 -> 1)
    ids = torch.tensor([[0, 3, 1], [2, 4, 0]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]])
    error = _error(5, {(3, 2): float("nan"), (3, 1): 0.1, (4, 1): 0.25, (0, 1): 0.5})
    primary = torch.tensor([False, True, True, False, False])
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, primary=primary)
    expected = sere_err_reference(ids, weights, error, 1, primary=primary)
    assert new_ids.tolist() == expected[0].tolist() == [[0, 0, 1], [2, 1, 1]]
    assert torch.equal(new_w, expected[1])
    # before {0..4}, after {0, 1, 2}, |P| 2, rerouted 3, critical 0, dropped 1
    assert stats.tolist() == [5, 3, 2, 3, 0, 1]


def test_empty_batch(err_path):
    ids = torch.zeros(0, 4, dtype=torch.int64)
    weights = torch.zeros(0, 4)
    primary = torch.arange(8) < 3
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, torch.rand(8, 8), 2, 0.5, 0.0, 4, True, primary)
    assert new_ids.shape == (0, 4) and new_w.shape == (0, 4)
    assert stats.tolist() == [0, 0, 3, 0, 0, 0]


# ------------------------------------------------------------------------------------------ sweep


def _sample(gen, num_tokens, num_experts, top_k, quantised):
    """([T, K] int64 ids, [T, K] float32 weights, [E, E] float32 errors) from a skewed router.

    `quantised`: weights in sixteenths and errors in eighths, so that costs, their sums and the
    errors tie often (exercising every tie-break); else softmax weights."""
    bias = torch.randn(num_experts, generator=gen) * 1.5  # [E] some experts are popular
    logits = torch.randn(num_tokens, num_experts, generator=gen) + bias  # [T, E]
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if quantised:
        weights = torch.randint(1, 17, weights.shape, generator=gen).float().sort(1, descending=True).values / 16
    error = (torch.rand(num_experts, num_experts, generator=gen) * 1.4 * 8).floor() / 8
    if not quantised:
        error = error + torch.rand(num_experts, num_experts, generator=gen) / 64
    return ids, weights, error.fill_diagonal_(0.0)


def _compare(case, got, want, renormalize):
    new_ids, new_w, stats = got
    want_ids, want_w, want_stats = want
    assert new_ids.dtype == want_ids.dtype and new_w.dtype == want_w.dtype, case
    assert torch.equal(new_ids.cpu(), want_ids), case
    if renormalize:  # per-token sums may round differently
        torch.testing.assert_close(new_w.cpu(), want_w, msg=lambda m: f"{case}: {m}")
    else:
        assert torch.equal(new_w.cpu(), want_w), case
    assert torch.equal(stats.cpu(), want_stats), f"{case}: {stats.tolist()} != {want_stats.tolist()}"


def _expected(ids, weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary):
    """Reference ids and weights (sere_err_reference itself) and the Python path's stats, on CPU."""
    args = (ids.cpu(), weights.cpu(), error.cpu(), num_primary, tolerance, keep_cost)
    primary = None if primary is None else primary.cpu()
    want_ids, want_w = sere_err_reference(*args, max_distinct, renormalize, primary)
    _, _, stats = sere.ops._reroute_err_python(*args, max_distinct or 0, renormalize, primary)
    return want_ids, want_w, stats


def _random_call(rng, gen, num_tokens, num_experts, top_k, tolerance, keep_cost, budget, renormalize):
    ids, weights, error = _sample(gen, num_tokens, num_experts, top_k, quantised=rng.random() < 0.5)
    num_primary = rng.randrange(1, top_k)
    primary = None
    if rng.random() < 0.3:  # an EP group's union: own primaries plus others
        primary = torch.rand(num_experts, generator=gen) < 0.2
        primary[ids[:, :num_primary].reshape(-1)] = True
    mask = primary if primary is not None else primary_mask(ids, num_experts, num_primary)
    max_distinct = int(mask.sum()) + 2 if budget else None
    ids = ids.to(rng.choice((torch.int32, torch.int64)))
    weights = weights.to(rng.choice((torch.float32, torch.bfloat16)))
    error = error.to(rng.choice((torch.float32, torch.bfloat16)))
    return ids, weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary


def _case_name(args):
    ids, weights, error, num_primary, tolerance, keep_cost, max_distinct, renormalize, primary = args
    return (
        f"T={ids.shape[0]} E={error.shape[0]} K={ids.shape[1]} S={num_primary} tol={tolerance} "
        f"keep={keep_cost} max_distinct={max_distinct} renorm={renormalize} {ids.dtype} {weights.dtype} "
        f"{error.dtype} external={primary is not None}"
    )


KNOBS = [
    (tolerance, keep_cost, budget, renormalize)
    for tolerance in (0.3, 1.0)
    for keep_cost, budget in ((INF, False), (0.05, False), (0.05, True), (0.01, True))
    for renormalize in (False, True)
]


@needs_op
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "tol{}-keep{}-budget{}-renorm{}".format(*k))
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 4), (8, 8), (64, 4), (64, 8), (128, 8)])
def test_compiled_matches_reference(num_experts, top_k, knobs):
    seed = num_experts * 1000 + top_k * 100 + KNOBS.index(knobs)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for num_tokens in (1, rng.randint(2, 48), rng.randint(49, 512)):
        args = _random_call(rng, gen, num_tokens, num_experts, top_k, *knobs)
        got = sere.ops.reroute_err_with_stats(*args)
        _compare(_case_name(args), got, _expected(*args), knobs[3])


# ------------------------------------------------------------------------------------- errors


def _base():
    """A valid call: T = 2, K = 3, E = 4, S = 1."""
    return {
        "topk_ids": torch.tensor([[0, 1, 2], [3, 0, 1]]),  # [2, 3] int64
        "topk_weights": torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]),  # [2, 3]
        "error": torch.ones(4, 4).fill_diagonal_(0.0),  # [4, 4]
        "num_primary": 1,
        "tolerance": 1.0,
        "keep_cost": INF,
        "max_distinct": None,
        "renormalize": False,
        "primary": None,
    }


def _with(**changes):
    args = _base()
    args.update(changes)
    return args


# (id, arguments, exception type, regex the message must match)
ERROR_CASES = [
    ("ids_1d", _with(topk_ids=torch.arange(3), topk_weights=torch.rand(3)), ValueError,
     r"topk_ids must be 2-D \[num_tokens, top_k\], got shape \[3\]"),
    ("ids_float", _with(topk_ids=torch.zeros(2, 3)), TypeError, r"topk_ids must be int32 or int64, got float32"),
    ("ids_not_contiguous", _with(topk_ids=torch.zeros(3, 2, dtype=torch.long).t()), ValueError,
     r"topk_ids must be contiguous"),
    ("ids_too_large", _with(topk_ids=torch.tensor([[0, 1, 2], [3, 0, 4]])), ValueError,
     r"topk_ids\[1, 2\] = 4 is outside \[0, num_experts=4\)"),
    ("ids_negative", _with(topk_ids=torch.tensor([[0, -1, 2], [3, 0, 1]], dtype=torch.int32)), ValueError,
     r"topk_ids\[0, 1\] = -1 is outside \[0, num_experts=4\)"),
    ("num_primary_zero", _with(num_primary=0), ValueError, r"num_primary must be in \[1, top_k=3\), got 0"),
    ("num_primary_equals_k", _with(num_primary=3), ValueError, r"num_primary must be in \[1, top_k=3\), got 3"),
    ("weights_shape", _with(topk_weights=torch.rand(2, 4)), ValueError,
     r"topk_weights must have the shape of topk_ids \[2, 3\], got \[2, 4\]"),
    ("weights_int", _with(topk_weights=torch.ones(2, 3, dtype=torch.long)), TypeError,
     r"topk_weights must be float32, bfloat16 or float16, got int64"),
    ("weights_float64", _with(topk_weights=torch.rand(2, 3, dtype=torch.float64)), TypeError,
     r"topk_weights must be float32, bfloat16 or float16, got float64"),
    ("weights_not_contiguous", _with(topk_weights=torch.rand(3, 2).t()), ValueError,
     r"topk_weights must be contiguous"),
    ("error_not_square", _with(error=torch.rand(4, 5)), ValueError,
     r"error must be a square \[num_experts, num_experts\] matrix with num_experts >= 1, got shape \[4, 5\]"),
    ("error_1d", _with(error=torch.rand(4)), ValueError, r"error must be a square .* got shape \[4\]"),
    ("error_empty", _with(error=torch.zeros(0, 0)), ValueError, r"error .* num_experts >= 1"),
    ("error_float64", _with(error=torch.rand(4, 4, dtype=torch.float64)), TypeError,
     r"error must be float32, bfloat16 or float16, got float64"),
    ("error_int", _with(error=torch.ones(4, 4, dtype=torch.int32)), TypeError, r"error must be .* got int32"),
    ("error_not_contiguous", _with(error=torch.rand(4, 4).t()), ValueError, r"error must be contiguous"),
    ("ids_beyond_error", _with(error=torch.rand(3, 3)), ValueError,
     r"topk_ids\[1, 0\] = 3 is outside \[0, num_experts=3\)"),
    ("tolerance_zero", _with(tolerance=0.0), ValueError, r"tolerance must be in \(0, 1\], got 0"),
    ("tolerance_above_one", _with(tolerance=1.5), ValueError, r"tolerance must be in \(0, 1\], got 1.5"),
    ("tolerance_nan", _with(tolerance=float("nan")), ValueError, r"tolerance must be in \(0, 1\], got nan"),
    ("keep_cost_negative", _with(keep_cost=-1.0), ValueError, r"keep_cost must be >= 0 \(inf: never keep\), got -1"),
    ("keep_cost_nan", _with(keep_cost=float("nan")), ValueError, r"keep_cost must be >= 0 .* got nan"),
    ("primary_shape", _with(primary=torch.ones(5, dtype=torch.bool)), ValueError,
     r"primary must be a 1-D \[num_experts=4\] mask, got shape \[5\]"),
    ("primary_dtype", _with(primary=torch.ones(4, dtype=torch.uint8)), TypeError, r"primary must be bool, got uint8"),
    ("primary_not_contiguous", _with(primary=torch.ones(8, dtype=torch.bool)[::2]), ValueError,
     r"primary must be contiguous"),
]


@pytest.mark.parametrize(("args", "exc", "pattern"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_name_the_argument(err_path, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sere.ops.reroute_err_with_stats(**args)


@pytest.mark.parametrize("max_distinct", [0, -3])
def test_max_distinct_below_one_is_rejected(err_path, max_distinct):
    with pytest.raises(ValueError, match=rf"max_distinct must be >= 1 or None, got {max_distinct}"):
        sere.ops.reroute_err(**_with(max_distinct=max_distinct))


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(sere.ops, "_COMPILED_ERR_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(sere.ops, "_warned_err_fallback", False)
    args = _with(keep_cost=0.05, max_distinct=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = sere.ops.reroute_err(**args)
        sere.ops.reroute_err_with_stats(**args)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "sere.reference.sere_err_reference" in str(runtime[0].message)
    assert runtime[0].filename == __file__  # points at the caller
    expected = sere_err_reference(**args)
    assert torch.equal(first[0], expected[0]) and torch.equal(first[1], expected[1])


# ------------------------------------------------------------------------ opcheck, torch.compile


OPCHECK_SAMPLES = [
    # (T, E, K, S, tolerance, keep_cost, max_distinct, renormalize, ids, weights, errors, external P)
    (1, 8, 2, 1, 1.0, INF, 0, False, torch.int64, torch.float32, torch.float32, False),
    (16, 64, 6, 2, 0.3, 0.01, 0, True, torch.int32, torch.bfloat16, torch.bfloat16, False),
    (33, 128, 8, 3, 0.8, 0.005, 20, True, torch.int64, torch.float16, torch.float16, True),
    (0, 16, 4, 1, 1.0, 0.0, 3, False, torch.int32, torch.float32, torch.float32, True),
]


@needs_op
@ignore_jit_warning
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: f"T{s[0]}-E{s[1]}-K{s[2]}-S{s[3]}")
def test_opcheck_reroute_err(sample):
    num_tokens, num_experts, top_k, num_primary, tolerance, keep_cost, max_distinct, renorm, *dtypes, external = sample
    ids, weights, error = _sample(torch.Generator().manual_seed(num_tokens), num_tokens, num_experts, top_k, False)
    primary = (torch.arange(num_experts) % 3 == 0) if external else None  # [E]
    args = (
        ids.to(dtypes[0]), weights.to(dtypes[1]), error.to(dtypes[2]), num_primary, tolerance, keep_cost,
        max_distinct, renorm, primary,
    )
    torch.library.opcheck(torch.ops.sere.reroute_err.default, args)


@needs_op
@ignore_jit_warning
def test_torch_compile_fullgraph():
    def route_step(topk_ids, topk_weights, error):
        return sere.ops.reroute_err_with_stats(topk_ids, topk_weights, error, 2, 0.5, 0.01, 40, True)

    compiled = torch.compile(route_step, fullgraph=True, dynamic=True)
    for num_tokens in (4, 17, 64):  # several batch sizes through one dynamic graph
        gen = torch.Generator().manual_seed(num_tokens)
        ids, weights, error = _sample(gen, num_tokens, 128, 8, quantised=False)
        weights, error = weights.to(torch.bfloat16), error.to(torch.bfloat16)
        got = compiled(ids, weights, error)
        want = route_step(ids, weights, error)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        expected_ids, _ = sere_err_reference(ids, weights, error, 2, 0.5, 0.01, 40, True)
        assert torch.equal(got[0], expected_ids)


# ---------------------------------------------------------------------------------------- GPU


def _gpu_random_call(rng, gen, num_tokens, num_experts, top_k):
    knobs = rng.choice(KNOBS)
    args = list(_random_call(rng, gen, num_tokens, num_experts, top_k, *knobs))
    args[2] = args[2].to(rng.choice((torch.float32, torch.bfloat16, torch.float16)))  # errors
    args[1] = args[1].to(rng.choice((torch.float32, torch.bfloat16, torch.float16)))  # weights
    if knobs[2] and rng.random() < 0.5:  # a tight budget: the in-block ranking decides
        mask = args[8] if args[8] is not None else primary_mask(args[0], num_experts, args[3])
        args[6] = max(1, int(mask.sum()) + rng.choice((0, 1)))
    return args


def _to_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def _check_cuda(args):
    got = sere.ops.reroute_err_with_stats(*_to_cuda(args))
    assert all(t.device.type == "cuda" for t in got)
    _compare(_case_name(args), got, _expected(*args), args[7])


@pytest.fixture
def _cuda_kernels_built():
    assert "cuda" in sere.ops._COMPILED_ERR_DEVICE_TYPES, (
        "sere._C has no CUDA kernel for sere::reroute_err: rebuild with a CUDA torch and nvcc "
        "(pip install --no-build-isolation --no-deps -e .)"
    )


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
@pytest.mark.parametrize("num_experts", (8, 64, 128, 256))
@pytest.mark.parametrize("top_k", (2, 4, 8))
def test_cuda_matches_reference(num_experts, top_k):
    rng = random.Random(num_experts * 10 + top_k)
    gen = torch.Generator().manual_seed(num_experts * 10 + top_k)
    for num_tokens in (1, 2, 3, 7, 16, 33, 64, 128, 255, 512, SINGLE_BLOCK_MAX_SLOTS // top_k):
        for _ in range(3):
            _check_cuda(_gpu_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
@pytest.mark.parametrize("num_experts", (1000, CUDA_MAX_EXPERTS))  # shared memory above 48 KiB
def test_cuda_many_experts(num_experts):
    rng = random.Random(num_experts)
    gen = torch.Generator().manual_seed(num_experts)
    for num_tokens, top_k in ((64, 8), (2048, 4)):
        for _ in range(2):
            _check_cuda(_gpu_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
def test_cuda_budget_ties_by_hand():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3], [0, 4]], dtype=torch.int32, device="cuda")
    weights = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.8, 0.2]], device="cuda")
    error = _error(5, {}).cuda()
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, 1.0, 0.1, 3)
    assert new_ids.tolist() == [[0, 1], [0, 1], [0, 0], [0, 3], [0, 0]]
    assert stats.tolist() == [5, 3, 1, 2, 3, 2]


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
@pytest.mark.parametrize("external_primary", (False, True))
def test_cuda_graph_capture_and_replay(external_primary):
    num_tokens, num_experts, top_k, num_primary = 64, 128, 8, 2
    static_ids = torch.zeros(num_tokens, top_k, dtype=torch.int32, device="cuda")
    static_weights = torch.zeros(num_tokens, top_k, dtype=torch.bfloat16, device="cuda")
    static_error = torch.zeros(num_experts, num_experts, dtype=torch.bfloat16, device="cuda")
    static_primary = torch.zeros(num_experts, dtype=torch.bool, device="cuda") if external_primary else None

    def fill(seed):
        ids, weights, error = _sample(torch.Generator().manual_seed(seed), num_tokens, num_experts, top_k, seed % 2 == 0)
        static_ids.copy_(ids)
        static_weights.copy_(weights)
        static_error.copy_(error)
        if external_primary:
            mask = torch.rand(num_experts, generator=torch.Generator().manual_seed(seed)) < 0.2
            mask[ids[:, :num_primary].reshape(-1)] = True
            static_primary.copy_(mask)

    def step():
        return sere.ops.reroute_err_with_stats(
            static_ids, static_weights, static_error, num_primary, 0.5, 0.01, 40, True, static_primary
        )

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs recommends
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for seed in range(1, 5):  # new contents in place, replay, compare
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        args = (static_ids, static_weights, static_error, num_primary, 0.5, 0.01, 40, True, static_primary)
        _compare(f"replay {seed}", out, _expected(*args), renormalize=True)


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
def test_cuda_matches_cpu_op():
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for num_tokens in (5, 300):
        args = _gpu_random_call(rng, gen, num_tokens, 64, 8)
        on_cpu = torch.ops.sere.reroute_err(*args[:6], args[6] or 0, args[7], args[8])
        on_gpu = torch.ops.sere.reroute_err(*_to_cuda(args[:6]), args[6] or 0, args[7], _to_cuda([args[8]])[0])
        _compare(_case_name(args), on_gpu, on_cpu, args[7])


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
def test_cuda_size_limits_are_clear_errors():
    ids = torch.zeros(SINGLE_BLOCK_MAX_SLOTS // 4 + 1, 4, dtype=torch.int64, device="cuda")
    weights = torch.ones(ids.shape, device="cuda")
    with pytest.raises(ValueError, match=r"supports num_tokens \* top_k <= 8192"):
        torch.ops.sere.reroute_err(ids, weights, torch.eye(8, device="cuda"), 1, 1.0, INF, 0, False, None)
    ids = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
    error = torch.eye(CUDA_MAX_EXPERTS + 1, device="cuda")
    with pytest.raises(ValueError, match=f"num_experts={CUDA_MAX_EXPERTS + 1}; the CUDA op supports at most"):
        torch.ops.sere.reroute_err(ids, torch.ones(1, 2, device="cuda"), error, 1, 1.0, INF, 0, False, None)
    with pytest.raises(ValueError, match=r"error must be on the device of topk_ids \(cuda:0\), got cpu"):
        torch.ops.sere.reroute_err(ids, torch.ones(1, 2, device="cuda"), torch.eye(4), 1, 1.0, INF, 0, False, None)


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
def test_cuda_out_of_range_ids_are_left_unchanged():
    #   E = 4, S = 1, every error 1, tolerance 1: every approximated slot drops.
    #   in: [0 | 7]   P = {0, 1} (9 is invalid)   out: [0 | 7]    (invalid: unchanged)
    #       [1 | -1]                                   [1 | -1]
    #       [9 | 2]   2 drops onto slot 0's id 9       [9 | 9]  w 0
    ids = torch.tensor([[0, 7], [1, -1], [9, 2]], device="cuda")
    weights = torch.full((3, 2), 0.5, device="cuda")
    new_ids, new_w, stats = torch.ops.sere.reroute_err(ids, weights, _error(4, {}).cuda(), 1, 1.0, INF, 0, False, None)
    assert new_ids.tolist() == [[0, 7], [1, -1], [9, 9]]
    assert new_w.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.5, 0.0]]
    assert stats.tolist() == [3, 2, 2, 1, 0, 1]


# ------------------------------------------------------------------------------------- refill


def _random_refill_call(rng, gen, num_tokens, num_experts, top_k, knobs, no_substitutes=False):
    args = list(_random_call(rng, gen, num_tokens, num_experts, top_k, *knobs))
    if no_substitutes:  # S = 1, no substitute anywhere: every slot outside P is dropped or kept
        args[2] = torch.ones_like(args[2]).fill_diagonal_(0.0)
        args[3], args[8] = 1, None
        if args[6] is not None:
            args[6] = int(primary_mask(args[0], num_experts, 1).sum()) + 2
    scores = (torch.randn(num_tokens, num_experts, generator=gen) * 2).softmax(1)  # [T, E]
    return args, scores.to(rng.choice((torch.float32, torch.bfloat16)))


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "tol{}-keep{}-budget{}-renorm{}".format(*k))
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 4), (64, 8), (128, 8)])
def test_refill_matches_reference(err_path, num_experts, top_k, knobs):
    """`router_scores=`: the op's decision, then dropped slots refilled from the loaded experts
    (plain torch after the op), equals `sere_err_reference(router_scores=...)`; the stats are
    the op's (dropped_slots counted before the refill)."""
    seed = 7 + num_experts * 1000 + top_k * 100 + KNOBS.index(knobs)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    refilled = 0
    for k, num_tokens in enumerate((1, rng.randint(2, 48), rng.randint(2, 48), rng.randint(49, 256))):
        args, scores = _random_refill_call(rng, gen, num_tokens, num_experts, top_k, knobs, k % 2 == 1)
        got = sere.ops.reroute_err_with_stats(*args, router_scores=scores)
        want_ids, want_w = sere_err_reference(*args[:6], args[6], args[7], args[8], router_scores=scores)
        _compare(_case_name(args), got, (want_ids, want_w, _expected(*args)[2]), True)
        plain_w = _expected(*args)[1]
        refilled += int(((plain_w == 0) & (want_w != 0)).sum())
    if num_experts >= 64 and (knobs[1] == INF or knobs[2]):  # drops with loaded experts to refill
        assert refilled > 0


def test_refill_router_scores_shape_is_named(err_path):
    with pytest.raises(ValueError, match=r"router_scores must be \[num_tokens=2, num_experts=4\]"):
        sere.ops.reroute_err(**_base(), router_scores=torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.usefixtures("_cuda_kernels_built")
def test_cuda_refill_matches_reference():
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    for num_tokens in (1, 16, 255):
        args, scores = _random_refill_call(rng, gen, num_tokens, 128, 8, rng.choice(KNOBS), rng.random() < 0.5)
        got = sere.ops.reroute_err_with_stats(*_to_cuda(args), router_scores=scores.cuda())
        want_ids, want_w = sere_err_reference(*args[:6], args[6], args[7], args[8], router_scores=scores)
        _compare(_case_name(args), got, (want_ids, want_w, _expected(*args)[2]), True)
