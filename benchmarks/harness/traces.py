"""Routing traces: real router outputs of the tiny model on held-out text, or synthetic ones.

Shape legend:
    B  sequences decoded in lock-step    P  decode positions (steps)    N = B * P tokens
    H  hidden   E  routed experts   K  top-k   L  MoE layers

A trace holds, per MoE layer, the router's input and output for every token: `hidden [B, P, H]`
(what the MoE block dispatches), `topk_ids [B, P, K]`, `topk_weights [B, P, K]` and
`router_probs [B, P, E]`. A decode step with batch b at position p is `[:b, p]`: b sequences,
one token each, routed together (teacher forcing). The model's router is
`Qwen3MoeTopKRouter` (transformers 5.x `modeling_qwen3_moe.py`): `mlp.gate(hidden) ->
(router_logits, topk_weights, topk_ids)`; a forward hook on it sees exactly what the MoE block
dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["RoutingTrace", "load_model", "heldout_batch", "capture_routing", "synthetic_trace", "trace_matrices", "split_step", "expert_weights"]

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"


@dataclass
class RoutingTrace:
    layers: list[int]  # decoder layer index of every MoE layer
    hidden: dict[int, torch.Tensor] | None  # layer -> [B, P, H] float32 (None for synthetic)
    topk_ids: dict[int, torch.Tensor]  # layer -> [B, P, K] int64
    topk_weights: dict[int, torch.Tensor]  # layer -> [B, P, K] float32
    router_probs: dict[int, torch.Tensor]  # layer -> [B, P, E] float32
    num_experts: int
    hidden_size: int
    source: str  # the model directory's name, or "synthetic:E<E>-zipf<s>"
    matrices: dict = field(default_factory=dict)  # {"similarity" | "substitution_error": {layer: [E, E]}}
    matrix_note: str = ""  # where the matrices come from


def load_model(path: str | Path = DEFAULT_MODEL):
    """(model in float32 eval mode, tokenizer). A directory without a checkpoint is an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint in {path} (expected {path / 'config.json'})")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def heldout_batch(tokenizer, num_seqs: int, seq_len: int, path: str | Path) -> torch.Tensor:
    """[B, P] token ids: B windows spread over the held-out text at `path` (an error if missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out text not found: {path}")
    ids = torch.tensor(tokenizer(path.read_text(errors="replace"))["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"{path} holds only {ids.numel()} tokens")
    starts = torch.linspace(0, ids.numel() - seq_len - 1, num_seqs).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def capture_routing(model, input_ids: torch.Tensor, source: str, chunk: int = 64) -> RoutingTrace:
    """Run the model on [B, P] ids with forward hooks on every MoE router; returns the trace."""
    layers = _moe_layers(model)
    store: dict[int, list] = {i: [] for i in layers}
    handles = []
    for i in layers:
        def hook(module, args, output, i=i):
            logits, weights, ids = output  # [n, E], [n, K], [n, K]
            hidden = args[0].reshape(-1, args[0].shape[-1]).float()  # [n, H]
            store[i].append((hidden, ids.long(), weights.float(), logits.float().softmax(-1)))
        handles.append(model.model.layers[i].mlp.gate.register_forward_hook(hook))
    try:
        for start in range(0, input_ids.shape[0], chunk):
            model(input_ids=input_ids[start : start + chunk])
    finally:
        for h in handles:
            h.remove()
    num_seqs, seq_len = input_ids.shape
    out = {name: {} for name in ("hidden", "ids", "weights", "probs")}
    for i in layers:
        parts = list(zip(*store[i]))
        for name, tensors in zip(("hidden", "ids", "weights", "probs"), parts):
            out[name][i] = torch.cat(tensors).reshape(num_seqs, seq_len, -1)
    config = model.config
    return RoutingTrace(layers, out["hidden"], out["ids"], out["weights"], out["probs"],
                        config.num_experts, config.hidden_size, source)


def synthetic_trace(
    num_seqs: int, seq_len: int, num_experts: int = 256, top_k: int = 8, zipf_s: float = 1.0,
    num_layers: int = 1, hidden_size: int = 7168, seed: int = 0, latent_dim: int = 16, affinity: float = 1.0,
) -> RoutingTrace:
    """Skewed, structured routing with a stated similarity (a synthetic trace has no calibration).

    Every expert e has a unit vector u_e in R^latent_dim and a Zipf(s) popularity (a random
    permutation of ranks); token t draws z_t ~ N(0, I) and its logits are
    `-s log(rank_e) + affinity <z_t, u_e> + Gumbel noise`; top-k by those logits, weights and
    router probabilities from their softmax. Experts with close u_e are chosen by the same
    tokens, so `trace.matrices["similarity"]` = (cos(u_e, u_f) + 1) / 2 is the construction's own
    similarity (stated in `trace.matrix_note`). No substitution-error matrix exists for it.
    """
    gen = torch.Generator().manual_seed(seed)
    ids, weights, probs, sims = {}, {}, {}, {}
    for layer in range(num_layers):
        rank = torch.randperm(num_experts, generator=gen).float() + 1  # [E]
        u = torch.nn.functional.normalize(torch.randn(num_experts, latent_dim, generator=gen), dim=1)  # [E, D]
        z = torch.randn(num_seqs, seq_len, latent_dim, generator=gen)  # [B, P, D]
        gumbel = -torch.log(-torch.log(torch.rand(num_seqs, seq_len, num_experts, generator=gen).clamp_min(1e-12)))
        logits = -zipf_s * torch.log(rank) + affinity * z @ u.T + gumbel  # [B, P, E]
        p = logits.softmax(-1)
        w, i = p.topk(top_k, dim=-1)
        ids[layer], weights[layer], probs[layer] = i, w / w.sum(-1, keepdim=True), p
        sim = (u @ u.T + 1) / 2
        sims[layer] = sim.fill_diagonal_(1.0)
    note = (f"synthetic construction: similarity = (cos(u_e, u_f) + 1) / 2 of the generator's expert vectors "
            f"(latent_dim {latent_dim}, affinity {affinity}); no substitution-error matrix, sere-err not run")
    return RoutingTrace(list(range(num_layers)), None, ids, weights, probs, num_experts, hidden_size,
                        f"synthetic:E{num_experts}-zipf{zipf_s:g}", {"similarity": sims}, note)


def trace_matrices(model_dir: str | Path, num_experts: int, layers: list[int]) -> tuple[dict, str]:
    """({"similarity": {layer: [E, E]}, "substitution_error": {...}}, note) from the model's own
    calibrated sidecars; a missing or mismatched sidecar raises `sere.sidecars.SidecarError`."""
    from sere.sidecars import ERROR_SIDECAR_NAME, SIDECAR_NAME, load_sidecar

    out, notes = {}, []
    for kind, name in (("similarity", SIDECAR_NAME), ("substitution_error", ERROR_SIDECAR_NAME)):
        sidecar = load_sidecar(Path(model_dir) / name, num_experts=num_experts, layer_ids=layers)
        out[kind] = {i: sidecar.matrix(i) for i in layers}
        notes.append(f"{name} ({sidecar.metric})")
    return out, "calibrated sidecars: " + ", ".join(notes)


def split_step(trace: RoutingTrace, layer: int, batch: int, position: int, world_size: int) -> dict[str, list]:
    """One lock-step decode step (the first `batch` sequences at `position`) split over W ranks,
    sequence s on rank s % W: per-rank lists of x [T_r, H], topk_ids / topk_weights [T_r, K] and
    router_probs [T_r, E]. Random hidden states (fixed seed) stand in for a synthetic trace.
    """
    ids = trace.topk_ids[layer][:batch, position]  # [B, K]
    if trace.hidden is not None:
        x = trace.hidden[layer][:batch, position]  # [B, H]
    else:
        x = torch.randn(batch, trace.hidden_size, generator=torch.Generator().manual_seed(position))
    parts = {"x": x, "topk_ids": ids, "topk_weights": trace.topk_weights[layer][:batch, position],
             "router_probs": trace.router_probs[layer][:batch, position]}
    return {name: [t[r::world_size].contiguous() for r in range(world_size)] for name, t in parts.items()}


def expert_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) float32 of decoder layer `layer`."""
    experts = model.model.layers[layer].mlp.experts
    return experts.gate_up_proj.detach().float().contiguous(), experts.down_proj.detach().float().contiguous()
