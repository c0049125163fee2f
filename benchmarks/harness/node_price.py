"""The quality price of node-aware routing: paired lock-step perplexity against cross-node bytes.

    python -m benchmarks.harness.node_price --batch-sizes 8 16 32 64 --num-batches 4 --seq-len 32 \
        --json benchmarks/results/bench_ep.price.json

`models/tiny-moe` decodes held-out text in lock-step (`sere.hf.evaluate.decode_lockstep`, teacher
forced), every setting on the SAME batches, so each batch's perplexity change is paired with topk.
The placement is virtual: E experts on `--ep-size` ranks (linear), `--ranks-per-node` per node,
sequence s of a batch on rank s % W; every step's dispatched ids are counted with
`sere.ep.accounting.unit_counts` (merged duplicate slots) exactly as `bench_ep.py` counts them.

`decode_lockstep` passes no placement, so `placed_route` stands in for `sere.hf.moe`'s `route`
while a setting decodes: the same `sere.policy.route` call with this placement, plus the counting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sere.hf.moe as hf_moe  # noqa: E402
from sere import policy as policies  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.ep.accounting import CROSS_NODE_FIELD, UNIT_FIELDS, merge_duplicate_slots, unit_counts  # noqa: E402
from sere.ep.placement import linear_placement  # noqa: E402
from sere.hf.calibrate import load_model, tokenize  # noqa: E402
from sere.hf.lockstep import batch_metrics, decode_lockstep, make_batches  # noqa: E402
from sere.sidecars import ERROR_SIDECAR_NAME, SIDECAR_NAME, load_sidecar  # noqa: E402


def settings() -> dict[str, SereConfig]:
    """topk, and sere / sere-err / oea at S = 2 and 4 plain, S = 2, 3 and 4 node-aware, and node-aware
    S = 2 and 3 grown to M = 3 and 4 nodes; and sere-err node-aware S = 3 and 4 that keeps every
    expert of the token on an allowed node ("keep": keep_cost 0, the slots it cannot keep refilled
    there), which spends experts, not cross-node rows; and sere-err node-aware S = 4 with S = 3 in
    one MoE layer (`layer_num_primary`), layers 0-3, a node budget between S = 3 and 4."""
    out = {"topk": SereConfig(policy="topk")}
    extra = {"sere": {}, "sere-err": {"tolerance": 0.6, "renormalize": True}, "oea": {}}
    for policy, fields in extra.items():
        for s in (2, 4):
            out[f"{policy} S={s}"] = SereConfig(policy=policy, num_primary=s, max_decode_tokens=1 << 20, **fields)
        for s in (2, 3, 4):
            out[f"{policy}-node S={s}"] = SereConfig(policy=policy, num_primary=s, node_limit="primary_nodes",
                                                     max_decode_tokens=1 << 20, **fields)
        for s, m in ((2, 3), (3, 4)):  # the top-S experts' nodes, grown to M nodes in all
            out[f"{policy}-node S={s} M={m}"] = SereConfig(policy=policy, num_primary=s, node_limit="primary_nodes",
                                                           max_nodes=m, max_decode_tokens=1 << 20, **fields)
    for s, m in ((3, None), (4, None), (1, 3), (2, 3), (1, 4)):
        label = f"sere-err-node S={s}" + (f" M={m}" if m else "") + " keep"
        out[label] = SereConfig(policy="sere-err", num_primary=s, node_limit="primary_nodes", max_nodes=m,
                                keep_cost=0.0, refill=True, max_decode_tokens=1 << 20, **extra["sere-err"])
    for layer in range(4):
        out[f"sere-err-node S=4 L{layer}:S=3"] = SereConfig(
            policy="sere-err", num_primary=4, layer_num_primary={layer: 3}, node_limit="primary_nodes",
            max_decode_tokens=1 << 20, **extra["sere-err"])
    return out


@contextlib.contextmanager
def placed_route(placement, totals: dict):
    """Within the context `sere.hf.moe`'s route gets `placement=` and its steps are counted."""
    original = hf_moe.route

    def route(cfg, topk_ids, topk_weights, **kwargs):
        kwargs.pop("placement", None)  # the hook's own (None here): this virtual placement replaces it
        routed = policies.route(cfg, topk_ids, topk_weights, placement=placement, **kwargs)
        ids, _ = merge_duplicate_slots(routed.ids, routed.weights)
        src = torch.arange(ids.shape[0]) % placement.world_size  # sequence s on rank s % W
        counts = unit_counts(ids, placement.expert_to_rank, placement.rank_to_node, src).tolist()
        for name, value in zip(UNIT_FIELDS, counts):
            totals[name] = totals.get(name, 0) + value
        totals["steps"] = totals.get("steps", 0) + 1
        return routed

    hf_moe.route = route
    try:
        yield
    finally:
        hf_moe.route = original


