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

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RoutingTrace", "load_model", "heldout_batch", "capture_routing", "synthetic_trace", "trace_similarity", "split_step", "expert_weights"]

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
    source: str  # "model:<path>", "random-model" or "synthetic:zipf<s>"


def load_model(path: str | Path = DEFAULT_MODEL, seed: int = 0):
    """(model in float32 eval mode, tokenizer or None, is_real). A tiny random Qwen3-MoE with the
    trained model's shapes stands in while `path` holds no checkpoint.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError as exc:  # pragma: no cover
        raise ImportError("routing traces need transformers: pip install 'transformers>=5.16,<5.20'") from exc
    path = Path(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(str(path)), True
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, moe_intermediate_size=64, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # HF init leaves the router at zero: give it something to choose
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model, None, False


def heldout_batch(tokenizer, num_seqs: int, seq_len: int, path: str | Path | None = None, vocab: int = 512):
    """[B, P] token ids: B windows spread over the held-out text, or random ids without one."""
    path = Path(path) if path is not None else DEFAULT_MODEL / "heldout.txt"
    if tokenizer is None or not path.is_file():
        return torch.randint(0, vocab, (num_seqs, seq_len), generator=torch.Generator().manual_seed(0))
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
    num_layers: int = 1, hidden_size: int = 7168, seed: int = 0,
) -> RoutingTrace:
    """Skewed routing: expert popularity ~ Zipf(s) (a random permutation of ranks), each token's
    top-k drawn without replacement by Gumbel top-k on log-popularity + token noise; the router
    probabilities are the softmax of those perturbed logits (DeepSeek-V3-like at the defaults).
    """
    gen = torch.Generator().manual_seed(seed)
    ids, weights, probs = {}, {}, {}
    for layer in range(num_layers):
        rank = torch.randperm(num_experts, generator=gen).float() + 1  # [E]
        log_pop = -zipf_s * torch.log(rank)  # [E]
        gumbel = -torch.log(-torch.log(torch.rand(num_seqs, seq_len, num_experts, generator=gen).clamp_min(1e-12)))
        logits = log_pop + gumbel  # [B, P, E]
        p = logits.softmax(-1)
        w, i = p.topk(top_k, dim=-1)
        ids[layer], weights[layer], probs[layer] = i, w / w.sum(-1, keepdim=True), p
    return RoutingTrace(list(range(num_layers)), None, ids, weights, probs, num_experts, hidden_size,
                        f"synthetic:zipf{zipf_s:g}")


def trace_similarity(num_experts: int, layers: list[int], model_dir: str | Path | None = None, seed: int = 0):
    """({layer: [E, E]}, source): the model's sidecar when present, else a random symmetric
    similarity built from random expert embeddings ((cos + 1) / 2, diagonal 1).
    """
    from sere.sidecars import SidecarError, load_sidecar

    if model_dir is not None:
        try:
            sidecar = load_sidecar(model_dir, num_experts=num_experts, layer_ids=layers)
            return {i: sidecar.matrix(i) for i in layers}, f"sidecar:{sidecar.metric}"
        except SidecarError:
            pass
    gen = torch.Generator().manual_seed(seed)
    sims = {}
    for i in layers:
        emb = torch.nn.functional.normalize(torch.randn(num_experts, 16, generator=gen), dim=1)
        sim = (emb @ emb.T + 1) / 2
        sim.fill_diagonal_(1.0)
        sims[i] = sim
    return sims, "random"


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
