"""Lock-step batch decoding of held-out text under a SereConfig: the measuring machinery that
`sere evaluate`, `sere tune` and benchmarks/pareto.py share (docs/spec.md §16).

B sequences of L+1 tokens are decoded together, teacher-forced, one token per sequence per
step, so every MoE layer re-routes across the B tokens of each step. Two equivalent ways:
`decode_lockstep` runs L real decode steps with a KV cache; `decode_forward` runs one causal
forward over [B, L] with each position's B tokens re-routed as one step (`routing_hook(
lockstep_batch=B)`), L times faster (tests/test_hf_moe.py checks that they agree).

Shape legend: B batch size, L decoded steps per sequence, V vocabulary.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from sere.config import SereConfig
from sere.hf.moe import find_moe_blocks, routing_hook
from sere.policy import TUNED, label, matrix_kind
from sere.progress import Progress

__all__ = [
    "batch_metrics", "decode_forward", "decode_lockstep", "evaluate", "hook_tables", "make_batches",
    "paired_increase", "sequence_nll",
]


def make_batches(token_ids: torch.Tensor, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """Up to `num_batches` [B, L+1] int64 batches of non-overlapping windows of `token_ids` [N].

    Raises SystemExit when not even one batch fits.
    """
    if seq_len < 1:
        raise SystemExit(f"--seq-len must be >= 1 (one decode step), got {seq_len}")
    num_windows = token_ids.numel() // (seq_len + 1)
    if num_windows < batch_size:
        raise SystemExit(
            f"the text has {token_ids.numel()} tokens: too short for {batch_size} sequences of "
            f"{seq_len + 1} tokens (one batch); use more text or a smaller --seq-len"
        )
    windows = token_ids[: num_windows * (seq_len + 1)].view(num_windows, seq_len + 1)
    count = min(num_batches, num_windows // batch_size)
    return [windows[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def hook_tables(cfg: SereConfig, sidecars: dict) -> dict:
    """routing_hook's `matrices` and `thresholds` for `cfg` from {matrix kind: Sidecar}."""
    kind = matrix_kind(cfg)
    if kind is None:
        return {}
    if kind not in sidecars:
        raise ValueError(f"policy {cfg.policy!r} needs a {kind} sidecar; none was loaded")
    sidecar = sidecars[kind]
    thresholds = None
    if cfg.threshold_quantile is not None:
        thresholds = {layer: sidecar.threshold_for(layer, cfg.threshold_quantile) for layer in sidecar.matrices}
    return {"matrices": sidecar.matrices, "thresholds": thresholds}


