"""The figure of `sere evaluate --png`: perplexity change against distinct experts."""

from __future__ import annotations

from pathlib import Path

from sere.policy import TUNED

__all__ = ["plot"]


def plot(records: list[dict], path: str | Path, title: str = "") -> None:
    """Perplexity change (%) against distinct experts per layer per step, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in records})
    cols = min(3, len(sizes))
    rows = -(-len(sizes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    markers = {"topk": "o", "sere": "s", "oea": "^", "sere-err": "D", TUNED: "*"}
    for ax, bs in zip(axes, sizes):
        for r in (r for r in records if r["batch_size"] == bs):
            ax.scatter(r["distinct_experts"], 100 * r["perplexity_change"], marker=markers.get(r["policy"], "x"),
                       label=r["label"])
            ax.annotate(r["label"], (r["distinct_experts"], 100 * r["perplexity_change"]), fontsize=6)
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("distinct experts / layer / step")
        ax.set_ylabel("perplexity change vs topk (%)")
        ax.grid(alpha=0.3)
    axes[len(sizes) - 1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
