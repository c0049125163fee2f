"""Ray Serve app builder: one MoE model on vLLM with SERE, behind an OpenAI-compatible ingress.

    serve run serve_config.yaml          # import_path: deploy.app:build_app, args: {...}

SERE reaches the engine as `hf_overrides={"sere": {...}}`: vLLM sets it on the model's HF config
(an unknown key is harmless), and the `sere` vLLM plugin (entry point `vllm.general_plugins`),
loaded in every vLLM process, reads it there. Without a `sere` block the key is absent and the
model runs unmodified.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from deploy.args import AppArgs, parse_args

__all__ = ["build_app", "build_ingress_deployment", "build_llm_config"]

logger = logging.getLogger("ray.serve")


def build_llm_config(args: "dict[str, Any] | AppArgs"):
    """The `ray.serve.llm.LLMConfig` for `args` (validated; nothing is started)."""
    from ray.serve.llm import LLMConfig

    args = parse_args(args)
    model_source = args.resolved_model_path()
    if not os.path.isdir(model_source):
        logger.warning("model_path=%r is not a local directory (base %s); vLLM will treat it as "
                       "a hub id", args.model_path, args.base_dir or "the repository root")
    engine_kwargs = args.engine.to_engine_kwargs()
    if args.sere is not None:
        engine_kwargs["hf_overrides"] = {"sere": args.sere.model_dump(mode="json")}
    autoscaling = args.autoscaling.model_dump(exclude_none=True)
    replica = args.replica
    deployment_config: dict[str, Any] = {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": replica.max_ongoing_requests,
        "health_check_period_s": replica.health_check_period_s,
        "health_check_timeout_s": replica.health_check_timeout_s,
        # Long enough to drain the longest request the ingress lets run (AppArgs.shutdown_timeout_s).
        "graceful_shutdown_timeout_s": args.shutdown_timeout_s(),
        "max_surge_percent": replica.max_surge_percent,
        "ray_actor_options": {"num_cpus": replica.num_cpus},
    }
    if replica.max_queued_requests != -1:
        deployment_config["max_queued_requests"] = replica.max_queued_requests
    return LLMConfig(
        model_loading_config={
            "model_id": args.served_model_name,
            "model_source": model_source,
        },
        engine_kwargs=engine_kwargs,
        accelerator_config={"kind": args.engine.device},
        placement_group_config=args.placement.model_dump(),
        deployment_config=deployment_config,
        runtime_env={"env_vars": dict(replica.env_vars)} if replica.env_vars else None,
        # vLLM's stats go to Ray's metrics port next to the plugin's sere_* series.
        log_engine_metrics=True,
    )


def build_ingress_deployment(args: "dict[str, Any] | AppArgs"):
    """The unbound `SereIngress` Serve deployment (no Ray runtime needed)."""
    from deploy.ingress import make_ingress_cls

    args = parse_args(args)
    ingress_args = args.ingress
    ingress = serve.deployment(
        make_ingress_cls(),
        name="SereIngress",
        num_replicas=ingress_args.num_replicas,
        max_ongoing_requests=100_000,  # a thin proxy: queueing happens at the engines
        ray_actor_options={"num_cpus": ingress_args.num_cpus,
                           **({"resources": ingress_args.resources} if ingress_args.resources else {})},
        # A changed app config restarts the ingress too (its code version is the config's hash):
        # start the new one first, and let the old one finish every request it holds.
        max_surge_percent=100,
        graceful_shutdown_timeout_s=args.shutdown_timeout_s(),
    )
    if ingress_args.api_key is not None:
        # Ray's build task logs the app args of a `serve deploy` and `serve config` shows them.
        logger.warning("ingress.api_key is set in the app args, which Ray logs and `serve config` "
                       "shows: use ingress.api_key_file or $SERE_API_KEY_FILE instead")
    return ingress


def build_app(args: "dict[str, Any] | AppArgs") -> Application:
    """Serve app builder (`import_path: deploy.app:build_app`).

    `engine.data_parallel_size > 1` uses Ray Serve LLM's data-parallel deployment (one
    gang-scheduled replica per DP rank, DP attention + expert parallelism); otherwise the plain
    LLM deployment. Both export the plugin's SERE counters as Ray metrics (`deploy.server`) and
    sit behind `deploy.ingress.SereIngress` (API key, `/health`).
    """
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_dp_deployment, build_llm_deployment

    from deploy.ingress import DEFAULT_SETTINGS
    from deploy.server import SereDPServer, SereLLMServer

    args = parse_args(args)
    llm_config = build_llm_config(args)
    if args.engine.data_parallel_size > 1:
        server = build_dp_deployment(llm_config, deployment_cls=SereDPServer)
    else:
        server = build_llm_deployment(llm_config, deployment_cls=SereLLMServer)

    model_id = llm_config.model_id
    ingress_args = args.ingress
    ingress = build_ingress_deployment(args)
    api_key = ingress_args.api_key.get_secret_value() if ingress_args.api_key else None
    settings = ingress_args.model_dump(include=set(DEFAULT_SETTINGS))
    return ingress.bind(
        llm_deployments={model_id: server},
        model_cards={model_id: to_model_metadata(model_id, llm_config)},
        api_key=api_key,
        settings=settings,
    )
