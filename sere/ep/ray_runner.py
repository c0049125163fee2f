"""Expert-parallel ranks as Ray actors on different nodes, one gloo group across them.

Shape legend:  T tokens of a rank   H hidden   K top-k   E experts   W ranks   R ranks per node

The runner reserves one placement-group bundle per node with STRICT_SPREAD (so the bundles land
on W / R distinct Ray nodes), orders the bundles by node address and starts rank r in the
(r // R)-th, and the actors form one
torch.distributed group (gloo; NCCL where CUDA is present) rendezvousing at rank 0's node address.
Each `step` runs `ep_moe_forward` on every rank with its own tokens and returns the outputs and the
per-rank counts. Calls time out instead of hanging when a node is gone.
"""

from __future__ import annotations

import datetime
import os

import torch

__all__ = ["RayEPRunner"]


class _EPRank:
    """One EP rank (wrapped with ray.remote by the runner)."""

    def __init__(self):
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def node(self) -> tuple[str, str]:
        import ray

        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def setup(self, rank, world_size, master_addr, port, placement_spec, num_experts, ranks_per_node,
              layer_weights, timeout_s):
        import torch.distributed as dist

        from sere.ep.collective import default_backend
        from sere.ep.dispatch import agree_placement
        from sere.ep.experts import SwiGLUExperts

        dist.init_process_group(default_backend(), init_method=f"tcp://{master_addr}:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = rank
        self.placement = agree_placement(placement_spec, num_experts, ranks_per_node=ranks_per_node)
        self.experts = {layer: SwiGLUExperts.from_global(gu, dn, self.placement, rank)
                        for layer, (gu, dn) in layer_weights.items()}
        return rank

    def step(self, x, topk_ids, topk_weights, cfg, matrix=None, router_scores=None, repeats=1, layer=0):
        """Run the step `repeats` times (timing); returns the last output and its counts."""
        from sere.ep.dispatch import ep_moe_forward

        times = []
        for _ in range(repeats):
            out, info = ep_moe_forward(x, topk_ids, topk_weights, self.experts[layer], self.placement, cfg,
                                       matrix, router_scores)
            times.append(info.seconds)
        return {
            "out": out, "topk_ids": info.topk_ids, "send_rows": info.send_rows.tolist(),
            "recv_rows": info.recv_rows.tolist(), "row_bytes": info.row_bytes,
            "combine_row_bytes": info.combine_row_bytes, "computed": info.local_experts_computed,
            "seconds": times,
        }

    def shutdown(self):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RayEPRunner:
    """W EP ranks spread R per node over W / R Ray nodes of a running cluster (ray.init done).

    expert_weights: (gate_up_proj [E, 2I, H], down_proj [E, H, I]) of one MoE layer, or
    {layer: (gate_up_proj, down_proj)} for several (each rank keeps its slice of every layer).
    """

    def __init__(self, world_size: int, ranks_per_node: int,
                 expert_weights: tuple[torch.Tensor, torch.Tensor] | dict[int, tuple[torch.Tensor, torch.Tensor]],
                 placement: str | list[list[int]] = "linear", port: int = 29650, num_cpus: float = 0.25,
                 timeout_s: float = 120.0):
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as exc:  # pragma: no cover
            raise ImportError("the Ray runner needs ray: pip install 'ray[serve]==2.60.0'") from exc
        if world_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} must divide world_size={world_size}")
        self.timeout_s = timeout_s
        num_nodes = world_size // ranks_per_node
        bundles = [{"CPU": num_cpus * ranks_per_node} for _ in range(num_nodes)]
        self.pg = placement_group(bundles, strategy="STRICT_SPREAD" if num_nodes > 1 else "PACK")
        ray.get(self.pg.ready(), timeout=timeout_s)
        # bundles in node-address order, so that ranks [n * R, (n + 1) * R) share the n-th node
        node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        bundle_node = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        order = sorted(range(num_nodes), key=lambda b: tuple(int(p) for p in node_ip[bundle_node[b]].split(".")))
        remote_rank = ray.remote(_EPRank)
        self.actors = [
            remote_rank.options(
                num_cpus=num_cpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=order[r // ranks_per_node]
                ),
            ).remote()
            for r in range(world_size)
        ]
        nodes = ray.get([a.node.remote() for a in self.actors], timeout=timeout_s)
        self.node_ips = [ip for ip, _ in nodes]
        self.node_ids = [node_id for _, node_id in nodes]
        if isinstance(expert_weights, tuple):
            expert_weights = {0: expert_weights}
        num_experts = next(iter(expert_weights.values()))[0].shape[0]
        weights_ref = ray.put(expert_weights)
        ray.get([
            actor.setup.remote(r, world_size, self.node_ips[0], port, placement, num_experts, ranks_per_node,
                               weights_ref, timeout_s)
            for r, actor in enumerate(self.actors)
        ], timeout=timeout_s)
        self.world_size, self.ranks_per_node = world_size, ranks_per_node

    def step(self, xs, topk_ids, topk_weights, cfg, matrix=None, router_scores=None, repeats=1,
             layer=0) -> list[dict]:
        """Per-rank lists of [T_r, ...] inputs -> per-rank result dicts (see `_EPRank.step`)."""
        import ray

        scores = router_scores or [None] * self.world_size
        sim_ref = ray.put(matrix) if matrix is not None else None
        return ray.get([
            actor.step.remote(xs[r], topk_ids[r], topk_weights[r], cfg, sim_ref, scores[r], repeats, layer)
            for r, actor in enumerate(self.actors)
        ], timeout=self.timeout_s)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # a dead node: the actors are killed below anyway
            pass
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.pg)
