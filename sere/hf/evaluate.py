"""Quality of re-routing under lock-step batch decoding (docs/spec.md §16).

    sere evaluate --model DIR --text PATH --batch-size 1 8 32 --policy sere oea \
        [--num-primary S ...] [--threshold R ... | --threshold-quantile Q ...] [--similarity FILE] \
        [--seq-len L] [--num-batches N | --num-sequences M] --json OUT [--png OUT]
    sere evaluate ... --policy sere-err [--error FILE] [--tolerance T ...] [--keep-cost C]
        [--max-distinct M] [--renormalize]
    sere evaluate ... --schedule FILE    (policy tuned: each batch size's bucket of a `sere tune` schedule)
    (or: python -m sere.evaluate ...)

Without --policy the model's own schedule (MODEL/sere_schedule.json) is evaluated when it has
one (docs/spec.md §20), else policy sere.

B held-out sequences of L+1 tokens are decoded together, teacher-forced, one token per sequence
per step with a KV cache, so every MoE layer re-routes across the B tokens of each step (the
batch-decode situation SERE targets). `topk` (re-routing off) always runs first on the same
sequences; each policy setting is compared against it: perplexity, next-token agreement (argmax
equal to topk's), KL(topk || policy) per token, and distinct experts per layer per step.

Shape legend: B batch size, L decoded steps per sequence, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from sere.config import SereConfig
from sere.ep.placement import linear_placement
from sere.hf.calibrate import MODEL_HELP, load_model, log, tokenize
from sere.hf.lockstep import decode_lockstep, evaluate, hook_tables, make_batches  # noqa: F401
from sere.hf.evaluate_plot import plot
from sere.hf.moe import find_moe_blocks
from sere.policy import POLICIES, TUNED, matrix_kind
from sere.hf.substitution import ERROR_SIDECAR_NAME
from sere.schedule import SCHEDULE_NAME
from sere.sidecars import SIDECAR_NAME, load_sidecar

__all__ = ["DEFAULT_OPERATING_POINT", "hook_tables", "make_batches", "decode_lockstep", "evaluate", "main"]

# Chosen on models/tiny-moe (64 experts, top-8; benchmarks/results/evaluate_tiny_moe*.json):
# S = K/2 = 4 costs <= +1.1% perplexity at batch >= 8 with 61-95% of topk's distinct experts,
# S = 2 costs +3.6..8.5% at batch 8-32; a threshold (rho as the 0.9 similarity quantile) kept
# more experts without beating plain S at equal distinct experts, so rho = 0.
DEFAULT_OPERATING_POINT = {"num_primary": 4, "threshold": 0.0}


def _layer_table(pairs: list[str]) -> dict[int, int]:
    """{layer: S} from --layer-num-primary LAYER:S ..."""
    try:
        return {int(layer): int(s) for layer, s in (pair.split(":") for pair in pairs)}
    except ValueError:
        raise SystemExit(f"--layer-num-primary takes LAYER:S pairs of integers (e.g. 1:3), got {pairs}") from None


def _settings(args, top_k: int) -> list[SereConfig]:
    """The SereConfigs of the command line's cross product (policy x S x threshold/tolerance)."""
    common = {"max_decode_tokens": max(256, *args.batch_size)}  # every evaluated step is decode
    if args.node_limit:
        common.update(node_limit=args.node_limit, max_nodes=args.max_nodes)
    if args.layer_num_primary:
        common["layer_num_primary"] = _layer_table(args.layer_num_primary)
    settings = []
    for policy in dict.fromkeys(args.policy):
        if policy == TUNED:
            settings.append(SereConfig(policy=TUNED, schedule=str(args.schedule)))
            continue
        if policy == "topk":
            continue
        for s in args.num_primary:
            if not 0 < s < top_k:
                raise SystemExit(f"--num-primary {s} must be in [1, top_k={top_k})")
            base = {**common, "policy": policy, "num_primary": s}
            if policy == "oea":
                settings.append(SereConfig(**base))
            elif policy == "xshare":
                if args.max_distinct is None:
                    raise SystemExit("--policy xshare needs --max-distinct B (its budget of distinct experts)")
                settings.append(SereConfig(**base, max_distinct=args.max_distinct))
            elif policy == "sere-err":
                settings += [SereConfig(**base, tolerance=t, keep_cost=args.keep_cost, max_distinct=args.max_distinct,
                                        renormalize=args.renormalize, refill=args.refill)
                             for t in args.tolerance]
            elif args.threshold_quantile:
                settings += [SereConfig(**base, threshold_quantile=q) for q in args.threshold_quantile]
            else:
                settings += [SereConfig(**base, threshold=r) for r in args.threshold]
    return settings


