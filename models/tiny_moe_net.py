"""Plain-PyTorch Qwen3-MoE for fast CPU training, with a 1:1 mapping onto the HF weight names.

Shapes: B batch, T sequence, N = B*T tokens, H hidden, E routed experts, K top-k,
I moe_intermediate_size, V vocab, nh / nkv attention / KV heads, hd head_dim.

The module tree mirrors ``transformers``' ``Qwen3MoeForCausalLM`` (5.x) name for name, including the
fused expert tensors ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first) and
``mlp.experts.down_proj [E, H, I]``. Only the expert *computation* differs: tokens are grouped by
expert (stable sort of the flattened ``topk_ids``) and each expert runs two matmuls on a contiguous
slice, instead of HF's one-hot mask + ``where`` per expert. The export writes the per-expert
checkpoint format (``mlp.experts.{e}.{gate,up,down}_proj.weight``) that both transformers and vLLM
convert on load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyMoeConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 64
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    def to_hf(self, **special_ids):
        """The matching ``transformers.Qwen3MoeConfig``."""
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size * self.num_experts_per_tok,  # unused
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=False,
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            norm_topk_prob=True,
            router_aux_loss_coef=0.01,
            architectures=["Qwen3MoeForCausalLM"],
            dtype="bfloat16",
            **special_ids,
        )

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: TinyMoeConfig, seq_len: int, device=None):
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=device) / cfg.head_dim)
    )
    freqs = torch.arange(seq_len, dtype=torch.float, device=device)[:, None] * inv_freq  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Router(nn.Module):
    """HF ``Qwen3MoeTopKRouter``: softmax in fp32, top-k, renormalised (norm_topk_prob=True)."""

    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x):  # x [N, H]
        logits = F.linear(x, self.weight)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [N, E]
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return probs, topk_weights, topk_ids


class Experts(nn.Module):
    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.inter = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, topk_ids, topk_weights):
        """x [N, H]; topk_ids [N, K] int64; topk_weights [N, K] -> [N, H]."""
        N, K = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)  # [N*K]
        order = torch.argsort(flat_ids, stable=True)  # [N*K], slots grouped by expert
        token_ids = order // K  # [N*K]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        xs = x.index_select(0, token_ids)  # [N*K, H]
        # NOTE: unbind once; indexing the parameter per expert would make autograd build a full
        # zero [E, ...] gradient for every expert.
        w_gate_up, w_down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        # Routing weights scale the [n, I] activations (linear in down_proj, 4x fewer elements than [n, H]).
        ws = topk_weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype).split(counts)  # [n, 1] per expert
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, w_gate_up[e]).chunk(2, dim=-1)  # [n, I] each
            outs.append(F.linear(F.silu(gate) * up * ws[e], w_down[e]))  # [n, H]
        return torch.zeros_like(x).index_add_(0, token_ids, torch.cat(outs))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, topk_weights, topk_ids = self.gate(x)
        return self.experts(x, topk_ids, topk_weights).reshape(shape), (probs, topk_ids)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, routing = self.mlp(self.post_attention_layernorm(x))
        return x + y, routing


class Backbone(nn.Module):
    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyQwen3Moe(nn.Module):
    """Causal LM; ``lm_head`` is tied to ``model.embed_tokens`` (not a separate parameter)."""

    def __init__(self, cfg: TinyMoeConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * self.cfg.num_hidden_layers)  # residual-branch outputs
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "experts.down_proj")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids):
        """input_ids [B, T] -> logits [B, T, V] (fp32), routing [(probs [N, E], topk_ids [N, K])] per layer."""
        T = input_ids.shape[1]
        cos, sin = rope_cos_sin(self.cfg, T, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        routing = []
        for layer in self.model.layers:
            x, r = layer(x, cos, sin)
            routing.append(r)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight).float(), routing


def load_balancing_loss(probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Switch / Qwen auxiliary loss of one layer: ``E * sum_e f_e * P_e``.

    ``f_e`` = fraction of (token, slot) selections that went to ``e`` times K (HF's convention:
    per-slot fractions summed over the K slots), ``P_e`` = mean router probability. Its minimum
    (perfect balance) is K; it is differentiable through ``P`` only.
    """
    N, E = probs.shape
    f = torch.bincount(topk_ids.reshape(-1), minlength=E).to(probs.dtype) / N  # [E], sums to K
    return E * torch.sum(f * probs.mean(dim=0))


def export_state_dict(model: TinyQwen3Moe, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """HF per-expert checkpoint names; lm_head omitted (tied)."""
    out = {}
    I = model.cfg.moe_intermediate_size
    for name, p in model.state_dict().items():
        p = p.detach().to(dtype)
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = p[e, :I].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = p[e, I:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = p[e].contiguous()
        else:
            out[name] = p.contiguous()
    return out


def import_state_dict(model: TinyQwen3Moe, sd: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`export_state_dict` (values cast to the model's dtype)."""
    own = model.state_dict()
    new = {}
    for name, p in own.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            new[name] = torch.stack(
                [
                    torch.cat([sd[f"{prefix}{e}.gate_proj.weight"], sd[f"{prefix}{e}.up_proj.weight"]])
                    for e in range(p.shape[0])
                ]
            )
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            new[name] = torch.stack([sd[f"{prefix}{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            new[name] = sd[name]
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in new.items()})
