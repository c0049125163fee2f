"""Quality against distinct experts: the Pareto frontier of every re-routing policy.

    python benchmarks/pareto.py --model models/tiny-moe --text models/tiny-moe/heldout.txt \
        --batch-sizes 1 8 16 32 64 --seq-len 128 --num-batches 32 \
        --json benchmarks/results/pareto.json --png benchmarks/results/pareto.png

Lock-step teacher-forced batch decoding (the `sere.evaluate` setting, computed as one causal
forward per batch, see `decode`), B held-out sequences per batch, re-routing across the B tokens
of each step in every MoE layer. Batches are disjoint windows of the text (as many as fit, up to
--num-batches). Every policy
setting decodes the SAME batches, so per-batch differences are paired: each batch's perplexity
change is against topk on that batch, and each point's gap to OEA's (and XShare's) frontier is
the per-batch difference to OEA's (XShare's) perplexity linearly interpolated at the point's
distinct-expert count (mean, std, standard error and the number of batches where the point is
below the frontier).

Policies: topk; oea S = 1..7; xshare (arXiv 2602.07265) S = 1 over budgets of 8..48 distinct
experts, and S = 2 at two budgets; paper sere (cosine, frobenius and cka sidecars, S = 2 and 4,
rho = 0, and for cosine also a per-layer quantile); sere-err (substitution error sidecar,
renormalised; plain, with OEA's refill of dropped slots, and with a budget of distinct experts
kept by routing mass, with and without refill).

Shape legend: B batch size, L decoded steps per sequence, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plot_policies import plot_pareto  # noqa: E402
from sere.hf.calibrate import load_model, log, tokenize  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.hf.lockstep import batch_metrics, decode_forward, make_batches  # noqa: E402
from sere.hf.moe import find_moe_blocks  # noqa: E402
from sere.policy import matrix_kind  # noqa: E402
from sere.progress import Progress  # noqa: E402
from sere.sidecars import load_sidecar  # noqa: E402

INF = float("inf")
XSHARE_BUDGETS = (8, 12, 16, 20, 24, 28, 32, 40, 48)  # distinct experts per layer per step (E = 64)


def _setting(label: str, sidecar: str | None = None, **fields) -> dict:
    """One point of the sweep: its label, the sidecar it reads (cosine / frobenius / error) and its
    SereConfig (every evaluated step is decode-sized)."""
    return dict(label=label, sidecar=sidecar, cfg=SereConfig(max_decode_tokens=1 << 20, **fields))


def default_settings(quantile: float) -> list[dict]:
    """The sweep: one dict per setting (label, sidecar, cfg)."""
    out = [_setting("topk", policy="topk")]
    out += [_setting(f"oea S={s}", policy="oea", num_primary=s) for s in range(1, 8)]
    out += [xshare_setting(1, b) for b in XSHARE_BUDGETS] + [xshare_setting(2, b) for b in (16, 32)]
    for metric in ("cosine", "frobenius", "cka"):
        out += [_setting(f"sere-{metric[:3]} S={s} rho=0", metric, policy="sere", num_primary=s) for s in (2, 4)]
    out += [_setting(f"sere-cos S={s} q={quantile}", "cosine", policy="sere", num_primary=s,
                     threshold_quantile=quantile) for s in (2, 4)]

    out += [_err(s) for s in (1, 2, 4, 6)]
    out += [_err(s, refill=True) for s in (1, 2, 4)]
    out += [budget_setting(1, d) for d in (2, 4, 6, 8, 12, 16, 24, 32, 48)]
    out += [_err(2, keep_cost=0.0, max_distinct=d) for d in (16, 32)]
    return out


def _err(s: int, tol: float = 0.6, **kw) -> dict:
    """A renormalised sere-err setting."""
    flags = "".join(f" {k}" if v is True else f" {k}={v}" for k, v in kw.items())
    return _setting(f"sere-err S={s} tol={tol}{flags}", "error", policy="sere-err", num_primary=s,
                    tolerance=tol, renormalize=True, **kw)


def xshare_setting(num_primary: int, budget: int) -> dict:
    """XShare: each token's top-S experts, then the experts of largest summed router score up to
    `budget` distinct experts; each token takes its top-k among them."""
    return _setting(f"xshare S={num_primary} B={budget}", policy="xshare", num_primary=num_primary,
                    max_distinct=budget)


def budget_setting(num_primary: int, max_distinct: int) -> dict:
    """sere-err with refill and a budget: P from each token's top-S, then the experts of largest
    summed routing weight up to `max_distinct`, every other slot substituted, or dropped and
    refilled from those experts by router score."""
    return _err(num_primary, keep_cost=0.0, max_distinct=max_distinct, refill=True)


def decode(model, batch: torch.Tensor, setting: dict, sidecars: dict):
    """Teacher-forced lock-step decode of batch [B, L+1]: (log-probs [B, L, V], mean distinct),
    as one causal forward (`sere.hf.lockstep.decode_forward`; tests/test_hf_moe.py checks that
    it equals L lock-step decode steps with a KV cache)."""
    cfg = setting["cfg"]
    tables = {matrix_kind(cfg): sidecars[setting["sidecar"]]} if setting["sidecar"] else {}
    return decode_forward(model, batch, cfg, tables)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through sorted points (clamped outside their range)."""
    pts = sorted(zip(xs, ys))
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1]


