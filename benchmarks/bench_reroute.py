"""Time the SERE re-routing op against the reference and against one MoE layer's decode.

For each shape (E experts x K top-k x S primaries) and token count T, in one run:
  op      torch.ops.sere.reroute (ids + stats), the compiled kernel alone
  api     sere.ops.reroute, the public call (argument checks + dispatch + op)
  ref     sere.reference.reroute_reference (ids only: less work than the op)
  err op / err ref  the error-aware op torch.ops.sere.reroute_err (ids, weights, stats; tolerance
          1, keep_cost --err-keep-cost, no budget) and its reference sere_err_reference, where
          sere._C has that op (else "-")
  moe     one Qwen3-30B-A3B-like MoE layer's decode in plain PyTorch (bf16, hidden 2048, expert
          width 768, a loop over the distinct experts, each on the tokens routed to it), with the
          model's routing (topk) and after SERE re-routing (sere); the op's share is op / moe topk.
On CUDA, `graph` is the op replayed from a captured CUDA graph (no launch overhead) and the MoE
layer is timed as a CUDA-graph replay of its expert loop (the launch-free, memory-bound part).
Medians of many runs after warm-up. Prints a table; --json / --png write the results.

    python benchmarks/bench_reroute.py --tokens 1 8 64 256 --shapes 128x8x2 64x6x2 --png out.png
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import sere.ops
from sere.reference import reroute_reference, sere_err_reference

HIDDEN = 2048  # Qwen3-30B-A3B hidden size
EXPERT_WIDTH = 768  # Qwen3-30B-A3B moe_intermediate_size


@dataclass
class Row:
    shape: str
    tokens: int
    op_ms: float
    api_ms: float
    ref_ms: float
    graph_ms: float | None
    speedup: float
    moe_topk_ms: float | None
    moe_sere_ms: float | None
    op_share_pct: float | None
    distinct_before: int
    distinct_after: int
    err_op_ms: float | None = None
    err_ref_ms: float | None = None


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        num_experts, top_k, num_primary = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ExKxS, e.g. 128x8x2") from exc
    if not 1 <= num_primary < top_k <= num_experts:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs 1 <= S < K <= E")
    return num_experts, top_k, num_primary


def routing(num_tokens, num_experts, top_k, device, seed):
    """Router-like ([T, K] int32 ids, [T, K] float32 weights): skewed expert popularity."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(num_experts, generator=gen) * 0.7  # [E] some experts are popular
    logits = torch.randn(num_tokens, num_experts, generator=gen) + bias  # [T, E]
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return ids.to(torch.int32).to(device), weights.to(device)


def similarity_matrix(num_experts, device, seed):
    """[E, E] float32 symmetric in [0, 1] with diagonal 1 (stands in for a calibrated one)."""
    gen = torch.Generator().manual_seed(seed)
    sim = torch.rand(num_experts, num_experts, generator=gen)
    return ((sim + sim.T) / 2).fill_diagonal_(1.0).to(device)


def error_matrix(num_experts, device, seed):
    """[E, E] float32 substitution errors in [0.3, 1.2) with diagonal 0 (stands in for a calibrated one)."""
    gen = torch.Generator().manual_seed(seed)
    error = 0.3 + 0.9 * torch.rand(num_experts, num_experts, generator=gen)
    return error.fill_diagonal_(0.0).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sample_ms(fn, device, inner):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    begin = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - begin) / 1e6 / inner


def median_ms(fns, device, repeats, warmup, inner=1):
    """{name: median ms of one call}; each sample times `inner` calls, and the functions'
    samples are interleaved so that a load change on a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample_ms(fn, device, inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def capture(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """`calls` calls of `fn` captured in a CUDA graph, after one warm-up call on a side stream
    (lazy init, workspaces)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_replay_ms(fn, repeats, calls_per_graph=20):
    """Median time of one `fn` call replayed from a captured CUDA graph."""
    graph = capture(fn, calls_per_graph)
    timed = median_ms({"graph": graph.replay}, torch.device("cuda"), repeats, warmup=3)
    return timed["graph"] / calls_per_graph


