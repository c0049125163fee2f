"""Verify the exported tiny Qwen3-MoE directory and write ``eval.json`` + the model card.

    .venv/bin/python models/verify_tiny_moe.py --dir models/tiny-moe [--vllm]

Checks: transformers loads the directory and generates; the training model (loaded back from the
exported safetensors) and the HF model agree on logits; held-out perplexity of the HF model on
``heldout.txt`` (same windows as the training loop's final evaluation); unigram perplexity (add-one,
counts from ``calib.txt``; the training loop also reports one from the full train split); expert
utilisation per layer. ``--vllm`` also loads the directory in vLLM (CPU) and generates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny_moe_net import TinyMoeConfig, TinyQwen3Moe, import_state_dict  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass ", "The meaning of life is", "Q: What is a computer?\nA:"]


def heldout_windows(tok, text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = (ids.numel() - 1) // seq_len
    return torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])  # [W, T+1]


def unigram_loss(tok, counts_text: str, eval_ids: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tok(counts_text, add_special_tokens=False)["input_ids"]),
                            minlength=len(tok)).double() + 1.0
    return float(-torch.log(counts / counts.sum())[eval_ids].mean())


def utilisation(counts: torch.Tensor, mass: torch.Tensor) -> dict:
    """counts / mass [E]: top-k selections / routing weight per expert over the held-out tokens."""
    E = counts.numel()
    share = counts / counts.sum()
    mshare = mass / mass.sum()
    ent = float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(E))
    return {
        "min_share_x_uniform": round(float(share.min() * E), 3),
        "max_share_x_uniform": round(float(share.max() * E), 3),
        "entropy_norm": round(ent, 4),
        "experts_below_quarter_uniform": int((share < 0.25 / E).sum()),
        "experts_never_selected": int((counts == 0).sum()),
        "mass_min_x_uniform": round(float(mshare.min() * E), 3),
        "mass_max_x_uniform": round(float(mshare.max() * E), 3),
        "mass_entropy_norm": round(float(-(mshare * mshare.clamp_min(1e-12).log()).sum() / math.log(E)), 4),
    }


@torch.no_grad()
def hf_eval(hf, wins: torch.Tensor, batch_size: int, top_k: int, num_experts: int):
    total, count = 0.0, 0
    L = hf.config.num_hidden_layers
    counts = torch.zeros(L, num_experts, dtype=torch.float64)
    mass = torch.zeros(L, num_experts, dtype=torch.float64)
    for i in range(0, wins.shape[0], batch_size):
        b = wins[i : i + batch_size]
        out = hf(b[:, :-1], output_router_logits=True)
        total += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), b[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += b[:, 1:].numel()
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            w, ids = torch.topk(probs, top_k, dim=-1)  # [N, K]
            w = w / w.sum(-1, keepdim=True)
            counts[layer] += torch.bincount(ids.reshape(-1), minlength=num_experts).double()
            mass[layer].index_add_(0, ids.reshape(-1), w.reshape(-1).double())
    return total / count, counts, mass


def vllm_check(model_dir: Path) -> dict:
    code = f"""
import json, os, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
t0 = time.time()
from vllm import LLM, SamplingParams
llm = LLM(model={str(model_dir)!r}, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512)
outs = llm.generate({PROMPTS[:2]!r}, SamplingParams(temperature=0.0, max_tokens=24))
print("VLLM_RESULT " + json.dumps({{"ok": True, "seconds": round(time.time() - t0, 1),
      "texts": [o.outputs[0].text for o in outs], "token_ids": [list(o.outputs[0].token_ids) for o in outs]}}))
"""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT "):])
    return {"ok": False, "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}


def shipped_files(d: Path) -> list[Path]:
    """The model's own files (SERE similarity sidecars excluded)."""
    return [f for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith("sere_similarity")]


