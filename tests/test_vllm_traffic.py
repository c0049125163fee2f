"""The live EP traffic counters of the vLLM hook (sere/vllm/traffic.py, docs/spec.md §19).

A stand-in for vLLM's MoE runner and forward context (the attributes `sere.vllm.traffic` reads,
vLLM's own `determine_expert_map`) drives `RoutingHook` for each of 4 EP ranks on 2 nodes: tokens
routed where they live (all2all dispatch), gathered from every DP rank first (vLLM's naive
dispatch), replicated over TP ranks, and with EPLB's redundant experts. The counters must equal a
plain per-token loop over the ids each hook dispatched (`loop_traffic`, also the oracle of the
real DP + EP engine test in tests/test_vllm_ep.py). And merged slots on vLLM's CPU expert kernel
(sere/vllm/ep.py): the same output, fewer weighted (token, expert) rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_common import cpu_expert_kernel


def _stand_in_runner(name, ep_rank, *, dp_size, gathered, num_physical, eplb_state=None):
    """The attributes of vLLM's MoERunner that sere.vllm.traffic reads, for EP = 4 (linear)."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    parallel = SimpleNamespace(use_ep=True, ep_size=4, ep_rank=ep_rank, dp_size=dp_size,
                               dp_rank=ep_rank // (4 // dp_size), sp_size=1, pcp_size=1)
    moe_config = SimpleNamespace(moe_parallel_config=parallel, num_experts=num_physical, hidden_dim=32,
                                 in_dtype=torch.bfloat16)
    return SimpleNamespace(layer_name=name, moe_config=moe_config, expert_placement_strategy="linear",
                           expert_map=determine_expert_map(4, ep_rank, num_physical, "linear")[1],
                           do_naive_dispatch_combine=gathered, router=SimpleNamespace(eplb_state=eplb_state))


def _stand_in_router(hidden_states, router_logits):
    weights, ids = router_logits.float().softmax(-1).topk(4, dim=-1)  # [T, 4]
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def loop_traffic(rows, src, owner, node, row_bytes) -> dict:
    """Plain per-token loop oracle of the live counters for the token rows living on `src`."""
    out = dict.fromkeys(("tokens", "merged_slots", "token_expert_pairs", "remote_token_expert_pairs",
                         "cross_node_token_expert_pairs", "token_rank_pairs", "remote_token_rank_pairs",
                         "cross_node_token_rank_pairs", "token_node_pairs", "cross_node_token_node_pairs"), 0)
    for row in rows:
        experts = set(row)
        ranks = {owner[e] for e in experts}
        nodes = {node[r] for r in ranks}
        out["tokens"] += 1
        out["merged_slots"] += len(row) - len(experts)
        out["token_expert_pairs"] += len(experts)
        out["remote_token_expert_pairs"] += sum(owner[e] != src for e in experts)
        out["cross_node_token_expert_pairs"] += sum(node[owner[e]] != node[src] for e in experts)
        out["token_rank_pairs"] += len(ranks)
        out["remote_token_rank_pairs"] += sum(r != src for r in ranks)
        out["cross_node_token_rank_pairs"] += sum(node[r] != node[src] for r in ranks)
        out["token_node_pairs"] += len(nodes)
        out["cross_node_token_node_pairs"] += sum(m != node[src] for m in nodes)
    for name in ("remote_token_expert", "cross_node_token_expert", "remote_token_rank", "cross_node_token_rank",
                 "cross_node_token_node"):
        out[f"{name}_bytes"] = out[f"{name}_pairs"] * row_bytes
    return {f"ep_{name}": value for name, value in out.items()}


# (dp_size, gathered by vLLM's naive dispatch, EPLB with 4 redundant experts)
TRAFFIC_CASES = {"all2all-dp4": (4, False, False), "naive-dp4": (4, True, False),
                 "naive-dp2-tp2": (2, True, False), "all2all-dp4-eplb": (4, False, True)}


def _case_inputs(case: str) -> SimpleNamespace:
    """Router logits and padding of each DP rank (or EP rank), the similarity, the EPLB tables."""
    dp_size, gathered, eplb = TRAFFIC_CASES[case]
    gen = torch.Generator().manual_seed(7)
    sim = torch.rand(16, 16, generator=gen)
    local_tokens = [3, 1, 2, 2][:dp_size] if gathered else [3, 1, 2, 2]
    inputs = SimpleNamespace(
        dp_size=dp_size, gathered=gathered, num_physical=20 if eplb else 16, sim=(sim + sim.T) / 2,
        local_tokens=local_tokens, logits=[torch.randn(n, 16, generator=gen) for n in local_tokens],
        # a padded last row; not with gathered tokens: vLLM's is_padding then covers only the local rows
        padding=[torch.tensor([False] * (n - 1) + [n > 2 and not gathered]) for n in local_tokens],
        l2p=None, eplb_state=None,
    )
    if eplb:  # experts 0-3 have a second replica, physical ids 16-19 (all on rank 3: linear 20 / 4)
        inputs.l2p = torch.tensor([[e, 16 + e] if e < 4 else [e, -1] for e in range(16)])
        inputs.eplb_state = SimpleNamespace(logical_to_physical_map=inputs.l2p,
                                            logical_replica_count=(inputs.l2p >= 0).sum(1))
    return inputs


