"""Train tiny-moe-upcycled: a dense Qwen3 model, upcycled into 64 fine-grained experts, then MoE-trained.

    nice -n 10 .venv/bin/python models/train_upcycled.py --out models/tiny-moe-upcycled \
        --dense-tokens 600000 --moe-tokens 2000000 --seed 0

Same tokenizer (copied from models/tiny-moe), corpus, split, held-out and calibration text as
tiny-moe. Phases (each cached under --work, so a rerun skips finished ones):
1. dense: TinyQwen3Moe with one expert of width --ffn-width and top-1 = a dense SwiGLU FFN;
2. upcycle (models/upcycle.py): the FFN split into --experts experts of width --expert-width by
   shuffled fine-grained partitions, down_proj scaled by F/w, routers N(0, --router-std);
3. moe: AdamW on the upcycled model with the load-balancing loss;
then held-out loss of the dense, just-upcycled and final models (and of --compare, if given) with
the same code, export, train_log.json. ``--bench-steps N`` times N steps of each phase and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_corpus import EOS, load_corpus  # noqa: E402
from tiny_moe_net import TinyQwen3Moe, import_state_dict  # noqa: E402
from train_tiny_moe import add_training_args, check_training_args, evaluate, export, unigram_loss, windows  # noqa: E402
from upcycle import upcycle_state  # noqa: E402
from upcycled_training import Phase, build, model_config, worker  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-moe-upcycled")
    p.add_argument("--source", type=Path, default=Path(__file__).parent / "tiny-moe",
                   help="tiny-moe directory: tokenizer, heldout.txt and calib.txt are taken from it")
    p.add_argument("--work", type=Path, default=Path("/tmp/tiny-moe-upcycled-work"))
    p.add_argument("--dense-tokens", type=int, default=600_000)
    p.add_argument("--dense-lr", type=float, default=3e-3)
    p.add_argument("--moe-tokens", type=int, default=2_000_000)
    p.add_argument("--moe-lr", type=float, default=1.5e-3)
    p.add_argument("--ffn-width", type=int, default=256, help="dense FFN width F")
    p.add_argument("--expert-width", type=int, default=32)
    p.add_argument("--noise-rel", type=float, default=0.01, help="expert init noise, relative to tensor std")
    p.add_argument("--router-std", type=float, default=0.02)
    add_training_args(p, batch_size=8, warmup_tokens=100_000, eval_every=50, ckpt_every_s=300.0, port=29611)
    p.add_argument("--resume", action="store_true", help="continue an interrupted phase from its checkpoint")
    p.add_argument("--compare", type=Path, default=None,
                   help="also evaluate this shipped model (e.g. models/tiny-moe) with the same code")
    args = p.parse_args(argv)
    check_training_args(args)
    for name in ("tokenizer.json", "heldout.txt", "calib.txt"):
        if not (args.source / name).is_file():
            raise SystemExit(f"--source {args.source} has no {name}")
    return args


def prepare_data(args):
    """The source's tokenizer and texts, and the train-split token stream (cached under --work)."""
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + ("heldout.txt", "calib.txt"):
        if (args.source / name).is_file():
            shutil.copyfile(args.source / name, args.out / name)
    tok = AutoTokenizer.from_pretrained(str(args.source))
    corpus = load_corpus(args.heldout_percent)
    check_same_corpus(corpus.summary(), args.source)
    train_path, meta_path = args.work / "train_ids.npy", args.work / "data_meta.json"
    key = {"corpus": corpus.summary(), "english_repeat": args.english_repeat}
    if not (train_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == key):
        t0 = time.time()
        docs = corpus.train_docs() + [t for _, t in corpus.train_english] * (args.english_repeat - 1)
        eos_id, parts = tok.convert_tokens_to_ids(EOS), []
        for i in range(0, len(docs), 256):
            for ids in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"]:
                parts.append(np.array([eos_id] + ids, dtype=np.uint16))
        np.save(train_path, np.concatenate(parts))
        meta_path.write_text(json.dumps(key))
        print(f"tokenized the train split in {time.time() - t0:.0f}s", flush=True)
    heldout = (args.source / "heldout.txt").read_text(encoding="utf-8")
    np.save(args.work / "heldout_ids.npy", np.array(tok(heldout, add_special_tokens=False)["input_ids"], dtype=np.int64))
    summary = corpus.summary()
    summary["notes"] = ["stdlib root: the standard library of the training interpreter, Python "
                        f"{platform.python_version()} (absolute path removed)"]
    return tok, summary


