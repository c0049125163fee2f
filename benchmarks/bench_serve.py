"""End-to-end serving benchmark: SERE on vs off, side by side, over the OpenAI HTTP API.

Starts a local Ray cluster with two Serve apps built from the same config (default:
serve_config.yaml) that differ only in their `sere` block: `/sere` (the config's SERE settings)
and `/off` (no SERE: the plugin stays inert). For each concurrency level it runs a closed loop of
streaming completions against each app in turn (same prompts, `ignore_eos` so every request
decodes exactly --max-tokens tokens) and reports requests/s, output tokens/s, TTFT and TPOT
(p50/p99), plus the distinct experts per MoE-layer step read from the engine's SERE counters.

    .venv/bin/python benchmarks/bench_serve.py --concurrency 1 4 16 --json out/bench_serve.json \
        --png out/bench_serve.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # deploy/ when run from a checkout without the editable install

PROMPTS = [
    "import os\nimport sys\n\ndef main(argv):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "def parse_args():\n    parser = argparse.ArgumentParser(",
    "# Read a CSV file and print the sum of each column\n",
    "for i, line in enumerate(open(path)):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The quick brown fox",
    "try:\n    import json\nexcept ImportError:\n",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ------------------------------------------------------------------------------ the load


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("no token streamed")
    return {"ttft_s": first - start, "tpot_s": (last - first) / max(tokens - 1, 1),
            "tokens": tokens, "latency_s": last - start}


async def closed_loop(base_url: str, model: str, concurrency: int, num_requests: int,
                      max_tokens: int, timeout_s: float) -> tuple[list[dict], int, float]:
    """`concurrency` workers issue requests back to back until `num_requests` are done."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("SERE_API_KEY", "unused"),
                                timeout=timeout_s, max_retries=0)
    todo = list(range(num_requests))
    results: list[dict] = []
    errors = 0

    async def worker():
        nonlocal errors
        while todo:
            i = todo.pop()
            try:
                results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))
            except Exception as error:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  request failed: {type(error).__name__}: {error}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                           timeout_s * (num_requests // concurrency + 2))
    elapsed = time.perf_counter() - start
    await client.close()
    return results, errors, elapsed


def summarize(policy: str, concurrency: int, results: list[dict], errors: int,
              elapsed: float, experts: dict | None) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] * 1e3 for r in results]
    tpot = [r["tpot_s"] * 1e3 for r in results]
    record = {
        "policy": policy,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "duration_s": round(elapsed, 3),
        "requests_per_s": round(len(results) / elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "ttft_ms_p50": round(statistics.median(ttft), 1) if ttft else None,
        "ttft_ms_p99": round(percentile(ttft, 99), 1) if ttft else None,
        "tpot_ms_p50": round(statistics.median(tpot), 2) if tpot else None,
        "tpot_ms_p99": round(percentile(tpot, 99), 2) if tpot else None,
    }
    if experts:
        record.update(experts)
    return record


# ------------------------------------------------------------------------- SERE counters


def sere_counters(app_name: str, model_id: str) -> dict | None:
    """Summed `sere_stats` counters of the app's engine workers (None when SERE is off)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"SereLLMServer:{model_id}", app_name=app_name)
    totals: dict[str, int] = {}
    for snapshot in handle.collective_rpc.remote("sere_stats").result(timeout_s=60):
        for layer in snapshot.get("layers", []):
            for key in ("steps", "distinct_experts_before", "distinct_experts_after"):
                totals[key] = totals.get(key, 0) + int(layer[key])
    return totals or None


def experts_per_step(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    steps = after["steps"] - before["steps"]
    if steps <= 0:
        return None
    return {
        "distinct_experts_router": round((after["distinct_experts_before"]
                                          - before["distinct_experts_before"]) / steps, 2),
        "distinct_experts_executed": round((after["distinct_experts_after"]
                                            - before["distinct_experts_after"]) / steps, 2),
    }


# ----------------------------------------------------------------------------- reporting


COLUMNS = [("policy", "policy"), ("concurrency", "conc"), ("requests_per_s", "req/s"),
           ("output_tokens_per_s", "out tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
           ("ttft_ms_p99", "TTFT p99 ms"), ("tpot_ms_p50", "TPOT p50 ms"),
           ("tpot_ms_p99", "TPOT p99 ms"), ("experts", "experts/layer/step (router -> read)"),
           ("errors", "errors")]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in records:
        if r.get("distinct_experts_executed") is not None:
            r = {**r, "experts": f"{r['distinct_experts_router']} -> {r['distinct_experts_executed']}"}
        lines.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    from plot_policies import plot_policies

    panels = [("output_tokens_per_s", "output tokens/s"), ("tpot_ms_p50", "TPOT p50 (ms)"),
              ("ttft_ms_p50", "TTFT p50 (ms)")]
    plot_policies(records, "concurrency", "concurrent requests", panels, path, title)


# ---------------------------------------------------------------------------------- main


def deploy_apps(config_path: str, model: str | None, num_cpus: int) -> tuple[str, dict[str, str]]:
    """A local Ray cluster with the `sere` and `off` apps; returns (base url, {policy: app})."""
    import ray
    import yaml
    from ray import serve

    from deploy.app import build_app
    from deploy.args import parse_args

    with open(config_path) as f:
        (spec,) = yaml.safe_load(f)["applications"]
    base_args = dict(spec["args"])
    if model:
        base_args["model_path"] = os.path.abspath(model)
    if not base_args.get("sere"):
        raise SystemExit(f"{config_path}: the app has no `sere` block to compare against")
    for name, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
        os.environ.setdefault(name, value)
    port = _free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    apps = {"sere": dict(base_args), "off": {**base_args, "sere": None}}
    for name, args in apps.items():
        parse_args(args)
        print(f"[bench] deploying app '{name}' (sere={args['sere']})", flush=True)
        serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{port}", {policy: policy for policy in apps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "serve_config.yaml"))
    parser.add_argument("--model", help="override the config's model_path")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="requests per (policy, concurrency); default max(8, 3 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--png", help="write the plot here")
    args = parser.parse_args(argv)

    import yaml

    with open(args.config) as f:
        model_id = yaml.safe_load(f)["applications"][0]["args"].get("served_model_name", "tiny-moe")
    t0 = time.perf_counter()
    base, apps = deploy_apps(args.config, args.model, args.num_cpus)
    print(f"[bench] apps ready in {time.perf_counter() - t0:.0f}s", flush=True)
    records = []
    try:
        for policy in apps:  # warm-up: first request pays lazy initialisation
            asyncio.run(closed_loop(f"{base}/{policy}/v1", model_id, 2, 2, 8, args.timeout))
        for level, concurrency in enumerate(args.concurrency):
            num = args.requests_per_level or max(8, 3 * concurrency)
            order = list(apps) if level % 2 == 0 else list(apps)[::-1]  # alternate who goes first
            for policy in order:
                before = sere_counters(policy, model_id) if policy == "sere" else None
                results, errors, elapsed = asyncio.run(closed_loop(
                    f"{base}/{policy}/v1", model_id, concurrency, num, args.max_tokens, args.timeout))
                after = sere_counters(policy, model_id) if policy == "sere" else None
                record = summarize(policy, concurrency, results, errors, elapsed,
                                   experts_per_step(before, after))
                records.append(record)
                print(f"[bench] {json.dumps(record)}", flush=True)
    finally:
        from ray import serve
        import ray

        serve.shutdown()
        ray.shutdown()

    conditions = (f"{platform.node()} {os.cpu_count()} CPUs, model {args.model or 'from ' + args.config}, "
                  f"{args.max_tokens} output tokens/request (ignore_eos), greedy, closed loop")
    print(f"\n{conditions}\n\n{table(records)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([{**r, "max_tokens": args.max_tokens, "conditions": conditions}
                       for r in records], f, indent=1)
    if args.png:
        plot(records, args.png, conditions)
    return 1 if any(r["errors"] for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
