"""The bench_ep scale model: record fields, and one record's bytes against a plain loop count."""

import torch

from benchmarks.harness.scale_model import route_step, sample_steps, scale_sweep
from benchmarks.harness.traces import synthetic_trace
from sere.config import SereConfig
from sere.ep import linear_placement

FIELDS = {"policy", "ep_size", "ranks_per_node", "batch", "trace", "simulated", "cross_node_bytes", "similarity",
          "unit", "merged"}


def test_records_and_token_node_bytes_match_loop():
    trace = synthetic_trace(16, 2, num_experts=32, top_k=4, hidden_size=8)
    cfg = SereConfig(policy="sere", node_limit="primary_nodes", max_decode_tokens=1 << 20)
    records = scale_sweep(trace, [8], [16], {"topk": SereConfig(policy="topk"), "sere-node": cfg},
                          ranks_per_node=2, num_steps=2)
    assert all(FIELDS <= set(r) for r in records)
    assert {(r["unit"], r["merged"]) for r in records} == {
        (u, m) for u in ("token_expert", "token_rank", "token_node", "all_gather") for m in (False, True)}
    placement = linear_placement(32, 8, 2)  # 4 nodes, experts 8n..8n+7 on node n
    for label, config in (("topk", SereConfig(policy="topk")), ("sere-node", cfg)):
        pairs = 0
        for step in sample_steps(trace, 0, 16, 8, 2):
            ids, _ = route_step(step, placement, config, trace.matrices["similarity"][0])
            for row, src in zip(ids.tolist(), step.src_rank.tolist()):
                pairs += len({e // 8 for e in row} - {src // 2})
        got = next(r for r in records if r["policy"] == label and r["unit"] == "token_node" and r["merged"])
        assert got["cross_node_bytes"] == pairs / 2 * 8 * 2  # mean over 2 steps x hidden 8 x 2 bytes
    ratio = [r["cross_node_bytes"] for r in records if r["unit"] == "token_node" and r["merged"]]
    assert ratio[1] < ratio[0]


def test_node_price_runs_through_the_hf_hook():
    """The price harness decodes tiny-moe through `sere.hf.moe` (it once broke silently when the hook
    began passing `placement=`); node-aware S=2 keeps each token on its top-2 experts' nodes."""
    import argparse

    from benchmarks.harness import node_price

    args = argparse.Namespace(model="models/tiny-moe", batch_sizes=[4], num_batches=2, seq_len=6, ep_size=8,
                              ranks_per_node=2, policies=["sere-node S=2"], text=None)
    records = {r["policy"]: r for r in node_price.run(args)}
    assert set(records) == {"topk", "sere-node S=2"}
    assert records["topk"]["perplexity_change"] == 0.0 and records["topk"]["cross_node_ratio_token_node"] == 1.0
    node = records["sere-node S=2"]
    assert node["perplexity_change_se"] is not None and node["num_batches"] == 2
    # 4 nodes of 16 experts; a token's 8 slots reach at most its top-2 experts' <= 2 nodes (of 4)
    assert node["cross_node_ratio_token_node"] < 1.0