class MoeLayer:
    """Routed experts of one MoE layer: SwiGLU experts in bf16, run one distinct expert at a time."""

    def __init__(self, num_experts, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        shape_gate_up = (num_experts, 2 * EXPERT_WIDTH, HIDDEN)
        shape_down = (num_experts, HIDDEN, EXPERT_WIDTH)
        self.w_gate_up = torch.empty(shape_gate_up, dtype=torch.bfloat16, device=device)  # [E, 2W, H]
        self.w_down = torch.empty(shape_down, dtype=torch.bfloat16, device=device)  # [E, H, W]
        self.w_gate_up.uniform_(-0.02, 0.02, generator=gen)
        self.w_down.uniform_(-0.02, 0.02, generator=gen)

    def plan(self, topk_ids, topk_weights):
        """Per distinct expert: (expert, [n] token rows, [n, 1] bf16 weights). Host sync: fine here."""
        top_k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long()  # [T * K]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w_down.shape[0]).tolist()
        tokens = order // top_k
        weights = topk_weights.reshape(-1)[order].to(torch.bfloat16)[:, None]
        groups, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                groups.append((expert, tokens[start : start + count], weights[start : start + count]))
                start += count
        return groups

    def run(self, hidden_states, groups):
        """[T, H] bf16 -> [T, H] bf16: sum over slots of weight * expert(hidden)."""
        out = torch.zeros_like(hidden_states)
        for expert, rows, weights in groups:
            gate, up = (hidden_states[rows] @ self.w_gate_up[expert].T).chunk(2, dim=-1)
            out.index_add_(0, rows, ((F.silu(gate) * up) @ self.w_down[expert].T) * weights)
        return out


def time_moe(layer, hidden_states, routings, device, repeats):
    """{name: median ms of the layer} for each routing {name: (topk_ids, topk_weights)}."""
    if device.type == "cuda":
        return {
            name: graph_replay_ms(lambda g=layer.plan(*ids_weights): layer.run(hidden_states, g), repeats, 1)
            for name, ids_weights in routings.items()
        }
    fns = {
        name: (lambda ids_weights=ids_weights: layer.run(hidden_states, layer.plan(*ids_weights)))
        for name, ids_weights in routings.items()
    }
    return median_ms(fns, device, repeats, warmup=1)


def bench_shape(shape, args, device):
    """Rows for one shape: first the ops at every token count, then the MoE layer (its 1 GB of
    weights allocated only for that phase)."""
    num_experts, top_k, num_primary = shape
    name = f"{num_experts}x{top_k}x{num_primary}"
    sim = similarity_matrix(num_experts, device, seed=num_experts).to(getattr(torch, args.sim_dtype))
    threshold = args.threshold
    with_err = not args.no_err and device.type in sere.ops._COMPILED_ERR_DEVICE_TYPES
    error = error_matrix(num_experts, device, seed=num_experts)
    inner = 10  # calls per sample: one cold call after the others ran does not dominate
    rows, routings = [], []
    moe_threads = torch.get_num_threads()
    torch.set_num_threads(args.op_threads)
    for num_tokens in args.tokens:
        ids, weights = routing(num_tokens, num_experts, top_k, device, seed=num_tokens)
        fns = {
            "op": lambda: torch.ops.sere.reroute(ids, sim, num_primary, threshold, None),
            "api": lambda: sere.ops.reroute(ids, weights, sim, num_primary, threshold),
            "ref": lambda: reroute_reference(ids, weights, sim, num_primary, threshold),
        }
        if with_err:
            keep_cost = args.err_keep_cost
            fns["err_op"] = lambda: torch.ops.sere.reroute_err(
                ids, weights, error, num_primary, 1.0, keep_cost, 0, False, None
            )
            fns["err_ref"] = lambda: sere_err_reference(ids, weights, error, num_primary, 1.0, keep_cost)
        timed = median_ms(fns, device, args.repeats, args.warmup, inner)
        graph_ms = graph_replay_ms(fns["op"], args.repeats) if device.type == "cuda" else None
        new_ids, stats = fns["op"]()
        routings.append({"topk": (ids, weights), "sere": (new_ids, weights)})
        before, after = stats[0].item(), stats[1].item()
        speedup = timed["ref"] / timed["op"]
        rows.append(Row(name, num_tokens, timed["op"], timed["api"], timed["ref"], graph_ms, speedup,
                        None, None, None, before, after, timed.get("err_op"), timed.get("err_ref")))
        print(format_row(rows[-1]), flush=True)
    torch.set_num_threads(moe_threads)
    if args.no_moe:
        return rows
    layer = MoeLayer(num_experts, device)
    print(f"MoE layer ({name}):", flush=True)
    for row, routed in zip(rows, routings):
        hidden_states = torch.randn(row.tokens, HIDDEN, dtype=torch.bfloat16, device=device)  # [T, H]
        moe = time_moe(layer, hidden_states, routed, device, args.moe_repeats)
        row.moe_topk_ms, row.moe_sere_ms = moe["topk"], moe["sere"]
        row.op_share_pct = 100.0 * (row.graph_ms if row.graph_ms is not None else row.op_ms) / row.moe_topk_ms
        print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'shape ExKxS':>11} {'T':>4} {'op ms':>9} {'api ms':>9} {'ref ms':>9} {'graph ms':>9} "
    f"{'ref/op':>7} {'moe topk ms':>11} {'moe sere ms':>11} {'op share':>9} {'distinct':>9} "
    f"{'err op ms':>9} {'err ref ms':>10}"
)


