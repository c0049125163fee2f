"""The shipped upcycled tiny Qwen3-MoE (models/tiny-moe-upcycled): loads, generates, is a real LM,
carries valid SERE sidecars, fits the size budget; and the upcycling split does what its card says."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from shipped_models import model, shipped, tok  # noqa: F401 (fixtures)

from sere.sidecars import load_sidecar

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "tiny-moe-upcycled"
SOURCE_DIR = ROOT / "models" / "tiny-moe"
SIDECARS = {
    "sere_similarity.safetensors": "cosine",
    "sere_similarity.frobenius.safetensors": "frobenius",
    "sere_similarity.cka.safetensors": "cka",
    "sere_similarity.substitution_error.safetensors": "substitution_error",
}
# Measured (transformers 5.19, fp32 from the shipped bf16): held-out ppl of the first 2 x 512-token
# windows of heldout.txt was 69.26 (tiny-moe: 51.99); the bound leaves 10 % for numerical / version drift.
HELDOUT_SLICE_PPL = 69.26
PPL_BOUND = 1.10 * HELDOUT_SLICE_PPL


def test_config_is_qwen3_moe_64_fine_grained_experts():
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["model_type"] == "qwen3_moe" and raw["architectures"] == ["Qwen3MoeForCausalLM"]
    assert raw["num_experts"] == 64 and raw["num_experts_per_tok"] == 8
    assert raw["moe_intermediate_size"] == 32 and raw["norm_topk_prob"] is True
    assert raw["mlp_only_layers"] == [] and raw["decoder_sparse_step"] == 1
    index = json.loads((MODEL_DIR / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}  # loaders skip the sidecars


def test_tokenizer_and_texts_are_tiny_moes(tok):
    for name in ("tokenizer.json", "heldout.txt", "calib.txt"):
        assert (MODEL_DIR / name).read_bytes() == (SOURCE_DIR / name).read_bytes(), name
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_greedy_generate(model, tok):
    ids = tok("def fibonacci(n):\n", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    assert torch.equal(out, model.generate(ids, max_new_tokens=8, do_sample=False))


def test_directory_under_20_mb():
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total < 20_000_000, f"{MODEL_DIR} is {total / 1e6:.2f} MB"


@pytest.mark.parametrize("name,metric", sorted(SIDECARS.items()))
def test_sidecars_validate(model, name, metric):
    path = MODEL_DIR / name
    assert path.is_file(), f"missing sidecar {path}"
    sidecar = load_sidecar(path, num_experts=64, layer_ids=list(range(model.config.num_hidden_layers)))
    assert sidecar.metric == metric
    for layer in range(model.config.num_hidden_layers):
        m = sidecar.matrix(layer)
        assert m.shape == (64, 64) and torch.isfinite(m).all()


def test_heldout_perplexity_finite_and_within_measured_bound(model, tok):
    seq_len, n_windows = 512, 2
    held = torch.tensor(tok((MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")[:60_000])["input_ids"])
    wins = torch.stack([held[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_windows)])  # [W, T+1]
    with torch.no_grad():
        logits = model(wins[:, :-1]).logits.float()  # [W, T, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), wins[:, 1:].reshape(-1))
    ppl = math.exp(loss.item())
    assert math.isfinite(ppl) and ppl < PPL_BOUND, (ppl, HELDOUT_SLICE_PPL)
    calib = torch.tensor(tok((MODEL_DIR / "calib.txt").read_text(encoding="utf-8"))["input_ids"])
    counts = torch.bincount(calib, minlength=len(tok)).double() + 1.0  # add-one unigram
    uni_ppl = math.exp(float(-torch.log(counts / counts.sum())[wins[:, 1:].reshape(-1)].mean()))
    assert ppl < uni_ppl / 4, (ppl, uni_ppl)


def _swiglu(x, gate, up, down):
    """Plain SwiGLU FFN: x [N, H], gate/up [F, H], down [H, F] -> [N, H]."""
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_upcycle_split_reproduces_the_dense_ffn():
    """Hand-checked property of models/upcycle.py: each of the R shuffled partitions of the FFN,
    mixed with weights 1/K (K = F/w experts), gives back the dense FFN; every neuron is in R experts."""
    sys.path.insert(0, str(ROOT / "models"))
    from upcycle import segment_plan, upcycle_layer

    torch.manual_seed(0)
    F, H, w, E = 16, 8, 4, 8  # 4 segments per partition, R = 2 partitions
    gate, up, down = torch.randn(F, H), torch.randn(F, H), torch.randn(H, F)
    gen = torch.Generator().manual_seed(3)
    plan = segment_plan(F, w, E, gen)  # [E, w]
    assert torch.equal(torch.bincount(plan.reshape(-1), minlength=F), torch.full((F,), 2))
    gate_up, new_down = upcycle_layer(torch.cat([gate, up])[None], down[None], plan, 0.0, gen)
    x = torch.randn(5, H)
    dense = _swiglu(x, gate, up, down)
    for part in range(2):
        mixed = torch.zeros_like(dense)
        for e in range(part * 4, part * 4 + 4):  # one whole partition, weight 1/4 each
            mixed += 0.25 * _swiglu(x, gate_up[e, :w], gate_up[e, w:], new_down[e])
        torch.testing.assert_close(mixed, dense, rtol=1e-5, atol=1e-5)
    for e in range(E):  # expert e holds exactly its planned neurons
        torch.testing.assert_close(gate_up[e, :w], gate[plan[e]])
