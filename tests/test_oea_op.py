"""The compiled `sere::oea` op (policy `oea`) against the per-token loop oracle `loop_oea`.

Hand cases with their statistics, seeded sweeps (E 8/64/128, K 4/8, every S, ties, NaN and
-inf scores, external and all-False primary masks, dtypes), errors that name the argument,
`torch.library.opcheck` and `torch.compile(fullgraph=True)`. The CUDA op is in test_reroute_gpu.py.
"""

import math
import random

import pytest
import torch
from oracle import loop_oea

import sere.ops

pytestmark = [
    pytest.mark.usefixtures("compiled_op"),
    # raised inside torch by opcheck's TorchScript checks, not by this project
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def _check(got, want, case=""):
    """Ids and stats exactly, weights to float tolerance (per-token sums may round differently)."""
    new_ids, new_w, stats = got
    want_ids, want_w, want_stats = want
    assert new_ids.tolist() == want_ids, case
    assert stats.tolist() == want_stats, case
    tol = 1e-5 if new_w.dtype == torch.float32 else 1e-2
    want_w = torch.tensor(want_w).to(new_w.dtype).float()  # the dtype's rounding and overflow
    torch.testing.assert_close(new_w.float(), want_w, rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{case}: {m}")


def test_fill_by_hand():
    # S = 1, P = {0, 2, 3}.
    #   [0 | 1 2]  s (.1 .2 .3 .3 .1): 2 and 3 tie at .3 -> 2 then 3   ->  [0 | 2 3]  w = raw / .7
    #   [3 | 4 0]  2 (.5) then 0 (.1)                                  ->  [3 | 2 0]
    #   [2 | 0 1]  0 (.3); 3 at -inf never fills                       ->  [2 | 0 2]  w [.2 .3 0]/.5
    # stats: before 5, after {0, 2, 3} 3, |P| 3, rerouted 4, critical 0, unfilled 1
    ids = torch.tensor([[0, 1, 2], [3, 4, 0], [2, 0, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.3, 0.3, 0.2, -math.inf, 0.2]])
    new_ids, new_w, stats = sere.ops.oea_with_stats(ids, weights, scores, 1)
    assert new_ids.dtype == torch.int32 and new_ids.tolist() == [[0, 2, 3], [3, 2, 0], [2, 0, 2]]
    assert stats.tolist() == [5, 3, 3, 4, 0, 1]
    torch.testing.assert_close(new_w[0], torch.tensor([0.1, 0.3, 0.3]) / 0.7)
    torch.testing.assert_close(new_w[2], torch.tensor([0.2, 0.3, 0.0]) / 0.5)
    assert new_w[2, 2].item() == 0.0


def test_external_and_empty_primary_by_hand():
    # P = {3} from an EP group: tokens 0 and 2 take 3, then repeat their slot 0 (weight 0);
    # token 1 holds 3 already: it keeps only its slot 0 (all the weight). With P = {} every
    # secondary slot is unfilled.
    #   [0 | 1 2] -> [0 | 3 0]    [3 | 4 0] -> [3 | 3 3]    [2 | 0 1] -> [2 | 3 2]
    ids = torch.tensor([[0, 1, 2], [3, 4, 0], [2, 0, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2, 0.2]])
    new_ids, new_w, stats = sere.ops.oea_with_stats(ids, weights, scores, 1, torch.tensor([0, 0, 0, 1, 0]).bool())
    assert new_ids.tolist() == [[0, 3, 0], [3, 3, 3], [2, 3, 2]]
    assert stats.tolist() == [5, 3, 1, 6, 0, 4]
    torch.testing.assert_close(new_w[1:], torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    new_ids, _, stats = sere.ops.oea_with_stats(ids, weights, scores, 1, torch.zeros(5, dtype=torch.bool))
    assert new_ids.tolist() == [[0, 0, 0], [3, 3, 3], [2, 2, 2]]
    assert stats.tolist() == [5, 3, 0, 6, 0, 6]


def test_nan_score_holds_its_rank_but_fills_nothing():
    # S = 1, P = {0, 1, 2, 3}. Token 0 [0 | 1 2], scores (.2 NaN .1 .4): the fill order is
    # 1 (NaN sorts first), 3 (.4), 2 (.1); the NaN pick fills nothing, so slot 1 repeats 0 with
    # weight 0 and slot 2 takes 3: [0 | 0 3], weights (.2 0 .4) / .6.
    ids = torch.tensor([[0, 1, 2], [3, 2, 1], [1, 0, 2], [2, 0, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2]] * 4)
    scores = torch.tensor([[0.2, math.nan, 0.1, 0.4]] + [[0.1, 0.2, 0.3, 0.4]] * 3)
    new_ids, new_w, stats = sere.ops.oea_with_stats(ids, weights, scores, 1)
    assert new_ids[0].tolist() == [0, 0, 3]
    torch.testing.assert_close(new_w[0], torch.tensor([0.2, 0.0, 0.4]) / 0.6)
    assert stats[5].item() == 1
    _check((new_ids, new_w, stats), loop_oea(ids, weights, scores, 1))


def test_empty_batch():
    ids, weights, scores = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0, 8)
    new_ids, new_w, stats = sere.ops.oea_with_stats(ids, weights, scores, 2, torch.arange(8) < 3)
    assert new_ids.shape == (0, 4) and new_w.shape == (0, 4)
    assert stats.tolist() == [0, 0, 3, 0, 0, 0]


def random_oea_call(rng, gen, num_tokens, num_experts, top_k):
    """A skewed router's (ids, weights, scores, S, primary); quantised scores tie often; some
    calls carry an external or all-False mask, NaN or -inf scores, bf16/fp16 tensors."""
    logits = torch.randn(num_tokens, num_experts, generator=gen) + torch.randn(num_experts, generator=gen) * 1.5
    scores = logits.softmax(-1)  # [T, E]
    if rng.random() < 0.5:
        scores = (scores * 16).round() / 16  # ties
    weights, ids = scores.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True) if rng.random() < 0.5 else weights
    if rng.random() < 0.2 and num_tokens > 1:
        scores[rng.randrange(num_tokens), rng.randrange(num_experts)] = rng.choice([math.nan, -math.inf])
    num_primary = rng.randrange(1, top_k)
    kind = rng.choice(["own", "own", "union", "all_false"])
    primary = None
    if kind == "union":
        primary = torch.rand(num_experts, generator=gen) < 0.2
        primary[ids[:, :num_primary].reshape(-1)] = True
    elif kind == "all_false":
        primary = torch.zeros(num_experts, dtype=torch.bool)
    ids = ids.to(rng.choice([torch.int32, torch.int64]))
    weights = weights.to(rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    scores = scores.to(rng.choice([torch.float32, torch.float32, torch.bfloat16]))
    return ids, weights, scores, num_primary, primary


@pytest.mark.parametrize("top_k", [4, 8])
@pytest.mark.parametrize("num_experts", [8, 64, 128])
def test_sweep_against_the_loop_oracle(num_experts, top_k):
    rng, gen = random.Random(num_experts * 10 + top_k), torch.Generator().manual_seed(num_experts + top_k)
    filled = 0
    for k in range(40):
        args = random_oea_call(rng, gen, rng.choice([1, 2, 5, 16, 33]), num_experts, top_k)
        got = sere.ops.oea_with_stats(*args)
        _check(got, loop_oea(*args), f"draw {k}: S={args[3]} {args[0].dtype} {args[1].dtype} {args[2].dtype}")
        assert got[0].dtype == args[0].dtype and got[1].dtype == args[1].dtype
        filled += int(got[2][3])
    assert filled > 0  # the sweep moved slots


def test_oea_returns_ids_and_weights():
    ids, weights, scores, s, primary = random_oea_call(random.Random(1), torch.Generator().manual_seed(1), 8, 64, 8)
    new_ids, new_w = sere.ops.oea(ids, weights, scores, s, primary)
    want_ids, want_w, want_stats = loop_oea(ids, weights, scores, s, primary)
    _check((new_ids, new_w, torch.tensor(want_stats)), (want_ids, want_w, want_stats))


def _base():
    return {
        "topk_ids": torch.tensor([[0, 1, 2], [3, 0, 1]]),
        "topk_weights": torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]),
        "router_scores": torch.rand(2, 4),
        "num_primary": 1,
        "primary": None,
    }


