"""The CUDA op against the loop oracle `loop_reroute`: single-block and multi-block paths,
non-finite similarities, CUDA-graph replay.

Marker `gpu`: skipped where no CUDA device is visible (tests/conftest.py). On a GPU machine the
extension must have been built with its CUDA kernels (benchmarks/device_check.sh does that).
"""

import random

import pytest
import torch

from oracle import loop_reroute
from test_gpu_route_capture import capture

import sere.ops

pytestmark = pytest.mark.gpu

SINGLE_BLOCK_MAX_SLOTS = 8192  # kSingleBlockMaxSlots in csrc/reroute_cuda.cuh
CUDA_MAX_EXPERTS = 4096  # kCudaMaxExperts
TOKENS = (1, 2, 3, 7, 16, 33, 64, 128, 255, 512)


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    assert "cuda" in sere.ops._COMPILED_DEVICE_TYPES, (
        "sere._C has no CUDA kernels: rebuild with a CUDA torch and nvcc "
        "(pip install --no-build-isolation --no-deps -e .)"
    )


def _case(gen, num_tokens, num_experts, top_k, levels=10, non_finite=False):
    """([T, K] int64 CPU ids, skewed popularity; [E, E] float32 CPU similarity with ties;
    `non_finite`: about 3% of its entries NaN, +inf or -inf)."""
    popularity = torch.rand(num_experts, generator=gen) ** 4 + 1e-3  # [E]
    topk_ids = torch.multinomial(popularity.expand(num_tokens, -1), top_k, generator=gen)  # [T, K]
    similarity = (torch.rand(num_experts, num_experts, generator=gen) * levels).round() / levels
    if non_finite:
        pick = torch.rand(num_experts, num_experts, generator=gen)  # [E, E]
        similarity[pick < 0.01] = float("nan")
        similarity[(pick >= 0.01) & (pick < 0.02)] = float("inf")
        similarity[(pick >= 0.02) & (pick < 0.03)] = float("-inf")
    return topk_ids, similarity.fill_diagonal_(1.0)


def _check(topk_ids, similarity, num_primary, threshold, primary=None):
    weights = torch.ones(topk_ids.shape, device="cuda")
    new_ids, _, stats = sere.ops.reroute_with_stats(topk_ids, weights, similarity, num_primary, threshold, primary)
    expected_ids, expected_stats = loop_reroute(topk_ids, similarity, num_primary, threshold, primary)
    case = f"T={topk_ids.shape[0]} E={similarity.shape[0]} K={topk_ids.shape[1]} S={num_primary} rho={threshold}"
    assert new_ids.device.type == "cuda" and new_ids.dtype == topk_ids.dtype, case
    assert new_ids.tolist() == expected_ids, case
    assert stats.tolist() == expected_stats, f"{case}: {stats.tolist()} != {expected_stats}"


def _random_call(rng, gen, num_tokens, num_experts, top_k):
    ids, sim = _case(gen, num_tokens, num_experts, top_k, levels=rng.choice((4, 10, 16)),
                     non_finite=rng.random() < 0.25)
    num_primary = rng.randrange(1, top_k)
    primary = None
    if rng.random() < 0.3:
        primary = torch.rand(num_experts, generator=gen) < 0.2
        primary[ids[:, :num_primary].reshape(-1)] = True
        primary = primary.cuda()
    ids = ids.to(rng.choice((torch.int32, torch.int64))).cuda()
    sim = sim.to(rng.choice((torch.float32, torch.bfloat16, torch.float16))).cuda()
    return ids, sim, num_primary, rng.choice((0.0, 0.3, 0.7)), primary