def check_same_corpus(summary: dict, source: Path) -> None:
    """The train/held-out split must be the one the source model was trained on (sizes recorded in its log)."""
    recorded = json.loads((source / "train_log.json").read_text())["final"]["corpus"]
    for part in ("train_code", "heldout_code", "train_english", "heldout_english"):
        if summary[part] != recorded[part]:
            raise SystemExit(f"corpus part {part} is {summary[part]}, {source.name} was trained on {recorded[part]} "
                             "(is Debian's fortunes / fortunes-min package installed?)")


def phases(args) -> tuple[Phase, Phase]:
    dense = Phase("dense", args.dense_tokens, args.dense_lr, args.warmup_tokens, 1, 1, args.ffn_width, 0.0, "",
                  str(args.work / "dense_final.pt"), args.seed)
    moe = Phase("moe", args.moe_tokens, args.moe_lr, args.warmup_tokens, args.experts, args.top_k,
                args.expert_width, args.aux_coef, str(args.work / "upcycled_init.pt"),
                str(args.work / "moe_final.pt"), args.seed + 1)
    return dense, moe


def run_phase(args, vocab: int, phase: Phase, port: int):
    if args.procs > 1:
        mp.spawn(worker, args=(args, vocab, phase, port), nprocs=args.procs, join=True)
    else:
        worker(0, args, vocab, phase, port)


def heldout_loss(model, args) -> float:
    wins = windows(torch.from_numpy(np.load(args.work / "heldout_ids.npy")), args.seq_len)
    return evaluate(model, wins, 8)


def load_shipped(model_dir: Path, args, vocab: int) -> TinyQwen3Moe:
    """A shipped Qwen3-MoE directory as a TinyQwen3Moe (fp32 from its bf16 weights)."""
    from safetensors.torch import load_file

    conf = json.loads((model_dir / "config.json").read_text())
    phase = Phase("x", 0, 0, 0, conf["num_experts"], conf["num_experts_per_tok"], conf["moe_intermediate_size"],
                  0, "", "", 0)
    model = TinyQwen3Moe(model_config(args, vocab, phase))
    import_state_dict(model, load_file(str(model_dir / "model.safetensors")))
    return model


def upcycle(args, vocab: int, dense: Phase, moe: Phase) -> dict:
    target = build(args, vocab, replace(moe, init_path=""))
    up = upcycle_state(torch.load(dense.out_path), target, args.noise_rel, args.router_std, args.seed)
    target.load_state_dict(up["state"])
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.save(target.state_dict(), moe.init_path)
    return {"plans": {k: v.tolist() for k, v in up["plans"].items()}}


def evaluations(args, vocab: int, dense: Phase, moe: Phase) -> dict:
    torch.set_num_threads(max(args.threads, 2))
    out = {}
    for name, phase, path in (("dense", replace(dense, init_path=""), dense.out_path),
                              ("upcycled_init", replace(moe, init_path=""), moe.init_path),
                              ("final", replace(moe, init_path=""), moe.out_path)):
        model = build(args, vocab, phase)
        model.load_state_dict(torch.load(path))
        out[name] = heldout_loss(model, args)
        print(f"held-out loss {name}: {out[name]:.4f} (ppl {math.exp(out[name]):.2f})", flush=True)
    if args.compare:
        out["compare"] = heldout_loss(load_shipped(args.compare, args, vocab), args)
        print(f"held-out loss {args.compare.name}: {out['compare']:.4f}", flush=True)
    return out


