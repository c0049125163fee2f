"""Lock-step batch-decode evaluation (docs/spec.md §16) on tiny random models."""

import json

import pytest
import torch

import transformers

from test_hf_moe import SAMPLE_TEXT, save_tiny_model, tiny_moe  # noqa: E402

from sere.hf.calibrate import main as calibrate_main  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.hf.evaluate import DEFAULT_OPERATING_POINT, decode_lockstep, evaluate, main, make_batches  # noqa: E402
from sere.hf.moe import find_moe_blocks  # noqa: E402
from sere.sidecars import Sidecar, save_sidecar  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n=2000, seed=0):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def _sidecar(model, value=0.5):
    """A uniform similarity: every non-primary secondary goes to the lowest-id primary."""
    blocks = find_moe_blocks(model)
    e = blocks[0].num_experts
    sim = torch.full((e, e), value)
    sim.fill_diagonal_(1.0)
    return Sidecar(path="mem", matrices={b.layer_idx: sim for b in blocks}, metric="cosine", num_experts=e,
                   num_tokens=0, model_id="t", metadata={})


def test_make_batches_cuts_non_overlapping_windows():
    tokens = torch.arange(100)
    batches = make_batches(tokens, batch_size=3, seq_len=9, num_batches=5)
    #  windows of 10 tokens: [0..9] [10..19] ... [90..99] -> 10 windows -> 3 batches of 3
    assert len(batches) == 3 and batches[0].shape == (3, 10)
    assert batches[1][0, 0] == 30 and batches[2][2, -1] == 89
    with pytest.raises(SystemExit, match="too short for 11 sequences of 10 tokens"):
        make_batches(tokens, batch_size=11, seq_len=9, num_batches=1)
    with pytest.raises(SystemExit, match="--seq-len must be >= 1"):
        make_batches(tokens, batch_size=1, seq_len=0, num_batches=1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_lockstep_decode_with_kv_cache_equals_a_full_forward(family):
    model = tiny_moe(family)
    batch = _tokens()[:4 * 9].view(4, 9)
    logp, distinct, rerouted = decode_lockstep(model, batch, SereConfig(policy="topk"))
    with torch.no_grad():
        full = model(batch[:, :-1]).logits.float().log_softmax(-1)
    torch.testing.assert_close(logp, full, rtol=1e-4, atol=1e-4)
    assert 1 <= distinct <= 8 and rerouted == 0


def test_evaluate_records_quality_and_distinct_experts():
    model = tiny_moe("qwen3_moe", num_experts=16)
    settings = [SereConfig(policy="sere", num_primary=1), SereConfig(policy="oea", num_primary=1),
                SereConfig(policy="sere", num_primary=2, threshold_quantile=0.5)]
    records = evaluate(model, _tokens(), [1, 4], settings, seq_len=6, num_sequences=4,
                       sidecars={"similarity": _sidecar(model)})
    assert [(r["policy"], r["batch_size"]) for r in records] == [
        ("topk", 1), ("sere", 1), ("oea", 1), ("sere", 1), ("topk", 4), ("sere", 4), ("oea", 4), ("sere", 4)]
    for r in records:
        assert r["num_tokens"] == 4 * 6 and r["num_batches"] == 4 // r["batch_size"]
        assert len(r["spread"]["per_batch"]["perplexity"]) == r["num_batches"]
        if r["policy"] == "topk":
            assert r["agreement"] == 1.0 and r["kl"] == 0.0 and r["perplexity_change"] == 0.0
            assert r["distinct_experts"] == r["distinct_experts_topk"]
        else:
            assert r["kl"] > 0 and r["distinct_experts"] < r["distinct_experts_topk"]
    # batch 1, S = 1, every secondary re-routed: one expert per layer per step
    assert records[1]["distinct_experts"] == 1.0 and records[2]["distinct_experts"] == 1.0
    assert records[4]["distinct_experts"] > records[0]["distinct_experts"]  # more tokens, more experts


def test_cli_writes_json_and_png(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "qwen2_moe")
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT)
    calibrate_main(["--model", str(model_dir), "--data", str(text), "--tokens", "200", "--seq-len", "100"])
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    records = main(["--model", str(model_dir), "--text", str(text), "--batch-size", "2", "4",
                    "--policy", "sere", "oea", "--num-primary", "1", "2", "--threshold", "0", "0.6",
                    "--seq-len", "5", "--num-batches", "1", "--json", str(out_json), "--png", str(out_png)])
    data = json.loads(out_json.read_text())
    assert data["meta"]["metric"] == "cosine" and data["meta"]["top_k"] == 4
    # per batch size: topk + oea x 2 + sere x (2 S x 2 rho)
    assert len(data["records"]) == len(records) == 2 * 7
    keys = {"policy", "batch_size", "perplexity", "agreement", "kl", "distinct_experts", "num_primary",
            "threshold", "num_tokens", "spread"}
    assert keys <= set(data["records"][0])
    assert out_png.stat().st_size > 1000