def write_model_card(d: Path, res: dict, log: dict) -> None:
    cfg, fin, args = log["config"], log["final"], log["args"]
    corpus = fin.get("corpus", {})
    mb = res["size_bytes"] / 2**20
    files = "\n".join(f"| `{f.name}` | {f.stat().st_size / 2**20:.2f} MiB |" for f in shipped_files(d))
    util_rows = "\n".join(
        f"| {i} | {u['min_share_x_uniform']} | {u['max_share_x_uniform']} | {u['entropy_norm']} | "
        f"{u['experts_below_quarter_uniform']} | {u['experts_never_selected']} | {u['mass_min_x_uniform']} | "
        f"{u['mass_max_x_uniform']} |"
        for i, u in enumerate(res["expert_utilisation"])
    )
    gens = "\n\n".join(f"Prompt `{g['prompt']!r}` ->\n```\n{g['prompt']}{g['completion']}\n```" for g in res["hf_generations"])
    v = res.get("vllm")
    if v is None:
        vllm_line = "not checked by `verify_tiny_moe.py` in this run (pass `--vllm`)."
    elif v.get("ok"):
        same = all(g["completion"].startswith(t) for g, t in zip(res["hf_generations"], v["texts"]))
        vllm_line = (f"loads and generates with `vllm.LLM(model=dir, enforce_eager=True, gpu_memory_utilization=0.3, "
                     f"max_model_len=512)`, `VLLM_CPU_KVCACHE_SPACE=1` (vllm-cpu 0.32.0; {v['seconds']} s incl. "
                     f"start-up). Greedy completion of `{PROMPTS[0]!r}`: `{v['texts'][0]!r}`. The greedy "
                     f"completions of the first {len(v['texts'])} prompts ({len(v['token_ids'][0])} tokens) "
                     f"{'are identical to' if same else 'DIFFER from'} those of transformers.")
    else:
        vllm_line = f"FAILED to load in vLLM (return code {v.get('returncode')}); see `eval.json`."

    resumes = log.get("resumes", [])
    if resumes:
        r = resumes[-1]
        train_cmd = f"--tokens {r['tokens_arg']} --first-phase {args['tokens']}:{r['step']} --seed {args['seed']}"
        history = (
            f"\n\nSchedule history: the run was started with `--tokens {args['tokens']}`; at step {r['step']} it was "
            f"stopped (other jobs made steps 2-4x slower than when it was sized) and resumed from the step-{r['step']} "
            f"checkpoint with `--tokens {r['tokens_arg']}`, which shortens the cosine decay from that step on (the LR "
            f"drops at the switch). Batches depend only on (seed, step, rank), so the command above replays the "
            f"same schedule and data order in one go (up to floating-point nondeterminism)."
        )
    else:
        train_cmd, history = f"--tokens {args['tokens']} --seed {args['seed']}", ""

    def c(name):
        s = corpus.get(name, {})
        return f"{s.get('docs', '?')} docs, {s.get('chars', 0) / 1e6:.2f} M chars"

    text = f"""# tiny-moe: a small Qwen3-MoE trained from scratch on CPU

A real (trained, not random) Mixture-of-Experts language model in the **Qwen3-MoE architecture**
(`Qwen3MoeForCausalLM`, `model_type: qwen3_moe`), small enough to ship in the repository
({mb:.1f} MiB) and to run in tests. It exists so that SERE (expert re-routing) can be developed and
measured on a model whose routing was learned, with both `transformers` and vLLM. It is a toy
language model: it writes Python-looking code and fortune-like English, nothing more.

## Architecture

| | |
|---|---|
| layers | {cfg['num_hidden_layers']}, every layer MoE (`mlp_only_layers=[]`, `decoder_sparse_step=1`) |
| hidden size | {cfg['hidden_size']} |
| attention | {cfg['num_attention_heads']} query heads x head_dim {cfg['head_dim']}, {cfg['num_key_value_heads']} KV heads (GQA), q/k RMSNorm, RoPE theta {cfg['rope_theta']:.0e} |
| routed experts | **{cfg['num_experts']}, top-{cfg['num_experts_per_tok']}**, softmax router, `norm_topk_prob=True`, no shared experts |
| expert MLP | SwiGLU, `moe_intermediate_size` {cfg['moe_intermediate_size']} |
| vocabulary | {cfg['vocab_size']} (byte-level BPE), tied input/output embeddings |
| context | `max_position_embeddings` {cfg['max_position_embeddings']} (trained on {args['seq_len']}-token windows) |
| parameters | {fin['params'] / 1e6:.2f} M total; stored in bfloat16 (`model.safetensors`) |

Checkpoint format: per-expert tensors `model.layers.N.mlp.experts.E.{{gate,up,down}}_proj.weight`
(the format of the official Qwen3-MoE checkpoints), which transformers 5 fuses into
`experts.gate_up_proj` / `experts.down_proj` on load and vLLM loads through its expert mapping.

## Tokenizer

Byte-level BPE (`tokenizers`), {cfg['vocab_size']} tokens, trained on the train split only. Special tokens:
`<|endoftext|>` (id 0; bos = eos, also the document separator), `<|pad|>` (1), `<|im_start|>` (2),
`<|im_end|>` (3). No token is added automatically when encoding. A minimal ChatML chat template is
included (the model was never trained on chat data). `generation_config.json`: greedy, eos ids [0, 3].

## Data

- Python {sys.version.split()[0]} standard library sources (`sysconfig.get_paths()["stdlib"]`, `*.py`,
  `site-packages` excluded) and Debian `fortunes` + `fortunes-min` English text.
- Split: a stdlib file is held out when `sha256("stdlib/" + relative path) % 10000 < {float(args['heldout_percent']) * 100:.0f}`
  ({args['heldout_percent']} %); fortunes are split per entry the same way (`fortunes/<file>#<index>`) and
  grouped into ~4 KB documents. Train: code {c('train_code')}; English {c('train_english')}
  (English repeated x{args['english_repeat']} in the train stream). Held out: code {c('heldout_code')};
  English {c('heldout_english')}.
- Documents are concatenated as `<|endoftext|>` + text; training samples random {args['seq_len']}-token windows.
- `heldout.txt` ({(d / 'heldout.txt').stat().st_size / 1e3:.0f} KB): a deterministic sample of the **held-out**
  split (code files cut at 12 KB, interleaved with English), in the same `<|endoftext|>`-separated
  format, so tokenizing it reproduces the evaluation stream. `calib.txt`
  ({(d / 'calib.txt').stat().st_size / 1e3:.0f} KB): the same kind of sample from the **train** split,
  for calibration (similarity matrices) without touching held-out text.

## Training

```
.venv/bin/python models/train_tiny_moe.py --out models/tiny-moe {train_cmd}
.venv/bin/python models/verify_tiny_moe.py --dir models/tiny-moe --vllm
```

Plain-PyTorch re-implementation of Qwen3-MoE whose parameters have the HF names (`models/tiny_moe_net.py`),
with a grouped expert computation (tokens sorted by expert id, two matmuls per expert on contiguous
slices) instead of HF's per-expert mask loop; {args['procs']} data-parallel processes x {args['threads']} thread
(gloo all-reduce of gradients), which on this shared 2-core machine was much more robust to CPU
contention than 2 OpenMP threads. AdamW (betas 0.9/0.95, weight decay {args['weight_decay']}), peak LR
{args['lr']}, linear warmup {args['warmup_tokens']} tokens then cosine to {args['min_lr_ratio']} x peak,
gradient clipping {args['grad_clip']}, global batch {args['batch_size']} x {args['seq_len']} tokens,
Switch/Qwen load-balancing loss (`E * sum_e f_e P_e`, per layer, averaged over layers) with
coefficient {args['aux_coef']}. Seed {args['seed']}.{history}

| | |
|---|---|
| tokens | {fin['train_tokens']:,} ({fin['steps']} steps) |
| wall time | {fin['train_time_s'] / 60:.1f} min of training steps ({fin['machine']}; other jobs shared the CPUs) |
| throughput | {fin['tokens_per_s']:.0f} tokens/s average (`--bench-steps 6` gave 3,500 tokens/s at a quiet moment of this machine, 1,000-1,600 under the other jobs' load) |
| train loss (mean of the logged steps in the last ~100) | {fin['train_loss_last100']:.3f} (ppl {fin['train_ppl_last100']:.1f}) |
| held-out loss, training loop | {fin['heldout_loss']:.3f} (**ppl {fin['heldout_ppl']:.2f}**) on {fin['heldout_eval_tokens']:,} tokens of `heldout.txt` |
| held-out ppl, HF `transformers` (fp32 from the shipped bf16) | {res['heldout_ppl_hf']:.2f} |
| unigram ppl (add-one, train-split counts) | {fin['unigram_ppl']:.1f} |
| unigram ppl (add-one, `calib.txt` counts) | {res['unigram_ppl_calib_counts']:.1f} |
| max abs logit diff, training model vs HF model | {res['logits_max_abs_diff_train_vs_hf']:.2e} (logits up to {res['logits_abs_max']:.1f}; argmax agreement {res['argmax_agreement_train_vs_hf']:.4f}) |

The training loop's held-out number is measured after rounding the weights to bfloat16, i.e. on the
shipped weights. Held-out loss is above train loss partly because `heldout.txt` is ~25 % English
(by characters) while the train stream is ~14 %, and English is the harder part for this model. Curves: `train_log.json` (`steps`: loss, aux loss / top-k, LR, grad norm;
`evals`: held-out loss on {args['eval_windows']} windows).

## Expert utilisation (held-out text, {res['heldout_tokens']:,} tokens x top-{cfg['num_experts_per_tok']})

Share of the top-{cfg['num_experts_per_tok']} selections per expert, relative to the uniform share
1/{cfg['num_experts']} (1.0 = perfectly balanced); entropy normalised by log {cfg['num_experts']};
"mass" = share of the (renormalised) routing weight.

| layer | min share | max share | entropy | experts < 1/4 uniform | never selected | min mass | max mass |
|---|---|---|---|---|---|---|---|
{util_rows}

Per-expert counts are in `eval.json` (`expert_token_counts`).

## vLLM

{vllm_line}

## Samples (greedy, transformers)

{gens}

## Files

| file | size |
|---|---|
{files}

Total {mb:.1f} MiB. SERE's calibration writes its similarity sidecars (`sere_similarity*.safetensors`)
into this directory too; they are not part of the model and not counted here.
Tests: `tests/test_tiny_model.py`.

## Limitations

Tiny and briefly trained ({fin['train_tokens'] / 1e6:.1f} M tokens, about a quarter of one epoch of the
train split): greedy decoding quickly falls into repetition, it is not a useful assistant, and it has
seen only Python stdlib code (mostly tests) and fortunes. Expert specialisation at this scale need not resemble that of large MoE models; see
section 5 of the SERE specification for what was found about expert similarity on such a model.
"""
    (d / "README.md").write_text(text, encoding="utf-8")