def run(args) -> list[dict]:
    model, tokenizer = load_model(args.model)
    text = tokenize(tokenizer, args.text or Path(args.model) / "heldout.txt")
    sidecars = {kind: load_sidecar(Path(args.model) / name)
                for kind, name in (("similarity", SIDECAR_NAME), ("substitution_error", ERROR_SIDECAR_NAME))}
    num_experts = model.config.num_experts
    placement = linear_placement(num_experts, args.ep_size, args.ranks_per_node)
    row_bytes = model.config.hidden_size * 2  # bf16 rows
    records = []
    chosen = {label: cfg for label, cfg in settings().items() if not args.policies or label in args.policies or label == "topk"}
    if args.policies and len(chosen) != len(set(args.policies) | {"topk"}):
        raise SystemExit(f"--policies: unknown labels {sorted(set(args.policies) - set(chosen))}; known: {list(settings())}")
    for batch_size in args.batch_sizes:
        batches = make_batches(text, batch_size, args.seq_len, args.num_batches)
        nll, totals = {}, {}
        for label, cfg in chosen.items():
            totals[label], nll[label] = {}, []
            with placed_route(placement, totals[label]):
                for batch in batches:
                    logp, _, _ = decode_lockstep(model, batch, cfg, sidecars)
                    nll[label].append(batch_metrics(logp, logp, batch[:, 1:])["nll"])
        base_ppl = math.exp(statistics.fmean(nll["topk"]))
        for label, cfg in chosen.items():
            t = totals[label]
            change = [math.exp(a - b) - 1.0 for a, b in zip(nll[label], nll["topk"])]
            record = {"policy": label, "config": policies.label(cfg), "batch": batch_size, "ep_size": args.ep_size,
                      "ranks_per_node": args.ranks_per_node, "seq_len": args.seq_len, "num_batches": len(batches),
                      "perplexity": math.exp(statistics.fmean(nll[label])),
                      "perplexity_change": math.exp(statistics.fmean(nll[label])) / base_ppl - 1.0,
                      "perplexity_change_std": statistics.pstdev(change),
                      # standard error of the mean paired change (sample s.d. / sqrt(batches))
                      "perplexity_change_se": statistics.stdev(change) / math.sqrt(len(change)) if len(change) > 1 else None}
            for unit, field in CROSS_NODE_FIELD.items():
                record[f"cross_node_bytes_{unit}"] = t[field] / t["steps"] * row_bytes  # per layer step
                record[f"cross_node_ratio_{unit}"] = t[field] / max(1, totals["topk"][field])
            records.append(record)
            print(f"batch {batch_size:>3} {label:<16} ppl {record['perplexity']:8.3f} "
                  f"({100 * record['perplexity_change']:+6.2f}% +- {100 * record['perplexity_change_std']:.2f}) "
                  f"token_node x {record['cross_node_ratio_token_node']:.3f}  "
                  f"token_expert x {record['cross_node_ratio_token_expert']:.3f}", flush=True)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-moe")
    parser.add_argument("--text", help="text to decode (default MODEL/heldout.txt)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--ep-size", type=int, default=64)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--policies", nargs="+", help="only these setting labels (topk always runs: the pairing)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    records = run(args)
    if args.json:
        command = "python -m benchmarks.harness.node_price " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(args.json, "w") as fh:
            fh.write('{"conditions": ' + json.dumps({"command": command, "placement": "linear", "dtype_bytes": 2}))
            fh.write(',\n "records": [\n' + ",\n".join(json.dumps(r) for r in records) + "\n]}\n")


if __name__ == "__main__":
    main()
