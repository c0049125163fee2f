"""User-facing SERE configuration (CLI, Serve args, `hf_overrides={"sere": {...}}`, YAML).

Validated at the boundary; the hot path receives plain ints and floats.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sere.policy import POLICIES, TUNED

__all__ = ["SereConfig", "Scope"]

Scope = Literal["ep_group", "rank"]


class SereConfig(BaseModel):
    """How a model's routing is re-routed.

    `num_primary` is S (each token's top-S experts form the batch's primary set); `threshold`
    is rho (keep a secondary expert whose best primary is less similar than rho; 0 disables).
    `threshold_quantile`, when set, replaces `threshold` by a per-layer quantile of the layer's
    off-diagonal similarities, which means the same thing for every metric.
    Steps with more than `max_decode_tokens` tokens (prefill, chunked prefill) are left alone.
    `sere-err` (error-aware) reads a `substitution_error` sidecar and uses `tolerance`,
    `keep_cost`, `max_distinct`, `renormalize` and `refill` (see `sere.reference.sere_err_reference`).
    `xshare` (arXiv 2602.07265) reads the router scores: the batch keeps every token's top
    `num_primary` experts plus the experts of largest summed score up to `max_distinct` (required),
    and each token takes its top-k among those (see `sere.reference.xshare_reference`).
    `scope` sets who shares the primary set: the whole expert-parallel group or each rank.
    `locality_epsilon` (sere only, expert parallelism): among the primaries within this
    similarity of the best, prefer one on a rank or node the token is already sent to.
    `node_limit="primary_nodes"` (sere, sere-err, oea; needs the expert placement): a token's
    secondary slots only go to experts on the nodes (`node_scope="rank"`: ranks) of its own
    top-S experts, grown to at most `max_nodes` nodes (ranks) in all when that is set.
    `layer_num_primary` ({decoder-layer index: S}; sere, oea, sere-err, xshare) sets S in those
    MoE layers, `num_primary` elsewhere (e.g. a smaller node budget where it costs least);
    `for_layer(layer)` is one layer's config, the one `sere.policy.route` takes.
    `policy="tuned"` follows a schedule made by `sere tune` (`schedule`: its path; None lets the
    engine use the model's own `sere_schedule.json`): `at(step_tokens)` is the bucket's config.
    The policy layer `sere.policy.route` applies it; docs/spec.md states every rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = "sere"
    num_primary: int = Field(default=2, ge=1)
    threshold: float = 0.0
    threshold_quantile: float | None = None
    max_decode_tokens: int = Field(default=256, ge=0)
    scope: str = "ep_group"
    similarity_path: str | None = None
    tolerance: float = 1.0
    keep_cost: float | None = Field(default=None, ge=0.0)
    max_distinct: int | None = Field(default=None, ge=1)
    renormalize: bool = False
    refill: bool = False
    locality_epsilon: float | None = Field(default=None, ge=0.0)
    node_limit: str | None = None
    max_nodes: int | None = Field(default=None, ge=1)
    node_scope: str = "node"
    schedule: str | None = None
    layer_num_primary: dict[int, int] | None = None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES and value != TUNED:
            raise ValueError(f"policy={value!r} is unknown; choose one of {list(POLICIES) + [TUNED]}")
        return value

    @field_validator("scope", "node_limit", "node_scope")
    @classmethod
    def _known_choice(cls, value: str | None, info) -> str | None:
        allowed = {"scope": ("ep_group", "rank"), "node_limit": ("primary_nodes", None), "node_scope": ("node", "rank")}
        if value not in allowed[info.field_name]:
            choices = " or ".join(map(repr, allowed[info.field_name]))
            raise ValueError(f"{info.field_name}={value!r} is unknown; choose {choices}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_in_unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold={value!r} is outside [0, 1]")
        return value

    @field_validator("tolerance")
    @classmethod
    def _tolerance_in_half_open_interval(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"tolerance={value!r} is outside (0, 1]")
        return value

    @field_validator("threshold_quantile")
    @classmethod
    def _quantile_in_unit_interval(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold_quantile={value!r} is outside [0, 1]")
        return value

    @model_validator(mode="after")
    def _one_threshold_form(self) -> "SereConfig":
        if self.threshold_quantile is not None and self.threshold > 0:
            raise ValueError(
                f"set either threshold ({self.threshold}) or threshold_quantile "
                f"({self.threshold_quantile}), not both"
            )
        if self.locality_epsilon is not None and self.policy != "sere":
            raise ValueError(f"locality_epsilon={self.locality_epsilon} applies to policy 'sere' only, not {self.policy!r}")
        if self.node_limit is not None and self.policy == "topk":
            raise ValueError("node_limit applies to policies 'sere', 'sere-err' and 'oea', not 'topk'")
        if self.node_limit is not None and self.locality_epsilon is not None:
            raise ValueError("set either node_limit or locality_epsilon, not both")
        if self.schedule is not None and self.policy != TUNED:
            raise ValueError(f"schedule={self.schedule!r} needs policy={TUNED!r}, not {self.policy!r}")
        if self.max_nodes is not None and self.node_limit is None:
            raise ValueError(f"max_nodes={self.max_nodes} needs node_limit='primary_nodes'")
        return self

    @model_validator(mode="after")
    def _layer_num_primary(self) -> "SereConfig":
        if self.layer_num_primary is None:
            return self
        if self.policy in ("topk", TUNED):
            raise ValueError(f"layer_num_primary applies to policies 'sere', 'oea', 'sere-err' and 'xshare', "
                             f"not {self.policy!r}")
        for layer, s in self.layer_num_primary.items():
            if layer < 0 or s < 1:
                raise ValueError(f"layer_num_primary[{layer}]={s}: layers are >= 0 and S >= 1")
        return self

    @model_validator(mode="after")
    def _xshare_fields(self) -> "SereConfig":
        if self.policy == "xshare" and self.max_distinct is None:
            raise ValueError("policy 'xshare' needs max_distinct (its expert budget B), got None")
        if self.policy == "xshare" and self.node_limit is not None:
            raise ValueError(f"node_limit={self.node_limit!r} does not apply to policy 'xshare' "
                             "(it selects its experts for the whole batch)")
        return self

    def at(self, step_tokens: int) -> "SereConfig":
        """The config that applies to a decode step of `step_tokens` tokens: self, or with
        policy "tuned" the schedule's bucket config."""
        if self.policy != TUNED:
            return self
        return self.loaded_schedule().config_for(step_tokens)

    def __hash__(self) -> int:  # frozen, and usable as a dict key although layer_num_primary is a dict
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in self.__dict__.values()))

    def for_layer(self, layer: int) -> "SereConfig":
        """The config of the MoE layer with decoder-layer index `layer`: `num_primary` from
        `layer_num_primary` where it names the layer, and no per-layer table."""
        if self.layer_num_primary is None:
            return self
        s = self.layer_num_primary.get(layer, self.num_primary)
        return self.model_copy(update={"num_primary": s, "layer_num_primary": None})

    def check_layers(self, moe_layers: list[int]) -> None:
        """Raise ValueError unless every layer `layer_num_primary` names is one of `moe_layers`."""
        unknown = sorted(set(self.layer_num_primary or {}) - set(moe_layers))
        if unknown:
            raise ValueError(f"layer_num_primary names layer(s) {unknown}, not MoE layers of the model "
                             f"(its MoE layers: {sorted(moe_layers)})")

    def bucket_configs(self) -> tuple["SereConfig", ...]:
        """Every config this one may apply: (self,), or a schedule's one per bucket."""
        return self.loaded_schedule().configs if self.policy == TUNED else (self,)

    def loaded_schedule(self):
        """The validated `sere.schedule.Schedule` of policy "tuned" (cached per path)."""
        if self.schedule is None:
            raise ValueError(f"policy={TUNED!r} needs schedule= (the file `sere tune` writes)")
        return _load_schedule(self.schedule)

    def check_model(self, top_k: int, num_experts: int) -> None:
        """Raise ValueError naming the field if this config cannot apply to the model."""
        if self.policy == TUNED:
            self.loaded_schedule().check_model(num_experts=num_experts, top_k=top_k)
        elif self.policy != "topk" and self.num_primary >= top_k:
            raise ValueError(
                f"num_primary={self.num_primary} must be smaller than the model's top_k={top_k}"
            )
        for layer, s in (self.layer_num_primary or {}).items():
            if s >= top_k:
                raise ValueError(f"layer_num_primary[{layer}]={s} must be smaller than the model's top_k={top_k}")
        if num_experts < 2:
            raise ValueError(f"num_experts={num_experts}: re-routing needs at least 2 experts")


@lru_cache(maxsize=16)
def _load_schedule(path: str):
    from sere.schedule import load_schedule

    return load_schedule(path)
