"""End-to-end serving benchmark: SERE off vs on, side by side, over the service's real HTTP API.

One local Ray cluster on 127.0.0.1 runs two Serve apps built by `deploy.app:build_app` from the same
config (default: serve_config.yaml) that differ only in their `sere` block: `/sere` (the config's
SERE settings) and `/off` (`policy: topk`, the model's own routing). Both sit behind the real
ingress (API key from a file, HTTP guards) and are pinned to one engine each (no autoscaling, so a
level measures one engine). Then:

- a sweep: for each concurrency level, a closed loop of streaming completions against each app in
  turn for --cell-seconds (same prompt sequence; who goes first alternates by level), reporting
  requests/s, output tokens/s, TTFT and TPOT p50/p99, errors by kind, and the distinct experts
  per MoE-layer step read from the engine's SERE counters;
- a soak (SERE on only; the off app is deleted first): --soak-seconds at --soak-concurrency,
  errors per minute and the summed RSS of the engine (replica + vLLM processes) and ingress
  processes every --rss-interval seconds: start/end/max and least-squares slope.

    .venv/bin/python benchmarks/bench_serve.py                # ~30 min: sweep 1 4 16 64 + 10 min soak
    .venv/bin/python benchmarks/bench_serve.py --quick --json /tmp/q.json --png /tmp/q.png  # ~5 min

Writes benchmarks/results/bench_serve.json and .png (with --quick: bench_serve_quick.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]  # deploy/ and the sibling modules

from bench_serve_load import RssSampler, closed_loop  # noqa: E402
from bench_serve_report import conditions, plot, table, write_json  # noqa: E402
from bench_serve_stats import cell_summary, memory_summary, per_minute  # noqa: E402

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
APPS = ("off", "sere")  # app name == route prefix
OFF_SERE = {"policy": "topk"}
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
QUICK = {"concurrency": [1, 4], "cell_seconds": 10.0, "soak_seconds": 40.0}


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not positive")
        return value
    return convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml", help="Serve config (one app)")
    parser.add_argument("--concurrency", type=_positive(int), nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--cell-seconds", type=_positive(float), default=60.0,
                        help="load time per (concurrency, app); in-flight requests then finish")
    parser.add_argument("--max-tokens", type=_positive(int), default=64)
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="0 skips the soak")
    parser.add_argument("--soak-concurrency", type=_positive(int), default=16)
    parser.add_argument("--rss-interval", type=_positive(float), default=5.0, help="seconds")
    parser.add_argument("--timeout", type=_positive(float), default=150.0, help="per request, s")
    parser.add_argument("--num-cpus", type=_positive(int), default=2, help="logical CPUs of Ray")
    parser.add_argument("--ready-timeout", type=_positive(float), default=600.0,
                        help="seconds for both apps to answer /health")
    parser.add_argument("--min-available-gib", type=float, default=8.0,
                        help="refuse to start with less free memory (two engines + Ray)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK} unless given (about 5 minutes with engine starts)")
    parser.add_argument("--json", help="default benchmarks/results/bench_serve[_quick].json")
    parser.add_argument("--png", help="default benchmarks/results/bench_serve[_quick].png")
    args = parser.parse_args(argv)
    if args.soak_seconds < 0:
        parser.error(f"--soak-seconds={args.soak_seconds} is negative")
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    stem = os.path.join(REPO, "benchmarks", "results", "bench_serve" + ("_quick" if args.quick else ""))
    args.json = args.json or stem + ".json"
    args.png = args.png or stem + ".png"
    return args


def app_args(spec_args: dict, app: str, key_file: str) -> dict:
    """The app's args: the config's, with SERE off for `off`, one engine, the key from a file."""
    if not spec_args.get("sere"):
        raise SystemExit("the config's app has no `sere` block: nothing to compare against")
    args = {**spec_args, "sere": OFF_SERE if app == "off" else spec_args["sere"]}
    args["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    args["ingress"] = {**spec_args.get("ingress", {}), "api_key_file": key_file}
    return args


def start_cluster(num_cpus: int) -> tuple[str, int]:
    """A Ray cluster of this process's own on loopback with Serve's proxy; (base url, raylet pid)."""
    import socket

    import ray
    import ray._private.worker as ray_worker
    from ray import serve

    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    # Serve's build task and the replicas import deploy/ even without the editable install.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    return f"http://127.0.0.1:{port}", raylet


def deploy(apps: dict[str, dict]) -> None:
    """`serve deploy` of a config holding `apps` (route prefix = name), as the dashboard's REST
    handler sends it: Serve builds `deploy.app:build_app` itself; apps left out are removed."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.parse_obj({"applications": [
        {"name": name, "route_prefix": f"/{name}", "import_path": "deploy.app:build_app", "args": args}
        for name, args in apps.items()]})
    _get_global_client().deploy_apps(config)


