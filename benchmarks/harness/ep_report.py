"""Tables and the plot of `benchmarks/bench_ep.py` (cross-node bytes per all-to-all unit)."""

from __future__ import annotations

from sere.ep.accounting import UNITS

__all__ = ["gloo_table", "ratio_tables", "plot_ratios"]

# one colour per base policy in every panel; node-aware variants dashed in the same colour
_COLOURS = {"topk": "tab:gray", "sere": "tab:blue", "sere-err": "tab:green", "oea": "tab:orange"}


def _find(records, **key):
    for r in records:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def gloo_table(records) -> str:
    """The real gloo run: measured (token, rank) rows, bytes and phase times, per policy."""
    first = records[0]
    base = _find(records, policy="topk")
    lines = [f"(a) real gloo EP={first['ep_size']} ({first['num_nodes']} simulated nodes x {first['ranks_per_node']} ranks, "
             f"batch {first['batch']} tokens/step, {first['trace']}, {first['dtype']}, launcher {first['launcher']}), "
             f"unit token_rank (measured split sizes), per MoE layer step:",
             f"{'policy':<15}{'x-node rows':>12}{'x-node KB':>10}{'/topk':>7}{'(token,node) x':>15}{'/topk':>7}"
             f"{'max distinct':>13}{'step ms':>9}{'reroute ms':>11}"]
    for r in records:
        ratio = r["cross_node_bytes"] / base["cross_node_bytes"] if base and base["cross_node_bytes"] else float("nan")
        node_ratio = (r["cross_node_token_node_pairs"] / base["cross_node_token_node_pairs"]
                      if base and base["cross_node_token_node_pairs"] else float("nan"))
        lines.append(f"{r['policy']:<15}{r['cross_node_rows']:>12.1f}{r['cross_node_bytes'] / 1e3:>10.1f}{ratio:>7.2f}"
                     f"{r['cross_node_token_node_pairs']:>15.1f}{node_ratio:>7.2f}{r['max_distinct_experts_per_rank']:>13.1f}"
                     f"{r['step_ms_median']:>9.2f}{r['reroute_ms_median']:>11.2f}")
    return "\n".join(lines)


def ratio_tables(records, batch: int) -> str:
    """Per trace and unit at one batch: cross-node bytes / topk's for every policy and EP size
    (merged slots; token_expert also as routed), then max distinct experts per rank."""
    out = []
    for trace in dict.fromkeys(r["trace"] for r in records):
        rows = [r for r in records if r["trace"] == trace and r["batch"] == batch]
        if not rows:
            continue
        labels = list(dict.fromkeys(r["policy"] for r in rows))
        eps = list(dict.fromkeys(r["ep_size"] for r in rows))
        first = rows[0]
        out.append(f"\n(b) simulated, {trace}: E={first['num_experts']}, hidden {first['hidden_size']} x "
                   f"{first['dtype_bytes']} B, 8 ranks/node, batch {batch} tokens per EP step; "
                   f"cross-node bytes / topk's (topk column: MB; '-': one node)")
        for unit in UNITS:
            for merged in ((False, True) if unit == "token_expert" else (True,)):
                out.append(f"  unit {unit}{' merged' if merged else ' as routed'}")
                out.append(f"  {'EP':>4}" + "".join(f"{label:>15}" for label in labels))
                for ep in eps:
                    base = _find(rows, ep_size=ep, policy="topk", unit=unit, merged=merged)
                    cells = []
                    for label in labels:
                        r = _find(rows, ep_size=ep, policy=label, unit=unit, merged=merged)
                        if label == "topk":
                            cells.append(f"{r['cross_node_bytes'] / 1e6:>13.3f}MB")
                        else:
                            value = r["cross_node_bytes"] / base["cross_node_bytes"] if base["cross_node_bytes"] else None
                            cells.append(f"{value:>15.3f}" if value is not None else f"{'-':>15}")
                    out.append(f"  {ep:>4}" + "".join(cells))
        out.append("  max distinct experts per rank")
        for ep in eps:
            out.append(f"  {ep:>4}" + "".join(
                f"{_find(rows, ep_size=ep, policy=label, unit='token_node', merged=True)['max_distinct_experts_per_rank']:>15.2f}"
                for label in labels))
    return "\n".join(out)


def plot_ratios(records, batch: int, path: str, title: str) -> None:
    """Cross-node bytes / topk's against EP size: per trace (columns), units token_node and
    token_expert (merged) (rows), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r["trace"] for r in records))
    units = ("token_node", "token_expert")
    fig, axes = plt.subplots(len(units), len(traces), figsize=(5.5 * len(traces), 8), squeeze=False)
    for col, trace in enumerate(traces):
        rows = [r for r in records if r["trace"] == trace and r["batch"] == batch and r["merged"]]
        for row_i, unit in enumerate(units):
            ax = axes[row_i][col]
            for label in dict.fromkeys(r["policy"] for r in rows):
                base = {r["ep_size"]: r["cross_node_bytes"] for r in rows if r["policy"] == "topk" and r["unit"] == unit}
                pts = [r for r in rows if r["policy"] == label and r["unit"] == unit and base[r["ep_size"]] > 0]
                ax.plot([r["ep_size"] for r in pts], [r["cross_node_bytes"] / base[r["ep_size"]] for r in pts],
                        marker="o", linestyle="--" if "node" in label else "-", label=label,
                        color=_COLOURS.get(label.removesuffix("-node")))
            ax.set_title(f"{trace}, batch {batch}: unit {unit} (merged)", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("EP size (8 ranks per node)")
            ax.set_ylabel("cross-node bytes / topk's")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
