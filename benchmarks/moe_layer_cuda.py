"""bench_moe_layer.py --device cuda: one MoE layer as grouped GEMMs under a CUDA graph, on one GPU.

What is measured and how is in bench_moe_layer.py's docstring. Shapes: T tokens, K = 8 slots,
E = 128 experts, H = 2048, W = 768, L = --layers weight sets. NOTE: not yet run on a GPU.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass

import torch

import sere.ops
from bench_moe_layer import (EXPERT_BYTES, EXPERT_WIDTH, HIDDEN, NUM_EXPERTS, TOP_K, Row, make_row,
                             structured_similarity)
from bench_reroute import capture
from moe_grouped import grouped_moe, moe_loop_reference

L2_FLUSH_BYTES = 256 << 20  # well above an H200's 50 MB L2


@dataclass
class CudaRow(Row):
    gbs_topk: float  # distinct experts' weight bytes / measured layer time
    gbs_sere: float
    max_abs_err: float  # grouped vs moe_loop_reference, layer 0, worst of the three routings


def _event_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median ms of eager `fn` calls between CUDA events (launch overhead included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """HBM bandwidth of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _event_ms(lambda: dst.copy_(src), repeats=10) / 1e3
    return 2 * num_bytes / seconds / 1e9


def replay_ms(graphs: dict[str, torch.cuda.CUDAGraph], repeats: int, warmup: int = 3) -> dict[str, float]:
    """{name: median ms of one replay}; the graphs' samples interleave, each after an L2 flush."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for graph in graphs.values():
        for _ in range(warmup):
            graph.replay()
    samples = {name: [] for name in graphs}
    for _ in range(repeats):
        for name, graph in graphs.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in samples.items()}


def run_cuda(args) -> tuple[list[Row], dict, str]:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        raise SystemExit(f"--device cuda: torch._grouped_mm has its graph-capturable CUTLASS kernel on sm_90 "
                         f"and sm_100 only; this GPU is sm_{major}{minor} (its fallback syncs with the host)")
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    bandwidth = measure_copy_bandwidth_gbs()
    print(f"# {gpu} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"copy bandwidth {bandwidth:.0f} GB/s; {args.layers} layers per graph")

    gen = torch.Generator(device=device).manual_seed(args.seed)
    layers = []
    for _ in range(args.layers):
        w_gate_up = torch.empty(NUM_EXPERTS, 2 * EXPERT_WIDTH, HIDDEN, dtype=torch.bfloat16, device=device)
        w_down = torch.empty(NUM_EXPERTS, HIDDEN, EXPERT_WIDTH, dtype=torch.bfloat16, device=device)
        layers.append((w_gate_up.normal_(0, 0.02, generator=gen), w_down.normal_(0, 0.02, generator=gen)))
    gate = torch.empty(NUM_EXPERTS, HIDDEN, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen)
    similarity = structured_similarity(args.seed).to(device)  # [E, E] float32

    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, HIDDEN, device=device, generator=gen).bfloat16()  # [T, H]

        def route():
            logits = (x @ gate.T).float()  # [T, E]
            weights, ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)  # [T, K], descending
            return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)

        weights, ids = route()  # [T, K] float32 / int32

        def reroute():
            return sere.ops.reroute_with_stats(ids, weights, similarity, args.num_primary, args.threshold)

        sere_ids, _, stats = reroute()
        distinct_topk, distinct_sere = stats[:2].tolist()
        # static buffers: each graph reads its routing from here at every replay
        routings = {"topk": ids, "sere": sere_ids, "floor": torch.zeros_like(ids)}  # [T, K] int32 each

        max_abs_err = 0.0
        for name, topk_ids in routings.items():
            got = grouped_moe(x, *layers[0], topk_ids, weights)
            want = moe_loop_reference(x, *layers[0], topk_ids, weights)
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1.6e-2, msg=lambda m: f"T={batch} {name}: {m}")
            max_abs_err = max(max_abs_err, (got.float() - want.float()).abs().max().item())

        graphs = {
            name: capture(lambda topk_ids=topk_ids: [grouped_moe(x, w13, w2, topk_ids, weights) for w13, w2 in layers])
            for name, topk_ids in routings.items()
        }
        times = {name: ms / args.layers for name, ms in replay_ms(graphs, args.repeats).items()}
        del graphs
        row = make_row(batch, distinct_topk, distinct_sere, times, bandwidth,
                       _event_ms(reroute, args.repeats), _event_ms(route, args.repeats), row_cls=CudaRow,
                       gbs_topk=distinct_topk * EXPERT_BYTES / (times["topk"] * 1e6),
                       gbs_sere=distinct_sere * EXPERT_BYTES / (times["sere"] * 1e6),
                       max_abs_err=max_abs_err)
        rows.append(row)
        print(f"T={batch:3d} distinct {distinct_topk:3d} -> {distinct_sere:3d}  topk {row.topk_ms * 1e3:7.1f} us "
              f"({row.gbs_topk:5.0f} GB/s)  sere {row.sere_ms * 1e3:7.1f} us ({row.gbs_sere:5.0f} GB/s)  "
              f"x{row.speedup:.2f} (ideal x{row.ideal_speedup:.2f})  floor {row.compute_floor_ms * 1e3:.1f} us  "
              f"err {max_abs_err:.1e}", flush=True)

    conditions = {
        "machine": platform.machine(),
        "gpu": gpu,
        "capability": f"sm_{major}{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bandwidth_gbs": bandwidth,
        "bandwidth_method": "1 GiB device-to-device copy, read + write bytes",
        "layers_per_graph": args.layers,
        "num_primary": args.num_primary,
        "threshold": args.threshold,
        "reroute_op": "compiled" if "cuda" in sere.ops._COMPILED_DEVICE_TYPES else "python fallback",
        "kernel": "torch._grouped_mm x2 (CUTLASS) over all 128 experts, slots sorted by expert, CUDA graph",
    }
    title = f"Qwen3-30B-A3B MoE layer, torch._grouped_mm under a CUDA graph, {gpu}, {bandwidth:.0f} GB/s copy"
    return rows, conditions, title
