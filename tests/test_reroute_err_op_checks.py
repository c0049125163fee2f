"""`sere::reroute_err` at its boundaries: bad arguments raise errors that name the argument;
`torch.library.opcheck` and `torch.compile(fullgraph=True)`, with and without the refill,
against the loop oracle `loop_sere_err`."""

import math

import pytest
import torch
from oracle import loop_sere_err
from test_reroute_err_op import compare, sample

import sere.ops

INF = math.inf

pytestmark = [
    pytest.mark.usefixtures("compiled_op"),  # fails, never skips, without sere._C
    # raised inside torch by opcheck's TorchScript checks, not by this project
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


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
        "router_scores": None,
    }


def _with(**changes):
    return {**_base(), **changes}


# (id, arguments, exception type, regex the message must match): the arguments of sere-err
# first, then those it shares with sere::reroute (tests/test_reroute_errors.py)
ERROR_CASES = [
    ("tolerance_zero", _with(tolerance=0.0), ValueError, r"tolerance must be in \(0, 1\], got 0"),
    ("tolerance_above_one", _with(tolerance=1.5), ValueError, r"tolerance must be in \(0, 1\], got 1.5"),
    ("tolerance_nan", _with(tolerance=float("nan")), ValueError, r"tolerance must be in \(0, 1\], got nan"),
    ("keep_cost_negative", _with(keep_cost=-1.0), ValueError, r"keep_cost must be >= 0 \(inf: never keep\), got -1"),
    ("keep_cost_nan", _with(keep_cost=float("nan")), ValueError, r"keep_cost must be >= 0 .* got nan"),
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
    ("primary_shape", _with(primary=torch.ones(5, dtype=torch.bool)), ValueError,
     r"primary must be a 1-D \[num_experts=4\] mask, got shape \[5\]"),
    ("primary_dtype", _with(primary=torch.ones(4, dtype=torch.uint8)), TypeError, r"primary must be bool, got uint8"),
    ("primary_not_contiguous", _with(primary=torch.ones(8, dtype=torch.bool)[::2]), ValueError,
     r"primary must be contiguous"),
    ("scores_shape", _with(router_scores=torch.ones(2, 3)), ValueError,
     r"router_scores must be \[num_tokens=2, num_experts=4\], got \[2, 3\]"),
    ("scores_int", _with(router_scores=torch.ones(2, 4, dtype=torch.int64)), TypeError,
     r"router_scores must be float32, bfloat16 or float16, got int64"),
    ("scores_not_contiguous", _with(router_scores=torch.rand(4, 2).t()), ValueError,
     r"router_scores must be contiguous"),
    ("scores_other_device", _with(router_scores=torch.ones(2, 4, device="meta")), ValueError,
     r"router_scores must be on the device of topk_ids \(cpu\), got meta"),
]


@pytest.mark.parametrize(("args", "exc", "pattern"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_arguments_name_the_argument(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sere.ops.reroute_err_with_stats(**args)


@pytest.mark.parametrize("max_distinct", [0, -3])
def test_max_distinct_below_one_is_rejected(max_distinct):
    with pytest.raises(ValueError, match=rf"max_distinct must be >= 1 or None, got {max_distinct}"):
        sere.ops.reroute_err(**_with(max_distinct=max_distinct))


# ------------------------------------------------------------------------ opcheck, torch.compile


OPCHECK_SAMPLES = [
    # (T, E, K, S, tolerance, keep_cost, max_distinct, renormalize, ids, weights, errors, external P)
    (1, 8, 2, 1, 1.0, INF, 0, False, torch.int64, torch.float32, torch.float32, False),
    (16, 64, 6, 2, 0.3, 0.01, 0, True, torch.int32, torch.bfloat16, torch.bfloat16, False),
    (33, 128, 8, 3, 0.8, 0.005, 20, True, torch.int64, torch.float16, torch.float16, True),
    (0, 16, 4, 1, 1.0, 0.0, 3, False, torch.int32, torch.float32, torch.float32, True),
]


@pytest.fixture(params=[False, True], ids=["plain", "refill"])
def refill(request):
    return request.param


@pytest.mark.parametrize("spec", OPCHECK_SAMPLES, ids=lambda s: f"T{s[0]}-E{s[1]}-K{s[2]}-S{s[3]}")
def test_opcheck_reroute_err(spec, refill):
    num_tokens, num_experts, top_k, num_primary, tolerance, keep_cost, max_distinct, renorm, *dtypes, external = spec
    gen = torch.Generator().manual_seed(num_tokens)
    ids, weights, error = sample(gen, num_tokens, num_experts, top_k, False)
    primary = (torch.arange(num_experts) % 3 == 0) if external else None  # [E]
    scores = torch.rand(num_tokens, num_experts, generator=gen).to(dtypes[1]) if refill else None  # [T, E]
    args = (
        ids.to(dtypes[0]), weights.to(dtypes[1]), error.to(dtypes[2]).nan_to_num(1.0), num_primary, tolerance,
        keep_cost, max_distinct, renorm, primary, scores,
    )
    torch.library.opcheck(torch.ops.sere.reroute_err.default, args)


def test_torch_compile_fullgraph(refill):
    def route_step(topk_ids, topk_weights, error, scores):
        return sere.ops.reroute_err_with_stats(topk_ids, topk_weights, error, 2, 0.5, 0.01, 40, True, None, scores)

    compiled = torch.compile(route_step, fullgraph=True, dynamic=True)
    for num_tokens in (4, 17, 64):  # several batch sizes through one dynamic graph
        gen = torch.Generator().manual_seed(num_tokens)
        ids, weights, error = sample(gen, num_tokens, 128, 8, quantised=False)
        weights, error = weights.to(torch.bfloat16), error.to(torch.bfloat16)
        scores = torch.rand(num_tokens, 128, generator=gen) if refill else None  # [T, E]
        got = compiled(ids, weights, error, scores)
        want = loop_sere_err(ids, weights, error, 2, 0.5, 0.01, 40, True, router_scores=scores)
        compare(f"T={num_tokens}", got, want, exact_weights=False)
