"""Train the tiny Qwen3-MoE on CPU and export it as a Hugging Face directory.

    .venv/bin/python models/train_tiny_moe.py --out models/tiny-moe --tokens 6000000

Steps: corpus + deterministic split -> byte-level BPE -> token streams (cached under --work) ->
AdamW with warmup + cosine decay, load-balancing aux loss -> weights rounded to bf16 -> final
held-out loss on ``heldout.txt`` -> export (config, generation config, safetensors, tokenizer) and
``train_log.json``. ``--bench-steps N`` times N steps and exits (pick --tokens from it).
Seeded; the token budget (not wall time) defines the schedule, so a rerun gives the same model up to
CPU floating-point nondeterminism.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sere.progress import Progress, log as write_line
from tiny_moe_corpus import CHAT_TEMPLATE, EOS, IM_END, PAD, load_corpus, sample_text, train_tokenizer
from tiny_moe_net import TinyMoeConfig, TinyQwen3Moe, export_state_dict, load_balancing_loss


def add_training_args(p: argparse.ArgumentParser, *, batch_size: int, warmup_tokens: int, eval_every: int,
                      ckpt_every_s: float, port: int) -> None:
    """The options of both trainers (this one and train_upcycled.py); the defaults that differ
    are arguments."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=2, help="data-parallel processes (gloo all-reduce)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch (split over --procs)")
    p.add_argument("--warmup-tokens", type=int, default=warmup_tokens)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    p.add_argument("--english-repeat", type=int, default=2, help="fortunes are repeated in the train stream")
    p.add_argument("--heldout-percent", type=float, default=5.0)
    p.add_argument("--hidden-size", type=int, default=256, help="model width d")
    p.add_argument("--layers", type=int, default=4, help="decoder layers, each with an MoE block")
    p.add_argument("--heads", type=int, default=4, help="attention query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="attention key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer, E")
    p.add_argument("--top-k", type=int, default=8, help="experts per token, K")
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between quick held-out evals")
    p.add_argument("--eval-windows", type=int, default=24, help="windows in the quick eval")
    p.add_argument("--ckpt-every-s", type=float, default=ckpt_every_s)
    p.add_argument("--bench-steps", type=int, default=0, help="time this many steps, then stop (writes no model)")
    p.add_argument("--port", type=int, default=port)


def check_training_args(args) -> None:
    """The checks and fixed settings both trainers share."""
    args.max_position_embeddings = 2048
    if args.batch_size % args.procs:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --procs {args.procs}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-moe")
    p.add_argument("--work", type=Path, default=Path("/tmp/tiny-moe-work"), help="caches and checkpoints")
    p.add_argument("--tokens", type=int, default=6_000_000, help="training tokens (defines the schedule)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--moe-intermediate", type=int, default=64)
    add_training_args(p, batch_size=16, warmup_tokens=200_000, eval_every=100, ckpt_every_s=600.0, port=29533)
    p.add_argument("--resume", action="store_true", help="continue from --work/ckpt.pt")
    p.add_argument("--first-phase", default="", metavar="TOKENS:STEPS",
                   help="steps below STEPS follow the LR schedule of a TOKENS-token run (reproduces a run that "
                        "was resumed with a smaller --tokens)")
    p.add_argument("--export-only", action="store_true", help="re-export the finished run found in --work")
    args = p.parse_args(argv)
    check_training_args(args)
    return args


def save_checkpoint(path: Path, model, opt, step: int, log: dict, elapsed: float) -> None:
    """What --resume continues from: weights, optimizer state, step, log and elapsed seconds."""
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log, "elapsed": elapsed}
    torch.save(state, path)


def load_checkpoint(path: Path, model, opt) -> tuple[int, dict, float]:
    """Restores the model and optimizer of `save_checkpoint`; returns (step, log, elapsed seconds)."""
    ck = torch.load(path, weights_only=False)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    return ck["step"], ck["log"], ck["elapsed"]


def bench_line(t_bench: float, bench_steps: int, tokens_per_step: int) -> str:
    """Seconds per step and tokens per second of the steps after the first two of a --bench-steps run."""
    dt = (time.time() - t_bench) / max(1, bench_steps - 2)
    return f"{dt:.2f} s/step, {tokens_per_step / dt:.0f} tokens/s"