def training_model(d: Path, cfg) -> TinyQwen3Moe:
    """The training-code network loaded from the exported safetensors of `d` (HF config `cfg`)."""
    from safetensors.torch import load_file

    tcfg = TinyMoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, rope_theta=cfg.rope_parameters["rope_theta"],
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
    )
    mine = TinyQwen3Moe(tcfg).eval()
    import_state_dict(mine, load_file(str(d / "model.safetensors")))
    return mine


def heldout_report(hf, tok, wins, d, cfg, batch_size: int) -> dict:
    """Held-out loss / perplexity of the transformers model on `wins` [W, T+1], the unigram baseline
    from calib.txt, and expert utilisation (shared by verify_upcycled.py)."""
    t0 = time.time()
    loss, counts, mass = hf_eval(hf, wins, batch_size, cfg.num_experts_per_tok, cfg.num_experts)
    uni = unigram_loss(tok, (d / "calib.txt").read_text(encoding="utf-8"), wins[:, 1:].reshape(-1))
    return {
        "hf_heldout_eval_seconds": round(time.time() - t0, 1),
        "heldout_tokens": int(wins[:, 1:].numel()),
        "heldout_loss_hf": round(loss, 4),
        "heldout_ppl_hf": round(math.exp(loss), 3),
        "unigram_ppl_calib_counts": round(math.exp(uni), 2),
        "expert_utilisation": [utilisation(counts[i], mass[i]) for i in range(counts.shape[0])],
        "expert_token_counts": counts.long().tolist(),
    }


