"""SERE inside DeepSpeed-MoE (`deepspeed.moe.layer.MoE`) with expert parallelism over gloo (ep_size 2).

Every global expert gets its own weights (DeepSpeed deep-copies one expert module); the output of
the DeepSpeed layer is compared with a single-process sum over the routed experts, for the model's
routing and after SERE re-routed it through the swapped gate.
"""

import pytest
import torch
from torch import nn

from benchmarks.harness.launch import RankFailure, run_group
from sere.config import SereConfig
from sere.reference import primary_mask, reroute_reference

import deepspeed  # noqa: F401

H, E, K, S, T = 16, 32, 4, 1, 4


def _expert(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(H, 32), nn.ReLU(), nn.Linear(32, H))


def _reference(x, ids, weights, experts):
    out = torch.zeros_like(x)
    for slot in range(ids.shape[1]):
        for e in ids[:, slot].unique().tolist():
            rows = ids[:, slot] == e
            out[rows] += weights[rows, slot, None] * experts[e](x[rows])
    return out


def _case(rank, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    from sere.ep.deepspeed_adapter import enable_sere

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)  # the gate's weights: the same on every rank
    moe = MoE(H, _expert(0), num_experts=E, ep_size=world, k=K, drop_tokens=False, min_capacity=1).eval()
    moe.set_deepspeed_parallelism()
    local = E // world
    with torch.no_grad():
        for i, module in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            module.load_state_dict(_expert(100 + rank * local + i).state_dict())  # global expert id
    experts = [_expert(100 + e) for e in range(E)]
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen)
    sim = torch.rand(E, E, generator=torch.Generator().manual_seed(9))
    sim.fill_diagonal_(1.0)

    with torch.no_grad():
        probs = torch.softmax(x @ moe.deepspeed_moe.gate.wg.weight.T, dim=-1)
        w, ids = probs.topk(K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y_topk = moe(x)[0]
        gate = enable_sere(moe, SereConfig(policy="sere", num_primary=S), sim)
        y_sere = moe(x)[0]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_ids, ids)
        primary = torch.stack([primary_mask(i, E, S) for i in all_ids]).any(0)
        expected_ids, _ = reroute_reference(ids, w, sim, S, primary=primary)
        model_ids, new_ids = gate.last_routing
        return {
            "topk_err": float((y_topk - _reference(x, ids, w, experts)).abs().max()),
            "sere_err": float((y_sere - _reference(x, expected_ids, w, experts)).abs().max()),
            "model_ids_equal": bool(torch.equal(model_ids, ids)),
            "ids_equal_reference": bool(torch.equal(new_ids, expected_ids)),
            "ids_changed": int((new_ids != ids).sum()),
            "distinct": (int(ids.unique().numel()), int(new_ids.unique().numel())),
            "finite": bool(torch.isfinite(y_sere).all()),
        }


def test_sere_gate_in_deepspeed_moe_ep2():
    results = run_group(_case, 2, timeout_s=240)
    for r in results:
        if isinstance(r, RankFailure):
            pytest.fail(f"{r.kind}: {r.message}\n{r.trace}")
    for r in results:
        assert r["model_ids_equal"] and r["ids_equal_reference"] and r["finite"]
        assert r["topk_err"] < 1e-5
        assert r["sere_err"] < 1e-5
    assert sum(r["ids_changed"] for r in results) > 0
    assert all(after <= before for before, after in (r["distinct"] for r in results))


def test_merge_duplicate_routes():
    from sere.ep.deepspeed_adapter import merge_duplicate_routes

    # token 0 carries expert 3 twice (slots 1 and 3): slot 3 is dropped, its weight joins slot 1
    ids = torch.tensor([[5, 3, 1, 3], [0, 1, 2, 4]])
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    new_ids, new_w = merge_duplicate_routes(ids, w)
    assert new_ids.tolist() == [[5, 3, 1, -1], [0, 1, 2, 4]]
    assert torch.allclose(new_w, torch.tensor([[0.4, 0.4, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]]))


def test_dropping_gate_is_refused():
    from deepspeed.moe.sharded_moe import TopKGate

    from sere.ep.deepspeed_adapter import SereTopKGate

    with pytest.raises(ValueError, match="drop_tokens=False"):
        SereTopKGate(TopKGate(H, E, k=K, drop_tokens=True), SereConfig(policy="sere", num_primary=S), torch.eye(E))
    with pytest.raises(ValueError, match="num_primary"):
        SereTopKGate(TopKGate(H, E, k=K, drop_tokens=False), SereConfig(policy="sere", num_primary=K), torch.eye(E))
    with pytest.raises(ValueError, match="similarity matrix"):
        SereTopKGate(TopKGate(H, E, k=K, drop_tokens=False), SereConfig(policy="sere", num_primary=S), None)
