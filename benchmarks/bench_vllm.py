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
Each round rotates the policy order. `--mode` picks vLLM's execution mode: `compiled` (vLLM's
default: torch.compile of the whole model, the SERE routing op inside the graph), `eager`
(enforce_eager=True), or `both` (one engine after the other, records tagged with their mode, and
`mode_comparison`: TPOT compiled vs eager per policy and batch size). Greedy decoding with ignore_eos, prefix caching off (each
policy computes its own KV), a different prompt per sequence (snippets of the Python standard
library).

    python benchmarks/bench_vllm.py --model models/tiny-moe --batch-sizes 1 4 16 \
        --policies topk sere oea --json out.json
    python benchmarks/bench_vllm.py --model models/tiny-moe --mode both --policies topk sere \
        --json benchmarks/results/vllm_modes.json
    python benchmarks/make_random_moe.py    # Qwen3-30B-A3B layer shapes, random weights
    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py --model build/random-moe --mode both \
        --policies topk sere --batch-sizes 1 4 16 64 --max-tokens 16 --prompt-chars 32 \
        --json benchmarks/results/vllm_modes_random_moe.json --png benchmarks/results/vllm_modes_random_moe.png
    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py --model build/random-moe \
        --batch-sizes 1 4 8 16 32 64 --policies topk sere oea sere-err --tolerance 0.6 --renormalize \
        --max-tokens 16 --prompt-chars 32 --json out.json --png out.png

NOTE: on a machine shared with other jobs use one OpenMP thread (`OMP_NUM_THREADS=1`): with two
threads on two busy cores, every barrier waits for a descheduled thread (decode steps were up to
10x slower, and erratically so).

