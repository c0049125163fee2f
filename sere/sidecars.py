"""The similarity sidecar: one [E, E] float32 matrix per MoE layer, next to the checkpoint.

Similarity metrics (cosine, frobenius, cka) have a diagonal of 1. The error-aware policy's
`substitution_error` matrices (err[i, j], the relative error of running j instead of i) have a
diagonal of 0 and are stored the same way, with that metric name.

File `sere_similarity.safetensors` holds tensors keyed `layers.{i}` (i = decoder layer index)
and string metadata: metric, num_tokens, model_id, num_experts, format. The checkpoint itself
is never rewritten. Every problem (missing file, missing layer, wrong shape, another model's
file) is an error that names the file and the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ERROR_METRIC", "ERROR_SIDECAR_NAME", "SIDECAR_NAME", "Sidecar", "SidecarError", "save_sidecar", "load_sidecar", "resolve_sidecar"]

SIDECAR_NAME = "sere_similarity.safetensors"
FORMAT = "sere-similarity/1"
ERROR_METRIC = "substitution_error"
ERROR_SIDECAR_NAME = "sere_similarity.substitution_error.safetensors"  # what sere-err reads
_KEY = "layers.{}"


class SidecarError(ValueError):
    """A missing, malformed or mismatched similarity sidecar."""


@dataclass(frozen=True)
class Sidecar:
    path: Path
    matrices: dict[int, torch.Tensor]  # decoder layer index -> [E, E] float32
    metric: str
    num_experts: int
    num_tokens: int
    model_id: str
    metadata: dict[str, str]

    def matrix(self, layer: int) -> torch.Tensor:
        """[E, E] float32 similarity of decoder layer `layer`."""
        if layer not in self.matrices:
            raise SidecarError(
                f"{self.path}: no similarity matrix for layer {layer} "
                f"(file has layers {sorted(self.matrices)})"
            )
        return self.matrices[layer]

    def threshold_for(self, layer: int, quantile: float) -> float:
        """The `quantile` of layer `layer`'s off-diagonal similarities: a metric-independent rho.

        quantile 0.1 means "keep an expert as critical when its best primary is less similar
        than 90% of the layer's expert pairs".
        """
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"threshold_quantile={quantile!r} is outside [0, 1]")
        sim = self.matrix(layer)
        off_diagonal = sim[~torch.eye(sim.shape[0], dtype=torch.bool)]
        return float(torch.quantile(off_diagonal.double(), quantile))


def resolve_sidecar(path: str | Path) -> Path:
    """A model directory resolves to its `sere_similarity.safetensors`; a file is taken as is."""
    path = Path(path)
    return path / SIDECAR_NAME if path.is_dir() else path


def save_sidecar(
    path: str | Path,
    matrices: dict[int, torch.Tensor],
    *,
    metric: str,
    num_tokens: int,
    model_id: str,
    num_experts: int,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write matrices ({layer: [E, E]}) with their metadata; returns the file written."""
    from safetensors.torch import save_file

    path = resolve_sidecar(path)
    tensors = {}
    for layer, sim in sorted(matrices.items()):
        _check_matrix(path, layer, sim, num_experts, metric)
        tensors[_KEY.format(layer)] = sim.detach().to(torch.float32).contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "metric": metric,
        "num_tokens": str(int(num_tokens)),
        "model_id": model_id,
        "num_experts": str(int(num_experts)),
        "layers": ",".join(str(layer) for layer in sorted(matrices)),
        **(extra_metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_sidecar(
    path: str | Path,
    *,
    num_experts: int | None = None,
    layer_ids: list[int] | None = None,
    num_layers: int | None = None,
) -> Sidecar:
    """Read and validate a sidecar.

    Args:
        path: the sidecar file, or a model directory holding `sere_similarity.safetensors`.
        num_experts: the model's routed expert count E; every matrix must be [E, E].
        layer_ids: the model's MoE decoder-layer indices; each must have a matrix.
        num_layers: the model's MoE layer count (when `layer_ids` is not known).
    """
    from safetensors import safe_open

    path = resolve_sidecar(path)
    if not path.is_file():
        raise SidecarError(
            f"similarity sidecar not found: {path} "
            f"(create it with: python -m sere.calibrate --model <model dir> --data <text>)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            raw = {key: handle.get_tensor(key) for key in keys}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise SidecarError(f"{path}: not a readable safetensors file ({exc})") from exc

    matrices: dict[int, torch.Tensor] = {}
    for key, tensor in raw.items():
        prefix, _, index = key.partition(".")
        if prefix != "layers" or not index.isdigit():
            raise SidecarError(f"{path}: unexpected tensor {key!r} (expected keys 'layers.<i>')")
        matrices[int(index)] = tensor
    if not matrices:
        raise SidecarError(f"{path}: holds no similarity matrices")

    file_experts = int(metadata.get("num_experts", next(iter(matrices.values())).shape[0]))
    if num_experts is not None and file_experts != num_experts:
        raise SidecarError(
            f"{path}: made for a model with {file_experts} experts, this model has {num_experts} "
            f"(model_id in file: {metadata.get('model_id', '?')})"
        )
    metric = metadata.get("metric", "unknown")
    for layer, sim in matrices.items():
        _check_matrix(path, layer, sim, file_experts, metric)
        matrices[layer] = sim.to(torch.float32)
    if layer_ids is not None:
        for layer in layer_ids:
            if layer not in matrices:
                raise SidecarError(
                    f"{path}: no similarity matrix for MoE layer {layer} "
                    f"(file has layers {sorted(matrices)})"
                )
    if num_layers is not None and len(matrices) != num_layers:
        raise SidecarError(
            f"{path}: has {len(matrices)} layer matrices, the model has {num_layers} MoE layers"
        )
    return Sidecar(
        path=path,
        matrices=matrices,
        metric=metric,
        num_experts=file_experts,
        num_tokens=int(metadata.get("num_tokens", 0)),
        model_id=metadata.get("model_id", ""),
        metadata=metadata,
    )


def _check_matrix(path: Path, layer: int, sim: torch.Tensor, num_experts: int, metric: str) -> None:
    if sim.dim() != 2 or tuple(sim.shape) != (num_experts, num_experts):
        raise SidecarError(
            f"{path}: layer {layer} similarity has shape {tuple(sim.shape)}, "
            f"expected [{num_experts}, {num_experts}]"
        )
    if not sim.is_floating_point():
        raise SidecarError(f"{path}: layer {layer} similarity has dtype {sim.dtype}, expected float")
    if not bool(torch.isfinite(sim).all()):
        raise SidecarError(f"{path}: layer {layer} similarity has non-finite values")
    diagonal = sim.float().diagonal()
    expected = 0.0 if metric == ERROR_METRIC else 1.0
    if not math.isclose(float(diagonal.min()), expected, abs_tol=1e-3) or not math.isclose(
        float(diagonal.max()), expected, abs_tol=1e-3
    ):
        raise SidecarError(f"{path}: layer {layer} {metric} diagonal is not {expected:g}")
