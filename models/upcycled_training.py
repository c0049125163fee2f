"""One training phase (dense or MoE) of the upcycled tiny model: data-parallel AdamW on CPU.

The loop follows ``train_tiny_moe.worker`` (same optimiser, LR schedule, batch sampling by
(seed, step, rank), gloo all-reduce of gradients, Switch/Qwen aux loss) and reuses its helpers; it
differs in starting from given weights (``Phase.init_path``) and in writing the final fp32 state
(rounded to bf16) to ``Phase.out_path``. Resumable from ``--work/ckpt_<phase>.pt``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sere.progress import Progress, log as write_line
from tiny_moe_net import TinyMoeConfig, TinyQwen3Moe, load_balancing_loss
from train_tiny_moe import all_reduce_, bench_line, evaluate, load_checkpoint, lr_at, save_checkpoint, windows


@dataclass
class Phase:
    name: str  # "dense" | "moe"
    tokens: int
    lr: float
    warmup_tokens: int
    num_experts: int
    top_k: int
    inter: int  # expert width (the dense FFN width F for the dense phase)
    aux_coef: float
    init_path: str  # "" = fresh init (seeded)
    out_path: str
    seed: int


def model_config(args, vocab_size: int, phase: Phase) -> TinyMoeConfig:
    return TinyMoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=phase.num_experts, num_experts_per_tok=phase.top_k, moe_intermediate_size=phase.inter,
        max_position_embeddings=args.max_position_embeddings,
    )


def build(args, vocab_size: int, phase: Phase) -> TinyQwen3Moe:
    torch.manual_seed(phase.seed)  # identical initial weights on every rank
    model = TinyQwen3Moe(model_config(args, vocab_size, phase))
    if phase.init_path:
        model.load_state_dict(torch.load(phase.init_path))
    return model


def make_optimizer(model, args, lr: float):
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def train_step(model, opt, batch, lr, phase: Phase, args) -> tuple[float, float, float]:
    """One optimiser step on batch [b, T+1]; returns (loss, aux / K, grad norm)."""
    for g in opt.param_groups:
        g["lr"] = lr
    logits, routing = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    aux = torch.stack([load_balancing_loss(p, ids) for p, ids in routing]).mean()
    (loss + phase.aux_coef * aux).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if dist.is_initialized():
        grads = [p.grad for p in params]
        flat = all_reduce_(torch._utils._flatten_dense_tensors(grads)).div_(dist.get_world_size())
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), aux.item() / phase.top_k, float(gnorm)


def worker(rank: int, args, vocab_size: int, phase: Phase, port: int):
    torch.set_num_threads(args.threads)
    if args.procs > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.procs)

    def say(line: str):
        if rank == 0:
            write_line(line, file=sys.stdout)

    work = Path(args.work)
    train_ids, quick = load_streams(work, args)
    model = build(args, vocab_size, phase)
    opt = make_optimizer(model, args, phase.lr)
    local_bs = args.batch_size // args.procs
    tokens_per_step = args.batch_size * args.seq_len
    total = max(1, phase.tokens // tokens_per_step)
    warm = max(1, phase.warmup_tokens // tokens_per_step)
    sched = SimpleNamespace(lr=phase.lr, min_lr_ratio=args.min_lr_ratio)  # what lr_at reads
    log = {"phase": asdict(phase), "steps": [], "evals": []}
    step, elapsed_before, ckpt = 0, 0.0, work / f"ckpt_{phase.name}.pt"
    if args.resume and ckpt.exists():
        step, log, elapsed_before = load_checkpoint(ckpt, model, opt)
        say(f"[{phase.name}] resumed at step {step}")
    run_steps = args.bench_steps or total
    say(f"[{phase.name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {total} steps of "
        f"{tokens_per_step} tokens, peak lr {phase.lr}")
    t0, t_ckpt, max_start = time.time(), time.time(), train_ids.numel() - args.seq_len - 1
    bar = Progress(run_steps, f"[train] {phase.name}", initial=step, unit="step", enabled=rank == 0)
    while step < run_steps:
        if step == 2:
            t_bench = time.time()
        gen = torch.Generator().manual_seed(phase.seed * 1_000_003 + step * args.procs + rank)
        starts = torch.randint(0, max_start, (local_bs,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # [b, T+1]
        lr = lr_at(step, total, warm, sched)
        loss, aux, gnorm = train_step(model, opt, batch, lr, phase, args)
        step += 1
        bar.update()
        stats = all_reduce_(torch.tensor([loss, aux], dtype=torch.float64)) / args.procs
        elapsed = elapsed_before + time.time() - t0
        if step % 10 == 0 or step == 1:
            log["steps"].append({"step": step, "tokens": step * tokens_per_step, "loss": round(stats[0].item(), 4),
                                 "aux": round(stats[1].item(), 4), "lr": round(lr, 6), "grad_norm": round(gnorm, 3),
                                 "elapsed_s": round(elapsed, 1)})
            say(json.dumps(log["steps"][-1]))
        if not args.bench_steps and (step % args.eval_every == 0 or step == total):
            ev = evaluate(model, quick, local_bs)
            log["evals"].append({"step": step, "heldout_loss_quick": round(ev, 4), "elapsed_s": round(elapsed, 1)})
            say(json.dumps(log["evals"][-1]))
        if rank == 0 and not args.bench_steps and time.time() - t_ckpt > args.ckpt_every_s:
            save_checkpoint(ckpt, model, opt, step, log, elapsed)
            t_ckpt = time.time()
    bar.close()
    if args.bench_steps:
        say(f"BENCH {phase.name}: {bench_line(t_bench, args.bench_steps, tokens_per_step)}")
        return
    if rank == 0:
        log["train_time_s"] = round(elapsed_before + time.time() - t0, 1)
        log["train_tokens"] = step * tokens_per_step
        save_final(model, log, phase)


def load_streams(work: Path, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Train token stream [n] and the quick-eval held-out windows [W, T+1] (tiny-moe's choice of windows)."""
    train_ids = torch.from_numpy(np.load(work / "train_ids.npy").astype(np.int64))
    quick = windows(torch.from_numpy(np.load(work / "heldout_ids.npy")), args.seq_len)
    pick = torch.randperm(quick.shape[0], generator=torch.Generator().manual_seed(1))[: args.eval_windows]
    return train_ids, quick[pick]


def save_final(model, log: dict, phase: Phase) -> None:
    """Round to the shipped precision (bf16, kept in fp32) and save the weights and the phase log."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.save(model.state_dict(), phase.out_path)
    Path(phase.out_path).with_suffix(".log.json").write_text(json.dumps(log, indent=1))