def prepare_data(args):
    """Tokenizer, heldout.txt, calib.txt and the token streams; cached under --work."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.heldout_percent)
    tok_dir = args.work / "tokenizer"
    train_path, meta_path = args.work / "train_ids.npy", args.work / "data_meta.json"
    key = {"vocab": args.vocab_size, "heldout_percent": args.heldout_percent,
           "english_repeat": args.english_repeat, "corpus": corpus.summary()}
    heldout_text = sample_text(corpus.heldout_code, corpus.heldout_english, 330_000, 110_000)
    calib_text = sample_text(corpus.train_code, corpus.train_english, 150_000, 50_000)
    (args.out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    (args.out / "calib.txt").write_text(calib_text, encoding="utf-8")

    from transformers import AutoTokenizer

    if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        train_ids = np.load(train_path)
    else:
        t0 = time.time()
        docs = corpus.train_docs() + [t for _, t in corpus.train_english] * (args.english_repeat - 1)
        tok = train_tokenizer(docs, args.vocab_size, tok_dir, args.max_position_embeddings)
        print(f"tokenizer trained in {time.time() - t0:.0f}s", flush=True)
        eos_id = tok.convert_tokens_to_ids(EOS)
        parts = []
        for i in range(0, len(docs), 256):
            for ids in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"]:
                parts.append(np.array([eos_id] + ids, dtype=np.uint16))
        train_ids = np.concatenate(parts)
        np.save(train_path, train_ids)
        meta_path.write_text(json.dumps({"key": key, "train_tokens": int(train_ids.size)}))
        print(f"tokenized {train_ids.size:,} train tokens in {time.time() - t0:.0f}s", flush=True)
    heldout_ids = np.array(tok(heldout_text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return tok, corpus, torch.from_numpy(train_ids.astype(np.int64)), torch.from_numpy(heldout_ids)


def lr_at(step, total_steps, warmup_steps, args):
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [W, seq_len + 1] windows (one shared token between neighbours)."""
    n = (ids.numel() - 1) // seq_len
    return torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over all positions of the windows (split over ranks)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # [loss sum, token count]
    for i in range(rank * batch_size, wins.shape[0], batch_size * world):
        b = wins[i : i + batch_size]
        logits, _ = model(b[:, :-1])
        sums[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        sums[1] += b[:, 1:].numel()
    model.train()
    all_reduce_(sums)
    return float(sums[0] / sums[1])


def unigram_loss(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram cross-entropy (nats/token) of eval_ids under train counts."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids].mean())


def build_model(args, vocab_size: int) -> TinyQwen3Moe:
    cfg = TinyMoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, max_position_embeddings=args.max_position_embeddings,
    )
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    return TinyQwen3Moe(cfg)


def worker(rank: int, args, vocab_size: int):
    torch.set_num_threads(args.threads)
    if args.procs > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.procs)
    def say(*parts, **_):  # rank 0 only, to stdout, above the progress bar when one is drawn
        if rank == 0:
            write_line(" ".join(map(str, parts)), file=sys.stdout)

    train_ids = torch.from_numpy(np.load(args.work / "train_ids.npy").astype(np.int64))
    heldout_ids = torch.from_numpy(np.load(args.work / "heldout_ids.npy"))
    model = build_model(args, vocab_size)
    cfg = model.cfg
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    local_bs = args.batch_size // args.procs
    tokens_per_step = args.batch_size * args.seq_len
    total_steps = max(1, args.tokens // tokens_per_step)
    warmup_steps = max(1, args.warmup_tokens // tokens_per_step)
    first_total, first_steps = total_steps, 0
    if args.first_phase:
        first_tokens, first_steps = (int(v) for v in args.first_phase.split(":"))
        first_total = max(1, first_tokens // tokens_per_step)
    heldout_wins = windows(heldout_ids, args.seq_len)
    pick = torch.randperm(heldout_wins.shape[0], generator=torch.Generator().manual_seed(1))[: args.eval_windows]
    quick_wins = heldout_wins[pick]
    log = {"config": cfg.as_dict(), "args": {k: str(v) for k, v in vars(args).items()}, "steps": [], "evals": []}
    step, elapsed_before = 0, 0.0
    ckpt_path = args.work / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        step, log, elapsed_before = load_checkpoint(ckpt_path, model, opt)
        log.setdefault("resumes", []).append({"step": step, "tokens_arg": args.tokens})
        say(f"resumed at step {step}", flush=True)
    say(f"params {n_params / 1e6:.2f}M, {total_steps} steps of {tokens_per_step} tokens on {args.procs} procs, "
        f"{train_ids.numel():,} train tokens available", flush=True)

    t_start, t_ckpt, ema = time.time(), time.time(), None
    max_start = train_ids.numel() - args.seq_len - 1
    steps_to_run = args.bench_steps if args.bench_steps else total_steps
    bar = Progress(steps_to_run, "[train] training", initial=step, unit="step", enabled=rank == 0)
    while step < steps_to_run:
        if args.bench_steps and step == 2:
            t_bench = time.time()
        # The batch of a step depends only on (seed, step, rank): resuming needs no RNG state.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * args.procs + rank)
        starts = torch.randint(0, max_start, (local_bs,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # [b, T+1]
        lr = lr_at(step, first_total if step < first_steps else total_steps, warmup_steps, args)
        for g in opt.param_groups:
            g["lr"] = lr
        logits, routing = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        aux = torch.stack([load_balancing_loss(p, ids) for p, ids in routing]).mean()
        (loss + args.aux_coef * aux).backward()
        if args.procs > 1:
            grads = [p.grad for p in params]
            flat = all_reduce_(torch._utils._flatten_dense_tensors(grads)).div_(args.procs)
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        stats = all_reduce_(torch.tensor([loss.item(), aux.item()], dtype=torch.float64)) / args.procs
        ema = stats[0].item() if ema is None else 0.95 * ema + 0.05 * stats[0].item()
        elapsed = elapsed_before + time.time() - t_start
        if step % 10 == 0 or step == 1:
            log["steps"].append({"step": step, "tokens": step * tokens_per_step, "loss": round(stats[0].item(), 4),
                                 "loss_ema": round(ema, 4), "aux": round(stats[1].item() / cfg.num_experts_per_tok, 4),
                                 "lr": round(lr, 6), "grad_norm": round(float(gnorm), 3), "elapsed_s": round(elapsed, 1)})
            say(json.dumps(log["steps"][-1]), flush=True)
        if not args.bench_steps and (step % args.eval_every == 0 or step == total_steps):
            ev = evaluate(model, quick_wins, local_bs)
            log["evals"].append({"step": step, "tokens": step * tokens_per_step, "heldout_loss_quick": round(ev, 4),
                                 "elapsed_s": round(elapsed, 1)})
            say(json.dumps(log["evals"][-1]), flush=True)
        if rank == 0 and not args.bench_steps and time.time() - t_ckpt > args.ckpt_every_s:
            save_checkpoint(ckpt_path, model, opt, step, log, elapsed)
            t_ckpt = time.time()
    bar.close()
    if args.bench_steps:
        say(f"BENCH {bench_line(t_bench, args.bench_steps, tokens_per_step)}", flush=True)
        return

    train_time = elapsed_before + time.time() - t_start
    # Round to the shipped precision, then measure what is shipped.
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())
    heldout_loss = evaluate(model, heldout_wins, local_bs)
    if rank != 0:
        return
    eval_tokens = heldout_wins[:, 1:].reshape(-1)
    uni = unigram_loss(train_ids, eval_tokens, cfg.vocab_size)
    tail = [s["loss"] for s in log["steps"][-10:]]
    log["final"] = {
        "steps": step, "train_tokens": step * tokens_per_step, "train_time_s": round(train_time, 1),
        "tokens_per_s": round(step * tokens_per_step / train_time, 1),
        "train_loss_last100": round(sum(tail) / len(tail), 4),
        "heldout_loss": round(heldout_loss, 4), "heldout_ppl": round(math.exp(heldout_loss), 3),
        "heldout_eval_tokens": int(eval_tokens.numel()), "unigram_loss": round(uni, 4),
        "unigram_ppl": round(math.exp(uni), 2), "params": n_params,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{args.procs} procs x {args.threads} threads",
    }
    log["final"]["train_ppl_last100"] = round(math.exp(log["final"]["train_loss_last100"]), 3)
    torch.save(model.state_dict(), args.work / "final_fp32_bf16rounded.pt")
    (args.work / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log["final"]), flush=True)


def export(model_state: dict, args, tok, corpus_summary: dict):
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    model = build_model(args, len(tok))
    model.load_state_dict(model_state)
    out = args.out
    ids = {"bos_token_id": tok.convert_tokens_to_ids(EOS), "eos_token_id": tok.convert_tokens_to_ids(EOS),
           "pad_token_id": tok.convert_tokens_to_ids(PAD)}
    model.cfg.to_hf(**ids).save_pretrained(str(out))
    # transformers 5 writes the attribute-map alias; use the key of the official Qwen3-MoE configs.
    conf = json.loads((out / "config.json").read_text())
    conf["num_experts"] = conf.pop("num_local_experts")
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=[ids["eos_token_id"], tok.convert_tokens_to_ids(IM_END)],
        pad_token_id=ids["pad_token_id"], do_sample=False, max_new_tokens=128,
    ).save_pretrained(str(out))
    state = export_state_dict(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # An index makes loaders read only the listed weights, not the SERE sidecars beside them
    # (vLLM otherwise loads every *.safetensors file of a single-file checkpoint).
    index = {"metadata": {"total_size": (out / "model.safetensors").stat().st_size},
             "weight_map": {name: "model.safetensors" for name in sorted(state)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    tok.save_pretrained(str(out))
    # Plain fast-tokenizer class name and an inline chat template, so loaders older than
    # transformers 5 (which wrote "TokenizersBackend" and a separate .jinja file) read it too.
    tconf = json.loads((out / "tokenizer_config.json").read_text())
    for k in ("backend", "is_local", "local_files_only"):
        tconf.pop(k, None)
    tconf["tokenizer_class"] = "PreTrainedTokenizerFast"
    tconf["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tconf, indent=2) + "\n")
    log = json.loads((args.work / "train_log.json").read_text())
    log["final"]["corpus"] = corpus_summary
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads, 2))
    tok, corpus, _, heldout_ids = prepare_data(args)
    np.save(args.work / "heldout_ids.npy", heldout_ids.numpy())
    if args.export_only:
        print("export only: using the finished run in", args.work, flush=True)
    elif args.procs > 1:
        mp.spawn(worker, args=(args, len(tok)), nprocs=args.procs, join=True)
    else:
        worker(0, args, len(tok))
    if not args.bench_steps:
        export(torch.load(args.work / "final_fp32_bf16rounded.pt"), args, tok, corpus.summary())
        print(f"exported to {args.out}", flush=True)


if __name__ == "__main__":
    main()
