"""EP ranks as Ray actors on two simulated nodes (127.0.0.2 and 127.0.0.3, own ports).

Real components: a two-node Ray cluster, actors placed by a STRICT_SPREAD placement group, one gloo
group across them. Slow (a cluster start, ~30 s).
"""

import pytest
import torch

from sere import policy as policies
from sere.config import SereConfig
from sere.ep import brute_force_traffic, linear_placement, moe_reference, random_expert_weights

pytestmark = pytest.mark.slow

E, H, I, K = 16, 32, 16, 4


def test_two_nodes_equal_single_process():
    import ray
    from benchmarks.harness.launch import free_port
    from sere.ep.ray_runner import RayEPRunner
    from benchmarks.harness.sim_cluster import SimulatedCluster

    gate_up, down = random_expert_weights(E, H, I, seed=2)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, H, generator=gen) for n in (6, 4)]
    probs = [torch.randn(x.shape[0], E, generator=gen).softmax(-1) for x in xs]
    ws, ids = zip(*(p.topk(K, dim=-1) for p in probs))
    sim = torch.rand(E, E, generator=gen)
    sim.fill_diagonal_(1.0)
    placement = linear_placement(E, 2)
    primary = torch.zeros(E, dtype=torch.bool)
    primary[torch.cat(ids)[:, 0]] = True  # every token's top-1 (topk returns slots by descending weight)
    configs = {
        "topk": SereConfig(policy="topk"),
        "sere": SereConfig(policy="sere", num_primary=1),
        "sere+locality": SereConfig(policy="sere", num_primary=1, locality_epsilon=0.1),
    }
    with SimulatedCluster(num_nodes=2, base_port=6390):
        runner = RayEPRunner(2, 1, (gate_up, down), port=free_port(), timeout_s=90)
        try:
            assert runner.node_ips == ["127.0.0.2", "127.0.0.3"]
            assert len(set(runner.node_ids)) == 2
            for label, cfg in configs.items():
                results = runner.step(xs, ids, ws, cfg, sim)
                all_ids = []
                for rank, res in enumerate(results):
                    exp_ids, exp_w, _, _ = policies.route(cfg, ids[rank], ws[rank], num_experts=E, matrix=sim,
                                                          primary=primary, placement=placement, step_tokens=10)
                    assert torch.equal(res["topk_ids"], exp_ids)
                    ref = moe_reference(xs[rank], exp_ids, exp_w, gate_up, down)
                    assert torch.allclose(res["out"], ref, atol=1e-5), (label, rank)
                    all_ids.append(exp_ids)
                count = brute_force_traffic(torch.cat(all_ids).tolist(), [0] * 6 + [1] * 4, placement, 1)
                assert [res["send_rows"] for res in results] == count["rows"]
        finally:
            runner.shutdown()
    assert not ray.is_initialized()
