"""The CUDA `sere::reroute_err` (with and without refill) and `sere::oea` ops against the loop
oracles, inside a captured CUDA graph too.

Marker `gpu`: skipped where no CUDA device is visible (tests/conftest.py). On a GPU machine the
extension must have been built with its CUDA kernels (benchmarks/device_check.sh does that).
"""

import math
import random

import pytest
import torch
from oracle import loop_oea, loop_sere_err
from test_gpu_route_capture import capture
from test_oea_op import random_oea_call
from test_reroute_err_op import KNOBS, case_name, compare, expected, random_call, random_refill_call, sample

import sere.ops

pytestmark = pytest.mark.gpu

INF = math.inf
SINGLE_BLOCK_MAX_SLOTS = 8192  # kSingleBlockMaxSlots in csrc/reroute_cuda.cuh
CUDA_MAX_EXPERTS = 4096  # kCudaMaxExperts


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    for name, types in (("reroute_err", sere.ops._COMPILED_ERR_DEVICE_TYPES), ("oea", sere.ops._COMPILED_OEA_DEVICE_TYPES)):
        assert "cuda" in types, (
            f"sere._C has no CUDA kernel for sere::{name}: rebuild with a CUDA torch and nvcc "
            "(pip install --no-build-isolation --no-deps -e .)"
        )


def _to_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def _gpu_random_call(rng, gen, num_tokens, num_experts, top_k):
    knobs = rng.choice(KNOBS)
    return list(random_call(rng, gen, num_tokens, num_experts, top_k, *knobs))


def _check_err(args, scores=None):
    got = sere.ops.reroute_err_with_stats(*_to_cuda(args), router_scores=None if scores is None else scores.cuda())
    assert all(t.device.type == "cuda" for t in got)
    compare(case_name(args), got, expected(args, scores), exact_weights=not args[7] and scores is None)


@pytest.mark.parametrize("num_experts", (8, 64, 128, 256))
@pytest.mark.parametrize("top_k", (2, 4, 8))
def test_err_matches_the_loop_oracle(num_experts, top_k):
    rng = random.Random(num_experts * 10 + top_k)
    gen = torch.Generator().manual_seed(num_experts * 10 + top_k)
    for num_tokens in (1, 2, 7, 33, 128, 512, SINGLE_BLOCK_MAX_SLOTS // top_k):
        for _ in range(2):
            _check_err(_gpu_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.parametrize("num_experts", (1000, CUDA_MAX_EXPERTS))  # shared memory above 48 KiB
def test_err_many_experts(num_experts):
    rng = random.Random(num_experts)
    gen = torch.Generator().manual_seed(num_experts)
    for num_tokens, top_k in ((64, 8), (2048, 4)):
        _check_err(_gpu_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.parametrize("num_experts", (8, 128, 1000))
def test_err_refill_matches_the_loop_oracle(num_experts):
    rng, gen = random.Random(3 + num_experts), torch.Generator().manual_seed(3 + num_experts)
    for num_tokens in (1, 16, 255, 1024):
        args, scores = random_refill_call(rng, gen, num_tokens, num_experts, 8, rng.choice(KNOBS), rng.random() < 0.5)
        _check_err(args, scores)


def test_err_budget_ties_by_hand():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3], [0, 4]], dtype=torch.int32, device="cuda")
    weights = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.8, 0.2]], device="cuda")
    error = torch.ones(5, 5, device="cuda").fill_diagonal_(0.0)
    new_ids, new_w, stats = sere.ops.reroute_err_with_stats(ids, weights, error, 1, 1.0, 0.1, 3)
    assert new_ids.tolist() == [[0, 1], [0, 1], [0, 0], [0, 3], [0, 0]]
    assert stats.tolist() == [5, 3, 1, 2, 3, 2]


@pytest.mark.parametrize("refill", (False, True))
def test_err_graph_capture_and_replay(refill):
    num_tokens, num_experts, top_k, num_primary = 64, 128, 8, 2
    static_ids = torch.zeros(num_tokens, top_k, dtype=torch.int32, device="cuda")
    static_weights = torch.zeros(num_tokens, top_k, dtype=torch.bfloat16, device="cuda")
    static_error = torch.zeros(num_experts, num_experts, dtype=torch.bfloat16, device="cuda")
    static_primary = torch.zeros(num_experts, dtype=torch.bool, device="cuda")
    static_scores = torch.zeros(num_tokens, num_experts, device="cuda") if refill else None

    def fill(seed):
        gen = torch.Generator().manual_seed(seed)
        ids, weights, error = sample(gen, num_tokens, num_experts, top_k, seed % 2 == 0)
        mask = torch.rand(num_experts, generator=gen) < 0.2
        mask[ids[:, :num_primary].reshape(-1)] = True
        for static, value in ((static_ids, ids), (static_weights, weights), (static_error, error), (static_primary, mask)):
            static.copy_(value)
        if refill:
            static_scores.copy_(torch.rand(num_tokens, num_experts, generator=gen).softmax(1))

    def step():
        return sere.ops.reroute_err_with_stats(
            static_ids, static_weights, static_error, num_primary, 0.5, 0.01, 40, True, static_primary, static_scores
        )

    graph, out = _capture(fill, step)
    for seed in range(1, 4):  # new contents in place, replay, compare
        fill(seed)
        _replay(graph)
        want = loop_sere_err(static_ids, static_weights, static_error, num_primary, 0.5, 0.01, 40, True,
                             static_primary, static_scores)
        compare(f"replay {seed}", out, want, exact_weights=False)


def _capture(fill, step):
    """(graph, outputs) of `step` captured after `fill(0)` and one warm-up run."""
    fill(0)
    return capture(step, warmups=1)


