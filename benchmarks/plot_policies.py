"""One figure, one panel per metric, one line per policy against a batch-like x axis (log 2).

Shared by the benchmarks that compare policies side by side (`bench_vllm.py`, `bench_serve.py`).
"""

from __future__ import annotations

import os

__all__ = ["plot_policies"]


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
