"""`sere tune` (sere/tune.py, sere/hf/tune.py; docs/spec.md §20): the selection rule on
hand-made measurements, the candidate grid, and a tune + `sere evaluate --schedule` run on a
tiny random model."""

from __future__ import annotations

import json
import math

import pytest

from sere.cli import main as cli_main
from sere.config import SereConfig
from sere.hf.evaluate import main as evaluate_main
from sere.schedule import SCHEDULE_NAME, load_schedule
from sere.tune import BUCKET_SIZES, candidates, qualifies, select

from test_hf_moe import SAMPLE_TEXT, save_tiny_model  # noqa: E402

Z95 = 1.6448536269514715  # the one-sided 95% normal quantile


def _row(label: str, policy: str, *sizes: tuple[float, float, float]) -> dict:
    """A measured candidate: (distinct, increase, increase_se) per measured batch size."""
    return {"label": label, "config": {"policy": policy},
            "sizes": [{"batch_size": b, "distinct": d, "increase": i, "increase_se": s}
                      for b, (d, i, s) in enumerate(sizes, start=1)]}


# bound = increase + z * se; target 1%
TABLE = [
    _row("topk", "topk", (8.0, 0.0, 0.0)),
    _row("oea S=1", "oea", (2.0, 0.05, 0.001)),          # bound 5.2%: out
    _row("oea S=2", "oea", (3.0, 0.006, 0.003)),         # bound 1.09% at z=1.645 (out), 0.9% at z=1 (in)
    _row("oea S=4", "oea", (5.0, 0.002, 0.001)),         # bound 0.36%: in
    _row("sere-err budget", "sere-err", (5.0, 0.001, 0.001)),  # bound 0.26%: in, same experts as oea S=4
    _row("two sizes", "xshare", (2.5, 0.001, 0.0), (3.5, 0.02, 0.0)),  # mean 3 experts, but 2% at size 2
    _row("noisy", "oea", (1.0, -0.02, 0.05)),           # bound 6.2%: a negative mean does not qualify it
]


def test_qualifies_is_the_upper_bound_at_every_size():
    assert not qualifies(_row("never measured", "oea"), 0.01, Z95)
    assert [qualifies(r, 0.01, Z95) for r in TABLE] == [True, False, False, True, True, False, False]
    assert [qualifies(r, 0.01, 1.0) for r in TABLE] == [True, False, True, True, True, False, False]
    assert qualifies(_row("topk", "topk", (8.0, 0.5, 0.5)), 0.01, Z95)  # topk always


def test_select_takes_the_fewest_experts_then_the_smaller_bound():
    assert select(TABLE, 0.01, Z95)["label"] == "sere-err budget"  # ties oea S=4 on experts, lower bound
    assert select(TABLE, 0.01, 1.0)["label"] == "oea S=2"  # 3 experts, within at z = 1
    assert select(TABLE, 0.0001, Z95)["label"] == "topk"  # nothing else is that good
    assert select(TABLE, 0.06, Z95)["label"] == "oea S=1"  # 2 experts (bound 5.16%); noisy (6.2%) fails
    assert select(TABLE, 0.1, Z95)["label"] == "noisy"  # 1 expert, bound 6.2%


def test_select_breaks_full_ties_by_row_order_and_needs_topk():
    twins = [_row("topk", "topk", (8.0, 0.0, 0.0)), _row("a", "oea", (4.0, 0.001, 0.0)),
             _row("b", "oea", (4.0, 0.001, 0.0))]
    assert select(twins, 0.01, Z95)["label"] == "a"
    with pytest.raises(ValueError, match="topk row"):
        select(twins[1:], 0.01, Z95)


def test_candidates_of_a_top8_bucket():
    rows = candidates(8, 40.0, ("oea", "sere-err", "xshare"))
    labels = [r["label"] for r in rows]
    # budgets: round(0.4, 0.55, 0.7, 0.85 x 40) = 16, 22, 28, 34
    assert labels == (["topk"] + [f"oea S={s}" for s in range(1, 8)]
                      + ["sere-err S=2 tol=0.6 renorm", "sere-err S=4 tol=0.6 renorm"]
                      + [f"sere-err S=1 budget={d} refill" for d in (16, 22, 28, 34)]
                      + [f"xshare S=1 budget={d}" for d in (16, 22, 28, 34)])
    for row in rows:
        SereConfig(**row["config"]).check_model(top_k=8, num_experts=64)  # every one is a valid config
    assert rows[-5]["config"] == {"policy": "sere-err", "num_primary": 1, "tolerance": 0.6, "renormalize": True,
                                  "keep_cost": 0.0, "max_distinct": 34, "refill": True}
    assert [r["label"] for r in candidates(8, 40.0, ("oea",))] == labels[:8]


