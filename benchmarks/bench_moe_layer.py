"""One MoE layer's decode time in vLLM's CPU expert kernel (--device cuda: grouped GEMMs on one GPU),
with and without SERE, next to a roofline.

Qwen3-30B-A3B layer shapes: bf16, 128 experts, top-8, hidden 2048, expert width 768 (9.4 MB of
weights per expert). For each batch size T, in one run and interleaved:
  routing   x [T, 2048] @ gate [128, 2048]^T, softmax top-8 (vLLM's CPURouter), the same for both
  op        sere.reroute_with_stats on the router's ids (compiled op), S = --num-primary
  topk      vLLM's `cpu_fused_moe` (prepacked weights, the kernel vLLM runs) on the router's ids
  sere      the same kernel on the re-routed ids
Roofline per policy: max(distinct experts x 9.4 MB / measured read bandwidth, compute floor). The
bandwidth is measured here first with the kernel's thread count; the compute floor is the same
kernel with every slot of every token on expert 0 (the step's FLOPs, one expert's bytes).
The router is random and the similarity is random but structured: 16 clusters of 8 experts,
similar inside a cluster (0.7-0.95) and not across (0.05-0.35), so SERE has real choices.
Medians of --repeats runs after warm-up. Prints a markdown table; --json / --png write results.

--device cuda (no vLLM needed; sm_90/sm_100, e.g. one H200): the experts are moe_grouped.py's
`grouped_moe`, two `torch._grouped_mm` calls (CUTLASS) over all 128 experts with the step's slots
sorted by expert, so untouched experts are empty groups that read no weights. Routing is a plain
softmax top-8 with renormalisation (vLLM's CPURouter's maths). Per batch size and policy, one CUDA
graph runs the layer --layers times over as many independent weight sets (a model's decode step
through its MoE layers: launch cost amortised and no layer's experts still in L2 from the last);
the routing lives in static input buffers, read at replay, not baked into the graph. Each sample
is one replay between CUDA events after an L2 flush; time per layer = replay / --layers. The
bandwidth is a 1 GiB device-to-device copy in the same run (read + write bytes); the compute floor
is the same graph with every slot on expert 0. Before timing, each routing's grouped result is
checked against moe_loop_reference (one expert at a time, plain PyTorch) at bf16 tolerance.
`op ms` and `routing ms` are eager, launch overhead included. NOTE: this path has not run on a GPU
yet (none was lent when it was written); its device-agnostic parts are tested on CPU
(tests/test_moe_grouped.py) and the rest by that file's `gpu` tests and benchmarks/device_check.sh.

    python benchmarks/bench_moe_layer.py --batch-sizes 1 2 4 8 16 32 64 --json out.json --png out.png
    python benchmarks/bench_moe_layer.py --device cuda --repeats 50 --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import sere.ops

NUM_EXPERTS, TOP_K, HIDDEN, EXPERT_WIDTH = 128, 8, 2048, 768
EXPERT_BYTES = 3 * HIDDEN * EXPERT_WIDTH * 2  # gate + up + down, bf16


@dataclass
class Row:
    batch_size: int
    distinct_topk: float
    distinct_sere: float
    topk_ms: float
    sere_ms: float
    op_ms: float
    routing_ms: float
    speedup: float
    ideal_speedup: float
    roofline_topk_ms: float
    roofline_sere_ms: float
    compute_floor_ms: float


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Read bandwidth: a sum over a buffer much larger than the caches."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
    seconds = _median_ms(lambda: buffer.sum(), repeats=5) / 1e3
    return num_bytes / seconds / 1e9


def structured_similarity(seed: int, cluster: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(NUM_EXPERTS) // cluster
    same = groups[:, None] == groups[None, :]
    sim = torch.where(same, 0.7 + 0.25 * torch.rand(NUM_EXPERTS, NUM_EXPERTS, generator=gen),
                      0.05 + 0.3 * torch.rand(NUM_EXPERTS, NUM_EXPERTS, generator=gen))
    sim = (sim + sim.T) / 2
    return sim.fill_diagonal_(1.0).contiguous()  # [E, E] float32


def make_row(batch, distinct_topk, distinct_sere, times, bandwidth, op_ms, routing_ms, row_cls=Row, **extra):
    """A row from {"topk", "sere", "floor"} median ms and the bandwidth in GB/s; roofline of a
    policy = max(its distinct experts' bytes / bandwidth, the measured compute floor)."""

    def roofline(distinct):
        return max(distinct * EXPERT_BYTES / (bandwidth * 1e9) * 1e3, times["floor"])

    return row_cls(
        batch_size=batch,
        distinct_topk=distinct_topk,
        distinct_sere=distinct_sere,
        topk_ms=times["topk"],
        sere_ms=times["sere"],
        op_ms=op_ms,
        routing_ms=routing_ms,
        speedup=times["topk"] / times["sere"],
        ideal_speedup=distinct_topk / distinct_sere,
        roofline_topk_ms=roofline(distinct_topk),
        roofline_sere_ms=roofline(distinct_sere),
        compute_floor_ms=times["floor"],
        **extra,
    )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--num-primary", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    parser.add_argument("--layers", type=int, default=8,
                        help="cuda: layers (weight sets) per captured graph (default 8, 1.2 GB each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")

    if args.device == "cuda":
        from moe_layer_cuda import run_cuda

        rows, conditions, title = run_cuda(args)
    else:
        rows, conditions, title = _run_cpu(args)

    print()
    print("| T | distinct topk | distinct sere | topk ms | sere ms | speedup | ideal | roofline topk ms "
          "| roofline sere ms | compute floor ms | op ms | routing ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    d = 4 if args.device == "cuda" else 2  # decimals of the layer times: tens of microseconds on a GPU
    for r in rows:
        print(f"| {r.batch_size} | {r.distinct_topk} | {r.distinct_sere} | {r.topk_ms:.{d}f} | {r.sere_ms:.{d}f} "
              f"| {r.speedup:.2f} | {r.ideal_speedup:.2f} | {r.roofline_topk_ms:.{d}f} | {r.roofline_sere_ms:.{d}f} "
              f"| {r.compute_floor_ms:.{d}f} | {r.op_ms:.3f} | {r.routing_ms:.3f} |")
    if args.device == "cuda":
        print()
        print("| T | GB/s topk | GB/s sere | max abs err vs loop |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r.batch_size} | {r.gbs_topk:.0f} | {r.gbs_sere:.0f} | {r.max_abs_err:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "rows": [asdict(r) for r in rows]}, f, indent=2)
    if args.png:
        _plot(rows, title, args.png)
    return rows


def _run_cpu(args) -> tuple[list[Row], dict, str]:
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    bandwidth = measure_bandwidth_gbs()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}, "
          f"load average {os.getloadavg()[0]:.1f}; read bandwidth {bandwidth:.1f} GB/s")

    gen = torch.Generator().manual_seed(args.seed)
    w13 = cpu_prepack_moe_weight((torch.randn(NUM_EXPERTS, 2 * EXPERT_WIDTH, HIDDEN, generator=gen) * 0.02).bfloat16(), "vec")
    w2 = cpu_prepack_moe_weight((torch.randn(NUM_EXPERTS, HIDDEN, EXPERT_WIDTH, generator=gen) * 0.02).bfloat16(), "vec")
    gate = (torch.randn(NUM_EXPERTS, HIDDEN, generator=gen) * 0.02).bfloat16()  # [E, H]
    router = CPURouter(top_k=TOP_K, global_num_experts=NUM_EXPERTS, renormalize=True)
    similarity = structured_similarity(args.seed)

    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, HIDDEN, generator=gen).bfloat16()  # [T, H]
        out = torch.empty_like(x)

        def route():
            logits = x @ gate.T  # [T, E]
            return router.select_experts(x, logits)

        weights, ids = route()  # [T, K] float32 / int32
        order = torch.argsort(weights, dim=1, descending=True, stable=True)
        weights, ids = weights.gather(1, order).contiguous(), ids.gather(1, order).contiguous()

        def reroute():
            return sere.ops.reroute_with_stats(ids, weights, similarity, args.num_primary, args.threshold)

        sere_ids, _, stats = reroute()
        distinct_topk, distinct_sere = int(stats[0]), int(stats[1])

        one_expert = torch.zeros(batch, TOP_K, dtype=torch.int32)  # [T, K]
        runs = {
            "topk": lambda: cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", "vec"),
            "sere": lambda: cpu_fused_moe(out, x, w13, w2, None, None, weights, sere_ids, "silu", "vec"),
            "floor": lambda: cpu_fused_moe(out, x, w13, w2, None, None, weights, one_expert, "silu", "vec"),
        }
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        # interleave the two policies so that drift on a shared machine hits both alike
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        # the floor's FLOPs are the step's: unchanged by re-routing
        times = {name: statistics.median(values) for name, values in times.items()}
        row = make_row(batch, distinct_topk, distinct_sere, times, bandwidth,
                       _median_ms(reroute, args.repeats), _median_ms(route, args.repeats))
        rows.append(row)
        print(f"T={batch:3d} distinct {distinct_topk:3d} -> {distinct_sere:3d}  topk {row.topk_ms:7.2f} ms  "
              f"sere {row.sere_ms:7.2f} ms  x{row.speedup:.2f} (ideal x{row.ideal_speedup:.2f})", flush=True)

    conditions = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average": os.getloadavg()[0],
        "bandwidth_gbs": bandwidth,
        "num_primary": args.num_primary,
        "threshold": args.threshold,
        "kernel": "vllm._custom_ops.cpu_fused_moe (isa vec)",
    }
    title = f"Qwen3-30B-A3B MoE layer, vLLM CPU kernel, {threads} thread(s), {bandwidth:.0f} GB/s"
    return rows, conditions, title


def _plot(rows: list[Row], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = [r.batch_size for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(batch, [r.topk_ms for r in rows], "o-", label="topk (measured)")
    ax.plot(batch, [r.sere_ms for r in rows], "s-", label="sere (measured)")
    ax.plot(batch, [r.roofline_topk_ms for r in rows], "--", label="topk roofline")
    ax.plot(batch, [r.roofline_sere_ms for r in rows], ":", label="sere roofline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the decode step")
    ax.set_ylabel("MoE layer time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
