"""A tuned schedule: which policy settings to use for each decode batch-size bucket.

`sere tune` measures, per bucket of decode-step sizes, the settings with the fewest distinct
experts whose paired perplexity increase stays within a target, and writes them to a JSON file
(default `sere_schedule.json` next to the model). `SereConfig(policy="tuned", schedule=PATH)`
applies it: `cfg.at(step_tokens)` is the bucket's own SereConfig. The file is checked like a
sidecar: every problem names the file (and the bucket), and a schedule made for another model
(experts, top-k, layers) is refused. docs/spec.md §20 states the format.

    {"format": "sere-schedule/1", "model_id": "tiny-moe", "num_experts": 64, "top_k": 8,
     "num_layers": 4, "target": {"max_ppl_increase": 0.01, ...}, "command": "sere tune ...",
     "buckets": [{"min_tokens": 1, "max_tokens": 1, "config": {"policy": "topk"}, ...}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sere.config import SereConfig

__all__ = [
    "BUCKETS", "FORMAT", "SCHEDULE_NAME", "Schedule", "ScheduleError", "bucket_of", "load_schedule", "model_shape",
    "save_schedule",
]

FORMAT = "sere-schedule/1"
SCHEDULE_NAME = "sere_schedule.json"

# Decode-step sizes (tokens) grouped as users batch: (min, max), max None = unbounded.
BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, None))


# Model config fields a schedule records besides experts / top-k / layers: two models of the same
# MoE shape class (tiny-moe and tiny-moe-upcycled: 64 experts, top-8, 4 layers) still differ here.
SHAPE_FIELDS = ("hidden_size", "moe_intermediate_size", "vocab_size")


class ScheduleError(ValueError):
    """A missing, malformed or mismatched schedule file."""


def model_shape(hf_config) -> dict[str, int]:
    """{field: value} of SHAPE_FIELDS that `hf_config` (an HF / vLLM model config) sets."""
    values = {name: getattr(hf_config, name, None) for name in SHAPE_FIELDS}
    return {name: value for name, value in values.items() if isinstance(value, int)}


def bucket_of(num_tokens: int) -> int:
    """Index into BUCKETS of a decode step with `num_tokens` tokens (>= 1)."""
    for index, (low, high) in enumerate(BUCKETS):
        if low <= num_tokens and (high is None or num_tokens <= high):
            return index
    raise ValueError(f"num_tokens={num_tokens} is in no bucket (a decode step has at least 1 token)")


@dataclass(frozen=True)
class Schedule:
    """A loaded schedule: one SereConfig per bucket of BUCKETS, and the model it was made for."""

    path: str
    configs: tuple["SereConfig", ...]  # len(BUCKETS), in BUCKETS order
    model_id: str
    num_experts: int
    top_k: int
    num_layers: int
    metadata: dict[str, Any]

    def config_for(self, num_tokens: int) -> "SereConfig":
        return self.configs[bucket_of(max(1, num_tokens))]

    def check_model(self, *, num_experts: int, top_k: int, num_layers: int | None = None,
                    shape: dict[str, int] | None = None) -> None:
        """ScheduleError naming the file if the model is not the one the schedule was tuned for:
        experts, top-k, and where given the MoE layers and the `model_shape` fields."""
        mine = {"num_experts": self.num_experts, "top_k": self.top_k}
        theirs = {"num_experts": num_experts, "top_k": top_k}
        if num_layers is not None:
            mine["num_layers"], theirs["num_layers"] = self.num_layers, num_layers
        recorded = self.metadata.get("model_shape") or {}
        for key in set(recorded) & set(shape or {}):
            mine[key], theirs[key] = recorded[key], shape[key]
        for key in mine:
            if mine[key] != theirs[key]:
                raise ScheduleError(
                    f"{self.path}: made for {key}={mine[key]} (model {self.model_id!r}), "
                    f"but this model has {key}={theirs[key]}"
                )


def save_schedule(path: str | Path, *, model_id: str, num_experts: int, top_k: int, num_layers: int,
                  buckets: list[dict[str, Any]], **metadata: Any) -> Path:
    """Write a schedule; `buckets` is one dict per BUCKETS entry with a "config" dict (and any
    measurements). Validated by loading it back, so a bad schedule is never left on disk."""
    path = Path(path)
    body = {"format": FORMAT, "model_id": model_id, "num_experts": num_experts, "top_k": top_k,
            "num_layers": num_layers, **metadata,
            "buckets": [{"min_tokens": low, "max_tokens": high, **entry} for (low, high), entry in zip(BUCKETS, buckets)]}
    if len(buckets) != len(BUCKETS):
        raise ScheduleError(f"{path}: {len(buckets)} buckets given, a schedule has {len(BUCKETS)}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    try:
        _parse(tmp, body)
    except ScheduleError:
        tmp.unlink()
        raise
    tmp.replace(path)
    return path


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file (ScheduleError naming the file and bucket on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"{path}: no such schedule file (make one with `sere tune`)")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ScheduleError(f"{path}: not valid JSON ({err})") from None
    return _parse(path, body)


def _parse(path: Path, body: Any) -> Schedule:
    from pydantic import ValidationError

    from sere.config import SereConfig

    if not isinstance(body, dict) or body.get("format") != FORMAT:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise ScheduleError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    for key in ("model_id", "num_experts", "top_k", "num_layers", "buckets"):
        if key not in body:
            raise ScheduleError(f"{path}: missing field {key!r}")
    shape = body.get("model_shape", {})
    if not isinstance(shape, dict) or not all(isinstance(v, int) for v in shape.values()):
        raise ScheduleError(f"{path}: 'model_shape' must map config fields to integers, got {shape!r}")
    entries = body["buckets"]
    if not isinstance(entries, list) or len(entries) != len(BUCKETS):
        raise ScheduleError(f"{path}: 'buckets' must list {len(BUCKETS)} buckets {list(BUCKETS)}")
    configs = []
    for index, (entry, (low, high)) in enumerate(zip(entries, BUCKETS)):
        where = f"{path}: bucket {index} ({low}-{high if high is not None else 'inf'} tokens)"
        if not isinstance(entry, dict) or (entry.get("min_tokens"), entry.get("max_tokens")) != (low, high):
            raise ScheduleError(f"{where}: min_tokens/max_tokens must be {low}/{high}")
        try:
            cfg = SereConfig(**entry.get("config", {}))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
            raise ScheduleError(f"{where}: bad config: {problems}") from None
        except TypeError as err:
            raise ScheduleError(f"{where}: bad config: {err}") from None
        if (cfg.policy == "tuned" or cfg.threshold_quantile is not None or cfg.similarity_path is not None
                or cfg.layer_num_primary is not None):
            raise ScheduleError(f"{where}: a bucket's config may not be 'tuned', nor set threshold_quantile, "
                                "similarity_path or layer_num_primary (they are resolved per model or layer, "
                                "not per bucket)")
        try:
            cfg.check_model(top_k=int(body["top_k"]), num_experts=int(body["num_experts"]))
        except ValueError as err:
            raise ScheduleError(f"{where}: {err}") from None
        configs.append(cfg)
    kinds = {_matrix_kind(cfg) for cfg in configs} - {None}
    if len(kinds) > 1:
        raise ScheduleError(f"{path}: buckets read different sidecars {sorted(kinds)}; a schedule may use one")
    metadata = {key: value for key, value in body.items() if key not in ("buckets",)}
    return Schedule(str(path), tuple(configs), str(body["model_id"]), int(body["num_experts"]),
                    int(body["top_k"]), int(body["num_layers"]), metadata)


def _matrix_kind(cfg: "SereConfig") -> str | None:
    from sere.policy import matrix_kind

    return matrix_kind(cfg)
