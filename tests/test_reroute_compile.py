"""The compiled op under torch.library.opcheck and inside torch.compile(fullgraph=True)."""

import pytest
import torch
from oracle import loop_reroute

import sere.ops

pytestmark = [
    pytest.mark.usefixtures("compiled_op"),
    # raised inside torch by opcheck's TorchScript checks, not by this project
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def _sample(num_tokens, num_experts, top_k, id_dtype, sim_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.rand(num_experts, generator=gen) ** 4 + 1e-3  # [E]
    topk_ids = torch.multinomial(popularity.expand(num_tokens, -1), top_k, generator=gen)  # [T, K]
    similarity = torch.rand(num_experts, num_experts, generator=gen).fill_diagonal_(1.0)  # [E, E]
    weights = torch.rand(num_tokens, top_k, generator=gen).softmax(-1)  # [T, K]
    return topk_ids.to(id_dtype), weights, similarity.to(sim_dtype)


SAMPLES = [
    # (T, E, K, S, threshold, ids dtype, sim dtype, external primary)
    (1, 8, 2, 1, 0.0, torch.int64, torch.float32, False),
    (16, 64, 6, 2, 0.3, torch.int32, torch.bfloat16, False),
    (33, 128, 8, 3, 0.7, torch.int64, torch.float16, True),
    (0, 16, 4, 1, 0.0, torch.int32, torch.float32, True),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"T{s[0]}-E{s[1]}-K{s[2]}-S{s[3]}")
def test_opcheck_reroute(sample):
    num_tokens, num_experts, top_k, num_primary, threshold, id_dtype, sim_dtype, external = sample
    topk_ids, _, similarity = _sample(num_tokens, num_experts, top_k, id_dtype, sim_dtype, seed=num_tokens)
    primary = (torch.arange(num_experts) % 3 == 0) if external else None  # [E]
    torch.library.opcheck(torch.ops.sere.reroute.default, (topk_ids, similarity, num_primary, threshold, primary))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_opcheck_primary_mask(id_dtype):
    topk_ids, _, _ = _sample(16, 64, 8, id_dtype, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.sere.primary_mask.default, (topk_ids, 64, 2))


def test_torch_compile_fullgraph():
    def route_step(topk_ids, topk_weights, similarity):
        new_ids, new_weights, stats = sere.ops.reroute_with_stats(topk_ids, topk_weights, similarity, 2, 0.3)
        mask = sere.ops.primary_mask(new_ids, similarity.shape[0], 2)
        return new_ids, new_weights, stats, mask

    compiled = torch.compile(route_step, fullgraph=True, dynamic=True)
    for num_tokens in (4, 17, 64):  # several batch sizes through one dynamic graph
        topk_ids, weights, similarity = _sample(num_tokens, 128, 8, torch.int64, torch.bfloat16, seed=num_tokens)
        new_ids, new_weights, stats, mask = compiled(topk_ids, weights, similarity)
        expected_ids, expected_stats = loop_reroute(topk_ids, similarity, 2, 0.3)
        assert new_ids.tolist() == expected_ids
        assert torch.equal(new_weights, weights)
        assert stats.tolist() == expected_stats
        assert mask.tolist() == [any(e in row[:2] for row in expected_ids) for e in range(128)]
