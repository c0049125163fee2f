"""Verify models/tiny-moe-upcycled with transformers (and optionally vLLM); write its ``eval.json``.

    .venv/bin/python models/verify_upcycled.py --dir models/tiny-moe-upcycled [--vllm]

Same checks and evaluation code as ``verify_tiny_moe.py`` (imported from it): HF generations, logits
of the training model vs the HF model, HF held-out perplexity on all of ``heldout.txt`` (the windows
of the training loop's evaluation), expert utilisation, unigram perplexity; ``--vllm`` loads the
directory in vLLM (CPU, enforce_eager) and generates. Does not write a model card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from verify_tiny_moe import (PROMPTS, heldout_report, heldout_windows, training_model, verify_parser,  # noqa: E402
                             vllm_check)


def main(argv=None):
    args = verify_parser(__doc__, Path(__file__).parent / "tiny-moe-upcycled").parse_args(argv)
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
    res.update(heldout_report(hf, tok, wins, d, cfg, args.batch_size))
    if args.vllm:
        res["vllm"] = vllm_check(d)
    (d / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "expert_token_counts"}, indent=1))


if __name__ == "__main__":
    main()