`sere` and `sere-err` read their sidecars from the model directory (`python -m sere.calibrate`,
`python -m sere.substitution`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# NOTE: the engine core in this process, so that `LLM.generate` queues every request before the
# first step. With an engine-core process, requests stream in while it already steps: the prefill
# of the last prompts then runs as a small step of its own, which the distinct-expert counters take
# for a decode step (it is <= max_decode_tokens), and decode steps start one sequence short.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

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


def _model_shape(model: str) -> dict:
    """The MoE shape fields of a local model's config.json (empty for a hub id)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return {}
    conf = json.loads(path.read_text())
    keys = ("num_hidden_layers", "hidden_size", "num_experts", "num_local_experts", "num_experts_per_tok",
            "moe_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    return {key: conf[key] for key in keys if key in conf}


def _model_recipe(model: str) -> dict | None:
    """The arguments that made a `make_random_moe.py` model (its make_random_moe.json), else None."""
    path = Path(model) / "make_random_moe.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mode_comparison(records: list[dict]) -> list[dict]:
    """TPOT of the compiled and the eager engine side by side, per policy and batch size."""
    tpot = {(r["mode"], r["policy"], r["batch_size"]): r["tpot_ms"] for r in records}
    rows = []
    for (mode, policy, batch), compiled in tpot.items():
        eager = tpot.get(("eager", policy, batch))
        if mode == "compiled" and eager is not None:
            rows.append({"policy": policy, "batch_size": batch, "tpot_ms_compiled": compiled,
                         "tpot_ms_eager": eager, "eager_over_compiled": eager / compiled,
                         "faster": "compiled" if compiled < eager else "eager"})
    return rows


def plot_title(conditions: dict) -> str:
    shape = conditions.get("model_shape", {})
    short = {"num_experts": "E", "num_local_experts": "E", "num_experts_per_tok": "K", "hidden_size": "d",
             "moe_intermediate_size": "I", "num_hidden_layers": "layers"}
    dims = " ".join(f"{short[k]}={v}" for k, v in shape.items() if k in short)
    return (f"vLLM end to end, {conditions['model']} ({dims}), S={conditions['num_primary']}\n"
            f"{conditions['cpus']} CPUs, OMP threads {conditions.get('omp_num_threads') or 'default'}, "
            f"load average {conditions['load_average_start']:.1f} -> {conditions['load_average_end']:.1f}")


def _decode_distinct(llm) -> tuple[float, float, float]:
    """(mean distinct experts before, after, re-routed slots per token) over layers and steps."""
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
    parser.add_argument("--policies", nargs="+", default=["topk", "sere", "oea"],
                        choices=["topk", "sere", "oea", "sere-err"])
    parser.add_argument("--num-primary", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--tolerance", type=float, default=1.0, help="sere-err: substitute below this error")
    parser.add_argument("--renormalize", action="store_true", help="sere-err: renormalise the kept weights")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per sequence")
    parser.add_argument("--prompt-chars", type=int, default=120, help="characters per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["compiled", "eager", "both"], default="compiled",
                        help="vLLM execution mode: compiled (vLLM's default), eager (enforce_eager), or both")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None, help="plot distinct experts and TPOT per batch size")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error(f"--max-tokens must be >= 2 (TPOT is a difference of two runs), got {args.max_tokens}")

    # The engine starts on a sidecar policy (so its sidecar is checked up front); sere_configure
    # switches policies, keeping the other fields.
    first = next((p for p in ("sere", "sere-err") if p in args.policies), args.policies[0])
    sere = {"policy": first, "num_primary": args.num_primary, "threshold": args.threshold,
            "tolerance": args.tolerance, "renormalize": args.renormalize}
    conditions = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "load_averages_1_5_15_start": os.getloadavg(),
        "model": args.model,
        "model_shape": _model_shape(args.model),
        "model_recipe": _model_recipe(args.model),
        "max_tokens": args.max_tokens,
        "prompt_chars": args.prompt_chars,
        "repeats": args.repeats,
        "num_primary": args.num_primary,
        "threshold": args.threshold,
        "sere_config": sere,
        "vllm_cpu_kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "vllm_enable_v1_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS",) if os.environ.get(name)]
    conditions["command"] = shlex.join([*env, "python", "benchmarks/bench_vllm.py", *(sys.argv[1:] if argv is None else argv)])
    wall_start = time.perf_counter()
    records = []
    for mode in (["compiled", "eager"] if args.mode == "both" else [args.mode]):
        records += _bench_mode(args, mode, sere, conditions)
        gc.collect()  # free this engine's weights before the next one loads its own
    _print_table(records)
    comparison = mode_comparison(records)
    for row in comparison:
        print(f"{row['policy']:8s} B={row['batch_size']:3d} TPOT compiled {row['tpot_ms_compiled']:7.2f} ms, "
              f"eager {row['tpot_ms_eager']:7.2f} ms: {row['faster']} faster (x{row['eager_over_compiled']:.2f})")
    conditions["load_average_end"] = os.getloadavg()[0]
    conditions["load_averages_1_5_15_end"] = os.getloadavg()
    conditions["wall_s"] = time.perf_counter() - wall_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "records": records, **({"mode_comparison": comparison}
                                                                       if comparison else {})}, f, indent=2)
    if args.png:
        from plot_policies import plot_policies

        panels = [("distinct_experts", "distinct experts per layer and step"), ("tpot_ms", "TPOT (ms)")]
        plotted = [{**r, "policy": f"{r['policy']} ({r['mode']})"} for r in records] if args.mode == "both" else records
        plot_policies(plotted, "batch_size", "batch size (sequences decoded together)", panels, args.png,
                      plot_title(conditions))
    return records


def _bench_mode(args, mode: str, sere: dict, conditions: dict) -> list[dict]:
    """One engine in `mode` ("compiled" or "eager"): every policy and batch size, interleaved."""
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=args.model, hf_overrides={"sere": sere}, enforce_eager=mode == "eager",
              gpu_memory_utilization=0.3, max_model_len=512, max_num_seqs=max(args.batch_sizes),
              enable_prefix_caching=False, seed=0)
    conditions[f"engine_start_s_{mode}"] = time.perf_counter() - start
    records = []
    try:
        for batch in args.batch_sizes:
            prompts = make_prompts(batch, chars=args.prompt_chars)
            times = {policy: {"one": [], "full": []} for policy in args.policies}
            stats = {}
            for repeat in range(args.repeats + 1):  # round 0 warms up
                # Each round starts one policy later, so that a periodic load on a shared machine
                # does not always hit the same policy.
                shift = repeat % len(args.policies)
                for policy in args.policies[shift:] + args.policies[:shift]:
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
                    "mode": mode,
                    "policy": policy,
                    "batch_size": batch,
                    "distinct_experts": after,
                    "distinct_experts_router": before,
                    "rerouted_slots_per_token": rerouted,
                    "tpot_ms": (full - one) / (args.max_tokens - 1) * 1e3,
                    "output_tokens_per_s": batch * args.max_tokens / full,
                    "e2e_s": full,
                    "e2e_s_repeats": times[policy]["full"],
                    "first_token_s_repeats": times[policy]["one"],
                })
                r = records[-1]
                print(f"{mode:8s} B={batch:3d} {policy:8s} distinct {r['distinct_experts']:5.1f} tpot {r['tpot_ms']:7.2f} ms "
                      f"{r['output_tokens_per_s']:8.1f} tok/s", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()

    return records


def _print_table(records: list[dict]) -> None:
    base = {(r["mode"], r["batch_size"]): r for r in records if r["policy"] == "topk"}
    print()
    print("| mode | batch | policy | distinct experts | TPOT ms | output tok/s | TPOT vs topk |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        key = (r["mode"], r["batch_size"])
        ratio = base[key]["tpot_ms"] / r["tpot_ms"] if key in base else float("nan")
        print(f"| {r['mode']} | {r['batch_size']} | {r['policy']} | {r['distinct_experts']:.1f} | {r['tpot_ms']:.2f} "
              f"| {r['output_tokens_per_s']:.1f} | x{ratio:.2f} |")


if __name__ == "__main__":
    main()
