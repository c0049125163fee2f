"""Cross-node bytes of expert-parallel dispatch per all-to-all backend unit: topk, sere, sere-err,
oea and their node-aware variants ("-node": `SereConfig.node_limit="primary_nodes"`).

(a) real: W gloo processes (default 4, two per simulated node: ranks 0-1 node 0, ranks 2-3 node 1),
    one MoE layer step per (layer, decode position) of the tiny model's routing on held-out text
    (its real router outputs, hidden states, expert weights and calibrated sidecars). The dispatch
    (`sere.ep.dispatch`) sends one row per (token, rank) with duplicates merged: unit token_rank,
    measured from the actual split sizes and checked against `sere.ep.accounting.unit_counts`.
(b) simulated: the trace-driven scale model (`benchmarks.harness.scale_model`) at EP 8..64 with 8
    ranks per node, for every unit of docs/ep_backends.md (token_expert = DeepEP low-latency,
    token_rank = DeepEP normal intranode, token_node = DeepEP normal internode, all_gather =
    allgather_reducescatter), with and without merged duplicate slots. Traces: tiny-moe (E=64,
    its own calibrated sidecars), synthetic E=128 (Qwen3-30B-A3B shape: top-8, hidden 2048) and
    E=256 (DeepSeek-V3 shape: top-8, hidden 7168) with a stated synthetic similarity and no
    substitution-error matrix (sere-err is not run on them).

    python benchmarks/bench_ep.py --json benchmarks/results/bench_ep.json \
        --png benchmarks/results/bench_ep.png --txt benchmarks/results/bench_ep.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.harness` when run as a script

from sere import policy as policies
from sere.config import SereConfig
from sere.ep import SwiGLUExperts, agree_placement, ep_moe_forward, make_placement
from sere.ep.accounting import UNIT_FIELDS, unit_counts
from benchmarks.harness.ep_report import gloo_table, plot_ratios, ratio_tables
from benchmarks.harness.launch import RankFailure, free_port, run_group
from benchmarks.harness.scale_model import scale_sweep
from benchmarks.harness.traces import (
    DEFAULT_MODEL, capture_routing, expert_weights, heldout_batch, load_model, split_step, synthetic_trace,
    trace_matrices,
)

LABELS = ("topk", "sere", "sere-err", "oea", "sere-node", "sere-err-node", "oea-node")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SYNTHETIC = {"qwen3-30b-a3b": (128, 8, 2048), "deepseek-v3": (256, 8, 7168)}  # E, top-k, hidden


def config_for(label: str, args) -> SereConfig:
    """The SereConfig of a benchmark label; every step is re-routed (decode steps of up to
    thousands of group tokens)."""
    policy = label.removesuffix("-node")
    fields = {"policy": policy, "max_decode_tokens": 1 << 20}
    if policy != "topk":
        fields["num_primary"] = args.num_primary
    if policy == "sere":
        fields["threshold"] = args.threshold
    if policy == "sere-err":
        fields.update(tolerance=args.tolerance, renormalize=True)
    if label.endswith("-node"):
        fields.update(node_limit="primary_nodes", node_scope=args.node_scope, max_nodes=args.max_nodes)
    return SereConfig(**fields)


# ---------------------------------------------------------------- (a) real gloo EP

def _gloo_worker(rank, world, data_path, labels, warmup, repeats):
    data = torch.load(data_path, weights_only=False)
    placement = agree_placement("linear", data["num_experts"], ranks_per_node=data["ranks_per_node"])
    experts = {layer: SwiGLUExperts.from_global(gu, dn, placement, rank) for layer, (gu, dn) in data["weights"].items()}
    out = {label: [] for label in labels}
    for step in data["steps"]:
        layer = step["layer"]
        args = [step[name][rank] for name in ("x", "topk_ids", "topk_weights")]
        for label in labels:  # interleaved, so that background load hits every policy alike
            cfg = data["configs"][label]
            kind = policies.matrix_kind(cfg)
            matrix = data["matrices"][kind][layer] if kind else None
            times = []
            for i in range(warmup + repeats):
                _, info = ep_moe_forward(*args, experts[layer], placement, cfg, matrix, step["router_probs"][rank])
                if i >= warmup:
                    times.append(info.seconds)
            out[label].append({"send_rows": info.send_rows.tolist(), "row_bytes": info.row_bytes,
                               "computed": info.local_experts_computed, "ids": info.topk_ids.tolist(), "seconds": times})
    return out


def _gloo_steps(args, trace):
    world, dtype = args.gloo_world, DTYPES[args.gloo_dtype]
    num_pos = trace.topk_ids[trace.layers[0]].shape[1]
    steps = []
    for layer in trace.layers:
        for pos in range(num_pos - args.steps, num_pos):
            step = split_step(trace, layer, args.gloo_batch, pos, world)
            step["x"] = [x.to(dtype) for x in step["x"]]
            steps.append({"layer": layer, **step})
    return steps


def _summarise_gloo(label, per_rank, placement, row_bytes):
    """Per-step means of one policy; raises if the measured rows differ from the accounting."""
    world, node = placement.world_size, placement.rank_to_node.tolist()
    num_steps = len(per_rank[0][label])
    total = {"cross_rows": 0, "rows": 0, "max_distinct": 0, **dict.fromkeys(UNIT_FIELDS, 0)}
    step_ms, reroute_ms = [], []
    for s in range(num_steps):
        for src in range(world):
            r = per_rank[src][label][s]
            total["rows"] += sum(r["send_rows"])
            total["cross_rows"] += sum(n for dst, n in enumerate(r["send_rows"]) if node[dst] != node[src])
            ids = torch.tensor(r["ids"], dtype=torch.int64)  # [T_src, K] (every rank holds tokens here)
            counts = unit_counts(ids, placement.expert_to_rank, placement.rank_to_node, src).tolist()
            for name, value in zip(UNIT_FIELDS, counts):
                total[name] += value
        total["max_distinct"] += max(per_rank[src][label][s]["computed"] for src in range(world))
        for rep in range(len(per_rank[0][label][s]["seconds"])):
            secs = [per_rank[src][label][s]["seconds"][rep] for src in range(world)]
            step_ms.append(1e3 * max(t["total"] - t["agree"] for t in secs))
            reroute_ms.append(1e3 * max(t["reroute"] for t in secs))
    if total["cross_rows"] != total["cross_node_token_rank_pairs"] or total["rows"] != total["token_rank_pairs"]:
        raise RuntimeError(f"{label}: measured rows {total['rows']} (cross-node {total['cross_rows']}) differ from "
                           f"the accounting {total['token_rank_pairs']} ({total['cross_node_token_rank_pairs']})")
    return {
        "unit": "token_rank", "merged": True, "steps": num_steps,
        "token_rank_pairs": total["rows"] / num_steps, "cross_node_rows": total["cross_rows"] / num_steps,
        "cross_node_bytes": total["cross_rows"] * row_bytes / num_steps,
        "cross_node_token_node_pairs": total["cross_node_token_node_pairs"] / num_steps,
        "cross_node_token_expert_pairs": total["cross_node_token_expert_pairs"] / num_steps,
        "max_distinct_experts_per_rank": total["max_distinct"] / num_steps,
        "step_ms_median": statistics.median(step_ms), "reroute_ms_median": statistics.median(reroute_ms),
    }


def real_gloo(args, model, trace, labels) -> list[dict]:
    world, rpn = args.gloo_world, args.gloo_ranks_per_node
    data = {"num_experts": trace.num_experts, "ranks_per_node": rpn, "matrices": trace.matrices,
            "configs": {label: config_for(label, args) for label in labels}, "steps": _gloo_steps(args, trace),
            "weights": {layer: expert_weights(model, layer) for layer in trace.layers}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "steps.pt")
        torch.save(data, path)
        per_rank = run_group(_gloo_worker, world, (path, labels, args.warmup, args.repeats), port=args.port or free_port(),
                             timeout_s=args.gloo_timeout)
    for r in per_rank:
        if isinstance(r, RankFailure):
            raise RuntimeError(f"{r.kind}: {r.message}\n{r.trace}")
    placement = make_placement("linear", trace.num_experts, world, rpn)
    row_bytes = trace.hidden_size * torch.finfo(DTYPES[args.gloo_dtype]).bits // 8
    records = []
    for label in labels:
        kind = policies.matrix_kind(data["configs"][label])
        records.append({
            "policy": label, "ep_size": world, "ranks_per_node": rpn, "num_nodes": world // rpn,
            "batch": args.gloo_batch, "trace": trace.source, "simulated": False, "launcher": "procs",
            "similarity": trace.matrix_note if kind else "none (policy reads no matrix)",
            **_summarise_gloo(label, per_rank, placement, row_bytes),
            "hidden_size": trace.hidden_size, "dtype": args.gloo_dtype, "config": policies.label(data["configs"][label]),
        })
    return records


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "gloo", "scale"], default="all")
    parser.add_argument("--model", default=str(DEFAULT_MODEL.relative_to(REPO)))
    parser.add_argument("--policies", nargs="+", default=list(LABELS), choices=LABELS)
    parser.add_argument("--num-primary", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--tolerance", type=float, default=0.6, help="sere-err tolerance (renormalised)")
    parser.add_argument("--node-scope", choices=["node", "rank"], default="node")
    parser.add_argument("--max-nodes", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4, help="decode positions per layer")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--synthetic", nargs="*", default=list(SYNTHETIC), choices=list(SYNTHETIC))
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--gloo-world", type=int, default=4)
    parser.add_argument("--gloo-ranks-per-node", type=int, default=2)
    parser.add_argument("--gloo-batch", type=int, default=64)
    parser.add_argument("--gloo-dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--gloo-timeout", type=float, default=580.0, help="seconds before the gloo run counts as hung")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one in 29600-29699)")
    parser.add_argument("--report-batch", type=int, default=32, help="batch of the printed tables and the plot")
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--txt")
    return parser.parse_args(argv)


def tiny_trace(args, model, tokenizer, batch):
    model_dir = Path(args.model)
    trace = capture_routing(model, heldout_batch(tokenizer, batch, args.seq_len, model_dir / "heldout.txt"),
                            model_dir.name)
    trace.matrices, trace.matrix_note = trace_matrices(model_dir, trace.num_experts, trace.layers)
    return trace


def keep_last_positions(trace, steps):
    for name in ("topk_ids", "topk_weights", "router_probs"):
        setattr(trace, name, {layer: t[:, -steps:] for layer, t in getattr(trace, name).items()})
    trace.hidden = None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    labels = list(args.policies)
    t0 = time.time()
    model, tokenizer = load_model(args.model)
    trace = tiny_trace(args, model, tokenizer, max(args.batches + [args.gloo_batch]))
    print(f"trace: {trace.source}, {len(trace.layers)} MoE layers, E={trace.num_experts}, {trace.matrix_note} "
          f"({time.time() - t0:.0f} s)")
    records, text, skipped = [], [], {}
    if args.part in ("all", "gloo"):
        gloo = real_gloo(args, model, trace, labels)
        text.append(gloo_table(gloo))
        records += gloo
    if args.part in ("all", "scale"):
        keep_last_positions(trace, args.steps)
        configs = {label: config_for(label, args) for label in labels}
        eps = [ep for ep in args.ep_sizes if trace.num_experts % ep == 0]
        scale = scale_sweep(trace, eps, args.batches, configs, args.ranks_per_node, num_steps=args.steps)
        for name in args.synthetic:
            num_experts, top_k, hidden = SYNTHETIC[name]
            synth = synthetic_trace(max(args.batches), args.steps, num_experts, top_k, args.zipf, hidden_size=hidden)
            usable = {l: c for l, c in configs.items() if policies.matrix_kind(c) in (None, *synth.matrices)}
            skipped[synth.source] = {l: "no substitution-error matrix for a synthetic trace"
                                     for l in configs if l not in usable}
            scale += scale_sweep(synth, [ep for ep in args.ep_sizes if num_experts % ep == 0], args.batches, usable,
                                 args.ranks_per_node, num_steps=args.steps)
        text.append(ratio_tables(scale, args.report_batch))
        records += scale
        if args.png:
            plot_ratios(scale, args.report_batch, args.png, f"python benchmarks/bench_ep.py (batch {args.report_batch})")
    report = "\n\n".join(text)
    print(report)
    command = "python benchmarks/bench_ep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    conditions = {
        "command": command, "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "model": args.model,
        "similarity": trace.matrix_note, "num_primary": args.num_primary, "threshold": args.threshold,
        "tolerance": args.tolerance, "node_scope": args.node_scope, "max_nodes": args.max_nodes,
        "zipf": args.zipf, "skipped": skipped, "elapsed_s": round(time.time() - t0, 1),
    }
    if args.txt:
        Path(args.txt).write_text(f"$ {command}\n\n{report}\n")
    if args.json:
        with open(args.json, "w") as fh:
            fh.write('{"conditions": ' + json.dumps(conditions) + ',\n "records": [\n')
            fh.write(",\n".join(json.dumps(r) for r in records) + "\n]}\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