def _route_on_rank(name: str, rank: int, inputs: SimpleNamespace) -> tuple:
    """One EP rank's hook call: (the hook, the dispatched id rows of the real tokens living on
    this rank, physical under EPLB, by a plain loop)."""
    from vllm.forward_context import override_forward_context

    from sere.config import SereConfig
    from sere.vllm import routing

    runner = _stand_in_runner(name, rank, dp_size=inputs.dp_size, gathered=inputs.gathered,
                              num_physical=inputs.num_physical, eplb_state=inputs.eplb_state)
    hook = routing.RoutingHook(
        _stand_in_router, cfg=SereConfig(policy="sere", num_primary=2), layer=0, layer_name=name,
        num_experts=16, top_k=4, similarity=lambda layer, cfg: (inputs.sim, cfg.threshold),
        scoring_func="softmax", device="cpu",
    )
    chunk = runner.moe_config.moe_parallel_config.dp_rank if inputs.gathered else rank
    sizes = inputs.local_tokens
    context = SimpleNamespace(is_padding=None if inputs.gathered else inputs.padding[chunk],
                              no_compile_layers={name: runner},
                              dp_metadata=SimpleNamespace(get_chunk_sizes_across_dp_rank=lambda: sizes))
    with override_forward_context(context):
        _, ids = hook(None, torch.cat(inputs.logits) if inputs.gathered else inputs.logits[rank])  # [T, 4]
    start = sum(sizes[:chunk]) if inputs.gathered else 0
    rows = []
    for t in range(start, start + sizes[chunk]):
        if inputs.padding[chunk][t - start]:
            continue
        row = ids[t].tolist()
        if inputs.l2p is not None:  # vLLM's replica choice by the row index t of the call
            row = [inputs.l2p[e][((t * 2654435769) % 2**32) % int((inputs.l2p[e] >= 0).sum())].item() for e in row]
        rows.append(row)
    return hook, rows