@pytest.mark.parametrize("num_experts", (8, 60, 128, 256))
@pytest.mark.parametrize("top_k", (2, 4, 8))
def test_single_block_matches_the_loop_oracle(num_experts, top_k):
    rng = random.Random(num_experts * 10 + top_k)
    gen = torch.Generator().manual_seed(num_experts * 10 + top_k)
    for num_tokens in TOKENS:
        for _ in range(3):
            _check(*_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"),
    [(1025, 128, 8), (2048, 256, 8), (4096, 64, 6), (40000, 128, 8), (3000, CUDA_MAX_EXPERTS, 4)],
)
def test_multi_block_matches_the_loop_oracle(num_tokens, num_experts, top_k):
    assert num_tokens * top_k > SINGLE_BLOCK_MAX_SLOTS
    rng = random.Random(num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    for _ in range(3):
        _check(*_random_call(rng, gen, num_tokens, num_experts, top_k))


@pytest.mark.parametrize("num_tokens", (64, 2048))  # single-block and multi-block paths
@pytest.mark.parametrize("external_primary", (False, True))
def test_cuda_graph_capture_and_replay(num_tokens, external_primary):
    num_experts, top_k, num_primary, threshold = 128, 8, 2, 0.3
    gen = torch.Generator().manual_seed(num_tokens)
    ids, sim = _case(gen, num_tokens, num_experts, top_k)
    static_ids = ids.to(torch.int32).cuda()
    static_sim = sim.to(torch.bfloat16).cuda()
    static_weights = torch.rand(num_tokens, top_k, device="cuda")
    static_primary = torch.zeros(num_experts, dtype=torch.bool, device="cuda") if external_primary else None

    def step():
        return sere.ops.reroute_with_stats(
            static_ids, static_weights, static_sim, num_primary, threshold, static_primary
        )

    graph, (new_ids, new_weights, stats) = capture(step, warmups=1)

    for seed in range(4):  # new contents in place, replay, compare
        ids, sim = _case(torch.Generator().manual_seed(100 + seed), num_tokens, num_experts, top_k)
        static_ids.copy_(ids)
        static_sim.copy_(sim)
        if external_primary:
            mask = torch.rand(num_experts, generator=torch.Generator().manual_seed(seed)) < 0.2
            mask[ids[:, :num_primary].reshape(-1)] = True
            static_primary.copy_(mask)
        graph.replay()
        torch.cuda.synchronize()
        expected_ids, expected_stats = loop_reroute(static_ids, static_sim, num_primary, threshold, static_primary)
        assert new_ids.tolist() == expected_ids, f"replay {seed}"
        assert stats.tolist() == expected_stats, f"replay {seed}"
        assert new_weights.data_ptr() == static_weights.data_ptr()


@pytest.mark.parametrize("repeats", (1, 2000))  # 3 x 2 slots: single block; 6000 x 2: multi-block
def test_out_of_range_ids_are_left_unchanged_and_not_counted(repeats):
    #   E = 4, S = 1, sim = identity.  Invalid ids (7, -1, 9) join no set and never change;
    #   in: [0 | 7]     P = {0, 1} (9 is invalid)     out: [0 | 7]
    #       [1 | -1]                                       [1 | -1]
    #       [9 | 2]     2 -> tie between 0 and 1 -> 0      [9 | 0]
    topk_ids = torch.tensor([[0, 7], [1, -1], [9, 2]], device="cuda").repeat(repeats, 1)
    new_ids, stats = torch.ops.sere.reroute(topk_ids, torch.eye(4, device="cuda"), 1, 0.0, None)
    expected = torch.tensor([[0, 7], [1, -1], [9, 0]]).repeat(repeats, 1)
    assert torch.equal(new_ids.cpu(), expected)
    assert stats.tolist() == [3, 2, 2, repeats, 0]


@pytest.mark.parametrize("repeats", (1, 2000))  # single-block and multi-block paths
def test_nan_similarity_to_p_keeps_the_expert(repeats):
    #   P = {0, 1}; sim[2] = (0.9, NaN, ...): the max over P is NaN -> 2 kept (critical), where
    #   skipping the NaN would pick 0; sim[3] = (-inf, -inf, ...): nothing comparable -> kept;
    #   sim[4] = (0.2, inf, ...) -> 1
    #   in: [0 | 2 3]  [1 | 4 2]   ->   [0 | 2 3]  [1 | 1 2]
    inf, nan = float("inf"), float("nan")
    sim = torch.eye(5)
    sim[2, 0], sim[2, 1], sim[3, 0], sim[3, 1], sim[4, 0], sim[4, 1] = 0.9, nan, -inf, -inf, 0.2, inf
    topk_ids = torch.tensor([[0, 2, 3], [1, 4, 2]], device="cuda").repeat(repeats, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        new_ids, stats = torch.ops.sere.reroute(topk_ids, sim.to(dtype).cuda(), 1, 0.0, None)
        assert new_ids.cpu().tolist() == [[0, 2, 3], [1, 1, 2]] * repeats
        assert stats.tolist() == [5, 4, 2, repeats, 3 * repeats]


def test_primary_mask_matches_reference():
    gen = torch.Generator().manual_seed(5)
    for num_tokens in (1, 64, 4096):
        ids, _ = _case(gen, num_tokens, 128, 8)
        expected = torch.zeros(128, dtype=torch.bool)
        expected[ids[:, :2].reshape(-1)] = True
        for dtype in (torch.int32, torch.int64):
            assert torch.equal(sere.ops.primary_mask(ids.to(dtype).cuda(), 128, 2).cpu(), expected)


def test_too_many_experts_is_a_clear_error():
    num_experts = CUDA_MAX_EXPERTS + 1
    topk_ids = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
    sim = torch.eye(num_experts, device="cuda")
    with pytest.raises(ValueError, match=f"num_experts={num_experts}; the CUDA op supports at most"):
        torch.ops.sere.reroute(topk_ids, sim, 1, 0.0, None)


def test_cuda_checks_name_the_argument():
    topk_ids = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match=r"similarity must be on the device of topk_ids \(cuda:0\), got cpu"):
        torch.ops.sere.reroute(topk_ids, torch.eye(4), 1, 0.0, None)
    with pytest.raises(ValueError, match=r"num_primary must be in \[1, top_k=3\), got 3"):
        torch.ops.sere.reroute(topk_ids, torch.eye(4, device="cuda"), 3, 0.0, None)