def _fmt(value, width, digits):
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def format_row(row: Row) -> str:
    return (
        f"{row.shape:>11} {row.tokens:>4} {row.op_ms:>9.4f} {row.api_ms:>9.4f} {row.ref_ms:>9.4f} "
        f"{_fmt(row.graph_ms, 9, 4)} {row.speedup:>6.1f}x {_fmt(row.moe_topk_ms, 11, 2)} "
        f"{_fmt(row.moe_sere_ms, 11, 2)} {_fmt(row.op_share_pct, 8, 3)}% "
        f"{row.distinct_before:>4}->{row.distinct_after:<4} "
        f"{_fmt(row.err_op_ms, 9, 4)} {_fmt(row.err_ref_ms, 10, 4)}"
    )


def conditions(args, device):
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "op_threads": args.op_threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threshold": args.threshold,
        "similarity_dtype": args.sim_dtype,
        "ids_dtype": "int32",
        "err_op": None if args.no_err else f"tolerance 1, keep_cost {args.err_keep_cost:g}, no budget, float32 errors",
        "repeats": args.repeats,
        "moe_repeats": args.moe_repeats,
        "moe_layer": f"bf16 SwiGLU experts, hidden {HIDDEN}, width {EXPERT_WIDTH}, per-expert loop",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def plot(rows, info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_share) = plt.subplots(1, 2, figsize=(12, 4.5))
    for shape in dict.fromkeys(row.shape for row in rows):
        sel = [row for row in rows if row.shape == shape]
        tokens = [row.tokens for row in sel]
        ax_time.plot(tokens, [row.op_ms for row in sel], "o-", label=f"{shape} op")
        ax_time.plot(tokens, [row.ref_ms for row in sel], "s--", label=f"{shape} reference")
        if sel[0].moe_topk_ms is not None:
            ax_time.plot(tokens, [row.moe_topk_ms for row in sel], "^:", label=f"{shape} MoE layer (topk)")
            ax_time.plot(tokens, [row.moe_sere_ms for row in sel], "v:", label=f"{shape} MoE layer (sere)")
            ax_share.plot(tokens, [row.op_share_pct for row in sel], "o-", label=shape)
    for ax in (ax_time, ax_share):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_ylabel("ms (median)")
    ax_time.set_title("re-routing op vs reference vs MoE layer")
    ax_share.set_ylabel("op time / MoE layer time (%)")
    ax_share.set_title("op share of one MoE layer")
    where = info.get("gpu") or info.get("cpu", info["device"])
    threads = f"{info['op_threads']} thread(s) for the ops, {info['threads']} for the MoE layer"
    fig.suptitle(f"sere bench_reroute on {where}, torch {info['torch']}, {threads}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(128, 8, 2), (64, 6, 2)])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs of the op (median)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--moe-repeats", type=int, default=None, help="timed MoE runs (default: 3 CPU, 50 CUDA)")
    parser.add_argument("--no-moe", action="store_true", help="skip the MoE layer")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--no-err", action="store_true", help="skip the error-aware op (sere-err) columns")
    parser.add_argument("--err-keep-cost", type=float, default=0.05, help="keep_cost of the sere-err op")
    parser.add_argument("--sim-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the MoE layer")
    parser.add_argument(
        "--op-threads", type=int, default=1,
        help="torch intra-op threads while timing op/reference (default 1: at these sizes more threads "
        "only add OpenMP contention, which slows the reference most on a shared machine)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="write a plot here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.moe_repeats is None:
        args.moe_repeats = 50 if device.type == "cuda" else 3
    if device.type not in sere.ops._COMPILED_DEVICE_TYPES:
        raise SystemExit(
            f"sere._C has no {device.type} kernels: rebuild with `pip install --no-build-isolation -e .` "
            "(CUDA kernels need a CUDA torch and nvcc)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    info = conditions(args, device)
    print(json.dumps(info))
    print(HEADER)
    rows = [row for shape in args.shapes for row in bench_shape(shape, args, device)]
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"conditions": info, "rows": [asdict(row) for row in rows]}, out, indent=2)
    if args.png:
        plot(rows, info, args.png)


if __name__ == "__main__":
    main()
