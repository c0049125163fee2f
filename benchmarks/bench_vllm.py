"""End-to-end batch decoding in vLLM with the SERE plugin: policies side by side in one engine.

One engine is started with SERE on (`hf_overrides={"sere": ...}`); for every batch size the
policies are switched at run time (`collective_rpc("sere_configure")`) and run interleaved,
`--repeats` times each, so that they share the process, the memory layout and the machine's
drift. Per (policy, batch size):
  tpot_ms              time per output token of one sequence = decode step time:
                       (t(N tokens) - t(1 token)) / (N - 1), medians over the repeats
  output_tokens_per_s  batch_size * N / t(N tokens)
  distinct_experts     mean distinct experts per MoE layer and decode step (the plugin's counters,
                       with max_decode_tokens = batch size so that prefill steps are not counted)
Greedy decoding with ignore_eos, prefix caching off (each policy computes its own KV), a different
prompt per sequence (snippets of the Python standard library).

    python benchmarks/bench_vllm.py --model models/tiny-moe --batch-sizes 1 4 16 \
        --policies topk sere oea --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

def make_prompts(count: int, seed: int = 0, chars: int = 120) -> list[str]:
    """`count` different prompts: snippets of the Python standard library sources (offline,
    deterministic). Distinct prompts matter: identical greedy sequences route identically and
    would understate the distinct experts of a batch."""
    import random

    stdlib = Path(os.__file__).parent
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4 * chars)
    rng = random.Random(seed)
    prompts = []
    for path in rng.sample(files, min(count, len(files))):
        text = path.read_text(errors="ignore")
        start = text.find("\n", rng.randrange(len(text) - 2 * chars)) + 1
        prompts.append(text[start : start + chars])
    return (prompts * (count // max(len(prompts), 1) + 1))[:count]


def _timed_generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def _decode_distinct(llm) -> tuple[float, float, float]:
    """(mean distinct experts before, after, re-routed slot fraction) over layers and steps."""
    before = after = steps = rerouted = tokens = 0
    for worker in llm.collective_rpc("sere_stats"):
        for entry in worker["layers"]:
            before += entry["distinct_experts_before"]
            after += entry["distinct_experts_after"]
            steps += entry["steps"]
            rerouted += entry["rerouted_slots"]
            tokens += entry["tokens"]
    if steps == 0:
        return float("nan"), float("nan"), float("nan")
    return before / steps, after / steps, rerouted / max(tokens, 1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model directory with its SERE sidecar")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--policies", nargs="+", default=["topk", "sere", "oea"], choices=["topk", "sere", "oea"])
    parser.add_argument("--num-primary", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from vllm import LLM

    sere = {"policy": "sere" if "sere" in args.policies else args.policies[0],
            "num_primary": args.num_primary, "threshold": args.threshold}
    llm = LLM(model=args.model, hf_overrides={"sere": sere}, enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=512, max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False, seed=0)
    conditions = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "model": args.model,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "num_primary": args.num_primary,
        "threshold": args.threshold,
    }
    records = []
    try:
        for batch in args.batch_sizes:
            prompts = make_prompts(batch)
            times = {policy: {"one": [], "full": []} for policy in args.policies}
            stats = {}
            for repeat in range(args.repeats + 1):  # round 0 warms up
                for policy in args.policies:
                    llm.collective_rpc("sere_configure", kwargs={"policy": policy, "max_decode_tokens": batch})
                    llm.collective_rpc("sere_reset_stats")
                    one = _timed_generate(llm, prompts, 1)
                    full = _timed_generate(llm, prompts, args.max_tokens)
                    if repeat == 0:
                        stats[policy] = _decode_distinct(llm)
                        continue
                    times[policy]["one"].append(one)
                    times[policy]["full"].append(full)
            for policy in args.policies:
                one = statistics.median(times[policy]["one"])
                full = statistics.median(times[policy]["full"])
                before, after, rerouted = stats[policy]
                records.append({
                    "policy": policy,
                    "batch_size": batch,
                    "distinct_experts": after,
                    "distinct_experts_router": before,
                    "rerouted_slot_fraction": rerouted,
                    "tpot_ms": (full - one) / (args.max_tokens - 1) * 1e3,
                    "output_tokens_per_s": batch * args.max_tokens / full,
                    "e2e_s": full,
                })
                r = records[-1]
                print(f"B={batch:3d} {policy:5s} distinct {r['distinct_experts']:5.1f} tpot {r['tpot_ms']:7.2f} ms "
                      f"{r['output_tokens_per_s']:8.1f} tok/s", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()

    base = {r["batch_size"]: r for r in records if r["policy"] == "topk"}
    print()
    print("| batch | policy | distinct experts | TPOT ms | output tok/s | TPOT vs topk |")
    print("|---|---|---|---|---|---|")
    for r in records:
        ratio = base[r["batch_size"]]["tpot_ms"] / r["tpot_ms"] if r["batch_size"] in base else float("nan")
        print(f"| {r['batch_size']} | {r['policy']} | {r['distinct_experts']:.1f} | {r['tpot_ms']:.2f} "
              f"| {r['output_tokens_per_s']:.1f} | x{ratio:.2f} |")
    conditions["load_average_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "records": records}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