def _frontier_gaps(per: dict, frontier: list[str], m: dict, change: list[float]) -> list[float]:
    """Per batch: the point's ppl change minus the frontier's (labels `frontier`, topk included)
    linearly interpolated at the point's distinct experts."""
    base = per["topk"]
    gaps = []
    for k in range(len(base["nll"])):
        xs = [per[f]["distinct"][k] for f in frontier]
        ys = [math.exp(per[f]["nll"][k]) / math.exp(base["nll"][k]) - 1 for f in frontier]
        gaps.append(change[k] - _interp(m["distinct"][k], xs, ys))
    return gaps


def _gap_fields(name: str, gaps: list[float]) -> dict:
    """mean, std, standard error and wins (batches below the frontier) of per-batch gaps."""
    n = len(gaps)
    return {f"gap_to_{name}_frontier": statistics.fmean(gaps), f"gap_to_{name}_frontier_std": statistics.pstdev(gaps),
            f"gap_to_{name}_frontier_se": statistics.stdev(gaps) / math.sqrt(n) if n > 1 else INF,
            f"wins_vs_{name}_frontier": sum(g < 0 for g in gaps)}


def summarise(per: dict, settings: list[dict], bs: int, seq_len: int) -> list[dict]:
    """Records for one batch size from per[label] = {'nll': [...], 'distinct': [...], ...}."""
    base = per["topk"]
    num_batches = len(base["nll"])
    frontiers = {"oea": [s["label"] for s in settings if s["cfg"].policy == "oea"] + ["topk"],
                 "xshare": [s["label"] for s in settings if s["cfg"].policy == "xshare"
                            and s["cfg"].num_primary == 1] + ["topk"]}
    records = []
    for s in settings:
        m = per[s["label"]]
        change = [math.exp(n) / math.exp(b) - 1 for n, b in zip(m["nll"], base["nll"])]  # paired
        gaps = {}
        for name, labels in frontiers.items():
            if len(labels) > 1:
                gaps.update(_gap_fields(name, _frontier_gaps(per, labels, m, change)))
        distinct = statistics.fmean(m["distinct"])
        records.append({
            **s["cfg"].model_dump(), "sidecar": s["sidecar"], "label": s["label"], "batch_size": bs,
            "num_batches": num_batches, "seq_len": seq_len, "num_tokens": num_batches * bs * seq_len,
            "distinct_experts": distinct, "distinct_std": statistics.pstdev(m["distinct"]),
            "distinct_fraction": distinct / statistics.fmean(base["distinct"]),
            "perplexity": math.exp(statistics.fmean(m["nll"])),
            "perplexity_change": statistics.fmean(change), "perplexity_change_std": statistics.pstdev(change),
            **gaps,
            "agreement": statistics.fmean(m["agreement"]), "agreement_std": statistics.pstdev(m["agreement"]),
            "kl": statistics.fmean(m["kl"]),
            "per_batch": {"perplexity_change": change, "distinct": m["distinct"], "agreement": m["agreement"]},
        })
    return records


def _title(meta: dict, records: list[dict]) -> str:
    """The figure's title: model, shape, steps and the paired batches of each batch size."""
    batches = ", ".join(f"{n} at B={bs}" for bs, n in sorted({(r["batch_size"], r["num_batches"]) for r in records}))
    return (f"{Path(meta['model']).name}: E={meta['num_experts']} K={meta['top_k']}, L={meta['seq_len']} steps, "
            f"paired batches: {batches}")


