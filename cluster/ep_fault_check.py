"""A replica whose expert-parallel group spans two simulated nodes, and the loss of one node.

Starts `cluster/start_local_cluster.sh` (head 127.0.0.1, node1 127.0.0.2, node2 127.0.0.3),
deploys the Serve app with data_parallel_size=2 + expert parallelism, one DP/EP rank per worker
node (bundles ask for the `sim_node` resource that each worker node has once), checks that both
ranks route with SERE, then SIGKILLs node2's raylet under load, restarts the node and waits for
the gang-scheduled DP group to come back. Prints one JSON line; exit 0 when every check passed.

    .venv/bin/python cluster/ep_fault_check.py --model models/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "cluster", "start_local_cluster.sh")
MODEL_ID = "tiny-moe"


def _free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 all free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65000 and all(_is_free(port + i) for i in range(span)):
            return port
    raise RuntimeError("no free port range")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Load:
    def __init__(self, base_url: str, workers: int = 3):
        import openai

        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=150,
                                    max_retries=0)
        self.events: list[tuple[float, float, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(workers)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.client.completions.create(model=MODEL_ID, prompt=f"def h{i}():", max_tokens=8)
                outcome = "ok"
            except Exception as error:  # noqa: BLE001 - recorded
                outcome = f"{type(error).__name__}:{getattr(error, 'status_code', '')}"
                time.sleep(0.5)
            self.events.append((start, time.monotonic(), outcome))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO, "models", "tiny-moe"))
    parser.add_argument("--down-s", type=float, default=30, help="how long node2 stays dead")
    parser.add_argument("--recover-timeout-s", type=float, default=400)
    parser.add_argument("--request-timeout-s", type=float, default=60)
    args = parser.parse_args(argv)

    env = dict(os.environ, RAY_PORT=str(_free_port(5)), SERE_METRICS_PORT=str(_free_port()),
               SERE_DASHBOARD_PORT=str(_free_port()), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED",
                                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")})
    cluster = lambda *a: subprocess.run(["bash", SCRIPT, *a], env=env, check=True,  # noqa: E731
                                        capture_output=True, text=True, timeout=300).stdout.strip()
    report: dict = {"gcs_port": int(env["RAY_PORT"])}
    checks: dict[str, bool] = {}
    t0 = time.monotonic()
    cluster("start", "2")
    try:
        import ray
        from ray import serve

        sys.path.insert(0, REPO)
        from deploy.app import build_app

        ray.init(address=f"127.0.0.1:{env['RAY_PORT']}", _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="ERROR")
        http_port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={
            "host": "127.0.0.1", "port": http_port, "request_timeout_s": args.request_timeout_s})
        app_args = {
            "model_path": os.path.abspath(args.model), "served_model_name": MODEL_ID,
            "sere": {"policy": "sere", "num_primary": 2, "scope": "ep_group"},
            "engine": {"max_model_len": 512, "kv_cache_gib": 0.25, "data_parallel_size": 2, "enforce_eager": True,
                       "enable_expert_parallel": True},
            "placement": {"bundles": [{"CPU": 0.5, "sim_node": 1}]},
            "replica": {"num_cpus": 0.25},
            # The ingress ends a request before the proxy's timeout does (503/408 with a body).
            # On the head, beside the HeadOnly proxy: an ingress lost with node2 would make the
            # proxy answer 500 for the requests it held.
            "ingress": {"num_cpus": 0.1, "request_timeout_s": args.request_timeout_s - 10,
                        "resources": {"head": 0.01}},
        }
        serve.run(build_app(app_args), name="ep", route_prefix="/", blocking=False)
        report["deploy_s"] = round(time.monotonic() - t0, 1)
        base = f"http://127.0.0.1:{http_port}"

        # Where the two DP/EP ranks run: one per simulated worker node.
        from ray.util.placement_group import placement_group_table

        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        nodes = sorted(addresses.get(node, "?") for pg in placement_group_table().values()
                       if pg["state"] == "CREATED" for node in pg["bundles_to_node_id"].values())
        report["rank_nodes"] = nodes
        checks["ranks_on_two_worker_nodes"] = nodes == ["127.0.0.2", "127.0.0.3"]

        load = Load(base)
        for thread in load.threads:
            thread.start()
        time.sleep(5)
        handle = serve.get_deployment_handle(f"SereDPServer:{MODEL_ID}", app_name="ep")
        ranks = {}
        for _ in range(8):  # each call reaches one DP replica
            (snapshot,) = handle.collective_rpc.remote("sere_stats").result(timeout_s=60)
            ranks[snapshot["rank"]] = sum(layer["steps"] for layer in snapshot["layers"])
        report["sere_steps_per_rank"] = ranks
        checks["both_ranks_reroute"] = len(ranks) == 2 and all(v > 0 for v in ranks.values())

        killed_at = time.monotonic()
        report["kill"] = cluster("kill-node", "2")
        time.sleep(args.down_s)
        cluster("start-node", "2")
        restarted_at = time.monotonic()
        while time.monotonic() - restarted_at < args.recover_timeout_s:
            if any(o == "ok" and s > restarted_at + 1 for s, _, o in load.events):
                break
            time.sleep(2)
        load.stop.set()
        for thread in load.threads:
            thread.join(timeout=args.request_timeout_s + 30)
        after = [e for e in load.events if e[0] >= killed_at]
        report["outcomes_after_kill"] = {o: sum(1 for *_, x in after if x == o)
                                         for o in sorted({x for *_, x in after})}
        report["max_request_s"] = round(max(e - s for s, e, _ in load.events), 1)
        first_ok = [e - restarted_at for s, e, o in load.events if o == "ok" and s > restarted_at]
        report["recovered_s_after_node_restart"] = round(min(first_ok), 1) if first_ok else None
        checks["no_request_hung"] = (not any(t.is_alive() for t in load.threads)
                                     and report["max_request_s"] <= args.request_timeout_s + 5)
        checks["recovered"] = bool(first_ok)
        # A lost node is a retried success or a 503 (Retry-After), or at worst the ingress's own
        # 408 for a request stuck on the dead node; never a bare 500 or a proxy timeout.
        checks["only_ok_503_or_408"] = all(
            o == "ok" or o.endswith((":503", ":408")) for o in report["outcomes_after_kill"])
        serve.shutdown()
        ray.shutdown()
    finally:
        cluster("stop")
    report["checks"] = checks
    report["total_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report))
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
