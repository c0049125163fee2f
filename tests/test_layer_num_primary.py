"""Per-layer S (`SereConfig.layer_num_primary`, docs/spec.md §22): the config, the policy layer's
refusal of an unresolved config, and the transformers hook against the loop oracle per layer."""

from pathlib import Path

import pytest
import torch

import oracle  # tests/oracle.py: plain-loop oracles of the policies
from sere.config import SereConfig
from sere.hf.moe import find_moe_blocks, routing_hook
from sere.policy import label, route
from test_hf_moe import _capture_expert_ids, _ids, tiny_moe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_for_layer_takes_the_layers_s_and_drops_the_table():
    cfg = SereConfig.model_validate({"policy": "oea", "num_primary": 4, "layer_num_primary": {"1": 3}})  # JSON keys
    assert cfg.layer_num_primary == {1: 3}
    assert (cfg.for_layer(1).num_primary, cfg.for_layer(0).num_primary, cfg.for_layer(7).num_primary) == (3, 4, 4)
    assert cfg.for_layer(1).layer_num_primary is None and cfg.for_layer(0).layer_num_primary is None
    plain = SereConfig(policy="oea", num_primary=4)
    assert plain.for_layer(1) is plain
    assert label(cfg) == "oea S=4 L1:S=3"


@pytest.mark.parametrize("fields, message", [
    ({"policy": "topk", "layer_num_primary": {1: 3}}, r"layer_num_primary applies to .* not 'topk'"),
    ({"policy": "tuned", "schedule": "s.json", "layer_num_primary": {1: 3}}, r"not 'tuned'"),
    ({"policy": "oea", "layer_num_primary": {1: 0}}, r"layer_num_primary\[1\]=0"),
    ({"policy": "oea", "layer_num_primary": {-1: 2}}, r"layer_num_primary\[-1\]=2"),
])
def test_bad_tables_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SereConfig.model_validate(fields)


def test_checks_against_the_model_name_the_layer_and_value():
    cfg = SereConfig(policy="oea", num_primary=2, layer_num_primary={1: 4})
    with pytest.raises(ValueError, match=r"layer_num_primary\[1\]=4 must be smaller than the model's top_k=4"):
        cfg.check_model(top_k=4, num_experts=8)
    with pytest.raises(ValueError, match=r"names layer\(s\) \[5\], not MoE layers .* \[0, 1\]"):
        SereConfig(policy="oea", layer_num_primary={5: 1}).check_layers([0, 1])


def test_route_refuses_an_unresolved_per_layer_config():
    cfg = SereConfig(policy="oea", num_primary=2, layer_num_primary={0: 1})
    ids, weights = torch.tensor([[0, 1, 2, 3]]), torch.full((1, 4), 0.25)
    with pytest.raises(ValueError, match=r"route with cfg.for_layer\(layer\)"):
        route(cfg, ids, weights, num_experts=8, router_scores=torch.full((1, 8), 0.125))


def test_hf_hook_applies_each_layers_s():
    """Two MoE layers, oea with S=2 except S=1 in layer 1: each layer's dispatched ids are the
    loop oracle's with that layer's own S (the same call with S=2 everywhere differs in layer 1)."""
    model = tiny_moe("qwen3_moe")
    blocks = find_moe_blocks(model)
    assert [b.layer_idx for b in blocks] == [0, 1]
    router_out = {}
    handles = [b.router.register_forward_hook(
        lambda m, a, out, layer=b.layer_idx: router_out.__setitem__(layer, out)) for b in blocks]
    cfg = SereConfig(policy="oea", num_primary=2, layer_num_primary={1: 1})
    with torch.no_grad(), routing_hook(model, cfg):
        seen, more = _capture_expert_ids(model)
        model(_ids(batch=1, seq=3))  # 3 tokens: P of S=1 and S=2 differ
    for h in handles + more:
        h.remove()
    for layer, s in ((0, 2), (1, 1)):
        logits, weights, ids = router_out[layer]
        scores = logits.float().softmax(-1)
        want, _, _, _ = oracle.route(SereConfig(policy="oea", num_primary=s), ids, weights, num_experts=8,
                                     router_scores=scores)
        assert seen[layer].tolist() == want
        other, _, _, _ = oracle.route(SereConfig(policy="oea", num_primary=3 - s), ids, weights, num_experts=8,
                                      router_scores=scores)
        assert other != want  # the case tells the layers apart


def test_hf_hook_refuses_a_layer_the_model_lacks():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"names layer\(s\) \[2\]"):
        with routing_hook(model, SereConfig(policy="oea", num_primary=2, layer_num_primary={2: 1})):
            pass


def test_evaluator_takes_a_layer_table(tmp_path):
    from sere.hf import evaluate

    model = Path(__file__).resolve().parents[1] / "models/tiny-moe"
    common = ["--model", str(model), "--text", str(model / "heldout.txt"), "--batch-size", "2",
              "--seq-len", "4", "--num-batches", "1", "--policy", "oea", "--num-primary", "4", "--threads", "1",
              "--json", str(tmp_path / "eval.json")]
    records = evaluate.main(common + ["--layer-num-primary", "1:3"])
    assert [r["label"] for r in records if r["policy"] == "oea"] == ["oea S=4 L1:S=3"]
    with pytest.raises(ValueError, match=r"layer_num_primary names layer\(s\) \[9\]"):
        evaluate.main(common + ["--layer-num-primary", "9:3"])
    with pytest.raises(SystemExit, match=r"LAYER:S pairs"):
        evaluate.main(common + ["--layer-num-primary", "1-3"])