def _with(**changes):
    return {**_base(), **changes}


BAD = [
    ("ids_out_of_range", _with(topk_ids=torch.tensor([[0, 1, 2], [3, 0, 4]])), ValueError,
     r"topk_ids\[1, 2\] = 4 is outside \[0, num_experts=4\)"),
    ("num_primary", _with(num_primary=3), ValueError, r"num_primary must be in \[1, top_k=3\), got 3"),
    ("weights_shape", _with(topk_weights=torch.rand(2, 4)), ValueError, r"topk_weights must have the shape"),
    ("weights_float64", _with(topk_weights=torch.rand(2, 3, dtype=torch.float64)), TypeError,
     r"topk_weights must be float32, bfloat16 or float16, got float64"),
    ("scores_rows", _with(router_scores=torch.rand(3, 4)), ValueError,
     r"router_scores must be \[num_tokens=2, num_experts=4\], got \[3, 4\]"),
    ("scores_1d", _with(router_scores=torch.rand(4)), ValueError, r"router_scores must be 2-D"),
    ("scores_int", _with(router_scores=torch.ones(2, 4, dtype=torch.int32)), TypeError,
     r"router_scores must be float32, bfloat16 or float16, got int32"),
    ("scores_not_contiguous", _with(router_scores=torch.rand(4, 2).t()), ValueError,
     r"router_scores must be contiguous"),
    ("primary_length", _with(primary=torch.ones(5, dtype=torch.bool)), ValueError,
     r"primary must be a 1-D \[num_experts=4\] mask"),
]


@pytest.mark.parametrize(("args", "exc", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_name_the_argument(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sere.ops.oea_with_stats(**args)


def test_missing_kernel_is_an_error(monkeypatch):
    monkeypatch.setattr(sere.ops, "_COMPILED_OEA_DEVICE_TYPES", frozenset())
    with pytest.raises(RuntimeError, match=r"no cpu kernel for sere::oea.*pip install --no-build-isolation -e \."):
        sere.ops.oea_with_stats(**_base())


@pytest.mark.parametrize("external", [False, True])
def test_opcheck(external):
    args = random_oea_call(random.Random(3), torch.Generator().manual_seed(3), 16, 64, 8)
    primary = (torch.arange(64) % 3 == 0) if external else None
    torch.library.opcheck(torch.ops.sere.oea.default, (*args[:4], primary))


def test_torch_compile_fullgraph():
    compiled = torch.compile(sere.ops.oea_with_stats, fullgraph=True, dynamic=True)
    rng, gen = random.Random(4), torch.Generator().manual_seed(4)
    for num_tokens in (4, 17, 64):  # several batch sizes through one dynamic graph
        ids, weights, scores, _, _ = random_oea_call(rng, gen, num_tokens, 128, 8)
        ids, weights, scores = ids.long(), weights.float(), scores.float()
        _check(compiled(ids, weights, scores, 2), loop_oea(ids, weights, scores, 2), f"T={num_tokens}")
