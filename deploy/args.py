"""Typed arguments of the Serve app (`serve_config.yaml` -> `applications[].args`).

Every block forbids unknown keys and bounds its numbers, so a typo in a YAML file fails at
`serve deploy` time with the field's path and the bad value, not minutes later inside an engine.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic import model_validator

from sere.config import SereConfig

__all__ = [
    "API_KEY_ENV",
    "API_KEY_FILE_ENV",
    "REPO_ROOT",
    "AppArgs",
    "AutoscalingArgs",
    "EngineArgs",
    "IngressArgs",
    "PlacementArgs",
    "ReplicaArgs",
    "format_validation_error",
    "parse_args",
]

API_KEY_ENV = "SERE_API_KEY"
API_KEY_FILE_ENV = "SERE_API_KEY_FILE"
# Extra drain time on top of the longest request, for the response to reach the client.
SHUTDOWN_MARGIN_S = 15.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GiB = 1 << 30


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Strict):
    """vLLM engine settings that the app sets on purpose; anything else goes in `extra`."""

    device: Literal["cpu", "gpu"] = "cpu"
    max_model_len: int = Field(default=2048, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    # Explicit KV-cache size; on CPU it replaces the RAM fraction that vLLM would otherwise take.
    kv_cache_gib: float | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    # > 1 selects the data-parallel-attention builder: one Serve replica per DP rank, gang-scheduled.
    data_parallel_size: int = Field(default=1, ge=1)
    enable_expert_parallel: bool = False
    all2all_backend: str | None = None
    dtype: str = "auto"
    enforce_eager: bool = False  # vLLM's default (compiled): faster on CPU too (benchmarks/results/vllm_modes.json)
    # Passed to vLLM's AsyncEngineArgs as is (e.g. {"enable_prefix_caching": false}).
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = set(cls.model_fields) - {"extra", "device", "kv_cache_gib"} | {
            "model", "served_model_name", "hf_overrides", "kv_cache_memory_bytes",
        }
        clash = sorted(owned & set(value))
        if clash:
            raise ValueError(f"engine.extra sets {clash}: use the typed fields of `engine` instead")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "EngineArgs":
        if self.all2all_backend is not None and not self.enable_expert_parallel:
            raise ValueError(
                f"all2all_backend={self.all2all_backend!r} needs enable_expert_parallel=true"
            )
        if self.device == "cpu" and self.all2all_backend not in (None, "allgather_reducescatter"):
            raise ValueError(
                f"all2all_backend={self.all2all_backend!r} is GPU-only; "
                "the CPU build has only 'allgather_reducescatter'"
            )
        return self

    def to_engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
        }
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * _GiB)
        if self.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.data_parallel_size > 1:
            kwargs["data_parallel_size"] = self.data_parallel_size
        if self.enable_expert_parallel:
            kwargs["enable_expert_parallel"] = True
        if self.all2all_backend is not None:
            kwargs["all2all_backend"] = self.all2all_backend
        return {**kwargs, **self.extra}


class PlacementArgs(_Strict):
    """Ray placement group of ONE engine (one DP rank): a bundle per TP worker."""

    bundles: list[dict[str, float]] = Field(default_factory=lambda: [{"CPU": 0.5}], min_length=1)
    strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"

    @field_validator("bundles")
    @classmethod
    def _non_negative(cls, value: list[dict[str, float]]) -> list[dict[str, float]]:
        for i, bundle in enumerate(value):
            for resource, amount in bundle.items():
                if amount < 0:
                    raise ValueError(f"bundles[{i}].{resource}={amount!r} is negative")
            if not any(amount > 0 for amount in bundle.values()):
                raise ValueError(f"bundles[{i}]={bundle!r} asks for no resource")
        return value


class AutoscalingArgs(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=32, gt=0)
    # How long the load must stay above / below target before Serve adds / removes a replica
    # (None: Ray's defaults, 30 s / 600 s). A removed replica drains like one in a rollout.
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas={self.initial_replicas} is outside "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ReplicaArgs(_Strict):
    """The Serve replica actor that owns an engine (its CPU share adds to the first bundle)."""

    num_cpus: float = Field(default=0.25, ge=0)
    max_ongoing_requests: int = Field(default=256, ge=1)
    # Requests waiting for a replica slot before Serve refuses new ones (the ingress answers
    # 503 + Retry-After); -1 is Ray's unbounded queue.
    max_queued_requests: int = Field(default=-1, ge=-1)
    health_check_period_s: float = Field(default=10, gt=0)
    health_check_timeout_s: float = Field(default=30, gt=0)
    # How long a stopping replica may drain before Serve kills it. None derives it from the
    # longest request the ingress lets run (`ingress.request_timeout_s` + 15 s), so a rollout
    # or scale-down never cuts a request short; a smaller value can.
    graceful_shutdown_timeout_s: float | None = Field(default=None, ge=0)
    # Extra replicas (% of the target) during a rollout: 100 keeps the old engine serving until
    # its replacement is ready (no failed or stalled requests; needs room for both); 0 (Ray's
    # default) stops the old replica first, and requests meanwhile get 503 + Retry-After.
    max_surge_percent: int = Field(default=0, ge=0, le=100)
    # Environment of the replica and its engine processes (NCCL settings, VLLM_* knobs).
    env_vars: dict[str, str] = Field(default_factory=dict)


class IngressArgs(_Strict):
    """The OpenAI-compatible HTTP front (one small replica per app is enough on one node)."""

    num_cpus: float = Field(default=0.1, ge=0)
    num_replicas: int = Field(default=1, ge=1)
    # Custom Ray resources of an ingress replica, e.g. {"head": 0.01} to keep it next to a
    # HeadOnly proxy: the proxy answers 500 for requests in flight on an ingress lost with its node.
    resources: dict[str, float] = Field(default_factory=dict)
    # The key clients must send as `Authorization: Bearer <key>`. Prefer `api_key_file` or the
    # environment ($SERE_API_KEY, $SERE_API_KEY_FILE of the ingress replica): Ray logs the args
    # of a `serve deploy` and `serve config` shows them. None of them set: an open endpoint.
    api_key: SecretStr | None = None
    api_key_file: str | None = Field(default=None, min_length=1)
    # The longest a request may run end to end (a stream is then ended with an error event, a
    # plain request answered 408); keep it below http_options.request_timeout_s.
    request_timeout_s: float = Field(default=100, gt=0)
    # How long a request waits for an engine to take it, in total over its retries, before the
    # answer is 503 + Retry-After (no replica ready, all full, or all failing).
    unavailable_wait_s: float = Field(default=10, ge=0)
    # Attempts of a request that failed before its first token reached the client.
    max_attempts: int = Field(default=3, ge=1, le=10)
    # Seconds in the Retry-After header of a 503 / 429.
    retry_after_s: int = Field(default=5, ge=1)
    # Larger request bodies are refused with 413 before they are read in full.
    max_body_bytes: int = Field(default=4 << 20, ge=1024)

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("api_key is blank: omit it to use $SERE_API_KEY or no key")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> "IngressArgs":
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        return self


class AppArgs(_Strict):
    """Everything `build_app` needs for one served model."""

    model_path: str = Field(min_length=1)
    served_model_name: str = Field(default="tiny-moe", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    # None serves the model unmodified (the plugin stays inert); a block turns SERE on.
    sere: SereConfig | None = None
    engine: EngineArgs = Field(default_factory=EngineArgs)
    placement: PlacementArgs = Field(default_factory=PlacementArgs)
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    replica: ReplicaArgs = Field(default_factory=ReplicaArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)
    # A relative model_path is resolved against this directory; default: the repository root (the
    # folder holding the `deploy` package), which does not depend on the cwd of Serve's build task.
    base_dir: str | None = None

    @field_validator("model_path")
    @classmethod
    def _no_remote_scheme(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(f"model_path={value!r}: give a local directory or a hub id, not a URI")
        return value

    @model_validator(mode="after")
    def _placement_matches_engine(self) -> "AppArgs":
        tp = self.engine.tensor_parallel_size
        if len(self.placement.bundles) != tp:
            raise ValueError(
                f"placement.bundles has {len(self.placement.bundles)} bundle(s) but "
                f"engine.tensor_parallel_size={tp}: give one bundle per TP worker"
            )
        wants_gpu = any(b.get("GPU", 0) > 0 for b in self.placement.bundles)
        if wants_gpu != (self.engine.device == "gpu"):
            raise ValueError(
                f"engine.device={self.engine.device!r} but placement.bundles="
                f"{self.placement.bundles!r} {'asks' if wants_gpu else 'does not ask'} for GPUs"
            )
        return self

    def shutdown_timeout_s(self) -> float:
        """The replicas' graceful_shutdown_timeout_s: as configured, else the longest request."""
        configured = self.replica.graceful_shutdown_timeout_s
        if configured is not None:
            return configured
        return self.ingress.request_timeout_s + SHUTDOWN_MARGIN_S

    def resolved_model_path(self) -> str:
        """An absolute path when model_path names a local directory, else the hub id unchanged."""
        path = os.path.expanduser(self.model_path)
        if os.path.isabs(path):
            return path
        candidate = os.path.abspath(os.path.join(self.base_dir or REPO_ROOT, path))
        if os.path.isdir(candidate) or path.startswith("."):
            return candidate
        return self.model_path  # e.g. "Qwen/Qwen3-30B-A3B": left to vLLM's loader


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: `field.path=value: message`."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "args"
        value = item.get("input")
        shown = "***" if "api_key" in where else repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"{where}={shown}: {item['msg']}")
    return "invalid serve app args:\n  " + "\n  ".join(lines)


def parse_args(args: "dict[str, Any] | AppArgs") -> AppArgs:
    """Validate raw args; raise ValueError with `format_validation_error`'s message."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args)
    except ValidationError as error:
        raise ValueError(format_validation_error(error)) from None
