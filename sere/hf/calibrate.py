"""Offline calibration of the expert similarity sidecar (docs/spec.md §14).

    sere calibrate --model DIR --data PATH --metric cosine|frobenius|cka --tokens N
        [--chunk-tokens C] [--seq-len L] [--out FILE]         (or: python -m sere.calibrate ...)

One forward pass over calibration text captures every MoE layer's real inputs X [N, d]. Then,
per layer, EVERY routed expert runs on the same tokens, streamed in chunks of C tokens; only
sufficient statistics are accumulated, never E x N x d outputs:
    cosine     G[i, j] = sum_n cos(Y_i[n], Y_j[n])             -> sim = (G / N + 1) / 2
    frobenius  G[i, j] = sum_n <Y_i[n], Y_j[n]>  (float64)     -> D_ij = sqrt(G_ii + G_jj - 2 G_ij),
                                                                 sim = 1 - D / max D
    cka        Y_i = H_i W_i^T (H_i [N, I] gated activations, W_i [d, I] the down projection), so
               Yc_i^T Yc_j = W_i (Hc_i^T Hc_j) W_j^T. We accumulate M = Z^T Z over the stacked
               Z = [Z_0 | ... | Z_{E-1}] ([C, E*r], r = min(I, d), Z_i = H_i if I <= d else Y_i)
               plus column sums, centre at the end, and get
               ||Yc_j^T Yc_i||_F^2 = sum((Mc_ij Q_j) * (Q_i Mc_ij)), Q_i = W_i^T W_i [r, r].
               Memory: (E*r)^2 float64 (E=64, r=64: 134 MB). Larger models take several passes
               over X, one per block of expert rows that fits `cka_memory_bytes`.
Diagonals are forced to 1. Shared experts are never part of `sim`.

Shape legend: N calibration tokens, C chunk tokens, E routed experts, K top-k, d hidden,
I expert intermediate size, r = min(I, d).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# read_text, load_model, tokenize and MODEL_HELP are also imported from here by the other tools.
from sere.hf.calibration_io import (MODEL_HELP, add_model_and_data_args, calibration_parser, load_calibration,
                                    load_model, parse_calibration_args, read_text, save_calibration, tokenize)
from sere.hf.moe import MoeBlock, down_matrices, expert_down, expert_hidden, find_moe_blocks
from sere.progress import Progress, log, progress
from sere.sidecars import SIDECAR_NAME

__all__ = ["METRICS", "MODEL_HELP", "read_text", "load_model", "tokenize", "capture_layer_inputs",
           "parse_calibration_args", "add_model_and_data_args", "load_calibration", "save_calibration", "similarity_matrix",
           "calibrate", "main"]

METRICS = ("cosine", "frobenius", "cka")


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    blocks: list[MoeBlock],
    token_ids: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 8,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run the model over `token_ids` ([N] int64, cut in windows of `seq_len`) and capture,
    per MoE layer, its inputs and its router's choice under the model's own routing.

    Returns:
        {layer: (X [N', d] float32, topk_ids [N', K] int64)}, N' = N rounded down to whole
        windows (or N when shorter than one window).
    """
    seq_len = min(seq_len, token_ids.numel())
    windows = token_ids[: token_ids.numel() // seq_len * seq_len].view(-1, seq_len)  # [W, L]
    inputs: dict[int, list[torch.Tensor]] = {b.layer_idx: [] for b in blocks}
    routed: dict[int, list[torch.Tensor]] = {b.layer_idx: [] for b in blocks}
    handles = []
    for b in blocks:
        def pre_hook(module, args, layer=b.layer_idx):
            x = args[0]
            inputs[layer].append(x.reshape(-1, x.shape[-1]).float().cpu())

        def router_hook(module, args, output, layer=b.layer_idx):
            routed[layer].append(output[2].reshape(output[2].shape[0], -1).long().cpu())

        handles.append(b.block.register_forward_pre_hook(pre_hook))
        handles.append(b.router.register_forward_hook(router_hook))
    try:
        with Progress(windows.shape[0], "[capture] forward pass", unit="window") as bar:
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
                bar.update(min(batch_size, windows.shape[0] - start))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (torch.cat(inputs[layer]), torch.cat(routed[layer])) for layer in inputs}


def _chunks(num_tokens: int, chunk_tokens: int):
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


