"""What the calibration CLIs (`sere calibrate`, `sere substitution`) share: reading the model and
the calibration text, their common options, and writing a sidecar (docs/spec.md §14).

Shape legend: N calibration tokens, E routed experts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sere.hf.moe import MoeBlock, find_moe_blocks
from sere.progress import log, stderr_is_tty
from sere.sidecars import save_sidecar

__all__ = ["MODEL_HELP", "read_text", "load_model", "tokenize", "calibration_parser", "add_model_and_data_args",
           "parse_calibration_args", "load_calibration", "save_calibration"]


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


def calibration_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a calibration CLI: its description, an example and --model / --data."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog=f"example:\n  {prog} --model models/tiny-moe --data models/tiny-moe/calib.txt --tokens 32768",
    )
    add_model_and_data_args(parser)
    return parser
