"""A Ray cluster of several simulated nodes on one machine, for tests and benchmarks.

Node n is a `ray start --block` process on loopback address 127.0.0.{n+2} with custom resource
`{"node{n+1}": 1}`, its own port range (base_port + 50 * n ...) and a private temp dir, so that it
neither collides with a cluster on Ray's default ports nor touches it. `stop()` ends only the
processes this object started (each `ray start --block` tears down the daemons it launched when
terminated; its own process group is killed after a grace period).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SimulatedCluster", "RAY_ENV"]

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
# NOTE: with multi-node enabled, Ray rewrites "127.0.0.1" / "localhost" in a bootstrap address to the
# machine's external IP, where a GCS bound to 127.0.0.1 does not listen (and multi-node clusters are
# refused when it is disabled). So the simulated nodes start at 127.0.0.2 (head), 127.0.0.3, ...,
# loopback addresses that Ray does not rewrite.


def node_ip(node: int) -> str:
    return f"127.0.0.{node + 2}"


class SimulatedCluster:
    def __init__(self, num_nodes: int = 2, base_port: int = 6390, num_cpus: int = 2,
                 temp_dir: str = "/tmp/ray_sere_ep", object_store_mb: int = 200):
        self.num_nodes, self.base_port, self.num_cpus = num_nodes, base_port, num_cpus
        self.temp_dir, self.object_store_mb = temp_dir, object_store_mb
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def address(self) -> str:
        return f"{node_ip(0)}:{self.base_port}"

    def _command(self, node: int) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        ports = self.base_port + 50 * node
        cmd = [
            ray, "start", "--block", "--node-ip-address", node_ip(node),
            "--num-cpus", str(self.num_cpus), "--resources", json.dumps({f"node{node + 1}": 1}),
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--node-manager-port", str(ports + 1), "--object-manager-port", str(ports + 2),
            "--dashboard-agent-listen-port", str(ports + 4), "--dashboard-agent-grpc-port", str(ports + 5),
            "--runtime-env-agent-port", str(ports + 6), "--metrics-export-port", str(ports + 7),
            "--min-worker-port", str(ports + 10), "--max-worker-port", str(ports + 40),
            "--disable-usage-stats",
        ]
        if node == 0:
            return cmd + ["--head", "--port", str(self.base_port), "--include-dashboard", "false",
                          "--ray-client-server-port", str(ports + 3), "--temp-dir", self.temp_dir]
        return cmd + ["--address", self.address]

    def start(self, timeout_s: float = 90.0, attempts: int = 3) -> "SimulatedCluster":
        """Start the nodes; retried when a node gives up during startup.

        NOTE: `ray start` allows a raylet 30 s (hard-coded) to register with the GCS, which a
        machine busy with other jobs can exceed; a fresh attempt usually succeeds.
        """
        os.environ.update(RAY_ENV)
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout_s)
                return self
            except RuntimeError:
                if attempt == attempts:
                    raise
                time.sleep(2.0)
        return self

    def _start_once(self, timeout_s: float) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        env = {**os.environ, **RAY_ENV}
        self.logs = []
        for node in range(self.num_nodes):
            log = Path(f"{self.temp_dir}_node{node}.log")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(self._command(node), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True))
            if node == 0:
                time.sleep(3.0)  # the workers need the head's GCS
        self._wait_for_nodes(timeout_s)

    def _wait_for_nodes(self, timeout_s: float) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        gcs_up = False
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if not gcs_up:  # NOTE: ray.init would retry forever against a GCS that is not listening
                try:
                    socket.create_connection((node_ip(0), self.base_port), timeout=1.0).close()
                    gcs_up = True
                except OSError:
                    time.sleep(1.0)
                    continue
            try:
                if not ray.is_initialized():
                    ray.init(address=self.address, include_dashboard=False, logging_level="ERROR",
                             _node_ip_address=node_ip(0))
                alive = [n for n in ray.nodes() if n["Alive"]]
                if len(alive) >= self.num_nodes:
                    return
            except Exception:  # the GCS is not up yet
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"simulated cluster did not reach {self.num_nodes} nodes in {timeout_s} s")

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:  # daemons left behind in this node's own process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()

    def __enter__(self) -> "SimulatedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