def test_bucket_sizes_are_the_edges_of_the_buckets():
    assert BUCKET_SIZES == ((1,), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny random Qwen3-MoE (8 experts, top-4), its substitution sidecar, and `sere tune`."""
    from sere.hf.substitution import main as substitution_main

    tmp = tmp_path_factory.mktemp("tune")
    model_dir = save_tiny_model(tmp / "m", "qwen3_moe")
    text = tmp / "calib.txt"
    text.write_text(SAMPLE_TEXT)
    substitution_main(["--model", str(model_dir), "--data", str(text), "--tokens", "200", "--seq-len", "100"])
    cli_main(["tune", "--model", str(model_dir), "--text", str(text), "--max-ppl-increase", "0.05",
              "--seq-len", "4", "--num-sequences", "8", "--threads", "1"])
    return model_dir, text


def test_tune_writes_a_schedule_whose_choices_follow_its_measurements(tuned):
    model_dir, _ = tuned
    body = json.loads((model_dir / SCHEDULE_NAME).read_text())
    schedule = load_schedule(model_dir / SCHEDULE_NAME)
    assert (schedule.num_experts, schedule.top_k, schedule.num_layers) == (8, 4, 2)
    assert body["command"].startswith("sere tune --model ") and "--max-ppl-increase 0.05" in body["command"]
    assert body["target"]["max_ppl_increase"] == 0.05 and math.isclose(body["target"]["z"], Z95)
    for bucket, sizes in zip(body["buckets"], BUCKET_SIZES):
        assert [m["batch_size"] for m in bucket["measured"]] == list(sizes)
        table = bucket["candidates"]
        assert table[0]["label"] == "topk" and len(table) == 1 + 3 + 1 + 2 * len({
            max(2, round(f * bucket["measured"][-1]["distinct_topk"])) for f in (0.4, 0.55, 0.7, 0.85)})
        within = [c for c in table if c["label"] == "topk" or (len(c["increase"]) == len(sizes) and all(
            i + Z95 * s <= 0.05 for i, s in zip(c["increase"], c["increase_se"])))]
        for c in table:  # a candidate left unmeasured at some size says why
            assert (c["skipped"] is None) == (c["batch_sizes"] == list(sizes)), c
        fewest = min(sum(c["distinct"]) / len(c["distinct"]) for c in within)
        chosen = next(c for c in table if c["label"] == bucket["label"])
        assert chosen in within and math.isclose(sum(chosen["distinct"]) / len(chosen["distinct"]), fewest)
    assert any(b["config"]["policy"] != "topk" for b in body["buckets"]), "nothing beat topk at a 5% target"


def test_evaluate_follows_the_schedule_and_defaults_to_it(tuned, tmp_path):
    model_dir, text = tuned
    schedule = json.loads((model_dir / SCHEDULE_NAME).read_text())
    out = tmp_path / "r.json"
    records = evaluate_main(["--model", str(model_dir), "--text", str(text), "--batch-size", "1", "3", "8",
                             "--seq-len", "4", "--json", str(out)])  # no --policy: the model's schedule
    tuned_records = [r for r in records if r["policy"] == "tuned"]
    assert [r["batch_size"] for r in tuned_records] == [1, 3, 8]
    for record, bucket in zip(tuned_records, (0, 1, 2)):  # 1 -> bucket 1, 3 -> 2-4, 8 -> 5-8
        config = schedule["buckets"][bucket]["config"]  # the record carries the bucket's settings
        assert record["bucket_label"].split()[0] == config["policy"]
        assert (record["num_primary"], record["max_distinct"]) == (
            config.get("num_primary") if config["policy"] != "topk" else None, config.get("max_distinct"))
    assert json.loads(out.read_text())["meta"]["schedule"].endswith(SCHEDULE_NAME)


def test_tune_refuses_bad_arguments_naming_them(tuned, tmp_path, capsys):
    model_dir, text = tuned
    base = ["tune", "--model", str(model_dir), "--text", str(text)]
    for extra, message in ((["--max-ppl-increase", "0"], "--max-ppl-increase must be > 0"),
                           (["--max-ppl-increase", "0.01", "--confidence", "1"], "--confidence must be in"),
                           (["--max-ppl-increase", "0.01", "--min-batches", "1"], "--min-batches must be >= 2"),
                           (["--max-ppl-increase", "0.01", "--policies", "sere"], "'sere' is not a candidate")):
        with pytest.raises(SystemExit):
            cli_main(base + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="gone.safetensors"):
        cli_main(base + ["--max-ppl-increase", "0.01", "--error", str(tmp_path / "gone.safetensors")])


def test_paired_increase_takes_the_larger_of_the_sequence_and_batch_errors():
    from sere.hf.lockstep import paired_increase

    base = [1.0, 1.0, 1.0, 1.0]
    # d = 0, .2, .1, .3: mean .15; per-sequence sd .1291 -> s.e. .06455; batches of 2: means .1, .2 -> s.e. .05
    increase, se = paired_increase([1.0, 1.2, 1.1, 1.3], base, batch_size=2)
    assert math.isclose(increase, math.exp(0.15) - 1) and math.isclose(se, math.exp(0.15) * 0.0645497, rel_tol=1e-5)
    # d = 0, 0, .3, .3: batches disagree (means 0 and .3 -> s.e. .15) more than sequences (s.e. .0866)
    _, se = paired_increase([1.0, 1.0, 1.3, 1.3], base, batch_size=2)
    assert math.isclose(se, math.exp(0.15) * 0.15, rel_tol=1e-9)
    assert math.isclose(paired_increase([1.0, 1.0, 1.3, 1.3], base)[1], math.exp(0.15) * 0.0866025, rel_tol=1e-5)
    assert paired_increase([1.0, 1.2, 1.1, 1.3], base, batch_size=4)[1] == math.inf  # one batch: unknown


def test_evaluate_without_a_schedule_says_it_evaluates_sere(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "m", "qwen3_moe")  # no sere_schedule.json, no sidecar
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    with pytest.raises(SystemExit, match="sere_similarity.safetensors"):  # policy sere needs its sidecar
        evaluate_main(["--model", str(model_dir), "--text", str(text), "--batch-size", "2", "--num-primary", "1",
                       "--json", str(tmp_path / "r.json")])
    assert f"no {model_dir / SCHEDULE_NAME}: evaluating policy sere" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"{tmp_path / 'none.json'}: no such schedule file"):
        evaluate_main(["--model", str(model_dir), "--text", str(text), "--batch-size", "2", "--schedule",
                       str(tmp_path / "none.json"), "--json", str(tmp_path / "r.json")])