def _repo_path(path) -> str:
    """`path` relative to the repository when inside it (results files record no machine paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else Path(path).name


def _command(argv: list[str] | None) -> str:
    """The command line that made a results file, with repository-relative paths."""
    words = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "benchmarks/pareto.py"] + [_repo_path(w) if Path(w).exists() else w for w in words])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models/tiny-moe"))
    parser.add_argument("--text", default=str(ROOT / "models/tiny-moe/heldout.txt"))
    parser.add_argument("--cosine", help="cosine sidecar (default MODEL/sere_similarity.safetensors)")
    parser.add_argument("--frobenius", help="default MODEL/sere_similarity.frobenius.safetensors")
    parser.add_argument("--cka", help="default MODEL/sere_similarity.cka.safetensors")
    parser.add_argument("--error", help="default MODEL/sere_similarity.substitution_error.safetensors")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-batches", type=int, default=32)
    parser.add_argument("--quantile", type=float, default=0.5, help="paper sere's per-layer rho quantile")
    parser.add_argument("--only", nargs="+", help="labels to run (the peers topk, oea and xshare always run)")
    parser.add_argument("--xshare", nargs="+", metavar="S:B",
                        help="the xshare points instead of the default sweep: warm-up S, budget B (e.g. 1:12 1:20)")
    parser.add_argument("--budgets", nargs="+", metavar="S:D",
                        help="instead of the default sweep: topk, oea and sere-err with refill, base S and a "
                             "budget of D distinct experts for each S:D (e.g. 2:16 3:21)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/pareto.json"))
    parser.add_argument("--png", default=str(ROOT / "benchmarks/results/pareto.png"))
    parser.add_argument("--merge", nargs="+", help="only merge these JSON outputs (split runs) and re-plot")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["batch_size"])
        meta = {**parts[0]["meta"], "wall_s": [p["meta"]["wall_s"] for p in parts],
                "merged": [p["meta"].get("command", "") for p in parts], "command": _command(argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        plot_pareto(records, args.png, _title(meta, records))
        return records
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model, tokenizer = load_model(model_dir)
    blocks = find_moe_blocks(model)
    layer_ids = [b.layer_idx for b in blocks]
    load = lambda p: load_sidecar(p, num_experts=blocks[0].num_experts, layer_ids=layer_ids)  # noqa: E731
    sidecars = {
        "cosine": load(args.cosine or model_dir / "sere_similarity.safetensors"),
        "frobenius": load(args.frobenius or model_dir / "sere_similarity.frobenius.safetensors"),
        "cka": load(args.cka or model_dir / "sere_similarity.cka.safetensors"),
        "error": load(args.error or model_dir / "sere_similarity.substitution_error.safetensors"),
    }
    settings = default_settings(args.quantile)
    peers = ("topk", "oea", "xshare")
    if args.xshare:
        settings = [s for s in settings if s["cfg"].policy != "xshare"] + [
            xshare_setting(*map(int, b.split(":"))) for b in args.xshare]
    if args.budgets:
        settings = [s for s in settings if s["cfg"].policy in peers] + [
            budget_setting(*map(int, b.split(":"))) for b in args.budgets]
    if args.only:
        settings = [s for s in settings if s["cfg"].policy in peers or s["label"] in args.only]
    token_ids = tokenize(tokenizer, args.text, 400_000)
    started = time.perf_counter()
    records = []
    # every batch size's batches first: the progress total, and a too-short text fails before any work
    planned = [(bs, make_batches(token_ids, bs, args.seq_len, args.num_batches)) for bs in args.batch_sizes]
    total_tokens = sum(len(batches) * bs * args.seq_len for bs, batches in planned) * len(settings)
    with Progress(total_tokens, "[pareto] lock-step decode", unit="token") as bar:
        for bs, batches in planned:
            per = {s["label"]: {"nll": [], "kl": [], "agreement": [], "distinct": []} for s in settings}
            for batch in batches:
                ref = None
                for s in settings:
                    logp, distinct = decode(model, batch, s, sidecars)
                    bar.update(bs * args.seq_len)
                    ref = logp if ref is None else ref
                    for key, value in batch_metrics(logp, ref, batch[:, 1:]).items():
                        per[s["label"]][key].append(value)
                    per[s["label"]]["distinct"].append(distinct)
            records += summarise(per, settings, bs, args.seq_len)
    meta = {"command": _command(argv), "model": _repo_path(model_dir), "text": _repo_path(args.text),
            "seq_len": args.seq_len,
            "num_batches": args.num_batches, "quantile": args.quantile,
            "sidecar_tokens": {k: v.num_tokens for k, v in sidecars.items()},
            "num_experts": blocks[0].num_experts, "top_k": blocks[0].top_k, "moe_layers": len(blocks),
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s), CPU, shared/loaded",
            "wall_s": time.perf_counter() - started}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    plot_pareto(records, args.png, _title(meta, records))
    for r in records:
        log(f"B={r['batch_size']:>3} {r['label']:<34} distinct {r['distinct_experts']:6.2f} "
            f"({100 * r['distinct_fraction']:5.1f}%) dppl {100 * r['perplexity_change']:+7.2f}% "
            f"±{100 * r['perplexity_change_std']:.2f} gapOEA {100 * r['gap_to_oea_frontier']:+6.2f}% "
            f"±{100 * r['gap_to_oea_frontier_se']:.2f}(se) wins {r['wins_vs_oea_frontier']}/{r['num_batches']} "
            + (f"gapXShare {100 * r['gap_to_xshare_frontier']:+6.2f}% ±{100 * r['gap_to_xshare_frontier_se']:.2f}(se) "
               if "gap_to_xshare_frontier" in r else "") + f"agree {r['agreement']:.3f}")
    return records


if __name__ == "__main__":
    main()
