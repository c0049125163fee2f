"""The shipped tiny Qwen3-MoE (models/tiny-moe) loads in transformers, generates and is a real LM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from shipped_models import model, shipped, tok  # noqa: F401 (fixtures)

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-moe"

def test_config_is_qwen3_moe_64_experts_top8():
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["model_type"] == "qwen3_moe"
    assert raw["architectures"] == ["Qwen3MoeForCausalLM"]
    cfg = transformers.AutoConfig.from_pretrained(str(MODEL_DIR))
    assert cfg.num_experts == 64
    assert cfg.num_experts_per_tok == 8
    assert cfg.norm_topk_prob is True
    assert cfg.head_dim == 64
    assert cfg.num_hidden_layers >= 4
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1  # every layer is MoE


def test_every_layer_is_moe(model):
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert len(blocks) == model.config.num_hidden_layers >= 4
    assert all(b.experts.gate_up_proj.shape[0] == 64 for b in blocks)


def test_tokenizer_special_tokens_and_chat_template(tok):
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_greedy_generate(model, tok):
    ids = tok("def fibonacci(n):\n", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    again = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, again)  # greedy is deterministic


def test_heldout_perplexity_far_below_unigram(model, tok):
    seq_len, n_windows = 512, 2
    held = torch.tensor(tok((MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")[:60_000])["input_ids"])
    assert held.numel() > seq_len * n_windows + 1
    wins = torch.stack([held[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_windows)])  # [W, T+1]
    with torch.no_grad():
        logits = model(wins[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), wins[:, 1:].reshape(-1))
    ppl = math.exp(loss.item())

    calib = torch.tensor(tok((MODEL_DIR / "calib.txt").read_text(encoding="utf-8"))["input_ids"])
    counts = torch.bincount(calib, minlength=len(tok)).double() + 1.0  # add-one smoothing
    uni_ppl = math.exp(float(-torch.log(counts / counts.sum())[wins[:, 1:].reshape(-1)].mean()))
    assert ppl < uni_ppl / 4, (ppl, uni_ppl)


def test_shipped_directory_under_40_mb():
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 40 * 2**20, size
