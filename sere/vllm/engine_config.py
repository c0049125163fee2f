"""SERE's configuration in a vLLM engine: where it comes from, and the checks at engine start.

`hf_overrides={"sere": {...}}` (per model) or `$SERE_CONFIG` (JSON, every MoE model of a process
tree). `validate_engine_config` runs in the caller's process when vLLM builds the engine config
(`sere.vllm.plugin` wraps `EngineArgs.create_engine_config`), before any worker starts: a bad
field, a model that does not fit, a missing or mismatched sidecar, or a compilation mode SERE
cannot run in fails there with a message naming the cause.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sere import policy
from sere.config import SereConfig
from sere.schedule import SCHEDULE_NAME, model_shape
from sere.sidecars import ERROR_METRIC, ERROR_SIDECAR_NAME, SIDECAR_NAME, Sidecar, load_sidecar
from sere.vllm.routing import ENV_RECORD

__all__ = [
    "COMPILE_CACHE_MARKER", "ENV_CONFIG", "config_from_vllm", "cuda_graphs_on", "parse_config",
    "validate_engine_config",
]

logger = logging.getLogger("vllm.sere")

ENV_CONFIG = "SERE_CONFIG"
# Added to vllm_config.additional_config when SERE is on: it enters the config hash that keys
# vLLM's compile cache (hf_overrides does not), so SERE and plain vLLM never share a compiled graph.
COMPILE_CACHE_MARKER = ("sere", "sere::route_layer v3")

_sidecars: dict[tuple[str, int], Sidecar] = {}


def parse_config(raw, source: str) -> SereConfig:
    """A SereConfig from a dict or JSON string; ValueError naming the field and the source."""
    from pydantic import ValidationError

    try:
        if isinstance(raw, str):
            raw = json.loads(raw)
        if isinstance(raw, SereConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object of SereConfig fields, got {type(raw).__name__}")
        return SereConfig(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"sere: invalid SERE config in {source}: {problems}") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"sere: invalid SERE config in {source}: {exc}") from None


def config_from_vllm(vllm_config) -> tuple[SereConfig, str] | None:
    """(config, source) from `hf_overrides["sere"]`, else from $SERE_CONFIG; None when off.

    Policy "tuned" without `schedule` gets the model directory's `sere_schedule.json` (every
    process resolves it the same way); its absence is an error naming the file.
    """
    model_config = getattr(vllm_config, "model_config", None)
    overrides = getattr(model_config, "hf_overrides", None)
    if isinstance(overrides, dict) and overrides.get("sere") is not None:
        found = parse_config(overrides["sere"], "hf_overrides['sere']"), "hf_overrides"
    else:
        raw = os.environ.get(ENV_CONFIG, "").strip()
        if not raw:
            return None
        found = parse_config(raw, f"${ENV_CONFIG}"), "env"
    cfg, source = found
    if cfg.policy == policy.TUNED and cfg.schedule is None:
        cfg = cfg.model_copy(update={"schedule": str(_model_schedule_path(model_config))})
    return cfg, source


def _model_schedule_path(model_config) -> Path:
    """MODEL_DIR/sere_schedule.json, which policy "tuned" without `schedule` follows."""
    model_dir = Path(str(getattr(model_config, "model", "")))
    path = model_dir / SCHEDULE_NAME
    if not model_dir.is_dir():
        raise ValueError(f"sere: policy 'tuned' without schedule needs a local model directory holding "
                         f"{SCHEDULE_NAME}; {str(model_dir)!r} is not one: set schedule")
    if not path.is_file():
        raise ValueError(f"sere: policy 'tuned' follows {path}, which does not exist: make it with "
                         f"`sere tune --model {model_dir} --text CALIBRATION_TEXT --max-ppl-increase 0.01`, "
                         "or set schedule")
    return path


def _moe_layer_count(hf_config) -> int | None:
    """How many decoder layers of an HF config are sparse MoE layers (None: cannot tell)."""
    num_layers = getattr(hf_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        return None
    if hasattr(hf_config, "decoder_sparse_step"):  # Qwen2-MoE / Qwen3-MoE
        step, dense = hf_config.decoder_sparse_step or 1, set(getattr(hf_config, "mlp_only_layers", None) or [])
        return sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if hasattr(hf_config, "first_k_dense_replace"):  # DeepSeek-V2 / V3
        first, freq = hf_config.first_k_dense_replace or 0, getattr(hf_config, "moe_layer_freq", 1) or 1
        return sum(1 for i in range(num_layers) if i >= first and i % freq == 0)
    return num_layers  # Mixtral, OLMoE: every layer


def _model_moe_shape(hf_config) -> tuple[int | None, int | None]:
    """(routed experts E, top_k) from an HF config, None where the model does not say."""
    def first(*names):
        for name in names:
            value = getattr(hf_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    return (
        first("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"),
        first("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"),
    )


def _sidecar_path(cfg: SereConfig, model_config) -> Path:
    """The sidecar file of the matrix `policy.matrix_kind(cfg)` names."""
    if cfg.similarity_path:
        return Path(cfg.similarity_path)
    name = ERROR_SIDECAR_NAME if policy.matrix_kind(cfg) == "substitution_error" else SIDECAR_NAME
    model_dir = Path(str(model_config.model))
    if not model_dir.is_dir():
        raise ValueError(
            f"sere: similarity_path is not set and the model {model_config.model!r} is not a local "
            f"directory to find {name} in; set similarity_path"
        )
    return model_dir / name


def _sidecar(path: Path, num_experts: int, cfg: SereConfig) -> Sidecar:
    key = (str(path), num_experts)
    if key not in _sidecars:
        _sidecars[key] = load_sidecar(path, num_experts=num_experts)
    sidecar = _sidecars[key]
    errors = policy.matrix_kind(cfg) == "substitution_error"
    if (sidecar.metric == ERROR_METRIC) != errors:
        want = f"a {ERROR_METRIC} sidecar (python -m sere.substitution)" if errors else "a similarity sidecar"
        raise ValueError(f"sere: policy {cfg.policy!r} needs {want}, but {path} holds metric {sidecar.metric!r}")
    return sidecar


def validate_engine_config(vllm_config) -> SereConfig | None:
    """Front-end check at engine start: config fields, model fit, sidecar presence and shape."""
    found = config_from_vllm(vllm_config)
    if found is None:
        return None
    cfg, source = found
    model_config = vllm_config.model_config
    num_experts, top_k = _model_moe_shape(model_config.hf_text_config)
    if num_experts is None or top_k is None:
        if source == "env":  # a process-wide default: leave dense models alone
            logger.info("sere: %s is not a routed MoE model; SERE is off for it", model_config.model)
            return None
        raise ValueError(f"sere: hf_overrides['sere'] is set but {model_config.model!r} has no routed experts")
    try:
        cfg.check_model(top_k=top_k, num_experts=num_experts)
        if cfg.layer_num_primary:
            cfg.check_layers(list(range(model_config.hf_text_config.num_hidden_layers)))
    except ValueError as exc:
        where = "hf_overrides['sere']" if source == "hf_overrides" else f"${ENV_CONFIG}"
        raise ValueError(f"sere: invalid SERE config in {where} for {model_config.model!r}: {exc}") from None
    if cfg.policy == policy.TUNED:  # the schedule must be this model's: layers and shape too
        try:
            cfg.loaded_schedule().check_model(num_experts=num_experts, top_k=top_k,
                                              num_layers=_moe_layer_count(model_config.hf_text_config),
                                              shape=model_shape(model_config.hf_text_config))
        except ValueError as exc:
            raise ValueError(f"sere: {exc}") from None
    if policy.matrix_kind(cfg) is not None:
        _sidecar(_sidecar_path(cfg, model_config), num_experts, cfg)
    _check_compilation(vllm_config)
    _mark_compile_cache(vllm_config)
    logger.info("sere: %s on %s (config from %s)", cfg, model_config.model, source)
    return cfg


def cuda_graphs_on(vllm_config) -> bool:
    """Whether vLLM will capture CUDA graphs (never on CPU, whatever the config asks)."""
    from vllm.config import CUDAGraphMode

    compilation = vllm_config.compilation_config
    return compilation.cudagraph_mode != CUDAGraphMode.NONE and vllm_config.device_config.device_type != "cpu"


def _check_compilation(vllm_config) -> None:
    """Refuse what cannot work compiled: records copy to the host on every call, which a
    captured CUDA graph would run once, at capture."""
    if os.environ.get(ENV_RECORD, "0") == "1" and cuda_graphs_on(vllm_config):
        mode = vllm_config.compilation_config.cudagraph_mode.name
        raise ValueError(
            f"sere: {ENV_RECORD}=1 records every routing call on the host, which cannot run inside "
            f"CUDA graphs (cudagraph_mode={mode}); unset {ENV_RECORD}, or start the engine with "
            "enforce_eager=True or compilation_config={'cudagraph_mode': 'NONE'}"
        )


def _mark_compile_cache(vllm_config) -> None:
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise ValueError(
            "sere: vllm_config.additional_config is not a dict; SERE needs to add "
            f"{COMPILE_CACHE_MARKER[0]!r} to it (it keys vLLM's compile cache)"
        )
    extra[COMPILE_CACHE_MARKER[0]] = COMPILE_CACHE_MARKER[1]