def write_log(args, dense: Phase, moe: Phase, losses: dict, upcycle_info: dict, argv) -> None:
    logs = {p.name: json.loads(Path(p.out_path).with_suffix(".log.json").read_text()) for p in (dense, moe)}
    for lg in logs.values():  # no machine paths in the shipped log: file names under --work only
        for key in ("init_path", "out_path"):
            lg["phase"][key] = "WORK/" + Path(lg["phase"][key]).name if lg["phase"][key] else ""
    heldout = np.load(args.work / "heldout_ids.npy")
    eval_tokens = windows(torch.from_numpy(heldout), args.seq_len)[:, 1:].reshape(-1)
    train_ids = torch.from_numpy(np.load(args.work / "train_ids.npy").astype(np.int64))
    uni = unigram_loss(train_ids, eval_tokens, 4096)
    final = {"heldout_eval_tokens": int(eval_tokens.numel()), "unigram_ppl": round(math.exp(uni), 2),
             "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                        f"{args.procs} procs x {args.threads} threads"}
    for name, loss in losses.items():
        key = f"compare_{args.compare.name}" if name == "compare" else name
        final[f"heldout_loss_{key}"] = round(loss, 4)
        final[f"heldout_ppl_{key}"] = round(math.exp(loss), 3)
    for name, lg in logs.items():
        final[f"{name}_train_tokens"] = lg["train_tokens"]
        final[f"{name}_train_time_s"] = lg["train_time_s"]
        tail = [s["loss"] for s in lg["steps"][-10:]]
        final[f"{name}_train_loss_last10_logged"] = round(sum(tail) / len(tail), 4)
    final["train_tokens"] = final["dense_train_tokens"] + final["moe_train_tokens"]
    final["heldout_ppl"] = final["heldout_ppl_final"]
    args_rec = {k: str(v) for k, v in vars(args).items() if k not in ("work", "out", "source", "compare")}
    args_rec["compare"] = args.compare.name if args.compare else ""
    command = "models/train_upcycled.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log = {"command": command, "args": args_rec, "dense": logs["dense"], "moe": logs["moe"],
           "upcycle": {"recipe": "shuffled fine-grained split, down_proj x F/w, router N(0, router_std)",
                       "scale": args.ffn_width / args.expert_width, **upcycle_info}, "final": final}
    (args.work / "train_log.json").write_text(json.dumps(log, indent=1))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads, 2))
    tok, corpus_summary = prepare_data(args)
    vocab = len(tok)
    dense, moe = phases(args)
    if args.bench_steps:
        run_phase(args, vocab, dense, args.port)
        bench_init = moe.init_path
        if not Path(bench_init).exists():  # no upcycled weights yet: time the MoE phase on a random init
            bench_init = str(args.work / "bench_init.pt")
            torch.save(build(args, vocab, replace(moe, init_path="")).state_dict(), bench_init)
        run_phase(args, vocab, replace(moe, init_path=bench_init), args.port + 1)
        return
    if not Path(dense.out_path).exists():
        run_phase(args, vocab, dense, args.port)
    info_path = args.work / "upcycle_info.json"
    if not Path(moe.init_path).exists():
        info_path.write_text(json.dumps(upcycle(args, vocab, dense, moe)))
    if not Path(moe.out_path).exists():
        run_phase(args, vocab, moe, args.port + 1)
    losses = evaluations(args, vocab, dense, moe)
    write_log(args, dense, moe, losses, json.loads(info_path.read_text()), argv)
    args.experts, args.top_k, args.moe_intermediate = moe.num_experts, moe.top_k, moe.inter
    export(torch.load(moe.out_path), args, tok, corpus_summary)
    for name in TOKENIZER_FILES:  # byte-identical tokenizer files to the source model's
        if (args.source / name).is_file():
            shutil.copyfile(args.source / name, args.out / name)
    print(f"exported to {args.out}", flush=True)


if __name__ == "__main__":
    main()
