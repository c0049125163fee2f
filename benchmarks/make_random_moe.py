"""A random-weight Qwen3-MoE at Qwen3-30B-A3B layer shapes, with SERE sidecars, for speed runs.

    python benchmarks/make_random_moe.py                     # -> build/random-moe (~4.8 GB, 4 layers)
    python benchmarks/bench_vllm.py --model build/random-moe ...

Layer shapes of Qwen3-30B-A3B: 128 routed experts, top-8 (softmax router, `norm_topk_prob`), hidden
2048, expert width (`moe_intermediate_size`) 768, 32 query heads x head_dim 128 with 4 KV heads
(vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ...), every layer MoE; only
`--num-layers` of them (default 4, not 48) so that it fits this machine. The vocabulary, tokenizer,
chat template and generation config are copied from `models/tiny-moe` (vocab 4096), so the same
prompts and calibration text work.

The weights are random (seeded; transformers' own init, std `initializer_range` 0.02), except the
router: gate weights ~ N(0, (router_logit_std / sqrt(hidden))^2), so that on unit-RMS (RMSNorm)
inputs the router logits have a spread of about `router_logit_std` instead of collapsing to a
near-uniform softmax. NOTE: a random router sends each token to an essentially random set of 8
experts, nearly independent of the other tokens in the batch: a realistic *worst case* for distinct
experts per step (a trained router shares more experts between tokens). Measured in vLLM (greedy
decode of 64 different ~10-token prompts, topk): 123-128 distinct experts per decode step in layer
0, where independent uniform routing gives 125.9; deeper layers share a little more (113 in layer
3), because attention mixes a common part of the context into every token. The text it generates
is noise; use it for speed, never for quality.

The checkpoint is written with `save_pretrained` (per-expert tensors, the official Qwen3-MoE
format) plus a `model.safetensors.index.json`, so that vLLM loads only the listed weights and not the
sidecars beside them. The sidecars are computed with the project's own tools, run on this model:
    python -m sere.calibrate    --model OUT --data CALIB --metric cosine --tokens N
    python -m sere.substitution --model OUT --data CALIB --tokens N
(`sere_similarity.safetensors` for `sere`, `sere_similarity.substitution_error.safetensors` for
`sere-err`), on short windows (`--calib-seq-len`, like the benchmark's contexts: over long windows
random attention averages the context and routing concentrates). Calibration runs every expert on
every calibration token in float32: with the default 4 layers each pass peaks at ~16 GB of RAM
(measured 2026-12) and takes a few minutes on 2 cores at `--calib-tokens 1024`; `--sidecars similarity`
runs the `sere` pass only (enough for `bench_vllm.py --policies topk sere oea`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = REPO / "models" / "tiny-moe"
# Files that make the tokenizer and the generation defaults identical to tiny-moe's.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "random-moe")
    parser.add_argument("--tokenizer-from", type=Path, default=TINY_MOE,
                        help="model directory whose tokenizer, vocab size and special ids are reused")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--moe-intermediate-size", type=int, default=768)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--router-logit-std", type=float, default=1.0,
                        help="target spread of the router logits on unit-RMS inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-data", type=Path, default=TINY_MOE / "calib.txt")
    parser.add_argument("--calib-tokens", type=int, default=1024)
    parser.add_argument("--calib-seq-len", type=int, default=64,
                        help="window of the calibration forward pass; short, like the benchmark's contexts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the calibration")
    parser.add_argument("--sidecars", choices=["both", "similarity"], default="both",
                        help="similarity: only `sere_similarity.safetensors` (policy sere), skipping the "
                             "substitution-error pass (sere-err) and its memory peak")
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        parser.error(f"{args.out} exists and is not empty (pass --force to replace it)")
    if not 1 <= args.top_k < args.num_experts:
        parser.error(f"--top-k {args.top_k} must be in [1, --num-experts {args.num_experts})")
    return args


def build_config(args: argparse.Namespace):
    """A Qwen3MoeConfig at the requested shapes, with the donor tokenizer's vocab and special ids."""
    from transformers import Qwen3MoeConfig

    donor = json.loads((args.tokenizer_from / "config.json").read_text())
    return Qwen3MoeConfig(
        vocab_size=donor["vocab_size"],
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,  # dense MLP width; unused, every layer is MoE
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=donor.get("max_position_embeddings", 2048),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        bos_token_id=donor.get("bos_token_id"),
        eos_token_id=donor.get("eos_token_id"),
        pad_token_id=donor.get("pad_token_id"),
    )


def build_model(args: argparse.Namespace):
    """The seeded random bf16 model, router weights rescaled (see the module docstring)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM._from_config(build_config(args), dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    std = args.router_logit_std / math.sqrt(args.hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight  # [E, d]
            gate.copy_(torch.randn(gate.shape, generator=generator) * std)
    return model


def save(model, args: argparse.Namespace) -> None:
    """save_pretrained + weight index + the donor's tokenizer files; config key as in Qwen's configs."""
    from safetensors import safe_open

    out = args.out
    model.save_pretrained(str(out))
    shards = sorted(out.glob("model*.safetensors"))
    index = out / "model.safetensors.index.json"
    if not index.exists():  # one shard: save_pretrained writes no index
        # An index makes loaders read only the listed weights, not the SERE sidecars beside them
        # (vLLM otherwise loads every *.safetensors file of a single-file checkpoint).
        with safe_open(str(shards[0]), framework="pt") as handle:
            names = sorted(handle.keys())
        index.write_text(json.dumps({"metadata": {"total_size": shards[0].stat().st_size},
                                     "weight_map": {name: shards[0].name for name in names}}, indent=1))
    # transformers 5 writes the attribute-map alias; use the key of the official Qwen3-MoE configs.
    conf = json.loads((out / "config.json").read_text())
    conf["num_experts"] = conf.pop("num_local_experts", conf.get("num_experts"))
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if (args.tokenizer_from / name).exists():
            shutil.copy2(args.tokenizer_from / name, out / name)


def calibrate(args: argparse.Namespace) -> None:
    """The sidecars `--sidecars` names, by the project's CLIs, each in its own process (each loads
    the model in float32; one process at a time keeps the peak memory at one copy)."""
    common = ["--model", str(args.out), "--data", str(args.calib_data), "--tokens", str(args.calib_tokens),
              "--seq-len", str(args.calib_seq_len)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    commands = [["sere.calibrate", *common, "--metric", "cosine"], ["sere.substitution", *common]]
    for command in commands[: 1 if args.sidecars == "similarity" else 2]:
        print(f"$ python -m {' '.join(command)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", *command], check=True, cwd=REPO)


def write_recipe(args: argparse.Namespace) -> None:
    """OUT/make_random_moe.json: the arguments that made the model (paths inside the repo relative
    to it, so that results quoting the recipe name no machine paths)."""
    def plain(value):
        if not isinstance(value, Path):
            return value
        return str(value.resolve().relative_to(REPO)) if value.resolve().is_relative_to(REPO) else str(value)

    recipe = {key: plain(value) for key, value in vars(args).items() if key != "force"}
    (args.out / "make_random_moe.json").write_text(json.dumps(recipe, indent=1) + "\n")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model = build_model(args)
    num_params = sum(p.numel() for p in model.parameters())
    save(model, args)
    del model
    gc.collect()  # NOTE: free the bf16 weights before the calibration processes load their copy
    print(f"[random-moe] wrote {args.out} ({num_params / 1e6:.1f} M parameters, bf16) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    calibrate(args)
    write_recipe(args)
    print(f"[random-moe] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return args.out


if __name__ == "__main__":
    main()