def _resolve_schedule(args, blocks, hf_config) -> None:
    """Settle `args.policy` / `args.schedule`: --schedule means tuned; no --policy means tuned
    with the model's own schedule when it has one, else sere (said on stderr). The schedule
    must fit the model (experts, top-k, MoE layers)."""
    if args.schedule is not None:
        args.policy = list(args.policy or []) + [TUNED]
    elif args.policy is None:
        own = Path(args.model) / SCHEDULE_NAME
        args.policy = [TUNED] if own.is_file() else ["sere"]
        if not own.is_file():
            log(f"[evaluate] no {own}: evaluating policy sere, the default without a schedule (make one with `sere tune`)")
    if TUNED not in args.policy:
        return
    args.schedule = args.schedule or Path(args.model) / SCHEDULE_NAME
    from sere.schedule import load_schedule, model_shape

    try:
        load_schedule(args.schedule).check_model(num_experts=blocks[0].num_experts, top_k=blocks[0].top_k,
                                                 num_layers=len(blocks), shape=model_shape(hf_config))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _command(prog: str, argv: list[str] | None) -> str:
    return shlex.join(prog.split() + (sys.argv[1:] if argv is None else list(argv)))


def _schedule_metadata(path) -> dict | None:
    """The schedule's target, command and calibration (what made it), for the results file."""
    if path is None:
        return None
    from sere.schedule import load_schedule

    meta = load_schedule(path).metadata
    return {key: meta.get(key) for key in ("model_id", "target", "command", "calibration")}


