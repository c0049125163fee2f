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

import argparse
from pathlib import Path

import torch
from torch import nn

from sere.hf.moe import MoeBlock, down_matrices, expert_down, expert_hidden, find_moe_blocks
from sere.progress import Progress, log, progress, stderr_is_tty
from sere.sidecars import SIDECAR_NAME, save_sidecar

__all__ = ["METRICS", "read_text", "load_model", "tokenize", "capture_layer_inputs",
           "parse_calibration_args", "add_model_and_data_args", "load_calibration", "save_calibration", "similarity_matrix",
           "calibrate", "main"]

METRICS = ("cosine", "frobenius", "cka")


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    """The text of a plain-text file, or of every readable text file under a folder (sorted).

    Files that are not UTF-8 are skipped in a folder and an error for a single file. Raises
    SystemExit with a message when nothing readable is found.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise SystemExit(f"text path not found: {path}")
    parts, total = [], 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            if path.is_file():
                raise SystemExit(f"cannot read {file} as UTF-8 text: {exc}") from exc
            continue
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    if not text.strip():
        raise SystemExit(f"no text found in {path}")
    return text


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a Hugging Face directory."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("transformers is required: pip install 'transformers>=5.16'") from exc
    if not stderr_is_tty():  # its weight-loading bar would write carriage-return frames into logs
        transformers_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"not a Hugging Face model directory (no config.json): {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model, tokenizer


def tokenize(tokenizer, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """[N] int64 token ids of the text at `path` (first `max_tokens` when given)."""
    # ~2 characters per token is a safe over-estimate for BPE on code and English
    max_chars = None if max_tokens is None else 8 * max_tokens + 4096
    text = read_text(path, max_chars)[:max_chars]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no max-length warning
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.int64)
    if ids.numel() == 0:
        raise SystemExit(f"{path}: the text has no tokens")
    return ids


def parse_calibration_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, chunk_tokens: int, sidecar_name: str
) -> argparse.Namespace:
    """Adds the options shared by the calibration CLIs after the caller's own (--tokens, --chunk-tokens,
    --seq-len, --batch-size, --out, --threads), parses `argv`, applies --threads, checks the counts."""
    parser.add_argument("--tokens", type=int, default=16384, metavar="N",
                        help="calibration tokens read from the start of --data, >= 1 (default: %(default)s); "
                             "rounded down to whole --seq-len windows; a shorter text is used whole, with a note")
    parser.add_argument("--chunk-tokens", type=int, default=chunk_tokens, metavar="C",
                        help="tokens run through every expert at once, >= 1 (default: %(default)s); memory "
                             "grows as experts x C x hidden size floats, the result does not depend on it")
    parser.add_argument("--seq-len", type=int, default=512, metavar="L",
                        help="tokens per window of the forward pass that captures the MoE layers' inputs, "
                             ">= 1 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="windows per capture forward pass, >= 1 (default: %(default)s); larger is "
                             "faster and needs more memory")
    parser.add_argument("--out", metavar="FILE",
                        help=f"sidecar file to write (default: MODEL/{sidecar_name}, where serving looks for it)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch CPU threads, >= 1 (default: torch's choice, about one per core)")
    args = parser.parse_args(argv)
    for flag in ("tokens", "chunk_tokens", "seq_len", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


MODEL_HELP = ("Hugging Face model directory (config.json, weights, tokenizer) of a supported MoE family: "
              "Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3")


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    """--model and --data, the inputs of both calibration CLIs."""
    parser.add_argument("--model", required=True, metavar="DIR", help=MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="calibration text: a UTF-8 file, or a folder whose text files are read in "
                             "sorted order (files that are not UTF-8 are skipped)")


def load_calibration(args: argparse.Namespace, tag: str) -> tuple[nn.Module, list[MoeBlock], torch.Tensor]:
    """(model, its MoE blocks, [N] int64 calibration token ids) for args.model / args.data /
    args.tokens; SystemExit when the model has no MoE blocks. `tag` prefixes the log line."""
    model, tokenizer = load_model(args.model)
    try:
        blocks = find_moe_blocks(model)
    except ValueError as exc:
        raise SystemExit(f"{args.model}: {exc}") from exc
    token_ids = tokenize(tokenizer, args.data, args.tokens)
    if token_ids.numel() < args.tokens:
        log(f"[{tag}] note: {args.data} has only {token_ids.numel()} tokens (asked {args.tokens})")
    return model, blocks, token_ids


def save_calibration(
    args: argparse.Namespace, matrices: dict[int, torch.Tensor], *, metric: str, num_tokens: int,
    model: nn.Module, num_experts: int, sidecar_name: str,
) -> Path:
    """Writes {layer: [E, E]} with the run's metadata to --out (default: MODEL/`sidecar_name`)."""
    out = Path(args.out) if args.out else Path(args.model) / sidecar_name
    return save_sidecar(
        out, matrices, metric=metric, num_tokens=num_tokens,
        model_id=Path(args.model).resolve().name, num_experts=num_experts,
        extra_metadata={"data": str(args.data), "architecture": type(model).__name__},
    )


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
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Calibrate the expert similarity sidecar that policy `sere` reads: one forward pass\n"
                    "captures every MoE layer's inputs, then every routed expert runs on them and each\n"
                    "pair of experts is compared on the same tokens.",
        epilog=f"example:\n  {prog} --model models/tiny-moe --data models/tiny-moe/calib.txt --tokens 32768",
    )
    add_model_and_data_args(parser)
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
