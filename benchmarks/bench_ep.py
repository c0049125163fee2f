"""Expert-parallel dispatch traffic and time: topk, oea, sere, sere+locality side by side.

(a) real: W gloo processes (default 4, two per simulated node: ranks 0-1 node 0, ranks 2-3 node 1),
    one MoE layer step per (layer, decode position) of the tiny model's routing on held-out text
    (its real router outputs, hidden states and expert weights; a random model of the same shapes
    when models/tiny-moe is absent). Rows and bytes come from the actual split sizes; time is the
    median over steps of the slowest rank, after the agreement collective (which syncs the ranks).
    `--launcher ray` runs the ranks as Ray actors on two simulated Ray nodes instead.
(b) simulated: the trace-driven scale model (`benchmarks.harness.scale_model`) for EP 8..256 at 8 ranks per
    node: (token, rank) / (token, node) pairs, cross-node bytes (rows x hidden x dtype bytes, one
    direction; the combine sends the same again) and the max distinct experts on any rank. Traces:
    the tiny model (E = 64: EP sizes dividing 64 only, no replicated experts) and synthetic
    DeepSeek-V3-like routing (E = 256, top-8, hidden 7168, Zipf expert popularity) for all sizes.

    python benchmarks/bench_ep.py --json out/bench_ep.json --png out/bench_ep.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.harness` when run as a script

from sere.config import SereConfig
from sere.ep import SwiGLUExperts, agree_placement, ep_moe_forward, make_placement
from benchmarks.harness.launch import RankFailure, free_port, run_group
from benchmarks.harness.scale_model import scale_sweep
from benchmarks.harness.traces import (
    DEFAULT_MODEL, capture_routing, expert_weights, heldout_batch, load_model, split_step, synthetic_trace,
    trace_similarity,
)

LABELS = ("topk", "oea", "sere", "sere+locality")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def config_for(label: str, num_primary: int, threshold: float, epsilon: float) -> SereConfig:
    """The SereConfig of a benchmark label ("sere+locality" is sere with `epsilon`); every step is
    re-routed (the benchmark's steps are decode steps of up to thousands of group tokens)."""
    policy = "sere" if label == "sere+locality" else label
    fields = {"policy": policy, "max_decode_tokens": 1 << 20}
    if policy != "topk":
        fields["num_primary"] = num_primary
    if policy == "sere":
        fields["threshold"] = threshold
    if label == "sere+locality":
        fields["locality_epsilon"] = epsilon
    return SereConfig(**fields)


def epsilon_for(similarity: dict[int, torch.Tensor], scale: float) -> float:
    """`scale` x the mean std of the layers' off-diagonal similarities (metric-independent slack)."""
    stds = [float(s[~torch.eye(s.shape[0], dtype=torch.bool)].std()) for s in similarity.values()]
    return scale * sum(stds) / len(stds)


# ---------------------------------------------------------------- (a) real gloo EP

def _gloo_worker(rank, world, data_path, labels, warmup, repeats):
    data = torch.load(data_path, weights_only=False)
    placement = agree_placement("linear", data["num_experts"], ranks_per_node=data["ranks_per_node"])
    experts = {layer: SwiGLUExperts.from_global(gu, dn, placement, rank) for layer, (gu, dn) in data["weights"].items()}
    out = {label: [] for label in labels}
    for step in data["steps"]:
        layer, sim = step["layer"], data["similarity"][step["layer"]]
        args = [step[name][rank] for name in ("x", "topk_ids", "topk_weights")]
        for label in labels:  # interleaved, so that background load hits every policy alike
            policy = config_for(label, data["num_primary"], data["threshold"], data["epsilon"])
            times = []
            for i in range(warmup + repeats):
                _, info = ep_moe_forward(*args, experts[layer], placement, policy, sim, step["router_probs"][rank])
                if i >= warmup:
                    times.append(info.seconds)
            out[label].append({"send_rows": info.send_rows.tolist(), "row_bytes": info.row_bytes,
                               "combine_row_bytes": info.combine_row_bytes, "computed": info.local_experts_computed,
                               "seconds": times})
    return out


def _ray_results(data, world, rpn, labels, warmup, repeats, port):
    from sere.ep.ray_runner import RayEPRunner
    from benchmarks.harness.sim_cluster import SimulatedCluster

    per_rank = [{label: [] for label in labels} for _ in range(world)]
    with SimulatedCluster(num_nodes=world // rpn, base_port=6390):
        runner = RayEPRunner(world, rpn, data["weights"], port=port)
        try:
            print(f"ray ranks on nodes {runner.node_ips}")
            for step in data["steps"]:
                for label in labels:
                    policy = config_for(label, data["num_primary"], data["threshold"], data["epsilon"])
                    res = runner.step(step["x"], step["topk_ids"], step["topk_weights"], policy,
                                      data["similarity"][step["layer"]], step["router_probs"],
                                      repeats=warmup + repeats, layer=step["layer"])
                    for rank, r in enumerate(res):
                        kept = {k: r[k] for k in ("send_rows", "row_bytes", "combine_row_bytes", "computed")}
                        per_rank[rank][label].append({**kept, "seconds": r["seconds"][warmup:]})
        finally:
            runner.shutdown()
    return per_rank


def real_gloo(args, model, trace, similarity, epsilon) -> list[dict]:
    world, rpn, dtype = args.gloo_world, args.gloo_ranks_per_node, DTYPES[args.gloo_dtype]
    positions = range(trace.topk_ids[trace.layers[0]].shape[1] - args.steps, trace.topk_ids[trace.layers[0]].shape[1])
    steps = []
    for layer in trace.layers:
        for pos in positions:
            step = split_step(trace, layer, args.gloo_batch, pos, world)
            step["x"] = [x.to(dtype) for x in step["x"]]
            steps.append({"layer": layer, **step})
    data = {"num_experts": trace.num_experts, "ranks_per_node": rpn, "num_primary": args.num_primary,
            "threshold": args.threshold, "epsilon": epsilon, "similarity": similarity, "steps": steps,
            "weights": {layer: expert_weights(model, layer) for layer in trace.layers}}
    labels = list(args.policies)
    if args.launcher == "ray":
        per_rank = _ray_results(data, world, rpn, labels, args.warmup, args.repeats, args.port or free_port())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "steps.pt")
            torch.save(data, path)
            per_rank = run_group(_gloo_worker, world, (path, labels, args.warmup, args.repeats), port=args.port,
                                 timeout_s=550)
        for r in per_rank:
            if isinstance(r, RankFailure):
                raise RuntimeError(f"{r.kind}: {r.message}\n{r.trace}")
    placement = make_placement("linear", trace.num_experts, world, rpn)
    node = placement.rank_to_node.tolist()
    records = []
    for label in labels:
        num_steps = len(per_rank[0][label])
        agg = {"rows": 0, "cross_rows": 0, "cross_bytes_payload": 0, "bytes_payload": 0, "max_distinct": 0}
        step_ms, phase_ms = [], {p: [] for p in ("primary", "reroute", "dispatch", "experts", "combine")}
        for s in range(num_steps):
            distinct = []
            for src in range(world):
                r = per_rank[src][label][s]
                for dst, rows in enumerate(r["send_rows"]):
                    agg["rows"] += rows
                    payload = rows * (r["row_bytes"] + r["combine_row_bytes"])
                    agg["bytes_payload"] += payload
                    if node[dst] != node[src]:
                        agg["cross_rows"] += rows
                        agg["cross_bytes_payload"] += payload
                distinct.append(r["computed"])
            agg["max_distinct"] += max(distinct)
            for rep in range(len(per_rank[0][label][s]["seconds"])):
                secs = [per_rank[src][label][s]["seconds"][rep] for src in range(world)]
                step_ms.append(1e3 * max(t["total"] - t["agree"] for t in secs))
                for p in phase_ms:
                    phase_ms[p].append(1e3 * max(t[p] for t in secs))
        row_bytes = trace.hidden_size * torch.finfo(dtype).bits // 8
        records.append({
            "policy": label, "ep_size": world, "ranks_per_node": rpn, "num_nodes": world // rpn,
            "batch": args.gloo_batch, "simulated": False, "launcher": args.launcher, "steps": num_steps,
            "token_rank_pairs": agg["rows"] / num_steps, "cross_node_rows": agg["cross_rows"] / num_steps,
            "cross_node_bytes": agg["cross_rows"] * row_bytes / num_steps,
            "cross_node_payload_bytes_roundtrip": agg["cross_bytes_payload"] / num_steps,
            "payload_bytes_roundtrip": agg["bytes_payload"] / num_steps,
            "max_distinct_experts_per_rank": agg["max_distinct"] / num_steps,
            "step_ms_median": statistics.median(step_ms),
            **{f"{p}_ms_median": statistics.median(v) for p, v in phase_ms.items()},
            "trace": trace.source, "hidden_size": trace.hidden_size, "dtype": args.gloo_dtype,
        })
    return records


# ---------------------------------------------------------------- output

def print_gloo(records):
    print(f"\n(a) real gloo EP={records[0]['ep_size']} ({records[0]['num_nodes']} simulated nodes x "
          f"{records[0]['ranks_per_node']} ranks, batch {records[0]['batch']} tokens/step, {records[0]['trace']}, "
          f"{records[0]['dtype']}, launcher {records[0]['launcher']}), per MoE layer step:")
    head = (f"{'policy':<14}{'max distinct':>13}{'rows':>8}{'x-node rows':>12}{'x-node KB':>10}"
            f"{'x-node KB rt':>13}{'all KB rt':>10}{'step ms':>9}{'P ms':>7}{'rerte ms':>9}{'disp ms':>8}{'exp ms':>8}"
            f"{'comb ms':>8}")
    print(head)
    for r in records:
        print(f"{r['policy']:<14}{r['max_distinct_experts_per_rank']:>13.1f}{r['token_rank_pairs']:>8.1f}"
              f"{r['cross_node_rows']:>12.1f}{r['cross_node_bytes'] / 1e3:>10.1f}"
              f"{r['cross_node_payload_bytes_roundtrip'] / 1e3:>13.1f}{r['payload_bytes_roundtrip'] / 1e3:>10.1f}"
              f"{r['step_ms_median']:>9.2f}{r['primary_ms_median']:>7.2f}{r['reroute_ms_median']:>9.2f}{r['dispatch_ms_median']:>8.2f}"
              f"{r['experts_ms_median']:>8.2f}{r['combine_ms_median']:>8.2f}")


def print_scale(records, labels):
    for trace in dict.fromkeys(r["trace"] for r in records):
        for batch in dict.fromkeys(r["batch"] for r in records if r["trace"] == trace):
            rows = [r for r in records if r["trace"] == trace and r["batch"] == batch]
            first = rows[0]
            print(f"\n(b) simulated, {trace}: E={first['num_experts']}, hidden {first['hidden_size']} x "
                  f"{first['dtype_bytes']} B, {first['ranks_per_node']} ranks/node, batch {batch} tokens per "
                  f"{'EP step' if first['batch_scope'] == 'group' else 'rank per step'}")
            print(f"{'EP':>4}{'nodes':>6} | cross-node MB (flat; hierarchical)" + " " * 30 + "| max distinct experts/rank")
            print(f"{'':>10} | " + "".join(f"{label:>19}" for label in labels) + " | "
                  + "".join(f"{label[:8]:>9}" for label in labels))
            for ep in dict.fromkeys(r["ep_size"] for r in rows):
                by = {r["policy"]: r for r in rows if r["ep_size"] == ep}
                cells = "".join(f"{by[l]['cross_node_bytes'] / 1e6:>10.3f};{by[l]['cross_node_bytes_hier'] / 1e6:>8.3f}"
                                for l in labels)
                dist = "".join(f"{by[l]['max_distinct_experts_per_rank']:>9.2f}" for l in labels)
                print(f"{ep:>4}{by[labels[0]]['num_nodes']:>6} | {cells} | {dist}")


def plot(records, labels, batch, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r["trace"] for r in records))
    fig, axes = plt.subplots(3, len(traces), figsize=(6 * len(traces), 11), squeeze=False)
    for col, trace in enumerate(traces):
        base = {r["ep_size"]: r["cross_node_bytes"] for r in records
                if r["trace"] == trace and r["batch"] == batch and r["policy"] == "topk"}
        for label in labels:
            rows = [r for r in records if r["trace"] == trace and r["batch"] == batch and r["policy"] == label]
            eps = [r["ep_size"] for r in rows]
            axes[0][col].plot(eps, [r["cross_node_bytes"] / 1e6 for r in rows], marker="o", label=label)
            if base:
                ratio = [r["cross_node_bytes"] / base[r["ep_size"]] if base[r["ep_size"]] else 1.0 for r in rows]
                axes[1][col].plot(eps, ratio, marker="o", label=label)
            axes[2][col].plot(eps, [r["max_distinct_experts_per_rank"] for r in rows], marker="o", label=label)
        axes[0][col].set_title(f"{trace} (E={rows[0]['num_experts']}), batch {batch}")
        axes[0][col].set_ylabel("cross-node dispatch MB / layer step")
        axes[1][col].set_ylabel("cross-node bytes / topk's")
        axes[2][col].set_ylabel("max distinct experts on a rank")
        for ax in (axes[0][col], axes[1][col], axes[2][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("EP size (8 ranks per node)")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle("Simulated EP dispatch (scale model), CPU trace replay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "gloo", "scale"], default="all")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--policies", nargs="+", default=list(LABELS), choices=LABELS)
    parser.add_argument("--num-primary", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--epsilon-std", type=float, default=0.25,
                        help="locality slack = this x std of the off-diagonal similarity")
    parser.add_argument("--steps", type=int, default=4, help="decode positions per layer")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--batch-scope", choices=["group", "rank"], default="group")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--synthetic-experts", type=int, default=256)
    parser.add_argument("--synthetic-hidden", type=int, default=7168)
    parser.add_argument("--synthetic-top-k", type=int, default=8)
    parser.add_argument("--gloo-world", type=int, default=4)
    parser.add_argument("--gloo-ranks-per-node", type=int, default=2)
    parser.add_argument("--gloo-batch", type=int, default=64)
    parser.add_argument("--gloo-dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--launcher", choices=["procs", "ray"], default="procs")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one in 29600-29699)")
    parser.add_argument("--plot-batch", type=int, default=128)
    parser.add_argument("--json")
    parser.add_argument("--png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = list(args.policies)

    t0 = time.time()
    max_batch = max(args.batches + [args.gloo_batch])
    model, tokenizer, real = load_model(args.model)
    heldout = os.path.join(args.model, "heldout.txt")
    trace = capture_routing(model, heldout_batch(tokenizer, max_batch, args.seq_len, heldout, model.config.vocab_size),
                            os.path.basename(os.path.normpath(args.model)) + ("" if real else "(random weights)"))
    similarity, sim_source = trace_similarity(trace.num_experts, trace.layers, args.model if real else None)
    epsilon = epsilon_for(similarity, args.epsilon_std)
    print(f"trace: {trace.source}, {len(trace.layers)} MoE layers, E={trace.num_experts}, similarity {sim_source}, "
          f"locality epsilon {epsilon:.4f} ({time.time() - t0:.0f} s)")
    records = []
    if args.part in ("all", "gloo"):
        gloo = real_gloo(args, model, trace, similarity, epsilon)
        print_gloo(gloo)
        records += gloo
    if args.part in ("all", "scale"):
        positions = trace.topk_ids[trace.layers[0]].shape[1]
        tail = {name: {l: t[:, positions - args.steps:] for l, t in getattr(trace, name).items()}
                for name in ("topk_ids", "topk_weights", "router_probs")}
        trace.topk_ids, trace.topk_weights, trace.router_probs, trace.hidden = (
            tail["topk_ids"], tail["topk_weights"], tail["router_probs"], None)
        policies = {l: config_for(l, args.num_primary, args.threshold, epsilon) for l in labels}
        real_eps = [ep for ep in args.ep_sizes if trace.num_experts % ep == 0]
        scale = scale_sweep(trace, similarity, real_eps, args.batches, policies, args.ranks_per_node,
                            num_steps=args.steps, batch_scope=args.batch_scope)
        synth = synthetic_trace(max_batch if args.batch_scope == "group" else 16 * max_batch,
                                args.steps, args.synthetic_experts, args.synthetic_top_k, args.zipf,
                                hidden_size=args.synthetic_hidden)
        synth_sim, _ = trace_similarity(synth.num_experts, synth.layers)
        synth_eps = epsilon_for(synth_sim, args.epsilon_std)
        synth_policies = {l: config_for(l, args.num_primary, args.threshold, synth_eps) for l in labels}
        scale += scale_sweep(synth, synth_sim, [ep for ep in args.ep_sizes if synth.num_experts % ep == 0],
                             args.batches, synth_policies, args.ranks_per_node, num_steps=args.steps,
                             batch_scope=args.batch_scope)
        for r in scale:
            r["similarity"] = sim_source if r["trace"] == trace.source else "random"
        print_scale(scale, labels)
        records += scale
        if args.png:
            plot(scale, labels, args.plot_batch, args.png)
            print(f"\nwrote {args.png}")
    conditions = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}", "model": args.model if real else "random Qwen3-MoE (no checkpoint)",
        "similarity": sim_source, "num_primary": args.num_primary, "threshold": args.threshold,
        "epsilon_std": args.epsilon_std, "batch_scope": args.batch_scope, "zipf": args.zipf,
        "elapsed_s": time.time() - t0,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"conditions": conditions, "records": records}, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