def build_parser(prog: str = "python -m sere.evaluate") -> argparse.ArgumentParser:
    """The command line of `sere evaluate` (`prog` names it in usage and errors)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure what re-routing costs under lock-step batch decoding: B held-out sequences\n"
                    "are decoded together, teacher-forced, with plain topk routing first and then each\n"
                    "policy setting, compared with topk on the same sequences: perplexity, next-token\n"
                    "agreement, KL(topk || policy), distinct experts per layer per step.",
        epilog=f"example:\n  {prog} --model models/tiny-moe --text models/tiny-moe/heldout.txt \\\n"
               "      --batch-size 8 32 --policy sere oea --num-primary 2 4 --json eval.json --png eval.png",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help=MODEL_HELP)
    parser.add_argument("--text", required=True, metavar="PATH",
                        help="held-out text: a UTF-8 file, or a folder whose text files are read in sorted "
                             "order; cut into non-overlapping sequences of --seq-len + 1 tokens")
    parser.add_argument("--batch-size", type=int, nargs="+", required=True, metavar="B",
                        help="one or more batch sizes, each >= 1: B sequences are decoded in lock-step, so "
                             "every MoE layer re-routes across B tokens per step; each B is reported apart")
    parser.add_argument("--policy", nargs="+", choices=POLICIES + (TUNED,), metavar="POLICY",
                        help="policies compared with topk (the model's own routing, always run first as the "
                             "baseline): sere = substitute the most similar primary expert; oea = fill with "
                             "experts the batch already loads, by router score; sere-err = substitute the "
                             "primary with the lowest substitution error, or drop the slot; tuned = each "
                             "batch size's settings from the schedule `sere tune` wrote (--schedule); topk "
                             f"(default: tuned when MODEL/{SCHEDULE_NAME} exists, else sere)")
    parser.add_argument("--schedule", metavar="FILE",
                        help=f"schedule read by policy tuned (adds it to --policy; default: MODEL/{SCHEDULE_NAME}, "
                             "written by `sere tune`); its records carry policy 'tuned' and the bucket's label")
    parser.add_argument("--num-primary", type=int, nargs="+", default=[DEFAULT_OPERATING_POINT["num_primary"]],
                        metavar="S",
                        help="primary experts per token, 1 <= S < the model's top-k: every token keeps its "
                             "top-S experts and their union is the batch's primary set; one run per value "
                             f"(default: {DEFAULT_OPERATING_POINT['num_primary']})")
    parser.add_argument("--threshold", type=float, nargs="+", default=[DEFAULT_OPERATING_POINT["threshold"]],
                        metavar="RHO",
                        help="sere: a secondary expert whose most similar primary is less similar than RHO "
                             "keeps its slot (a critical expert), in [0, 1]; 0 re-routes every secondary; "
                             f"one run per value (default: {DEFAULT_OPERATING_POINT['threshold']})")
    parser.add_argument("--threshold-quantile", type=float, nargs="+", metavar="Q",
                        help="sere: per-layer RHO = this quantile of the layer's off-diagonal similarities, "
                             "in [0, 1] (means the same for every metric); replaces --threshold; one run per value")
    parser.add_argument("--similarity", metavar="FILE",
                        help=f"similarity sidecar read by policy sere (default: MODEL/{SIDECAR_NAME}, "
                             "written by `sere calibrate`)")
    parser.add_argument("--error", metavar="FILE",
                        help=f"substitution error sidecar read by policy sere-err (default: "
                             f"MODEL/{ERROR_SIDECAR_NAME}, written by `sere substitution`)")
    parser.add_argument("--tolerance", type=float, nargs="+", default=[1.0], metavar="T",
                        help="sere-err: largest substitution error (relative output error; 1 = as bad as "
                             "dropping) at which a substitute is used, in (0, 1]; a slot with no substitute "
                             "that good is dropped; one run per value (default: 1.0)")
    parser.add_argument("--keep-cost", type=float, default=None, metavar="C",
                        help="sere-err: a secondary slot whose weighted error (router weight x min(error, 1)) "
                             "is above C keeps its own expert, >= 0 (default: no slot is kept)")
    parser.add_argument("--max-distinct", type=int, metavar="M",
                        help="sere-err: budget of distinct experts per MoE call, primaries included, >= 1: at "
                             "most M - |primaries| kept experts, those of largest summed cost; the others are "
                             "approximated (default: no budget); xshare (required): its budget B of distinct experts")
    parser.add_argument("--renormalize", action="store_true",
                        help="sere-err: rescale each token's weights to their original sum after drops "
                             "(default: off)")
    parser.add_argument("--refill", action="store_true",
                        help="sere-err: refill dropped slots with experts the batch already loads, highest "
                             "router score first, as OEA fills (default: off)")
    parser.add_argument("--seq-len", type=int, default=64, metavar="L",
                        help="decode steps per sequence, >= 1; a sequence is L + 1 tokens (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-batches", type=int, metavar="N",
                       help="batches per batch size, >= 1 (default: 1; fewer when the text runs out)")
    group.add_argument("--num-sequences", type=int, metavar="M",
                       help="sequences per batch size instead: M // B batches (at least 1) of every B, so every "
                            "batch size sees the same text")
    parser.add_argument("--max-text-tokens", type=int, default=1_000_000, metavar="N",
                        help="tokens of --text read at most (default: %(default)s)")
    parser.add_argument("--json", required=True, metavar="FILE",
                        help="output JSON: {meta, records}, one record per (setting, batch size)")
    parser.add_argument("--png", metavar="FILE",
                        help="also plot perplexity change against distinct experts, one panel per batch size "
                             "(needs matplotlib)")
    parser.add_argument("--ep-size", type=int, metavar="W",
                        help="virtual expert placement: E experts on W ranks (linear, as vLLM places them), so "
                             "that quality is measured under the placement the traffic figures assume")
    parser.add_argument("--ranks-per-node", type=int, default=8, metavar="R",
                        help="ranks per node of the virtual placement (default: %(default)s)")
    parser.add_argument("--node-limit", choices=("primary_nodes",),
                        help="node-aware re-routing (needs --ep-size): a token's secondary slots only go to "
                             "experts on the nodes of its own top-S experts (docs/spec.md §21)")
    parser.add_argument("--max-nodes", type=int, metavar="M",
                        help="with --node-limit: at most M nodes per token in all (DeepSeek-V3 style)")
    parser.add_argument("--layer-num-primary", nargs="+", metavar="LAYER:S",
                        help="S per MoE layer (decoder-layer index), --num-primary elsewhere, e.g. 1:3 "
                             "(docs/spec.md §22)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch CPU threads, >= 1 (default: torch's choice, about one per core)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m sere.evaluate") -> list[dict]:
    """`sere evaluate`; returns the records also written to --json."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.node_limit and not args.ep_size:
        parser.error("--node-limit needs the virtual placement: set --ep-size")
    for flag in ("num_batches", "num_sequences", "max_text_tokens", "threads", "seq_len", "ep_size",
                 "ranks_per_node", "max_nodes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.batch_size) < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    for value in args.threshold + (args.threshold_quantile or []):
        if not 0.0 <= value <= 1.0:
            parser.error(f"thresholds and quantiles must be in [0, 1], got {value}")
    for value in args.tolerance:
        if not 0.0 < value <= 1.0:
            parser.error(f"--tolerance must be in (0, 1], got {value}")
    if (args.keep_cost is not None and args.keep_cost < 0) or (args.max_distinct is not None and args.max_distinct < 1):
        parser.error(f"--keep-cost must be >= 0 and --max-distinct >= 1, got {args.keep_cost}, {args.max_distinct}")

    model, tokenizer = load_model(args.model)
    try:
        blocks = find_moe_blocks(model)
    except ValueError as exc:
        raise SystemExit(f"{args.model}: {exc}") from exc
    _resolve_schedule(args, blocks, model.config)
    settings = _settings(args, blocks[0].top_k)
    placement = None
    if args.ep_size:
        try:
            placement = linear_placement(blocks[0].num_experts, args.ep_size, min(args.ranks_per_node, args.ep_size))
        except ValueError as exc:
            raise SystemExit(f"--ep-size {args.ep_size}: {exc}") from exc
    sidecars = {}
    for kind, path in (("similarity", args.similarity or Path(args.model) / SIDECAR_NAME),
                       ("substitution_error", args.error or Path(args.model) / ERROR_SIDECAR_NAME)):
        if any(matrix_kind(s) == kind for s in settings):
            try:
                sidecars[kind] = load_sidecar(path, num_experts=blocks[0].num_experts,
                                              layer_ids=[b.layer_idx for b in blocks], num_layers=len(blocks))
            except ValueError as exc:
                raise SystemExit(str(exc)) from exc
    similarity, error = sidecars.get("similarity"), sidecars.get("substitution_error")
    token_ids = tokenize(tokenizer, args.text, args.max_text_tokens)
    num_batches = args.num_batches if args.num_batches is not None else 1
    records = evaluate(model, token_ids, args.batch_size, settings, seq_len=args.seq_len,
                       num_batches=num_batches, num_sequences=args.num_sequences, sidecars=sidecars,
                       placement=placement)
    meta = {"model": str(args.model), "text": str(args.text),
            "similarity": str(similarity.path) if similarity else None,
            "metric": similarity.metric if similarity else None,
            "error": str(error.path) if error else None,
            "schedule": str(args.schedule) if args.schedule else None, "command": _command(prog, argv),
            "schedule_metadata": _schedule_metadata(args.schedule),
            "num_experts": blocks[0].num_experts, "top_k": blocks[0].top_k, "moe_layers": len(blocks),
            "ep_size": args.ep_size, "ranks_per_node": args.ranks_per_node if args.ep_size else None}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    if args.png:
        plot(records, args.png, f"{Path(args.model).name}: {meta['metric'] or ''} E={meta['num_experts']} K={meta['top_k']}")
    for r in records:
        log(f"[evaluate] B={r['batch_size']:>3} {('tuned: ' + r['bucket_label']) if r['bucket_label'] else r['label']:<22} distinct {r['distinct_experts']:6.2f} "
            f"({100 * r['distinct_fraction']:5.1f}%) ppl {r['perplexity']:8.3f} ({100 * r['perplexity_change']:+6.2f}%) "
            f"agree {r['agreement']:.3f} kl {r['kl']:.4f}")
    return records


if __name__ == "__main__":
    main()
