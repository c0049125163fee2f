"""Statistics of `benchmarks/bench_serve.py`: percentiles, one sweep cell's summary, memory trend.

Pure functions over plain lists and dicts (no Ray, no engine), so tests/test_bench_serve.py checks
them against hand-worked numbers.
"""

from __future__ import annotations

import math

__all__ = ["cell_summary", "linear_slope", "memory_summary", "percentile", "per_minute"]

_MiB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks (numpy's
    default): rank h = (n - 1) q / 100, value x[floor h] + (h - floor h)(x[floor h + 1] - x[floor h]).
    NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q!r} is outside [0, 100]")
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def _rounded(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def cell_summary(results: list[dict], elapsed_s: float) -> dict:
    """Throughput and latency of one closed-loop run.

    `results`: one dict per request: {"ok": bool, "error": str | None, "tokens": int,
    "ttft_s": float | None, "tpot_s": float | None}. Throughput counts successful requests and
    their output tokens over `elapsed_s` (first request sent -> last one answered); TTFT (time to
    the first streamed token) and TPOT (time per output token after the first) are over successful
    requests, in milliseconds. `errors_by_kind` counts failures by their `error` label.
    """
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s={elapsed_s!r} must be positive")
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    tpot = [r["tpot_s"] * 1e3 for r in ok if r["tpot_s"] is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_kind": dict(sorted(errors.items())),
        "duration_s": round(elapsed_s, 3),
        "requests_per_s": round(len(ok) / elapsed_s, 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed_s, 2),
        "ttft_ms_p50": _rounded(percentile(ttft, 50), 1),
        "ttft_ms_p99": _rounded(percentile(ttft, 99), 1),
        "tpot_ms_p50": _rounded(percentile(tpot, 50), 2),
        "tpot_ms_p99": _rounded(percentile(tpot, 99), 2),
    }


def linear_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs: sum((x - mx)(y - my)) / sum((x - mx)^2)."""
    if len(xs) != len(ys):
        raise ValueError(f"xs has {len(xs)} values but ys has {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"a slope needs at least 2 points, got {len(xs)}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("all xs are equal: the slope is undefined")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread


def memory_summary(samples: list[tuple[float, int]]) -> dict:
    """RSS trend of a soak from (seconds since start, RSS bytes) samples: start, end, max (MiB),
    least-squares slope over the whole soak and over its second half (MiB per minute; the first
    minutes include warm-up allocations)."""
    if len(samples) < 4:
        raise ValueError(f"a memory trend needs at least 4 samples, got {len(samples)}")
    minutes = [t / 60 for t, _ in samples]
    mib = [rss / _MiB for _, rss in samples]
    half = len(samples) // 2
    return {
        "samples": len(samples),
        "rss_mib_start": round(mib[0], 1),
        "rss_mib_end": round(mib[-1], 1),
        "rss_mib_max": round(max(mib), 1),
        "slope_mib_per_min": round(linear_slope(minutes, mib), 3),
        "slope_mib_per_min_second_half": round(linear_slope(minutes[half:], mib[half:]), 3),
    }


def per_minute(results: list[dict], start_s: float) -> list[dict]:
    """Successful requests, output tokens and errors per whole minute of a soak, by the time each
    request ended (`end_s`, same clock as `start_s`)."""
    buckets: dict[int, dict] = {}
    for r in results:
        minute = int((r["end_s"] - start_s) // 60)
        bucket = buckets.setdefault(minute, {"minute": minute, "ok": 0, "tokens": 0, "errors": 0})
        if r["ok"]:
            bucket["ok"] += 1
            bucket["tokens"] += r["tokens"]
        else:
            bucket["errors"] += 1
    return [buckets[m] for m in sorted(buckets)]