@torch.no_grad()
def decode_lockstep(model: nn.Module, batch: torch.Tensor, cfg: SereConfig, sidecars: dict | None = None,
                    placement=None):
    """Teacher-forced lock-step decoding of `batch` [B, L+1] under `cfg`, with a KV cache.

    `sidecars`: {matrix kind: Sidecar} ("similarity", "substitution_error") as `cfg` needs;
    `placement`: the virtual expert placement of the placement-aware options (`node_limit`).
    Returns:
        (log-probs [B, L, V] float32 of the next token at each step, mean distinct experts per
        layer per step, fraction of slots re-routed).
    """
    from transformers import DynamicCache

    num_steps = batch.shape[1] - 1
    out_steps = []
    with routing_hook(model, cfg, placement=placement, **hook_tables(cfg, sidecars or {})) as record:
        cache = DynamicCache(config=model.config)
        for t in range(num_steps):
            out = model(input_ids=batch[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            out_steps.append(out.logits[:, -1].float().log_softmax(-1))  # [B, V]
    slots = sum(c[0] for calls in record.calls.values() for c in calls) * find_moe_blocks(model)[0].top_k
    return torch.stack(out_steps, dim=1), record.mean_distinct(), record.rerouted_slots() / max(1, slots)


@torch.no_grad()
def decode_forward(model: nn.Module, batch: torch.Tensor, cfg: SereConfig, sidecars: dict | None = None):
    """What `decode_lockstep` computes, as one causal forward over `batch[:, :-1]` [B, L].

    Returns:
        (log-probs [B, L, V] float32, mean distinct experts per layer per step).
    """
    with routing_hook(model, cfg, lockstep_batch=batch.shape[0], **hook_tables(cfg, sidecars or {})) as record:
        logits = model(input_ids=batch[:, :-1]).logits  # [B, L, V]
    return logits.float().log_softmax(-1), record.mean_distinct()


def sequence_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] float64 mean next-token negative log-likelihood of each sequence.

    logp [B, L, V] float32 log-probs; targets [B, L] int64.
    """
    return -logp.gather(-1, targets[..., None]).squeeze(-1).double().mean(dim=1)


def batch_metrics(logp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean NLL, KL(ref || logp) per token and argmax agreement with `ref`.

    logp, ref [B, L, V] float32 log-probs; targets [B, L] int64.
    """
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # [B, L]
    kl = (ref.exp() * (ref - logp)).sum(-1)  # [B, L] KL(topk || policy)
    agree = (logp.argmax(-1) == ref.argmax(-1)).float()
    return {"nll": float(nll.mean()), "kl": float(kl.mean()), "agreement": float(agree.mean())}


def paired_increase(nll: list[float], base_nll: list[float], batch_size: int = 1) -> tuple[float, float]:
    """(perplexity increase, its standard error) from per-sequence mean NLLs paired with topk's.

    The increase is exp(mean d) - 1 with d the per-sequence NLL difference (sequences have equal
    length, so this is the perplexity ratio over all tokens minus 1). The s.e. is the delta
    method's exp(mean d) x s.e.(mean d), where s.e.(mean d) is the larger of the per-sequence
    one and the one over batches of `batch_size` consecutive sequences (their routing is shared,
    so their errors are correlated); inf when there are fewer than two sequences, or batches.
    """
    diffs = [a - b for a, b in zip(nll, base_nll)]
    mean = statistics.fmean(diffs)
    batches = [statistics.fmean(diffs[i : i + batch_size]) for i in range(0, len(diffs), batch_size)]
    se = max(_standard_error(diffs), _standard_error(batches) if batch_size > 1 else 0.0)
    return math.expm1(mean), math.exp(mean) * se


def _standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf


def evaluate(
    model: nn.Module,
    token_ids: torch.Tensor,
    batch_sizes: list[int],
    settings: list[SereConfig],
    *,
    seq_len: int = 64,
    num_batches: int | None = 1,
    num_sequences: int | None = None,
    sidecars: dict | None = None,
    placement=None,
) -> list[dict]:
    """`sere evaluate`'s measurement: one record per (setting, batch size), topk first.

    Every setting decodes the same batches with `decode_lockstep` (KV cache); each is compared
    with topk on them (paired per sequence).
    """
    records = []
    all_settings = [SereConfig(policy="topk")] + [s for s in settings if s.policy != "topk"]
    # every batch size's batches first: the progress total, and a too-short text fails before any work
    planned = [(bs, make_batches(token_ids, bs, seq_len,
                                 num_batches if num_sequences is None else max(1, num_sequences // bs)))
               for bs in batch_sizes]
    total_tokens = sum(len(batches) * bs * seq_len for bs, batches in planned) * len(all_settings)
    with Progress(total_tokens, "[evaluate] lock-step decode", unit="token") as bar:
        for bs, batches in planned:
            per = {s: {"nll": [], "kl": [], "agreement": [], "distinct": [], "rerouted": [], "seq_nll": []}
                   for s in all_settings}
            for batch in batches:
                ref = None
                for s in all_settings:
                    logp, distinct, rerouted = decode_lockstep(model, batch, s, sidecars, placement)
                    bar.update(bs * seq_len)
                    ref = logp if ref is None else ref
                    for key, value in batch_metrics(logp, ref, batch[:, 1:]).items():
                        per[s][key].append(value)
                    per[s]["distinct"].append(distinct)
                    per[s]["rerouted"].append(rerouted)
                    per[s]["seq_nll"] += sequence_nll(logp, batch[:, 1:]).tolist()
            base = per[all_settings[0]]
            records += [_record(s, bs, per[s], base, len(batches), seq_len) for s in all_settings]
    return records


def _record(s: SereConfig, bs: int, m: dict, base: dict, num_batches: int, seq_len: int) -> dict:
    """One `evaluate` record from the per-batch lists `m` of setting `s` and topk's `base`."""
    ppl, base_ppl = math.exp(statistics.fmean(m["nll"])), math.exp(statistics.fmean(base["nll"]))
    distinct, base_distinct = statistics.fmean(m["distinct"]), statistics.fmean(base["distinct"])
    batch_ppl = [math.exp(v) for v in m["nll"]]
    applied = s.at(bs)  # policy "tuned": the schedule's config for this batch size
    _, change_se = paired_increase(m["seq_nll"], base["seq_nll"], bs)
    return {
        "policy": s.policy, "label": label(s), "batch_size": bs,
        "bucket_label": label(applied) if s.policy == TUNED else None,
        "num_primary": applied.num_primary if applied.policy != "topk" else None, "threshold": applied.threshold,
        "threshold_quantile": applied.threshold_quantile, "tolerance": applied.tolerance,
        "keep_cost": applied.keep_cost, "max_distinct": applied.max_distinct, "renormalize": applied.renormalize,
        "refill": applied.refill, "node_limit": applied.node_limit, "max_nodes": applied.max_nodes,
        "num_tokens": num_batches * bs * seq_len, "num_batches": num_batches, "seq_len": seq_len,
        "perplexity": ppl, "perplexity_change": ppl / base_ppl - 1.0,
        "perplexity_change_se": change_se,  # paired with topk, per sequence and per batch
        "agreement": statistics.fmean(m["agreement"]), "kl": statistics.fmean(m["kl"]),
        "distinct_experts": distinct, "distinct_experts_topk": base_distinct,
        "distinct_fraction": distinct / base_distinct,
        "rerouted_fraction": statistics.fmean(m["rerouted"]),
        "spread": {
            "perplexity_std": statistics.pstdev(batch_ppl),
            # paired with topk on the same batch: the noise of `perplexity_change`
            "perplexity_change_std": statistics.pstdev(
                [math.exp(v - b) - 1.0 for v, b in zip(m["nll"], base["nll"])]),
            "per_batch": {"perplexity": batch_ppl, "agreement": m["agreement"], "kl": m["kl"],
                          "distinct_experts": m["distinct"]},
        },
    }
