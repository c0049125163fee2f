"""Substitution test: is an expert's "most similar" expert a good stand-in for it?

    python benchmarks/substitution_test.py --model DIR --data HELDOUT --tokens N \
        [--similarity FILE ...] [--chunk-tokens C] --json OUT

On held-out tokens, for the tokens the model routes to expert i (any of its top-k slots), the
relative output error of replacing expert i by expert j:
    err[i, j] = sum_n ||Y_i[n] - Y_j[n]||^2 / sum_n ||Y_i[n]||^2     (dropping i: err = 1)
as `sere.substitution.substitution_error` computes it (streamed in token chunks, never E x N x d;
experts that no held-out token reaches are left out of the summaries). Reported per layer and
overall (mean / median over experts) for: the nearest neighbour under each similarity sidecar
(argmax_{j != i} sim[i, j], ties to the lowest id), a random other expert (the exact expectation,
mean over j != i), the best possible substitute (oracle, min over j != i) and dropping (1).
Also: how often the nearest neighbour beats dropping, how many distinct experts serve as
nearest neighbours (a "hub" shows as few), and the Spearman rank correlation between sim[i, j]
and -err[i, j] over all pairs (does the similarity predict substitution error at all?).

Shape legend: N held-out tokens, C chunk tokens, E routed experts, K top-k, d hidden.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from sere.hf.calibrate import capture_layer_inputs, load_model, log, tokenize
from sere.hf.moe import find_moe_blocks
from sere.sidecars import ERROR_METRIC, load_sidecar
from sere.hf.substitution import substitution_error


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def layer_report(err: torch.Tensor, count: torch.Tensor, sims: dict[str, torch.Tensor]) -> dict:
    """Per-expert substitution errors of one layer, summarised."""
    num_experts = err.shape[0]
    used = count > 0  # experts never routed to on the held-out tokens are left out
    off = ~torch.eye(num_experts, dtype=torch.bool)
    rows = {
        "random": err.masked_fill(~off, 0).sum(1) / (num_experts - 1),
        "oracle": err.masked_fill(~off, float("inf")).min(1).values,
        "drop": torch.ones(num_experts, dtype=torch.float64),
    }
    extra = {}
    for name, sim in sims.items():
        nearest = sim.masked_fill(~off, float("-inf")).argmax(1)  # first max: lowest id on ties
        rows[name] = err.gather(1, nearest[:, None]).squeeze(1)
        extra[name] = {
            "beats_drop": float((rows[name][used] < 1.0).double().mean()),
            "distinct_neighbours": int(nearest[used].unique().numel()),
            "max_in_degree": int(torch.bincount(nearest[used], minlength=num_experts).max()),
            "spearman_sim_vs_neg_err": _spearman(sim[off].double(), -err[off]),
            "off_diagonal": {"mean": float(sim[off].mean()), "min": float(sim[off].min()),
                             "max": float(sim[off].max())},
        }
    summary = {name: {"mean": float(v[used].mean()), "median": float(v[used].median())} for name, v in rows.items()}
    return {"experts_used": int(used.sum()), "summary": summary, "nearest": extra,
            "per_expert": {name: v.tolist() for name, v in rows.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="held-out text (file or folder)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--similarity", nargs="*",
                        help="similarity sidecar files (default: MODEL/sere_similarity*.safetensors but the "
                             "substitution-error one)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    blocks = find_moe_blocks(model)
    paths = args.similarity or sorted(str(p) for p in Path(args.model).glob("sere_similarity*.safetensors"))
    sidecars = {}
    for path in paths:
        sidecar = load_sidecar(path, num_experts=blocks[0].num_experts, layer_ids=[b.layer_idx for b in blocks])
        if sidecar.metric == ERROR_METRIC:  # an error, not a similarity: its "nearest" is the worst
            if args.similarity:
                raise SystemExit(f"{path} holds substitution errors, not a similarity")
            continue
        label = sidecar.metric if sidecar.metric not in sidecars else Path(path).name
        sidecars[label] = sidecar
    tokens = tokenize(tokenizer, args.data, args.tokens)
    captured = capture_layer_inputs(model, blocks, tokens, args.seq_len)

    layers, pooled = {}, {}
    for b in blocks:
        log(f"[substitution] layer {b.layer_idx}")
        err, count = substitution_error(b, *captured[b.layer_idx], args.chunk_tokens)
        err = err.double()  # [E, E], the report's sums and means in float64
        report = layer_report(err, count, {k: s.matrix(b.layer_idx) for k, s in sidecars.items()})
        layers[b.layer_idx] = report
        for name, values in report["per_expert"].items():
            used = [v for v, c in zip(values, count.tolist()) if c > 0]
            pooled.setdefault(name, []).extend(used)
    overall = {name: {"mean": statistics.fmean(v), "median": statistics.median(v)} for name, v in pooled.items()}
    result = {
        "meta": {"model": args.model, "data": args.data, "num_tokens": int(tokens.numel()),
                 "similarity": {k: str(s.path) for k, s in sidecars.items()},
                 "num_experts": blocks[0].num_experts, "top_k": blocks[0].top_k},
        "overall": overall, "layers": layers,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))

    names = list(overall)
    print("| layer | " + " | ".join(f"{n} mean / median" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for layer, rep in layers.items():
        cells = [f"{rep['summary'][n]['mean']:.3f} / {rep['summary'][n]['median']:.3f}" for n in names]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{overall[n]['mean']:.3f} / {overall[n]['median']:.3f}" for n in names) + " |")
    for layer, rep in layers.items():
        for name, extra in rep["nearest"].items():
            print(f"layer {layer} {name}: nearest beats drop for {100 * extra['beats_drop']:.0f}% of experts, "
                  f"{extra['distinct_neighbours']} distinct neighbours (max in-degree {extra['max_in_degree']}), "
                  f"spearman(sim, -err) {extra['spearman_sim_vs_neg_err']:+.3f}, off-diagonal sim "
                  f"mean {extra['off_diagonal']['mean']:.3f} min {extra['off_diagonal']['min']:.3f} "
                  f"max {extra['off_diagonal']['max']:.3f}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