@pytest.mark.parametrize("case", TRAFFIC_CASES)
def test_live_traffic_counters_match_a_loop_over_the_dispatched_ids(case, monkeypatch):
    """EP 4 on 2 nodes (SERE_RANKS_PER_NODE=2), 16 logical experts, policy sere: each rank's
    hook counts the tokens living on it, for the ids it dispatches, as a per-token loop does."""
    from sere.vllm import metrics, routing, traffic

    monkeypatch.setenv(traffic.ENV_RANKS_PER_NODE, "2")
    inputs = _case_inputs(case)
    owner = [e // (inputs.num_physical // 4) for e in range(inputs.num_physical)]
    counted, names = [], [f"traffic.{case}.layers.0.rank{rank}" for rank in range(4)]
    try:
        for rank, name in enumerate(names):
            hook, rows = _route_on_rank(name, rank, inputs)
            got = dict(zip(metrics.TRAFFIC_FIELDS, hook.traffic.tolist()))
            replica = inputs.gathered and rank % (4 // inputs.dp_size) != 0
            want = dict.fromkeys(metrics.TRAFFIC_FIELDS, 0) if replica else loop_traffic(rows, rank, owner,
                                                                                          [0, 0, 1, 1], 64)
            assert got == want, f"{case}, rank {rank}"
            counted.append(got)
    finally:
        for name in names:
            routing.LAYERS.pop(name, None), metrics.LAYERS.pop(name, None), traffic._LAYERS.pop(name, None)
    total = {name: sum(got[name] for got in counted) for name in metrics.TRAFFIC_FIELDS}
    assert total["ep_tokens"] == sum(int((~p).sum()) for p in inputs.padding)  # each real token once in the group
    assert total["ep_merged_slots"] > 0 and total["ep_cross_node_token_node_pairs"] > 0  # not a vacuous case
    assert total["ep_cross_node_token_rank_pairs"] < total["ep_remote_token_rank_pairs"]  # same-node ranks seen


def test_traffic_counters_reach_the_stats_rpc_prometheus_and_the_exporter(tmp_path):
    from prometheus_client import REGISTRY

    from sere.vllm import exporter, metrics

    stats = metrics.layer_stats("traffic.export.layers.7", 7, "sere", "cpu")
    labels = {"layer": "7", "policy": "sere", "rank": "0"}
    name = "sere_ep_cross_node_token_node_bytes_total"
    before = REGISTRY.get_sample_value(name, labels) or 0
    try:
        stats.traffic += torch.arange(1, len(metrics.TRAFFIC_FIELDS) + 1)  # as sere::route_layer adds
        entry = next(e for e in metrics.snapshot()["layers"] if e["layer_name"] == "traffic.export.layers.7")
        assert [entry[f] for f in metrics.TRAFFIC_FIELDS] == list(range(1, len(metrics.TRAFFIC_FIELDS) + 1))
        assert REGISTRY.get_sample_value(name, labels) - before == len(metrics.TRAFFIC_FIELDS)  # the last field
        exporter._write_snapshot(tmp_path, "0")
        for path in tmp_path.glob("sere-*.json"):  # as another process's file
            path.rename(tmp_path / "sere-1.json")
        samples = {(s.name, s.labels["layer"]): s.value
                   for family in exporter.SnapshotCollector(tmp_path).collect() for s in family.samples}
        assert samples[("sere_ep_tokens_total", "7")] == 1 and samples[(name, "7")] == len(metrics.TRAFFIC_FIELDS)
    finally:
        metrics.LAYERS.pop("traffic.export.layers.7", None)


def test_ranks_per_node_must_divide_the_ep_size(monkeypatch):
    from sere.vllm import traffic

    monkeypatch.setenv(traffic.ENV_RANKS_PER_NODE, "3")
    with pytest.raises(ValueError, match="SERE_RANKS_PER_NODE=3 must be >= 1 and divide the EP size 4"):
        traffic.rank_to_node(4)
    monkeypatch.setenv(traffic.ENV_RANKS_PER_NODE, "two")
    with pytest.raises(ValueError, match="SERE_RANKS_PER_NODE='two' is not an integer"):
        traffic.rank_to_node(4)
    monkeypatch.delenv(traffic.ENV_RANKS_PER_NODE)
    assert traffic.rank_to_node(4).tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------- merged slots in vLLM's CPU EP path


def test_merged_slots_keep_the_cpu_expert_output_and_weight_fewer_rows():
    """A token naming one expert twice (as SERE's re-routing makes it): with merged slots the EP
    halves still sum to vLLM's kernel on the ids as routed (the repeat computed twice), and fewer
    (token, expert) rows carry weight: one per distinct owned expert of a token (a plain loop)."""
    from sere.vllm import ep as vllm_ep

    gen = torch.Generator().manual_seed(1)
    num_experts, tokens, top_k = 8, 6, 4
    topk_ids = torch.tensor([[0, 5, 0, 0], [1, 2, 3, 4], [6, 6, 7, 1], [2, 5, 5, 2], [3, 3, 3, 3], [4, 0, 7, 4]],
                            dtype=torch.int32)  # [T, K], repeats as re-routing makes them
    topk_weights = torch.rand(tokens, top_k, generator=gen) + 0.1  # [T, K] float32, no zero
    run = cpu_expert_kernel(1, tokens, topk_ids, topk_weights, num_experts)

    full = run(slice(None), None)  # no expert map: vLLM's own call, each slot computed
    maps = []
    for rank in range(2):
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[rank * 4 : rank * 4 + 4] = torch.arange(4, dtype=torch.int32)
        maps.append(expert_map)
    old = vllm_ep.set_merge_slots(True)
    try:
        for merge in (True, False):
            vllm_ep.set_merge_slots(merge)
            summed = sum(run(slice(r * 4, r * 4 + 4), maps[r]) for r in range(2))
            torch.testing.assert_close(summed, full, atol=2e-2, rtol=2e-2)
    finally:
        vllm_ep.set_merge_slots(old)
    rows = {True: 0, False: 0}
    for rank in range(2):
        for merge in (True, False):
            ids, weights = vllm_ep.local_slots(topk_ids, topk_weights, maps[rank], merge)
            rows[merge] += int((weights != 0).sum())
            assert ids.min() >= 0 and ids.max() < 4  # every id indexes the rank's own weights
    owner = [e // 4 for e in range(num_experts)]
    distinct = sum(len({e for e in row if owner[e] == r}) for row in topk_ids.tolist() for r in range(2))
    assert rows[True] == distinct == 15 and rows[False] == tokens * top_k == 24  # 2+4+3+2+1+3 distinct
