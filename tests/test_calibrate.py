"""Calibration of the similarity sidecar: formulas (docs/spec.md §14), streaming, every
family, twin experts, and the CLI."""

import subprocess
import sys

import pytest
import torch

import transformers

from test_hf_moe import FAMILIES, SAMPLE_TEXT, save_tiny_model, tiny_moe  # noqa: E402

from sere.hf.calibrate import calibrate, main, similarity_matrix  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.hf.moe import find_moe_blocks, routing_hook, run_expert  # noqa: E402
from sere.sidecars import SIDECAR_NAME, load_sidecar  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(block, x):
    """The three metrics straight from the spec, holding all E x N x d outputs (float64)."""
    y = torch.stack([run_expert(block, i, x) for i in range(block.num_experts)]).double()  # [E, N, d]
    cos = torch.nn.functional.cosine_similarity(y[:, None], y[None], dim=-1).mean(-1)
    dist = torch.cdist(y.flatten(1)[None], y.flatten(1)[None])[0]
    yc = y - y.mean(1, keepdim=True)
    e = block.num_experts
    num = torch.stack([torch.stack([(yc[j].T @ yc[i]).norm() ** 2 for j in range(e)]) for i in range(e)])
    out = {"cosine": (cos + 1) / 2, "frobenius": 1 - dist / dist.max(),
           "cka": num / (num.diagonal()[:, None] * num.diagonal()[None]).sqrt()}
    for sim in out.values():
        sim.fill_diagonal_(1.0)
    return {k: v.float() for k, v in out.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # CKA in hidden space (I < d) / output space
def test_streamed_statistics_match_the_spec_formulas(family):
    block = find_moe_blocks(tiny_moe(family))[0]
    x = torch.randn(150, 32) + 0.3
    with torch.no_grad():
        expected = _brute_force(block, x)
    for metric, sim in expected.items():
        # chunks of 32 tokens (last one partial); CKA also in several row-block passes
        got = similarity_matrix(block, x, metric, chunk_tokens=32, cka_memory_bytes=3 * 8 * 8 * 64 * 64)
        torch.testing.assert_close(got, sim, rtol=0, atol=2e-5, msg=metric)
        assert torch.equal(got.diagonal(), torch.ones(8))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_calibrates_every_moe_layer(family):
    model = tiny_moe(family)
    tokens = torch.randint(3, 320, (96,), generator=torch.Generator().manual_seed(0))
    matrices, num_tokens = calibrate(model, tokens, "cosine", chunk_tokens=40, seq_len=32)
    assert num_tokens == 96
    assert sorted(matrices) == [b.layer_idx for b in find_moe_blocks(model)]
    for sim in matrices.values():
        assert sim.shape == (8, 8) and sim.dtype == torch.float32
        assert torch.equal(sim.diagonal(), torch.ones(8))
        assert float(sim.min()) >= 0.0 and float(sim.max()) <= 1.0
        torch.testing.assert_close(sim, sim.T, rtol=0, atol=1e-6)


def _twin_model():
    """16 experts, top-4. Expert 1 is a copy of expert 0 in every layer. Expert 0's router row is
    scaled up (it is often a token's first choice) and expert 1's is 0.99 x expert 0's, so the
    tokens that pick expert 0 first pick its twin next, as a secondary outside the primary set."""
    model = tiny_moe("qwen3_moe", num_experts=16)
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.experts.gate_up_proj[1] = b.experts.gate_up_proj[0]
            b.experts.down_proj[1] = b.experts.down_proj[0]
            b.router.weight[0] *= 3.0
            b.router.weight[1] = 0.99 * b.router.weight[0]
    return model


def test_twin_experts_have_similarity_one_and_rerouting_between_them_is_exact():
    model = _twin_model()
    tokens = torch.randint(3, 320, (128,), generator=torch.Generator().manual_seed(0))
    sims = {}
    for metric in ("cosine", "frobenius", "cka"):
        sims[metric], _ = calibrate(model, tokens, metric, chunk_tokens=50, seq_len=64)
        for layer, sim in sims[metric].items():
            assert sim[0, 1] == pytest.approx(1.0, abs=1e-4), (metric, layer)
            off = sim[~torch.eye(16, dtype=torch.bool)]
            assert float(off.sort().values[-3]) < 0.999, "only the twin pair is near 1"
    ids = tokens[:24].view(3, 8)
    with torch.no_grad():
        plain = model(ids).logits
        for metric, matrices in sims.items():
            # rho = 0.999: only the twin pair may re-route, every other secondary is kept
            cfg = SereConfig(policy="sere", num_primary=1, threshold=0.999)
            with routing_hook(model, cfg, matrices=matrices) as record:
                rerouted = model(ids).logits
            assert record.rerouted_slots() > 0, metric
            torch.testing.assert_close(rerouted, plain, rtol=1e-5, atol=1e-5, msg=metric)


def test_cli_writes_a_loadable_sidecar_with_metadata(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "olmoe")
    data = tmp_path / "calib"
    data.mkdir()
    (data / "a.txt").write_text(SAMPLE_TEXT[:3000])
    (data / "b.txt").write_text(SAMPLE_TEXT[3000:6000])
    (data / "junk.bin").write_bytes(bytes([0xFF, 0xFE, 0x00]) * 10)  # not UTF-8: skipped
    path = main(["--model", str(model_dir), "--data", str(data), "--metric", "cka", "--tokens", "300",
                 "--chunk-tokens", "64", "--seq-len", "100"])
    assert path == model_dir / SIDECAR_NAME
    sidecar = load_sidecar(model_dir, num_experts=8, layer_ids=[0, 1])
    assert sidecar.metric == "cka" and sidecar.num_tokens == 300 and sidecar.model_id == "m"
    out = tmp_path / "sere_similarity.cosine.safetensors"
    main(["--model", str(model_dir), "--data", str(data / "a.txt"), "--tokens", "100", "--out", str(out)])
    assert load_sidecar(out).metric == "cosine"


def test_cli_as_a_module_reports_progress_on_stderr(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "mixtral")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT[:2000])
    proc = subprocess.run(
        [sys.executable, "-m", "sere.calibrate", "--model", str(model_dir), "--data", str(tmp_path / "c.txt"),
         "--metric", "frobenius", "--tokens", "128", "--chunk-tokens", "32", "--seq-len", "64", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer 1 frobenius: chunk 4/4" in proc.stderr and "wrote" in proc.stderr
    assert load_sidecar(model_dir).metric == "frobenius"


def test_cli_errors(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SystemExit, match="no text found"):
        main(["--model", str(model_dir), "--data", str(tmp_path / "empty.txt")])
    with pytest.raises(SystemExit, match="text path not found"):
        main(["--model", str(model_dir), "--data", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--model", str(tmp_path), "--data", str(tmp_path / "empty.txt")])
    dense_dir = tmp_path / "dense"
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)).save_pretrained(dense_dir)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(dense_dir)
    with pytest.raises(SystemExit, match="no MoE blocks"):
        main(["--model", str(dense_dir), "--data", str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="metric='l2' is unknown"):
        similarity_matrix(find_moe_blocks(tiny_moe())[0], torch.randn(4, 32), "l2")


def _substitution_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "substitution_test.py"
    spec = importlib.util.spec_from_file_location("substitution_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_substitution_errors_match_brute_force_and_twins_cost_nothing():
    sub = _substitution_module()
    model = _twin_model()
    block = find_moe_blocks(model)[0]
    x = torch.randn(90, 32)
    topk_ids = torch.randint(0, 16, (90, 4), generator=torch.Generator().manual_seed(0))
    err, count = sub.substitution_error(block, x, topk_ids, chunk_tokens=40)
    with torch.no_grad():
        y = torch.stack([run_expert(block, i, x) for i in range(16)]).double()  # [E, N, d]
    for i, j in [(2, 5), (7, 3)]:
        routed = (topk_ids == i).any(1)
        expected = ((y[i] - y[j]) ** 2).sum(-1)[routed].sum() / (y[i] ** 2).sum(-1)[routed].sum()
        assert float(err[i, j]) == pytest.approx(float(expected), rel=1e-6)
        assert int(count[i]) == int(routed.sum())
    assert float(err[1, 0]) == pytest.approx(0.0, abs=1e-6)
    sim = torch.eye(16)
    sim[1, 0] = sim[0, 1] = 0.9  # the twins are each other's nearest neighbour
    report = sub.layer_report(err, count, {"cosine": sim})
    assert report["per_expert"]["cosine"][1] == pytest.approx(0.0, abs=1e-6)
    assert report["summary"]["drop"]["mean"] == 1.0
    assert report["nearest"]["cosine"]["beats_drop"] > 0