def _replay(graph):
    graph.replay()
    torch.cuda.synchronize()


def test_err_size_limits_are_clear_errors():
    ids = torch.zeros(SINGLE_BLOCK_MAX_SLOTS // 4 + 1, 4, dtype=torch.int64, device="cuda")
    weights = torch.ones(ids.shape, device="cuda")
    with pytest.raises(ValueError, match=r"supports num_tokens \* top_k <= 8192"):
        torch.ops.sere.reroute_err(ids, weights, torch.eye(8, device="cuda"), 1, 1.0, INF, 0, False, None)
    ids = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
    error = torch.eye(CUDA_MAX_EXPERTS + 1, device="cuda")
    with pytest.raises(ValueError, match=f"num_experts={CUDA_MAX_EXPERTS + 1}; the CUDA op supports at most"):
        torch.ops.sere.reroute_err(ids, torch.ones(1, 2, device="cuda"), error, 1, 1.0, INF, 0, False, None)
    with pytest.raises(ValueError, match=r"router_scores must be on the device of topk_ids \(cuda:0\), got cpu"):
        torch.ops.sere.reroute_err(ids, torch.ones(1, 2, device="cuda"), torch.eye(4, device="cuda"), 1, 1.0, INF,
                                   0, False, None, torch.ones(1, 4))


def test_err_out_of_range_ids_are_left_unchanged():
    #   E = 4, S = 1, every error 1, tolerance 1: every approximated slot drops.
    #   in: [0 | 7]   P = {0, 1} (9 is invalid)   out: [0 | 7]    (invalid: unchanged)
    #       [1 | -1]                                   [1 | -1]
    #       [9 | 2]   2 drops onto slot 0's id 9       [9 | 9]  w 0
    ids = torch.tensor([[0, 7], [1, -1], [9, 2]], device="cuda")
    weights = torch.full((3, 2), 0.5, device="cuda")
    error = torch.ones(4, 4, device="cuda").fill_diagonal_(0.0)
    new_ids, new_w, stats = torch.ops.sere.reroute_err(ids, weights, error, 1, 1.0, INF, 0, False, None)
    assert new_ids.tolist() == [[0, 7], [1, -1], [9, 9]]
    assert new_w.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.5, 0.0]]
    assert stats.tolist() == [3, 2, 2, 1, 0, 1]


# ------------------------------------------------------------------------------------------ OEA


def _check_oea(args):
    got = sere.ops.oea_with_stats(*_to_cuda(args))
    want_ids, want_w, want_stats = loop_oea(*args)
    case = f"T={args[0].shape[0]} E={args[2].shape[1]} K={args[0].shape[1]} S={args[3]} {args[1].dtype}"
    assert got[0].device.type == "cuda" and got[0].tolist() == want_ids, case
    assert got[2].tolist() == want_stats, case
    tol = 1e-5 if got[1].dtype == torch.float32 else 1e-2
    want_w = torch.tensor(want_w, dtype=torch.float64).to(got[1].dtype).float()
    torch.testing.assert_close(got[1].cpu().float(), want_w, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("num_experts", (8, 64, 128, 1000, CUDA_MAX_EXPERTS))
@pytest.mark.parametrize("top_k", (2, 4, 8))
def test_oea_matches_the_loop_oracle(num_experts, top_k):
    rng, gen = random.Random(num_experts + top_k), torch.Generator().manual_seed(num_experts + top_k)
    for num_tokens in (1, 3, 33, 255, SINGLE_BLOCK_MAX_SLOTS // top_k):
        for _ in range(2):
            _check_oea(random_oea_call(rng, gen, num_tokens, num_experts, top_k))


def test_oea_graph_capture_and_replay():
    num_tokens, num_experts, top_k, num_primary = 64, 128, 8, 2
    static = [torch.zeros(num_tokens, top_k, dtype=torch.int64, device="cuda"),
              torch.zeros(num_tokens, top_k, device="cuda"),
              torch.zeros(num_tokens, num_experts, dtype=torch.bfloat16, device="cuda")]

    def fill(seed):
        ids, weights, scores, _, _ = random_oea_call(random.Random(seed), torch.Generator().manual_seed(seed),
                                                     num_tokens, num_experts, top_k)
        for buffer, value in zip(static, (ids, weights, scores)):
            buffer.copy_(value)

    graph, out = _capture(fill, lambda: sere.ops.oea_with_stats(*static, num_primary))
    for seed in range(1, 4):
        fill(seed)
        _replay(graph)
        want_ids, want_w, want_stats = loop_oea(*static, num_primary)
        assert out[0].tolist() == want_ids and out[2].tolist() == want_stats, f"replay {seed}"
        torch.testing.assert_close(out[1].cpu(), torch.tensor(want_w, dtype=torch.float32), equal_nan=True)


def test_oea_size_limits_are_clear_errors():
    ids = torch.zeros(SINGLE_BLOCK_MAX_SLOTS // 4 + 1, 4, dtype=torch.int64, device="cuda")
    weights, scores = torch.ones(ids.shape, device="cuda"), torch.ones(ids.shape[0], 8, device="cuda")
    with pytest.raises(ValueError, match=r"sere::oea on CUDA supports num_tokens \* top_k <= 8192"):
        torch.ops.sere.oea(ids, weights, scores, 1, None)
    ids, weights = torch.zeros(1, 2, dtype=torch.int64, device="cuda"), torch.ones(1, 2, device="cuda")
    with pytest.raises(ValueError, match=f"num_experts={CUDA_MAX_EXPERTS + 1}; the CUDA op supports at most"):
        torch.ops.sere.oea(ids, weights, torch.ones(1, CUDA_MAX_EXPERTS + 1, device="cuda"), 1, None)
