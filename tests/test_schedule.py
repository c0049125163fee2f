"""Schedules (sere/schedule.py, docs/spec.md §20): validation, and which bucket a step uses.

Every case is written out by hand: the bucket edges, the configs, the messages' file and bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import oracle
from sere.config import SereConfig
from sere.policy import route
from sere.schedule import BUCKETS, FORMAT, ScheduleError, load_schedule, save_schedule

E, K = 16, 4
EDGES = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, None)]


def _body(configs: list[dict], **extra) -> dict:
    """A schedule file's body for a 16-expert top-4 model with 2 MoE layers."""
    return {"format": FORMAT, "model_id": "toy", "num_experts": E, "top_k": K, "num_layers": 2,
            "model_shape": {"hidden_size": 32}, **extra,
            "buckets": [{"min_tokens": lo, "max_tokens": hi, "config": c} for (lo, hi), c in zip(EDGES, configs)]}


def _write(tmp_path: Path, body) -> Path:
    path = tmp_path / "sere_schedule.json"
    path.write_text(json.dumps(body))
    return path


# bucket i -> OEA with S = 1 + i % 3: the bucket a step lands in shows in its num_primary
BY_BUCKET = [{"policy": "oea", "num_primary": 1 + i % 3} for i in range(7)]


def test_buckets_are_the_documented_edges():
    assert list(BUCKETS) == EDGES


@pytest.mark.parametrize("tokens, bucket", [
    (0, 0), (1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 3), (17, 4), (32, 4), (33, 5),
    (64, 5), (65, 6), (256, 6), (10_000, 6),
])
def test_at_picks_the_bucket_of_the_step_size(tmp_path, tokens, bucket):
    cfg = SereConfig(policy="tuned", schedule=str(_write(tmp_path, _body(BY_BUCKET))))
    applied = cfg.at(tokens)
    assert (applied.policy, applied.num_primary) == ("oea", 1 + bucket % 3)
    assert SereConfig(policy="oea").at(tokens) == SereConfig(policy="oea")  # not tuned: itself


def test_route_applies_the_bucket_config_of_step_tokens(tmp_path):
    """The same 4 tokens routed as steps of 1, 6, 12 and 40 tokens (step_tokens: e.g. an EP
    group's total) follow buckets 0, 2, 3 and 5: OEA with S = 1, 3, 1, 3, as the plain-loop
    oracle of tests/oracle.py gives it."""
    cfg = SereConfig(policy="tuned", schedule=str(_write(tmp_path, _body(BY_BUCKET))))
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, E, generator=gen)
    scores = logits.softmax(-1)
    weights, ids = scores.topk(K, dim=-1)
    for step_tokens, num_primary in ((1, 1), (6, 3), (12, 1), (40, 3)):
        got = route(cfg, ids, weights, num_experts=E, router_scores=scores, step_tokens=step_tokens)
        want = oracle.oea(*oracle.sort_slots(ids, weights), scores, num_primary)
        assert got.ids.tolist() == want.ids, (step_tokens, num_primary)
        assert int(got.stats[2]) == len({e for row in oracle.as_rows(ids) for e in row[:num_primary]})


def test_a_good_schedule_loads_with_one_config_per_bucket(tmp_path):
    schedule = load_schedule(_write(tmp_path, _body(BY_BUCKET)))
    assert [c.num_primary for c in schedule.configs] == [1, 2, 3, 1, 2, 3, 1]
    schedule.check_model(num_experts=E, top_k=K, num_layers=2, shape={"hidden_size": 32})


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.update(format="sere-schedule/0"), r"format is 'sere-schedule/0', expected 'sere-schedule/1'"),
    (lambda b: b.pop("top_k"), r"missing field 'top_k'"),
    (lambda b: b["buckets"].pop(), r"'buckets' must list 7 buckets"),
    (lambda b: b["buckets"][2].update(max_tokens=7), r"bucket 2 \(5-8 tokens\): min_tokens/max_tokens must be 5/8"),
    (lambda b: b["buckets"][6].update(max_tokens=128), r"bucket 6 \(65-inf tokens\): min_tokens/max_tokens"),
    (lambda b: b["buckets"][3].update(config={"policy": "oea", "num_primary": 4}),
     r"bucket 3 \(9-16 tokens\): num_primary=4 must be smaller than the model's top_k=4"),
    (lambda b: b["buckets"][4].update(config={"policy": "oea", "num_primry": 1}),
     r"bucket 4 \(17-32 tokens\): bad config: num_primry: Extra inputs are not permitted"),
    (lambda b: b["buckets"][5].update(config={"policy": "tuned"}), r"bucket 5 \(33-64 tokens\): .*may not be 'tuned'"),
    (lambda b: b["buckets"][1].update(config={"policy": "sere", "num_primary": 1, "threshold_quantile": 0.5}),
     r"bucket 1 \(2-4 tokens\): .*threshold_quantile"),
    (lambda b: b["buckets"][2].update(config={"policy": "oea", "num_primary": 1, "layer_num_primary": {0: 2}}),
     r"bucket 2 \(5-8 tokens\): .*layer_num_primary"),
    (lambda b: (b["buckets"][0].update(config={"policy": "sere", "num_primary": 1}),
                b["buckets"][1].update(config={"policy": "sere-err", "num_primary": 1})),
     r"buckets read different sidecars \['similarity', 'substitution_error'\]"),
    (lambda b: b.update(model_shape={"hidden_size": "32"}), r"'model_shape' must map config fields to integers"),
])
def test_a_bad_schedule_is_refused_naming_the_file_and_bucket(tmp_path, mutate, message):
    body = _body(BY_BUCKET)
    mutate(body)
    path = _write(tmp_path, body)
    with pytest.raises(ScheduleError, match=message) as err:
        load_schedule(path)
    assert str(path) in str(err.value)


