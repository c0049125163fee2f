"""The figures that compare policies side by side.

`plot_policies`: one panel per metric, one line per policy against a batch-like x axis (log 2)
(`bench_vllm.py`, `bench_serve.py`). `plot_pareto`: perplexity change against distinct experts,
one panel per batch size, one series per policy family (`pareto.py`).
"""

from __future__ import annotations

import os

import math

__all__ = ["plot_pareto", "plot_policies"]


def plot_policies(records: list[dict], x_key: str, x_label: str, panels: list[tuple[str, str]],
                  path: str, title: str) -> None:
    """Write a PNG: for each (record key, axis label) in `panels`, a line per `policy` over `x_key`.
    Records without the key (None) are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for policy in dict.fromkeys(r["policy"] for r in records):
            rows = [r for r in records if r["policy"] == policy and r.get(key) is not None]
            ax.plot([r[x_key] for r in rows], [r[key] for r in rows], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


_PARETO_SERIES = [  # (legend, colour, marker, joined by a line, which records)
    ("topk", "k", "o", False, lambda r: r["policy"] == "topk"),
    ("oea", "tab:blue", "^", True, lambda r: r["policy"] == "oea"),
    ("xshare S=1", "tab:brown", "P", True, lambda r: r["policy"] == "xshare" and r["num_primary"] == 1),
    ("xshare S=2", "tab:brown", "X", False, lambda r: r["policy"] == "xshare" and r["num_primary"] != 1),
    ("sere (cosine)", "tab:orange", "s", False, lambda r: r["policy"] == "sere" and r["sidecar"] == "cosine"),
    ("sere (frobenius)", "tab:orange", "s", False, lambda r: r["policy"] == "sere" and r["sidecar"] == "frobenius"),
    ("sere (cka)", "tab:olive", "s", False, lambda r: r["policy"] == "sere" and r["sidecar"] == "cka"),
    ("sere-err", "tab:green", "D", False, lambda r: r["policy"] == "sere-err" and not r.get("refill")),
    ("sere-err + refill", "tab:purple", "D", False,
     lambda r: r["policy"] == "sere-err" and r.get("refill") and r.get("max_distinct") is None),
    ("sere-err budget + refill", "tab:red", "v", True,
     lambda r: r["policy"] == "sere-err" and r.get("refill") and r.get("max_distinct") is not None),
]


def plot_pareto(records: list[dict], path: str, title: str) -> None:
    """Write a PNG: perplexity change vs topk (%, symlog, +- standard error over the paired
    batches) against distinct experts per layer per step, one panel per `batch_size`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in records})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        rows = [r for r in records if r["batch_size"] == bs]
        for label, color, marker, joined, pick in _PARETO_SERIES:
            pts = sorted((r for r in rows if pick(r)), key=lambda r: r["distinct_experts"])
            if not pts:
                continue
            ax.errorbar([r["distinct_experts"] for r in pts], [100 * r["perplexity_change"] for r in pts],
                        yerr=[100 * r["perplexity_change_std"] / math.sqrt(r["num_batches"]) for r in pts],
                        fmt=marker + ("-" if joined else ""), color=color,
                        mfc=color if "frob" not in label else "none", label=label, capsize=2, ms=5)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("distinct experts / layer / step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ppl change vs topk (%), ± s.e. over batches")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
