"""benchmarks/moe_grouped.py: the grouped-GEMM MoE layer against the per-expert loop (its spec).

On CPU, torch 2.13 runs `torch._grouped_mm` as a loop over groups (GroupedMMUtils.h
`_grouped_mm_fallback`), so the sorting, offsets, empty groups and combine are checked here with
the real call. The CUTLASS kernel (sm_90/sm_100) and CUDA-graph capture are checked by the `gpu`
tests at the bottom (benchmarks/device_check.sh runs them).
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# bf16 outputs of bf16 GEMMs that may block the sums differently: about 2 ulps of bf16 at |y| ~ 1
ATOL, RTOL = 1e-2, 1.6e-2


@pytest.fixture(scope="module")
def mg():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("moe_grouped")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _layer(num_experts, hidden, width, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = torch.randn(num_experts, 2 * width, hidden, generator=gen, device=device) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, width, generator=gen, device=device) / width**0.5
    return w_gate_up.bfloat16(), w_down.bfloat16()  # [E, 2W, H], [E, H, W]


def _routing(kind, num_tokens, num_experts, top_k, device="cpu", seed=0):
    """([T, K] int32 ids, [T, K] float32 weights summing to 1 per token)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "distinct":  # a router's top-k: K different experts per token
        ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    elif kind == "repeats":  # after re-routing a token may hold one expert in several slots
        ids = torch.randint(0, min(3, num_experts), (num_tokens, top_k), generator=gen)
    else:  # "one": every slot on the last expert, all other groups empty
        ids = torch.full((num_tokens, top_k), num_experts - 1)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return ids.to(torch.int32).to(device), (weights / weights.sum(dim=1, keepdim=True)).to(device)


def test_sort_by_expert_golden(mg):
    # topk_ids      slot = t * K + k     sorted by expert (stable)    offs = end of each group
    #   t0: [3, 1]    0 -> 3, 1 -> 1      e0: slot 3                    e0 1, e1 3, e2 3 (empty),
    #   t1: [1, 0]    2 -> 1, 3 -> 0      e1: slots 1, 2   e3: slot 0   e3 4, e4 4 (empty)
    order, offs = mg.sort_by_expert(torch.tensor([[3, 1], [1, 0]], dtype=torch.int32), num_experts=5)
    assert order.tolist() == [3, 1, 2, 0]
    assert offs.dtype == torch.int32 and offs.tolist() == [1, 3, 3, 4, 4]


@pytest.mark.parametrize("kind", ["distinct", "repeats", "one"])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (2, 16, 4), (7, 16, 8), (33, 64, 8)])
def test_grouped_matches_loop(mg, kind, num_tokens, num_experts, top_k):
    hidden, width = 64, 32
    w_gate_up, w_down = _layer(num_experts, hidden, width)
    ids, weights = _routing(kind, num_tokens, num_experts, top_k)
    # untouched experts' weights are NaN: a slot computed in the wrong expert's group would show
    untouched = torch.ones(num_experts, dtype=torch.bool)
    untouched[ids.long().flatten()] = False
    w_gate_up[untouched], w_down[untouched] = float("nan"), float("nan")
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()  # [T, H]
    got = mg.grouped_moe(x, w_gate_up, w_down, ids, weights)
    want = mg.moe_loop_reference(x, w_gate_up, w_down, ids, weights)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert want.isfinite().all() and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_grouped_matches_loop_at_model_widths_int64_ids(mg):
    """Qwen3-30B-A3B hidden and expert widths (16 experts here, to keep the CPU test small)."""
    w_gate_up, w_down = _layer(16, 2048, 768)
    ids, weights = _routing("distinct", 3, 16, 8)
    x = torch.randn(3, 2048, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = mg.grouped_moe(x, w_gate_up, w_down, ids.long(), weights)
    torch.testing.assert_close(got, mg.moe_loop_reference(x, w_gate_up, w_down, ids, weights), atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_cuda_path_refuses_without_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_moe_layer")
    with pytest.raises(SystemExit, match="no CUDA device visible"):
        bench.main(["--device", "cuda", "--batch-sizes", "1"])


def _needs_grouped_kernel():
    if not torch.cuda.is_available():
        return False  # the `gpu` marker skips these (tests/conftest.py)
    return torch.cuda.get_device_capability()[0] not in (9, 10)


needs_sm90 = pytest.mark.skipif(
    _needs_grouped_kernel(),
    reason="needs a CUDA GPU of sm_90/sm_100 (H100/H200/B200): torch._grouped_mm's CUTLASS kernel; "
    "elsewhere it falls back to a host-synchronising loop",
)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("kind", ["distinct", "repeats", "one"])
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_grouped_matches_loop_cuda_model_shapes(mg, kind, num_tokens):
    w_gate_up, w_down = _layer(128, 2048, 768, device="cuda")
    ids, weights = _routing(kind, num_tokens, 128, 8, device="cuda")
    x = torch.randn(num_tokens, 2048, device="cuda").bfloat16()
    got = mg.grouped_moe(x, w_gate_up, w_down, ids, weights)
    torch.testing.assert_close(got, mg.moe_loop_reference(x, w_gate_up, w_down, ids, weights), atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
@needs_sm90
def test_grouped_moe_cuda_graph_reads_routing_at_replay(mg):
    """One capture, then new ids copied into its static buffer: the replay follows them."""
    w_gate_up, w_down = _layer(128, 2048, 768, device="cuda")
    x = torch.randn(16, 2048, device="cuda").bfloat16()  # [T, H]
    ids, weights = _routing("distinct", 16, 128, 8, device="cuda")  # static buffers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mg.grouped_moe(x, w_gate_up, w_down, ids, weights)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mg.grouped_moe(x, w_gate_up, w_down, ids, weights)
    for kind, seed in [("distinct", 0), ("distinct", 5), ("repeats", 1), ("one", 0)]:
        new_ids, new_weights = _routing(kind, 16, 128, 8, device="cuda", seed=seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        graph.replay()
        want = mg.moe_loop_reference(x, w_gate_up, w_down, new_ids, new_weights)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{kind} seed {seed}: {m}")