def test_a_missing_or_unreadable_schedule_names_the_file(tmp_path):
    with pytest.raises(ScheduleError, match=rf"{tmp_path / 'none.json'}: no such schedule file"):
        load_schedule(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ScheduleError, match=r"bad\.json: not valid JSON"):
        load_schedule(tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="no such schedule file"):
        SereConfig(policy="tuned", schedule=str(tmp_path / "gone.json")).at(1)


@pytest.mark.parametrize("model, message", [
    (dict(num_experts=32, top_k=K, num_layers=2), "made for num_experts=16 .*this model has num_experts=32"),
    (dict(num_experts=E, top_k=2, num_layers=2), "made for top_k=4 .*this model has top_k=2"),
    (dict(num_experts=E, top_k=K, num_layers=3), "made for num_layers=2 .*this model has num_layers=3"),
    (dict(num_experts=E, top_k=K, num_layers=2, shape={"hidden_size": 64}),
     "made for hidden_size=32 .*this model has hidden_size=64"),
])
def test_another_models_schedule_is_refused(tmp_path, model, message):
    path = _write(tmp_path, _body(BY_BUCKET))
    with pytest.raises(ScheduleError, match=message) as err:
        load_schedule(path).check_model(**model)
    assert str(path) in str(err.value) and "'toy'" in str(err.value)


def test_sereconfig_check_model_reads_the_schedule(tmp_path):
    cfg = SereConfig(policy="tuned", schedule=str(_write(tmp_path, _body(BY_BUCKET))))
    cfg.check_model(top_k=K, num_experts=E)
    with pytest.raises(ValueError, match="num_experts=16"):
        cfg.check_model(top_k=K, num_experts=8)
    with pytest.raises(ValueError, match="schedule=.* needs policy='tuned'"):
        SereConfig(policy="oea", schedule="x.json")


def test_save_schedule_round_trips_and_never_leaves_a_bad_file(tmp_path):
    entries = [{"config": c, "label": f"b{i}"} for i, c in enumerate(BY_BUCKET)]
    path = save_schedule(tmp_path / "s.json", model_id="toy", num_experts=E, top_k=K, num_layers=2,
                         buckets=entries, command="sere tune ...")
    body = json.loads(path.read_text())
    assert [(b["min_tokens"], b["max_tokens"], b["label"]) for b in body["buckets"]] == [
        (lo, hi, f"b{i}") for i, (lo, hi) in enumerate(EDGES)]
    assert body["command"] == "sere tune ..." and load_schedule(path).configs[2].num_primary == 3
    bad = entries[:3] + [{"config": {"policy": "oea", "num_primary": 9}}] + entries[4:]
    with pytest.raises(ScheduleError, match=r"bucket 3 \(9-16 tokens\)"):
        save_schedule(tmp_path / "t.json", model_id="toy", num_experts=E, top_k=K, num_layers=2, buckets=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# ---------------------------------------------------------------- the vLLM engine-start checks


def _vllm_config(model_dir: Path, sere: dict, **shape):
    """What `validate_engine_config` reads of vLLM's config, for a 16-expert top-4 Qwen3-MoE-like model
    with 2 decoder layers (both MoE)."""
    from types import SimpleNamespace

    text = SimpleNamespace(num_experts=E, num_experts_per_tok=K, num_hidden_layers=2, decoder_sparse_step=1,
                           mlp_only_layers=[], hidden_size=32, **shape)
    model = SimpleNamespace(model=str(model_dir), hf_overrides={"sere": sere}, hf_text_config=text)
    return SimpleNamespace(model_config=model, additional_config={})


def test_engine_tuned_without_schedule_follows_the_models_own(tmp_path, monkeypatch):
    from sere.vllm.engine_config import config_from_vllm, validate_engine_config

    monkeypatch.delenv("SERE_RECORD", raising=False)
    with pytest.raises(ValueError, match=rf"follows {tmp_path / 'sere_schedule.json'}, which does not exist"):
        config_from_vllm(_vllm_config(tmp_path, {"policy": "tuned"}))
    _write(tmp_path, _body(BY_BUCKET))
    cfg = validate_engine_config(_vllm_config(tmp_path, {"policy": "tuned"}))
    assert cfg.schedule == str(tmp_path / "sere_schedule.json") and cfg.at(6).num_primary == 3
    with pytest.raises(ValueError, match="not a local model directory|is not one"):
        config_from_vllm(_vllm_config(tmp_path / "hub-id", {"policy": "tuned"}))


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=3), "made for num_layers=2 .*this model has num_layers=3"),
    (dict(mlp_only_layers=[1]), "made for num_layers=2 .*this model has num_layers=1"),
    (dict(hidden_size=64), "made for hidden_size=32 .*this model has hidden_size=64"),
    (dict(num_experts=32), "num_experts=16"),
])
def test_engine_start_refuses_another_models_schedule(tmp_path, monkeypatch, change, message):
    from sere.vllm.engine_config import validate_engine_config

    monkeypatch.delenv("SERE_RECORD", raising=False)
    path = _write(tmp_path, _body(BY_BUCKET))
    vllm_config = _vllm_config(tmp_path, {"policy": "tuned", "schedule": str(path)})
    for key, value in change.items():
        setattr(vllm_config.model_config.hf_text_config, key, value)
    with pytest.raises(ValueError, match=message) as err:
        validate_engine_config(vllm_config)
    assert str(path) in str(err.value)