def wait_healthy(apps, base: str, headers: dict, deadline: float) -> None:
    """Until every app answers /health (its engine is up); TimeoutError naming the app. (The key
    is sent: under a route prefix the ingress's key check does not see /health as open.)"""
    import httpx
    from ray import serve

    for name in apps:
        while True:
            try:
                if httpx.get(f"{base}/{name}/health", headers=headers, timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                status = serve.status().applications.get(name)
                raise TimeoutError(f"app '{name}' not healthy within --ready-timeout "
                                   f"(status: {status.status if status else 'absent'}; "
                                   f"{status.message[-300:] if status else ''})")
            time.sleep(3)


def wait_removed(app: str, deadline: float) -> None:
    from ray import serve

    while app in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"app '{app}' still present after removing it from the config")
        time.sleep(2)


def check_memory(min_gib: float) -> float:
    """The GiB of memory available; SystemExit below `min_gib`: without room for two engines Ray's
    OOM killer ends replicas (or the Serve controller) mid-run and the figures measure restarts."""
    import psutil

    available = psutil.virtual_memory().available / (1 << 30)
    if available < min_gib:
        raise SystemExit(f"only {available:.1f} GiB of memory available, --min-available-gib is "
                         f"{min_gib:g}: wait for other work to finish")
    return available


def sere_counters(app: str, model_id: str) -> dict:
    """Summed `sere_stats` counters of the app's engine workers."""
    from ray import serve

    handle = serve.get_deployment_handle(f"SereLLMServer:{model_id}", app_name=app)
    totals = {"steps": 0, "distinct_experts_before": 0, "distinct_experts_after": 0}
    for snapshot in handle.collective_rpc.remote("sere_stats").result(timeout_s=60):
        for layer in snapshot.get("layers", []):
            for key in totals:
                totals[key] += int(layer[key])
    return totals


def experts_per_step(before: dict, after: dict) -> dict:
    steps = after["steps"] - before["steps"]
    if steps <= 0:
        raise RuntimeError("the engine's SERE counters did not move: is the sere plugin loaded?")
    return {"distinct_experts_router": round((after["distinct_experts_before"]
                                              - before["distinct_experts_before"]) / steps, 2),
            "distinct_experts_executed": round((after["distinct_experts_after"]
                                                - before["distinct_experts_after"]) / steps, 2)}


def sweep(args, base: str, headers: dict, model_id: str, policies: dict[str, str]) -> list[dict]:
    records = []
    for level, concurrency in enumerate(args.concurrency):
        for app in (APPS if level % 2 == 0 else APPS[::-1]):
            load = os.getloadavg()[0]
            before = sere_counters(app, model_id)
            results, elapsed = asyncio.run(closed_loop(
                f"{base}/{app}", headers, model_id, PROMPTS, concurrency=concurrency,
                duration_s=args.cell_seconds, max_tokens=args.max_tokens, timeout_s=args.timeout))
            record = {"sere": "on" if app == "sere" else "off", "policy": policies[app],
                      "concurrency": concurrency, **cell_summary(results, elapsed),
                      **experts_per_step(before, sere_counters(app, model_id)),
                      "load_average_1m_start": round(load, 2), "load_average_1m_end":
                      round(os.getloadavg()[0], 2)}
            records.append(record)
            print(f"[bench] {json.dumps(record)}", flush=True)
    return records