def verify_parser(description: str, model_dir: Path) -> argparse.ArgumentParser:
    """The options of both verify scripts (this one and verify_upcycled.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=model_dir, help="the model directory")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window")
    p.add_argument("--batch-size", type=int, default=8, help="held-out windows per forward pass")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--vllm", action="store_true", help="also load the directory in vLLM (CPU) and generate")
    return p


def main(argv=None):
    p = verify_parser(__doc__, Path(__file__).parent / "tiny-moe")
    p.add_argument("--max-windows", type=int, default=0, help="limit held-out windows (0: all; smoke tests)")
    p.add_argument("--card-only", action="store_true", help="rewrite README.md from the existing eval.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = args.dir
    if args.card_only:
        res = json.loads((d / "eval.json").read_text())
        for _ in range(2):
            write_model_card(d, res, json.loads((d / "train_log.json").read_text()))
            res["size_bytes"] = sum(f.stat().st_size for f in shipped_files(d))
        (d / "eval.json").write_text(json.dumps(res, indent=1))
        return
    tok = AutoTokenizer.from_pretrained(str(d))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    cfg = hf.config
    res = {"model_class": type(hf).__name__, "model_type": cfg.model_type}

    gens = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=40, do_sample=False)
        gens.append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:])})
    res["hf_generations"] = gens

    # Export faithfulness: training model <- exported safetensors vs the HF model.
    mine = training_model(d, cfg)
    wins = heldout_windows(tok, (d / "heldout.txt").read_text(encoding="utf-8"), args.seq_len)
    if args.max_windows:
        wins = wins[: args.max_windows]
    with torch.no_grad():
        a, _ = mine(wins[:4, :-1])
        b = hf(wins[:4, :-1]).logits.float()
    res["logits_max_abs_diff_train_vs_hf"] = float((a - b).abs().max())
    res["logits_abs_max"] = float(a.abs().max())
    res["argmax_agreement_train_vs_hf"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())

    res.update(heldout_report(hf, tok, wins, d, cfg, args.batch_size))
    log = json.loads((d / "train_log.json").read_text())
    res["train_loop_heldout_ppl"] = log["final"]["heldout_ppl"]
    res["size_bytes"] = sum(f.stat().st_size for f in shipped_files(d))
    if args.vllm:
        res["vllm"] = vllm_check(d)
    for _ in range(2):  # the card's own size is part of the directory size
        write_model_card(d, res, log)
        res["size_bytes"] = sum(f.stat().st_size for f in shipped_files(d))
        (d / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "expert_token_counts"}, indent=1))


if __name__ == "__main__":
    main()
