"""benchmarks/make_random_moe.py: a tiny build loads in transformers and its sidecars validate."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import torch
import transformers
import safetensors

from sere.sidecars import ERROR_METRIC, ERROR_SIDECAR_NAME, SIDECAR_NAME, load_sidecar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = REPO / "models" / "tiny-moe"
# 8 experts, top-2, hidden 64, 1 layer: seconds instead of the default build's minutes.
TINY_FLAGS = ["--num-experts", "8", "--top-k", "2", "--hidden-size", "64", "--moe-intermediate-size", "32",
              "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "32",
              "--calib-tokens", "256", "--router-logit-std", "2.0", "--threads", "2"]


def _script():
    spec = importlib.util.spec_from_file_location("make_random_moe", REPO / "benchmarks" / "make_random_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random-moe") / "model"
    assert _script().main(["--out", str(out), *TINY_FLAGS]) == out
    return out


def test_config_has_the_requested_shapes_and_the_donor_vocab(built):
    cfg = transformers.AutoConfig.from_pretrained(str(built))
    raw = json.loads((built / "config.json").read_text())
    donor = json.loads((TINY_MOE / "config.json").read_text())
    assert raw["model_type"] == "qwen3_moe" and raw["num_experts"] == 8  # the official configs' key
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size) == (8, 2, 64, 32)
    assert cfg.num_hidden_layers == 1 and cfg.mlp_only_layers == [] and cfg.norm_topk_prob is True
    assert cfg.vocab_size == donor["vocab_size"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (built / name).read_bytes() == (TINY_MOE / name).read_bytes()


def test_index_lists_exactly_the_weights(built):
    """vLLM must read the listed checkpoint, never the sidecars beside it."""
    index = json.loads((built / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert not any(name.startswith("sere_similarity") for name in files)
    names = set()
    for name in files:
        with safetensors.safe_open(str(built / name), framework="pt") as handle:
            names |= set(handle.keys())
    assert names == set(index["weight_map"])
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names  # per-expert (official) format


def test_transformers_loads_and_routes_with_spread(built):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(built))
    ids = tok("def f(x):\n    return x + 1\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and bool(torch.isfinite(logits).all())
    gate = model.model.layers[0].mlp.gate.weight  # [E, d]
    assert gate.std().item() == pytest.approx(2.0 / math.sqrt(64), rel=0.2)  # --router-logit-std 2.0


def test_sidecars_load_and_match_the_model(built):
    similarity = load_sidecar(built / SIDECAR_NAME, num_experts=8, layer_ids=[0], num_layers=1)
    errors = load_sidecar(built / ERROR_SIDECAR_NAME, num_experts=8, layer_ids=[0], num_layers=1)
    assert similarity.metric == "cosine" and errors.metric == ERROR_METRIC
    assert similarity.num_tokens == errors.num_tokens == 256
    sim = similarity.matrix(0)  # [8, 8]
    assert torch.allclose(sim, sim.T, atol=1e-5) and bool(((sim >= 0) & (sim <= 1)).all())


def test_refuses_to_overwrite_without_force(built):
    with pytest.raises(SystemExit):
        _script().main(["--out", str(built), *TINY_FLAGS])
