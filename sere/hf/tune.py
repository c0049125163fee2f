"""The measuring half of `sere tune` (the rule and the command line are in `sere.tune`).

Per bucket of `sere.schedule.BUCKETS`: topk decodes the calibration batches of each measured
size first (the baseline, and the distinct experts the budgets are fractions of), then every
candidate decodes the same batches; per-sequence mean NLLs are paired with topk's
(`sere.hf.lockstep.paired_increase`). Shape legend: B batch size, L decoded steps per sequence.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from sere.config import SereConfig
from sere.hf.calibrate import load_model, log, tokenize
from sere.hf.lockstep import decode_forward, make_batches, paired_increase, sequence_nll
from sere.hf.moe import find_moe_blocks
from sere.progress import Progress
from sere.schedule import BUCKETS, SCHEDULE_NAME, model_shape, save_schedule
from sere.sidecars import ERROR_SIDECAR_NAME, load_sidecar
from sere.tune import BUCKET_SIZES, candidates, qualifies, select

__all__ = ["measure", "tune_model"]


def measure(model, batches: list[torch.Tensor], cfg: SereConfig, sidecars: dict, bar=None) -> dict:
    """Decode `batches` ([B, L+1] each) under `cfg`: {"seq_nll": [per sequence], "distinct": mean}."""
    seq_nll, distinct = [], []
    for batch in batches:
        logp, mean_distinct = decode_forward(model, batch, cfg, sidecars)
        seq_nll += sequence_nll(logp, batch[:, 1:]).tolist()
        distinct.append(mean_distinct)
        if bar is not None:
            bar.update(batch.shape[0] * (batch.shape[1] - 1))
    return {"seq_nll": seq_nll, "distinct": statistics.fmean(distinct)}


def _tune_bucket(model, planned: dict, top_k: int, policies, sidecars, bar, max_increase: float, z: float) -> list[dict]:
    """Every candidate's measurements in one bucket: rows for `sere.tune.select`.

    Two shortcuts that cannot change the choice: a candidate is measured at the upper edge
    first and not at the lower one when it already misses the target there; a family stops at
    its first member that qualifies (its later members load more experts). Such rows carry
    `skipped` and only the sizes measured.
    """
    topk = {size: measure(model, batches, SereConfig(policy="topk"), sidecars, bar)
            for size, batches in planned.items()}
    rows, settled = [], set()
    for cand in candidates(top_k, topk[max(planned)]["distinct"], policies):
        cfg, sizes, skipped = SereConfig(**cand["config"]), [], None
        if cand["family"] in settled:
            skipped = "a member of its family with fewer experts qualified"
        for size in sorted(planned, reverse=True) if skipped is None else ():
            m = topk[size] if cfg.policy == "topk" else measure(model, planned[size], cfg, sidecars, bar)
            increase, se = paired_increase(m["seq_nll"], topk[size]["seq_nll"], size)
            sizes.append({"batch_size": size, "num_sequences": len(m["seq_nll"]), "distinct": m["distinct"],
                          "distinct_topk": topk[size]["distinct"], "increase": increase, "increase_se": se})
            if cfg.policy != "topk" and increase + z * se > max_increase and len(sizes) < len(planned):
                skipped = f"misses the target at batch size {size}"
                break
        measured = {m["batch_size"] for m in sizes} if cfg.policy != "topk" else set(planned)
        bar.update(sum(len(planned[size]) * size * (planned[size][0].shape[1] - 1)
                       for size in set(planned) - measured))  # work skipped counts as done
        row = {**cand, "sizes": sorted(sizes, key=lambda m: m["batch_size"]), "skipped": skipped}
        rows.append(row)
        if cand["family"] != "topk" and qualifies(row, max_increase, z):
            settled.add(cand["family"])
    return rows


def _load_sidecars(args, blocks) -> dict:
    if "sere-err" not in args.policies:
        return {}
    path = Path(args.error) if args.error else Path(args.model) / ERROR_SIDECAR_NAME
    try:
        sidecar = load_sidecar(path, num_experts=blocks[0].num_experts, layer_ids=[b.layer_idx for b in blocks],
                               num_layers=len(blocks))
    except ValueError as exc:
        raise SystemExit(f"{exc} (sere-err candidates read it; make it with `sere substitution`, or tune "
                         "without them: --policies oea xshare)") from None
    return {"substitution_error": sidecar}


def tune_model(args, *, z: float, command: str) -> Path:
    """Measure every bucket's candidates for `args` (sere.tune's parsed command line) and write
    the schedule; returns its path."""
    model, tokenizer = load_model(args.model)
    try:
        blocks = find_moe_blocks(model)
    except ValueError as exc:
        raise SystemExit(f"{args.model}: {exc}") from exc
    top_k = blocks[0].top_k
    sidecars = _load_sidecars(args, blocks)
    token_ids = tokenize(tokenizer, args.text, args.max_text_tokens)
    planned = [{size: make_batches(token_ids, size, args.seq_len, max(args.min_batches, args.num_sequences // size))
                for size in sizes} for sizes in BUCKET_SIZES]
    num_candidates = len(candidates(top_k, 8.0, args.policies))  # the count does not depend on the budgets
    total = sum(len(b) * size * args.seq_len for bucket in planned for size, b in bucket.items()) * num_candidates
    started = time.perf_counter()
    entries = []
    with Progress(total, "[tune] lock-step decode", unit="token") as bar:
        for (low, high), bucket in zip(BUCKETS, planned):
            rows = _tune_bucket(model, bucket, top_k, args.policies, sidecars, bar, args.max_ppl_increase, z)
            chosen = select(rows, args.max_ppl_increase, z)
            entries.append(_entry(chosen, rows, args.max_ppl_increase, z))
            log(f"[tune] {low}-{high or 'inf'} tokens: {chosen['label']} "
                + ", ".join(f"B={m['batch_size']} distinct {m['distinct']:.2f}/{m['distinct_topk']:.2f} "
                            f"dppl {100 * m['increase']:+.2f}% (se {100 * m['increase_se']:.2f})"
                            for m in chosen["sizes"]))
    out = Path(args.out) if args.out else Path(args.model) / SCHEDULE_NAME
    save_schedule(
        out, model_id=Path(args.model).resolve().name, num_experts=blocks[0].num_experts, top_k=top_k,
        num_layers=len(blocks), buckets=entries, command=command, model_shape=model_shape(model.config),
        target={"max_ppl_increase": args.max_ppl_increase, "confidence": args.confidence, "z": z},
        calibration={"text": command_path(args.text), "seq_len": args.seq_len, "num_sequences": args.num_sequences,
                     "min_batches": args.min_batches,
                     "policies": list(args.policies), "wall_s": round(time.perf_counter() - started, 1)},
    )
    log(f"[tune] wrote {out}")
    return out


def command_path(path) -> str:
    """`path` relative to the working directory when inside it (schedules record no machine paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def _entry(chosen: dict, rows: list[dict], max_increase: float, z: float) -> dict:
    """A schedule bucket: the chosen config, its measurements, and every candidate's summary."""
    return {
        "config": chosen["config"], "label": chosen["label"], "measured": chosen["sizes"],
        "candidates": [{"label": r["label"], "qualified": qualifies(r, max_increase, z), "skipped": r["skipped"],
                        "batch_sizes": [m["batch_size"] for m in r["sizes"]],
                        "distinct": [round(m["distinct"], 3) for m in r["sizes"]],
                        "increase": [round(m["increase"], 5) for m in r["sizes"]],
                        "increase_se": [round(m["increase_se"], 5) for m in r["sizes"]]} for r in rows],
    }
