"""Upcycle a dense FFN into fine-grained experts, the way Qwen1.5-MoE was made from a dense model.

The dense model is ``TinyQwen3Moe`` with one expert of width F and top-1 (its router then always
gives weight 1, so the block is exactly a SwiGLU FFN ``down(silu(gate x) * up x)``).

Fine-grained splitting with shuffling (Qwen1.5-MoE's recipe, written from its description): the F
intermediate neurons are partitioned into F/w segments of w neurons; R = E*w/F independent random
permutations of the neurons ("groups") each give F/w segments, so the E experts are R partitions of
the same FFN and every dense neuron sits in exactly R experts. An expert keeps its neurons' rows of
``gate_proj`` / ``up_proj`` and columns of ``down_proj``.

Output scale: the router is re-initialised small and random, so at init it picks K experts almost
uniformly with renormalised weights ~1/K. Then E[sum_k w_k * s * seg_k(x)] = s/E * sum_e seg_e(x)
= s*R/E * FFN(x), so ``down_proj`` is multiplied by s = E/R = F/w to reproduce the dense FFN in
expectation over the (random) expert choice. (With K = F/w it is exact whenever the K chosen
experts form one whole partition; otherwise the choice adds variance, measured as the held-out loss
right after upcycling.) Small Gaussian noise (relative to each tensor's std) breaks exact ties.
"""

from __future__ import annotations

import torch


def segment_plan(ffn_width: int, expert_width: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """[E, w] dense-neuron indices of each expert: R shuffled partitions of range(F) into w-wide segments."""
    if ffn_width % expert_width:
        raise ValueError(f"ffn width {ffn_width} is not a multiple of expert width {expert_width}")
    per_partition = ffn_width // expert_width
    if num_experts % per_partition:
        raise ValueError(f"num_experts {num_experts} is not a multiple of F/w = {per_partition}")
    groups = num_experts // per_partition
    plans = [torch.randperm(ffn_width, generator=gen).view(per_partition, expert_width) for _ in range(groups)]
    return torch.cat(plans)  # [E, w]


def _noisy(t: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    if rel <= 0:
        return t
    return t + torch.randn(t.shape, generator=gen) * (rel * float(t.std()))


@torch.no_grad()
def upcycle_layer(gate_up: torch.Tensor, down: torch.Tensor, plan: torch.Tensor, noise_rel: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``gate_up [1, 2F, H]`` and ``down [1, H, F]`` -> experts ``[E, 2w, H]`` and ``[E, H, w]``."""
    F = down.shape[-1]
    gate, up = gate_up[0, :F], gate_up[0, F:]  # [F, H] each
    scale = F / plan.shape[1]  # = E / R, see the module docstring
    new_gate_up = torch.cat([gate[plan], up[plan]], dim=1)  # [E, 2w, H]
    new_down = down[0][:, plan].permute(1, 0, 2) * scale  # [H, E, w] -> [E, H, w]
    return _noisy(new_gate_up, noise_rel, gen), _noisy(new_down, noise_rel, gen)


@torch.no_grad()
def upcycle_state(dense_state: dict, moe_model, noise_rel: float, router_std: float, seed: int) -> dict:
    """State dict for ``moe_model`` (a TinyQwen3Moe with E experts of width w) from a dense one.

    Attention, norms and embeddings are copied; each layer's experts come from its dense FFN
    (:func:`upcycle_layer`); each router is N(0, router_std). Returns the plans too (``plans``:
    layer -> [E, w] neuron indices) for the training log.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = moe_model.cfg
    state, plans = {}, {}
    for name, ref in moe_model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            dense_width = dense_state[prefix + "down_proj"].shape[-1]
            plan = segment_plan(dense_width, cfg.moe_intermediate_size, cfg.num_experts, gen)
            gu, dn = upcycle_layer(dense_state[name], dense_state[prefix + "down_proj"], plan, noise_rel, gen)
            state[name], state[prefix + "down_proj"] = gu, dn
            plans[prefix] = plan
        elif name.endswith("mlp.experts.down_proj"):
            continue  # written together with gate_up_proj
        elif name.endswith("mlp.gate.weight"):
            state[name] = torch.randn(ref.shape, generator=gen) * router_std
        else:
            state[name] = dense_state[name].clone()
    for name, ref in moe_model.state_dict().items():
        if state[name].shape != ref.shape:
            raise ValueError(f"upcycled {name} has shape {tuple(state[name].shape)}, model wants {tuple(ref.shape)}")
    return {"state": state, "plans": plans}