def test_cli_errors(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "qwen3_moe")
    base = ["--model", str(model_dir), "--batch-size", "2", "--json", str(tmp_path / "r.json")]
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match="no text found"):
        main(base + ["--text", str(tmp_path / "empty.txt"), "--policy", "oea", "--num-primary", "1"])
    (tmp_path / "short.txt").write_text("def f(x): return x")
    with pytest.raises(SystemExit, match="too short for 2 sequences"):
        main(base + ["--text", str(tmp_path / "short.txt"), "--policy", "oea", "--num-primary", "1"])
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT[:4000])
    with pytest.raises(SystemExit, match=r"--num-primary 4 must be in \[1, top_k=4\)"):
        main(base + ["--text", str(text), "--policy", "oea", "--num-primary", "4"])
    with pytest.raises(SystemExit, match="similarity sidecar not found"):
        main(base + ["--text", str(text), "--policy", "sere", "--num-primary", "1"])
    other = tmp_path / "other.safetensors"  # a sidecar from a 16-expert model
    save_sidecar(other, {0: torch.eye(16), 1: torch.eye(16)}, metric="cosine", num_tokens=1, model_id="x",
                 num_experts=16)
    with pytest.raises(SystemExit, match="made for a model with 16 experts, this model has 8"):
        main(base + ["--text", str(text), "--policy", "sere", "--num-primary", "1", "--similarity", str(other)])
    three_layers = tmp_path / "three.safetensors"
    save_sidecar(three_layers, {i: torch.eye(8) for i in range(3)}, metric="cosine", num_tokens=1, model_id="x",
                 num_experts=8)
    with pytest.raises(SystemExit, match="has 3 layer matrices, the model has 2 MoE layers"):
        main(base + ["--text", str(text), "--policy", "sere", "--num-primary", "1", "--similarity", str(three_layers)])
    dense_dir = tmp_path / "dense"
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)).save_pretrained(dense_dir)
    with pytest.raises(SystemExit, match="no MoE blocks"):
        main(["--model", str(dense_dir), "--text", str(text), "--batch-size", "2", "--json", str(tmp_path / "r.json")])


def test_default_operating_point_is_valid_for_a_top8_model():
    assert 1 <= DEFAULT_OPERATING_POINT["num_primary"] < 8
    assert 0.0 <= DEFAULT_OPERATING_POINT["threshold"] <= 1.0


def test_cli_sere_err_with_an_error_sidecar(tmp_path):
    from sere.hf.substitution import main as substitution_main

    model_dir = save_tiny_model(tmp_path / "m", "qwen3_moe")
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT)
    substitution_main(["--model", str(model_dir), "--data", str(text), "--tokens", "200", "--seq-len", "100"])
    out_json = tmp_path / "r.json"
    records = main(["--model", str(model_dir), "--text", str(text), "--batch-size", "4", "--policy", "sere-err",
                    "oea", "--num-primary", "1", "--tolerance", "0.5", "1.0", "--renormalize", "--seq-len", "4",
                    "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert data["meta"]["error"].endswith("sere_similarity.substitution_error.safetensors")
    labels = [r["label"] for r in records]
    assert labels == ["topk", "sere-err S=1 tol=0.5 renorm", "sere-err S=1 tol=1.0 renorm", "oea S=1"]
    err = [r for r in records if r["policy"] == "sere-err"]
    assert all(r["renormalize"] and r["distinct_experts"] <= records[0]["distinct_experts"] for r in err)
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--text", str(text), "--batch-size", "4", "--policy", "sere-err",
              "--num-primary", "1", "--tolerance", "1.5", "--json", str(out_json)])


def test_cli_virtual_placement_and_node_limit(tmp_path):
    """--ep-size/--ranks-per-node place the experts virtually; --node-limit routes node-aware under it."""
    model_dir = save_tiny_model(tmp_path / "m", "qwen3_moe")
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT)
    base = ["--model", str(model_dir), "--text", str(text), "--batch-size", "4", "--policy", "oea",
            "--num-primary", "1", "--seq-len", "4", "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):  # argparse error: --node-limit without a placement
        main(base + ["--node-limit", "primary_nodes"])
    records = main(base + ["--ep-size", "4", "--ranks-per-node", "2", "--node-limit", "primary_nodes"])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["ep_size"] == 4 and data["meta"]["ranks_per_node"] == 2
    assert [r["label"] for r in records] == ["topk", "oea S=1 node:node"]
    assert records[1]["node_limit"] == "primary_nodes"
    with pytest.raises(SystemExit, match="--ep-size 3"):  # 8 experts do not split over 3 ranks
        main(base + ["--ep-size", "3"])
