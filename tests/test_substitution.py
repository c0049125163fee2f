"""Calibration of the substitution error sidecar (docs/spec.md §9): brute force, twin
experts, streaming, and the CLI."""

import pytest
import torch

import transformers

from test_hf_moe import SAMPLE_TEXT, save_tiny_model, tiny_moe  # noqa: E402

from sere.hf.calibrate import capture_layer_inputs  # noqa: E402
from sere.hf.moe import find_moe_blocks, run_expert  # noqa: E402
from sere.sidecars import ERROR_METRIC, load_sidecar  # noqa: E402
from sere.hf.substitution import ERROR_SIDECAR_NAME, main, substitution_error  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(block, x, topk_ids):
    """err[i, j] straight from the definition, one pair at a time (float64)."""
    y = torch.stack([run_expert(block, i, x) for i in range(block.num_experts)]).double()  # [E, N, d]
    e = block.num_experts
    err = torch.ones(e, e, dtype=torch.float64)
    for i in range(e):
        rows = (topk_ids == i).any(1)  # tokens routed to i
        if not rows.any():
            continue
        den = (y[i, rows] ** 2).sum()
        for j in range(e):
            err[i, j] = ((y[i, rows] - y[j, rows]) ** 2).sum() / den
    err.fill_diagonal_(0.0)
    return err.float()


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_matches_brute_force(chunk_tokens):
    block = find_moe_blocks(tiny_moe())[0]
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        topk_ids = block.router(x)[2].long()  # [N, K]
    err, count = substitution_error(block, x, topk_ids, chunk_tokens)
    torch.testing.assert_close(err, _brute_force(block, x, topk_ids), rtol=1e-4, atol=1e-5)
    assert count.tolist() == [int((topk_ids == i).any(1).sum()) for i in range(block.num_experts)]
    assert (err.diagonal() == 0).all()


def test_hand_computed_case(monkeypatch):
    # token 0 routed to experts {0, 1}, token 1 to {1} (a duplicate slot counts once);
    # expert outputs (d = 1, stubbed):
    #           token0 token1
    #   Y_0:      1      3
    #   Y_1:      2      5
    # err[0, 1] = (1-2)^2 / 1^2 = 1
    # err[1, 0] = ((2-1)^2 + (5-3)^2) / (2^2 + 5^2) = 5 / 29
    import sere.hf.substitution as sub

    block = find_moe_blocks(tiny_moe(num_experts=2, top_k=2))[0]
    outputs = torch.tensor([[[1.0], [3.0]], [[2.0], [5.0]]])  # [E, N, d]
    monkeypatch.setattr(sub, "run_experts", lambda b, x: outputs)
    err, count = substitution_error(block, torch.zeros(2, 32), torch.tensor([[0, 1], [1, 1]]), 2)
    assert count.tolist() == [1, 2]
    assert err[0, 1].item() == pytest.approx(1.0)
    assert err[1, 0].item() == pytest.approx(5 / 29)
    assert err.diagonal().tolist() == [0.0, 0.0]


def test_identical_experts_have_zero_error_between_them():
    model = tiny_moe()
    block = find_moe_blocks(model)[0]
    with torch.no_grad():
        block.experts.gate_up_proj[3] = block.experts.gate_up_proj[5]
        block.experts.down_proj[3] = block.experts.down_proj[5]
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
        topk_ids = block.router(x)[2].long()
    err, count = substitution_error(block, x, topk_ids, 16)
    assert count[3] > 0 and count[5] > 0
    assert err[3, 5].item() == pytest.approx(0.0, abs=1e-5)
    assert err[5, 3].item() == pytest.approx(0.0, abs=1e-5)
    assert err[3, 0].item() > 0.01


def test_unrouted_expert_costs_like_dropping():
    block = find_moe_blocks(tiny_moe())[0]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    topk_ids = torch.tensor([[0, 1, 2, 3]] * 6)
    err, count = substitution_error(block, x, topk_ids)
    assert count[4:].eq(0).all()
    off = ~torch.eye(8, dtype=torch.bool)
    assert err[4:][off[4:]].eq(1.0).all()


def test_capture_then_calibrate_uses_the_router_choice():
    model = tiny_moe()
    blocks = find_moe_blocks(model)
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0))
    captured = capture_layer_inputs(model, blocks, ids, seq_len=20)
    x, topk_ids = captured[blocks[1].layer_idx]
    err, _ = substitution_error(blocks[1], x, topk_ids, 7)
    torch.testing.assert_close(err, _brute_force(blocks[1], x, topk_ids), rtol=1e-4, atol=1e-5)


def test_cli_writes_a_loadable_error_sidecar(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m")
    data = tmp_path / "calib.txt"
    data.write_text(SAMPLE_TEXT)
    path = main(["--model", str(model_dir), "--data", str(data), "--tokens", "128", "--seq-len", "32",
                 "--chunk-tokens", "50", "--threads", "1"])
    assert path == model_dir / ERROR_SIDECAR_NAME
    sidecar = load_sidecar(path)
    assert sidecar.metric == ERROR_METRIC and sidecar.num_tokens == 128
    assert set(sidecar.matrices) == {0, 1}
    for err in sidecar.matrices.values():
        assert (err.diagonal() == 0).all() and (err >= 0).all()
