"""Verify models/tiny-moe-upcycled with transformers (and optionally vLLM); write its ``eval.json``.

    .venv/bin/python models/verify_upcycled.py --dir models/tiny-moe-upcycled [--vllm]

Same checks and evaluation code as ``verify_tiny_moe.py`` (imported from it): HF generations, logits
of the training model vs the HF model, HF held-out perplexity on all of ``heldout.txt`` (the windows
of the training loop's evaluation), expert utilisation, unigram perplexity; ``--vllm`` loads the
directory in vLLM (CPU, enforce_eager) and generates. Does not write a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_moe_net import TinyMoeConfig, TinyQwen3Moe, import_state_dict  # noqa: E402
from verify_tiny_moe import PROMPTS, heldout_windows, hf_eval, unigram_loss, utilisation, vllm_check  # noqa: E402


def training_model(d: Path, cfg) -> TinyQwen3Moe:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(__file__).parent / "tiny-moe-upcycled")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vllm", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = args.dir
    tok = AutoTokenizer.from_pretrained(str(d))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    cfg = hf.config
    res = {"model_class": type(hf).__name__, "model_type": cfg.model_type, "hf_generations": []}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=40, do_sample=False)
        res["hf_generations"].append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:])})
    wins = heldout_windows(tok, (d / "heldout.txt").read_text(encoding="utf-8"), args.seq_len)  # [W, T+1]
    with torch.no_grad():
        a, _ = training_model(d, cfg)(wins[:4, :-1])
        b = hf(wins[:4, :-1]).logits.float()
    res["logits_max_abs_diff_train_vs_hf"] = float((a - b).abs().max())
    res["argmax_agreement_train_vs_hf"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    t0 = time.time()
    loss, counts, mass = hf_eval(hf, wins, args.batch_size, cfg.num_experts_per_tok, cfg.num_experts)
    res["hf_heldout_eval_seconds"] = round(time.time() - t0, 1)
    res["heldout_tokens"] = int(wins[:, 1:].numel())
    res["heldout_loss_hf"] = round(loss, 4)
    res["heldout_ppl_hf"] = round(math.exp(loss), 3)
    uni = unigram_loss(tok, (d / "calib.txt").read_text(encoding="utf-8"), wins[:, 1:].reshape(-1))
    res["unigram_ppl_calib_counts"] = round(math.exp(uni), 2)
    res["expert_utilisation"] = [utilisation(counts[i], mass[i]) for i in range(counts.shape[0])]
    res["expert_token_counts"] = counts.long().tolist()
    if args.vllm:
        res["vllm"] = vllm_check(d)
    (d / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "expert_token_counts"}, indent=1))


if __name__ == "__main__":
    main()
