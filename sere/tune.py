"""`sere tune`: pick, per decode batch-size bucket, the settings that meet a quality target.

    sere tune --model DIR --text calib.txt --max-ppl-increase 0.01 [--out FILE] [--confidence 0.95]
    (or: python -m sere.tune ...)

For every bucket of `sere.schedule.BUCKETS` (1, 2-4, 5-8, 9-16, 17-32, 33-64, 65+ tokens per
step) the candidate settings (`candidates`: topk; oea S=1..K-1; sere-err with S=2 and K/2, and
with S=1 under budgets of distinct experts; xshare under the same budgets) are measured under
lock-step teacher-forced decoding of the calibration text (`sere.hf.lockstep.decode_forward`)
at the bucket's edge sizes (`BUCKET_SIZES`), paired with topk on the same sequences. `select`
keeps the candidate with the fewest mean distinct experts whose upper confidence bound on the
perplexity increase (mean + z x s.e., the s.e. over paired sequences or over batches, whichever
is larger) is within the target at every measured size; topk always qualifies. The schedule (docs/spec.md §20) is written next to the
model (`sere_schedule.json`) or to --out, with every measurement and the command that made it.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from statistics import NormalDist

__all__ = ["BUCKET_SIZES", "BUDGET_FRACTIONS", "candidates", "main", "qualifies", "select"]

# The decode batch sizes measured per bucket (in sere.schedule.BUCKETS order): both edges, since
# a policy's cost can grow either way inside a bucket (OEA fills from fewer loaded experts at the
# lower edge; a fixed budget of distinct experts binds harder at the upper edge). 65+: 65 and 128.
BUCKET_SIZES: tuple[tuple[int, ...], ...] = ((1,), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128))
# Budgets of distinct experts tried by sere-err and xshare: these fractions of topk's distinct
# experts at the bucket's upper edge.
BUDGET_FRACTIONS = (0.4, 0.55, 0.7, 0.85)


def candidates(top_k: int, topk_distinct: float, policies: tuple[str, ...]) -> list[dict]:
    """The candidate settings of one bucket: [{"label", "family", "config": SereConfig fields}],
    topk first, each family's members from the fewest distinct experts to the most (`_tune_bucket`
    stops a family at its first member that qualifies: the rest can only load more experts).

    `topk_distinct`: mean distinct experts per layer per step of topk at the bucket's upper edge
    (the budgets are fractions of it); `policies`: the families to try.
    """
    out = [{"label": "topk", "family": "topk", "config": {"policy": "topk"}}]
    if "oea" in policies:
        out += [{"label": f"oea S={s}", "family": "oea", "config": {"policy": "oea", "num_primary": s}}
                for s in range(1, top_k)]
    budgets = sorted({max(2, round(f * topk_distinct)) for f in BUDGET_FRACTIONS})
    if "sere-err" in policies:
        for s in sorted({min(2, top_k - 1), max(1, top_k // 2)}):
            out.append({"label": f"sere-err S={s} tol=0.6 renorm", "family": "sere-err",
                        "config": {"policy": "sere-err", "num_primary": s, "tolerance": 0.6, "renormalize": True}})
        out += [{"label": f"sere-err S=1 budget={d} refill", "family": "sere-err budget",
                 "config": {"policy": "sere-err", "num_primary": 1, "tolerance": 0.6, "renormalize": True,
                            "keep_cost": 0.0, "max_distinct": d, "refill": True}} for d in budgets]
    if "xshare" in policies:
        out += [{"label": f"xshare S=1 budget={d}", "family": "xshare",
                 "config": {"policy": "xshare", "num_primary": 1, "max_distinct": d}} for d in budgets]
    return out


def qualifies(row: dict, max_increase: float, z: float) -> bool:
    """Whether a measured candidate meets the target: topk always; any other when it was measured
    (`sizes` not empty) and at every measured size increase + z x increase_se <= max_increase."""
    if row["config"]["policy"] == "topk":
        return True
    return bool(row["sizes"]) and all(m["increase"] + z * m["increase_se"] <= max_increase for m in row["sizes"])


def select(rows: list[dict], max_increase: float, z: float) -> dict:
    """The chosen row of one bucket's measurements.

    rows: [{"label", "config", "sizes": [{"batch_size", "distinct", "increase", "increase_se"}]}],
    topk among them. Among the rows that `qualify`, the fewest distinct experts (mean over the
    measured sizes); ties: the smaller largest upper bound, then the earlier row.
    """
    if not any(row["config"]["policy"] == "topk" for row in rows):
        raise ValueError("select needs the topk row among the candidates (it always qualifies)")

    def key(indexed):
        index, row = indexed
        bound = max(m["increase"] + z * m["increase_se"] for m in row["sizes"])
        return statistics.fmean(m["distinct"] for m in row["sizes"]), bound, index

    qualified = [(i, row) for i, row in enumerate(rows) if qualifies(row, max_increase, z)]  # topk included
    return min(qualified, key=key)[1]


def _command(prog: str, argv: list[str]) -> str:
    """The command line that made a schedule, with repository-relative paths where possible."""
    root = Path(__file__).resolve().parents[1]

    def word(w: str) -> str:
        path = Path(w)
        if path.exists() and path.resolve().is_relative_to(root):
            return str(path.resolve().relative_to(root))
        return w

    return shlex.join(prog.split() + [word(w) for w in argv])


def build_parser(prog: str = "python -m sere.tune") -> argparse.ArgumentParser:
    """The command line of `sere tune`."""
    from sere.schedule import SCHEDULE_NAME
    from sere.sidecars import ERROR_SIDECAR_NAME

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick, per decode batch-size bucket (1, 2-4, 5-8, 9-16, 17-32, 33-64, 65+), the re-routing\n"
                    "settings with the fewest distinct experts whose perplexity increase over topk stays\n"
                    "within a target (with a confidence margin), measured on calibration text; write the\n"
                    "schedule that `policy: tuned` follows.",
        epilog=f"example:\n  {prog} --model models/tiny-moe --text models/tiny-moe/calib.txt --max-ppl-increase 0.01")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face MoE model directory (config, weights, tokenizer; Qwen2/3-MoE, Mixtral, "
                             "OLMoE, DeepSeek-V2/V3)")
    parser.add_argument("--text", required=True, metavar="PATH",
                        help="calibration text (a UTF-8 file or a folder of text files); evaluate the schedule on "
                             "other, held-out text")
    parser.add_argument("--max-ppl-increase", type=float, required=True, metavar="X",
                        help="target: perplexity at most (1 + X) x topk's, e.g. 0.01 for 1%%, > 0")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="C",
                        help="one-sided confidence of the bound: a setting qualifies when mean + z(C) x s.e. of "
                             "its paired increase is within the target, in [0.5, 1) (default: %(default)s)")
    parser.add_argument("--out", metavar="FILE",
                        help=f"where to write the schedule (default: MODEL/{SCHEDULE_NAME}, which policy tuned follows)")
    parser.add_argument("--policies", nargs="+", default=None, metavar="POLICY",
                        help="candidate families besides topk: oea, sere-err, xshare (default: all the policy "
                             "layer has; sere-err reads the substitution error sidecar)")
    parser.add_argument("--error", metavar="FILE",
                        help=f"substitution error sidecar for sere-err (default: MODEL/{ERROR_SIDECAR_NAME})")
    parser.add_argument("--seq-len", type=int, default=32, metavar="L",
                        help="decode steps per sequence (default: %(default)s)")
    parser.add_argument("--num-sequences", type=int, default=48, metavar="N",
                        help="sequences per measured batch size: N // B batches of B (at least --min-batches) "
                             "(default: %(default)s)")
    parser.add_argument("--min-batches", type=int, default=4, metavar="K",
                        help="at least K batches of every measured size (the s.e. is also taken over batches, "
                             "whose sequences share routing), >= 2 (default: %(default)s)")
    parser.add_argument("--max-text-tokens", type=int, default=1_000_000, metavar="N",
                        help="tokens of --text read at most (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's choice)")
    return parser


def _check_args(parser, args) -> None:
    from sere.policy import POLICIES

    if not args.max_ppl_increase > 0:
        parser.error(f"--max-ppl-increase must be > 0, got {args.max_ppl_increase}")
    if not 0.5 <= args.confidence < 1:
        parser.error(f"--confidence must be in [0.5, 1), got {args.confidence}")
    if args.min_batches < 2:
        parser.error(f"--min-batches must be >= 2 (a standard error over batches), got {args.min_batches}")
    for flag in ("seq_len", "num_sequences", "max_text_tokens", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    available = tuple(p for p in ("oea", "sere-err", "xshare") if p in POLICIES)
    args.policies = tuple(available if args.policies is None else args.policies)
    for name in args.policies:
        if name not in available:
            parser.error(f"--policies: {name!r} is not a candidate family; choose from {list(available)}")


def main(argv: list[str] | None = None, prog: str = "python -m sere.tune") -> Path:
    """`sere tune`; returns the schedule file written."""
    import torch

    from sere.hf.tune import tune_model

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    z = NormalDist().inv_cdf(args.confidence)
    return tune_model(args, z=z, command=_command(prog, argv))


if __name__ == "__main__":
    main()