def soak(args, base: str, headers: dict, model_id: str, raylet: int) -> dict:
    """SERE on alone at steady load for --soak-seconds: errors, per-minute counts, RSS trend."""
    print(f"[bench] soak: {args.soak_seconds:.0f} s at concurrency {args.soak_concurrency}", flush=True)
    load = os.getloadavg()[0]
    with RssSampler(raylet, "sere", args.rss_interval) as sampler:
        results, elapsed = asyncio.run(closed_loop(
            f"{base}/sere", headers, model_id, PROMPTS, concurrency=args.soak_concurrency,
            duration_s=args.soak_seconds, max_tokens=args.max_tokens, timeout_s=args.timeout))
    start = min(r["start_s"] for r in results)
    roles = list(sampler.samples[0][1])
    return {"sere": "on", "concurrency": args.soak_concurrency, **cell_summary(results, elapsed),
            "load_average_1m_start": round(load, 2), "load_average_1m_end": round(os.getloadavg()[0], 2),
            "per_minute": per_minute(results, start),
            "memory": {role: {**memory_summary([(t, rss[role]) for t, rss, _ in sampler.samples]),
                              "processes": sampler.samples[-1][2][role]} for role in roles},
            "rss_mib": [[round(t, 1)] + [round(rss[role] / (1 << 20), 1) for role in roles]
                        for t, rss, _ in sampler.samples],
            "rss_mib_columns": ["seconds"] + roles}


def run(args, spec_args: dict, save) -> tuple[list[dict], dict | None, dict]:
    """Cluster up, apps deployed, sweep, soak, cluster down: (sweep records, soak, timings).
    `save(records, None, timings)` is called after the sweep, so a failed soak loses no figures."""
    import ray
    from ray import serve

    model_id = spec_args.get("served_model_name", "tiny-moe")
    key = secrets.token_hex(16)
    with tempfile.NamedTemporaryFile("w", prefix="bench-serve-key-", delete=False) as f:
        f.write(key + "\n")
    headers = {"Authorization": f"Bearer {key}"}
    timings = {}
    try:
        t0 = time.monotonic()
        base, raylet = start_cluster(args.num_cpus)
        apps = {app: app_args(spec_args, app, f.name) for app in APPS}
        for name, app in apps.items():
            print(f"[bench] deploying '{name}' (sere={app['sere']})", flush=True)
        deploy(apps)
        wait_healthy(apps, base, headers, time.monotonic() + args.ready_timeout)
        timings["apps_ready_s"] = round(time.monotonic() - t0, 1)
        for app in APPS:  # warm-up: the first requests pay lazy initialisation
            asyncio.run(closed_loop(f"{base}/{app}", headers, model_id, PROMPTS, concurrency=2,
                                    duration_s=1e9, max_tokens=8, timeout_s=args.timeout, max_requests=4))
        t1 = time.monotonic()
        policies = {app: apps[app]["sere"]["policy"] for app in APPS}
        records = sweep(args, base, headers, model_id, policies)
        timings["sweep_s"] = round(time.monotonic() - t1, 1)
        save(records, None, timings)
        soak_record = None
        if args.soak_seconds > 0:
            deploy({"sere": apps["sere"]})  # /off removed: only SERE on's engine shares the CPUs
            wait_removed("off", time.monotonic() + 120)
            soak_record = soak(args, base, headers, model_id, raylet)
        return records, soak_record, timings
    finally:
        serve.shutdown()
        ray.shutdown()
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with open(os.path.join(REPO, args.config)) as f:
        (spec,) = yaml.safe_load(f)["applications"]
    started = {"load": os.getloadavg(), "available_gib": check_memory(args.min_available_gib),
               "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(records: list[dict], soak_record: dict | None, timings: dict) -> None:
        info = conditions(args, argv, spec["args"], OFF_SERE, PROMPTS, started, timings, REPO)
        print(f"\n{json.dumps(info, indent=1)}\n\n{table(records, soak_record)}", flush=True)
        write_json(args.json, info, records, soak_record)
        plot(records, soak_record, info, args.png)
        print(f"[bench] wrote {args.json} and {args.png}", flush=True)

    records, soak_record, timings = run(args, dict(spec["args"]), save)
    save(records, soak_record, timings)
    failed = any(r["errors"] for r in records) or (soak_record and soak_record["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
