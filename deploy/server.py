"""Serve replicas that own a vLLM engine and publish its SERE statistics on Ray's metrics port.

The `sere` vLLM plugin counts re-routing per MoE layer inside each engine worker process
(`sere.vllm.metrics`); those processes are children of the replica, which Ray's metrics agent does not
scrape. The replica therefore polls the workers' `sere_stats` RPC (one small dict per worker) and
re-exports the counters as Ray metrics, which Ray serves as Prometheus text next to vLLM's own
`ray_vllm_*` series: `ray_sere_steps_total`, `ray_sere_distinct_experts_after_total`, ...
(labels: model_id, layer, policy, rank) and the gauge `ray_sere_distinct_experts{stage}`.

A replica whose engine died (a worker killed, a GPU fault) would otherwise stay in Serve's routing
table until three health checks failed (~30 s), and, being the idle-looking one, draw most new
requests, each failing at once. `_EngineWatchdog` checks the engine every second and ends the
replica process when it is dead: the routers drop it at once, the ingress retries the requests
elsewhere (`deploy.resilience`), and the controller starts a replacement.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

from sere.vllm.metrics import COUNTER_HELP

__all__ = ["SereDPServer", "SereLLMServer", "SereStatsExporter"]

logger = logging.getLogger("ray.serve")

ENV_INTERVAL = "SERE_RAY_METRICS_INTERVAL_S"
ENV_WATCHDOG = "SERE_ENGINE_WATCHDOG_S"  # seconds between engine checks; 0 turns the watchdog off
_TAGS = ("model_id", "layer", "policy", "rank")


class SereStatsExporter:
    """Turns successive `sere_stats` snapshots (cumulative per worker) into Ray metrics.

    A snapshot is `sere.vllm.metrics.snapshot()`: {"rank", "layers": [{"layer_name", "layer",
    "policy", <counter fields>}, ...]}.
    """

    def __init__(self, model_id: str):
        from ray.util.metrics import Counter, Gauge

        self.model_id = model_id
        self.counters = {
            name: Counter(f"sere_{name}", description=text, tag_keys=_TAGS)
            for name, text in COUNTER_HELP.items()
        }
        self.gauge = Gauge(
            "sere_distinct_experts",
            description="mean distinct experts per MoE-layer step since the previous export",
            tag_keys=_TAGS + ("stage",),
        )
        self._seen: dict[tuple[str, str], dict[str, int]] = {}  # (rank, layer) -> last values

    def update(self, snapshots: list[dict]) -> None:
        for snapshot in snapshots:
            rank = str(snapshot.get("rank", "0"))
            layers = snapshot.get("layers", [])
            if isinstance(layers, dict):  # {layer name: entry}, the plugin's earlier form
                layers = [{"layer_name": name, **entry} for name, entry in layers.items()]
            for entry in layers:
                key = (rank, entry.get("layer_name", str(entry["layer"])))
                before = self._seen.get(key, {})
                tags = {"model_id": self.model_id, "layer": str(entry["layer"]),
                        "policy": str(entry["policy"]), "rank": rank}
                delta = {}
                for name, counter in self.counters.items():
                    now = int(entry.get(name, 0))
                    # A smaller value means the worker's stats were reset: count from zero.
                    delta[name] = now - before.get(name, 0) if now >= before.get(name, 0) else now
                    if delta[name] > 0:
                        counter.inc(delta[name], tags=tags)
                self._seen[key] = {name: int(entry.get(name, 0)) for name in self.counters}
                if delta["steps"] > 0:
                    for stage in ("before", "after"):
                        mean = delta[f"distinct_experts_{stage}"] / delta["steps"]
                        self.gauge.set(mean, tags={**tags, "stage": stage})


def _sere_enabled(llm_config) -> bool:
    overrides = llm_config.engine_kwargs.get("hf_overrides")
    return (isinstance(overrides, dict) and "sere" in overrides) or bool(os.environ.get("SERE_CONFIG"))


class _SereStatsMixin:
    """Starts the export loop once the engine is up (no-op when SERE is off for the model)."""

    async def start(self):
        await super().start()
        self._sere_task = None
        if self.engine is not None and _sere_enabled(self._llm_config):
            interval = float(os.environ.get(ENV_INTERVAL, "5"))
            exporter = SereStatsExporter(self._llm_config.model_id)
            logger.info("sere: exporting re-routing stats as Ray metrics every %.1fs", interval)
            self._sere_task = asyncio.get_running_loop().create_task(
                self._export_sere_stats(exporter, interval)
            )

    async def _export_sere_stats(self, exporter: SereStatsExporter, interval: float) -> None:
        warned = False
        while True:
            await asyncio.sleep(interval)
            try:
                exporter.update(await self.engine.collective_rpc("sere_stats", timeout=interval))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - metrics must never take a replica down
                if not warned:
                    logger.warning("sere: cannot read re-routing stats from the engine (%s: %s); "
                                   "is the sere vLLM plugin installed?", type(error).__name__, error)
                    warned = True


class _EngineWatchdog:
    """Ends the replica process as soon as its engine is dead (module docstring)."""

    async def start(self):
        await super().start()
        self._watchdog = None
        interval = float(os.environ.get(ENV_WATCHDOG, "1"))
        if self.engine is not None and interval > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine(interval))

    async def _watch_engine(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.engine.check_health(), 30)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: the engine is gone
                logger.error("sere: the engine is dead (%s: %s); ending this replica so that Serve "
                             "routes around it and replaces it", type(error).__name__, error)
                os._exit(70)  # EX_SOFTWARE; a clean exit_actor() is not possible from a task

    async def __del__(self):
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:  # graceful shutdown stops the engine: not a death
            watchdog.cancel()
        await super().__del__()


class SereLLMServer(_EngineWatchdog, _SereStatsMixin, LLMServer):
    """Ray Serve LLM's `LLMServer` + SERE metrics export + the engine watchdog."""


class SereDPServer(_EngineWatchdog, _SereStatsMixin, DPServer):
    """Ray Serve LLM's data-parallel `DPServer` (one DP rank per replica) + SERE metrics export
    + the engine watchdog."""