@torch.no_grad()
def similarity_matrix(
    block: MoeBlock,
    x: torch.Tensor,
    metric: str,
    chunk_tokens: int = 512,
    cka_memory_bytes: int = 1 << 30,
) -> torch.Tensor:
    """[E, E] float32 similarity of `block`'s routed experts on inputs x [N, d] (diag 1)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; choose one of {list(METRICS)}")
    num_experts, num_tokens = block.num_experts, x.shape[0]
    chunks = _chunks(num_tokens, chunk_tokens)
    name = f"[calibrate] layer {block.layer_idx} {metric}"
    if metric == "cka":
        sim = _cka(block, x, chunks, cka_memory_bytes, name)
    else:
        gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        for s, e in progress(chunks, desc=name, unit="chunk", leave=False, every=0.25):
            y = expert_down(block, expert_hidden(block, x[s:e]))  # [E, C, d]
            if metric == "cosine":
                y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                flat = y.flatten(1)  # [E, C*d]
                gram += (flat @ flat.T).double()  # sum of per-token cosines
            else:
                flat = y.flatten(1).double()
                gram += flat @ flat.T
        if metric == "cosine":
            sim = (gram / num_tokens + 1.0) / 2.0
        else:
            sq = gram.diagonal()
            dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0).sqrt()  # [E, E]
            dist.fill_diagonal_(0.0)
            max_dist = dist.max()
            sim = 1.0 - dist / max_dist if max_dist > 0 else torch.ones_like(dist)
    sim = sim.float().clamp(0.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


def _cka(block: MoeBlock, x, chunks, memory_bytes: int, name: str) -> torch.Tensor:
    """Linear CKA via cross products in the r = min(I, d) space (see module docstring)."""
    num_experts = block.num_experts
    w = down_matrices(block)  # [E, d, I]
    use_hidden = w.shape[2] <= w.shape[1]
    q = (w.transpose(1, 2) @ w).double() if use_hidden else None  # [E, I, I]

    def features(s, e):  # [C, E*r]
        h = expert_hidden(block, x[s:e])  # [E, C, I]
        z = h if use_hidden else expert_down(block, h)  # [E, C, r]
        return z.transpose(0, 1).reshape(e - s, -1)

    shift = features(*chunks[0]).mean(0)  # [E*r], shifted sums: less cancellation when centring
    width = shift.numel()
    r = width // num_experts
    rows = max(1, min(num_experts, memory_bytes // (8 * width * r)))  # experts per pass
    num_tokens = chunks[-1][1]
    col_sum = torch.zeros(width, dtype=torch.float64)
    num = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for p0 in range(0, num_experts, rows):
        p1 = min(num_experts, p0 + rows)
        cross = torch.zeros((p1 - p0) * r, width, dtype=torch.float64)  # rows [p0, p1) of Z^T Z
        for s, e in progress(chunks, desc=f"{name} rows {p0}-{p1 - 1}", unit="chunk", leave=False,
                             every=0.25):
            z = features(s, e) - shift  # [C, E*r]
            cross += (z[:, p0 * r : p1 * r].T @ z).double()
            if p0 == 0:
                col_sum += z.sum(0).double()
        mean = col_sum / num_tokens
        cross -= num_tokens * torch.outer(mean[p0 * r : p1 * r], mean)  # centred: Zc^T Zc
        blocks = cross.view(p1 - p0, r, num_experts, r).permute(0, 2, 1, 3)  # [P, E, r, r]
        if q is None:
            num[p0:p1] = (blocks * blocks).sum((-1, -2))
        else:
            left = q[p0:p1, None] @ blocks  # Q_i Mc_ij
            right = blocks @ q[None]  # Mc_ij Q_j
            num[p0:p1] = (left * right).sum((-1, -2))
    diag = num.diagonal().clamp_min(1e-300)
    return num / (diag[:, None] * diag[None, :]).sqrt()


def calibrate(
    model: nn.Module,
    token_ids: torch.Tensor,
    metric: str,
    *,
    chunk_tokens: int = 512,
    seq_len: int = 512,
    batch_size: int = 8,
) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: [E, E] float32 similarity}, number of calibration tokens used)."""
    blocks = find_moe_blocks(model)
    captured = capture_layer_inputs(model, blocks, token_ids, seq_len, batch_size)
    matrices = {}
    for b in progress(blocks, desc=f"[calibrate] {metric}", unit="layer"):
        matrices[b.layer_idx] = similarity_matrix(b, captured[b.layer_idx][0], metric, chunk_tokens)
    return matrices, captured[blocks[0].layer_idx][0].shape[0]


def main(argv: list[str] | None = None, prog: str = "python -m sere.calibrate") -> Path:
    """`sere calibrate` (`prog` names it in usage and errors); returns the sidecar's path."""
    parser = calibration_parser(
        prog,
        "Calibrate the expert similarity sidecar that policy `sere` reads: one forward pass\n"
        "captures every MoE layer's inputs, then every routed expert runs on them and each\n"
        "pair of experts is compared on the same tokens.",
    )
    parser.add_argument("--metric", choices=METRICS, default="cosine",
                        help="how two experts' outputs on the same tokens are compared, giving a similarity "
                             "in [0, 1]: cosine = mean per-token cosine, rescaled; frobenius = 1 - distance "
                             "between the output matrices / the layer's largest distance; cka = linear CKA "
                             "of the centred outputs (default: %(default)s)")
    args = parse_calibration_args(parser, argv, chunk_tokens=512, sidecar_name=SIDECAR_NAME)

    torch.manual_seed(0)
    model, blocks, token_ids = load_calibration(args, "calibrate")
    matrices, num_tokens = calibrate(
        model, token_ids, args.metric,
        chunk_tokens=args.chunk_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
    )
    path = save_calibration(args, matrices, metric=args.metric, num_tokens=num_tokens, model=model,
                            num_experts=blocks[0].num_experts, sidecar_name=SIDECAR_NAME)
    for layer, sim in matrices.items():
        off = sim[~torch.eye(sim.shape[0], dtype=torch.bool)]
        log(f"[calibrate] layer {layer}: off-diagonal mean {off.mean():.4f} "
            f"min {off.min():.4f} max {off.max():.4f}")
    log(f"[calibrate] wrote {path} ({args.metric}, {num_tokens} tokens)")
    return path


if __name__ == "__main__":
    main()
