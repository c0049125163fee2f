"""Calibration of the asymmetric substitution error for `sere-err` (docs/spec.md §9).

    sere substitution --model DIR --data PATH --tokens N [--chunk-tokens C] [--out FILE]
                                                      (or: python -m sere.substitution ...)

    err[i, j] = sum_{n routed to i} ||Y_i[n] - Y_j[n]||^2 / sum_{n routed to i} ||Y_i[n]||^2

the relative output error of running expert j in place of expert i, over the calibration tokens
that the model's own router sends to i (any of its top-k slots). Dropping i costs 1; diagonal 0.
Experts that no calibration token reaches get a row of 1 off the diagonal (no evidence: as bad
as dropping), so `sere-err` never substitutes them (they are dropped, or kept when critical).

Streaming: with r_i[n] in {0, 1} the routing indicator,
    num[i, j] = sum_n r_i[n] (||Y_i[n]||^2 + ||Y_j[n]||^2 - 2 <Y_i[n], Y_j[n]>)
              = A_i + (R^T Q)[i, j] - 2 (flat(r * Y) flat(Y)^T)[i, j]
with Q[n, j] = ||Y_j[n]||^2, accumulated in float64 per chunk of C tokens: memory E x C x d,
never E x N x d.

Shape legend: N calibration tokens, C chunk tokens, E routed experts, K top-k, d hidden.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sere.hf.calibrate import capture_layer_inputs
from sere.hf.calibration_io import calibration_parser, load_calibration, parse_calibration_args, save_calibration
from sere.hf.moe import MoeBlock, find_moe_blocks, run_experts
from sere.progress import log, progress
from sere.sidecars import ERROR_METRIC, ERROR_SIDECAR_NAME

__all__ = ["ERROR_SIDECAR_NAME", "substitution_error", "calibrate_errors", "main"]


@torch.no_grad()
def substitution_error(
    block: MoeBlock, x: torch.Tensor, topk_ids: torch.Tensor, chunk_tokens: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Substitution errors of `block`'s routed experts on their own routed tokens.

    Args:
        x: [N, d] float layer inputs.
        topk_ids: [N, K] int64, the router's choice for each token (duplicates count once).
        chunk_tokens: C, tokens per expert chunk.
    Returns:
        (err [E, E] float32 with diagonal 0 and rows of 1 for unrouted experts,
         tokens routed to each expert [E] int64).
    """
    num_experts = block.num_experts
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows, x has {x.shape[0]}")
    num = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    own = torch.zeros(num_experts, dtype=torch.float64)  # A_i = sum_n r_i ||Y_i||^2
    count = torch.zeros(num_experts, dtype=torch.int64)
    starts = range(0, x.shape[0], chunk_tokens)
    for s in progress(starts, desc=f"[substitution] layer {block.layer_idx}", unit="chunk", leave=False,
                      every=0.25):
        e = min(s + chunk_tokens, x.shape[0])
        y = run_experts(block, x[s:e]).double()  # [E, C, d]
        routed = torch.zeros(e - s, num_experts, dtype=torch.float64)
        routed.scatter_(1, topk_ids[s:e].long(), 1.0)  # [C, E]
        sq = (y * y).sum(-1).T  # [C, E]
        weighted = (y * routed.T[:, :, None]).flatten(1)  # [E, C*d]
        num += routed.T @ sq - 2.0 * (weighted @ y.flatten(1).T)  # [E, E]
        own += (routed * sq).sum(0)
        count += routed.sum(0).long()
    num += own[:, None]
    err = (num.clamp_min(0.0) / own.clamp_min(1e-300)[:, None]).float()
    err[count == 0] = 1.0
    err.fill_diagonal_(0.0)
    return err, count


def calibrate_errors(
    model, token_ids: torch.Tensor, *, chunk_tokens: int = 256, seq_len: int = 512, batch_size: int = 8
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """({layer: err [E, E]}, {layer: routed counts [E]}, number of calibration tokens)."""
    blocks = find_moe_blocks(model)
    captured = capture_layer_inputs(model, blocks, token_ids, seq_len, batch_size)
    errors, counts = {}, {}
    for b in progress(blocks, desc="[substitution] substitution error", unit="layer"):
        x, ids = captured[b.layer_idx]
        errors[b.layer_idx], counts[b.layer_idx] = substitution_error(b, x, ids, chunk_tokens)
    return errors, counts, captured[blocks[0].layer_idx][0].shape[0]


def main(argv: list[str] | None = None, prog: str = "python -m sere.substitution") -> Path:
    """`sere substitution` (`prog` names it in usage and errors); returns the sidecar's path."""
    parser = calibration_parser(
        prog,
        "Calibrate the substitution error sidecar that policy `sere-err` reads: err[i, j] is\n"
        "the relative output error of running expert j in place of expert i, over the\n"
        "calibration tokens the model's router sends to i (0 on the diagonal; 1 = as bad as\n"
        "dropping i).",
    )
    args = parse_calibration_args(parser, argv, chunk_tokens=256, sidecar_name=ERROR_SIDECAR_NAME)

    model, blocks, token_ids = load_calibration(args, "substitution")
    errors, counts, num_tokens = calibrate_errors(
        model, token_ids, chunk_tokens=args.chunk_tokens, seq_len=args.seq_len, batch_size=args.batch_size
    )
    path = save_calibration(args, errors, metric=ERROR_METRIC, num_tokens=num_tokens, model=model,
                            num_experts=blocks[0].num_experts, sidecar_name=ERROR_SIDECAR_NAME)
    for layer, err in errors.items():
        off = err.masked_fill(torch.eye(err.shape[0], dtype=torch.bool), float("inf"))
        best = off.min(1).values
        finite = best[best.isfinite()]
        log(f"[substitution] layer {layer}: best-substitute error median {finite.median():.3f} "
            f"min {finite.min():.3f}; {(finite < 1).sum()}/{err.shape[0]} experts beat dropping; "
            f"unrouted {(counts[layer] == 0).sum()}")
    log(f"[substitution] wrote {path} ({num_tokens} tokens)")
    return path


if __name__ == "__main__":
    main()
