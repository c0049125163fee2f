"""Expert parallelism with the SERE vLLM plugin (sere/vllm/ep.py) on the CPU backend.

Fast: the gloo `all_gatherv` / `reduce_scatterv` added to vLLM's CpuCommunicator (two real
processes), and the expert-map translation for the CPU expert kernel (`cpu_fused_moe`: the sum
of two EP halves equals the full layer). Slow (real engines on models/tiny-moe):
TP=2 + enable_expert_parallel and DP=2 + enable_expert_parallel give the same greedy tokens as
one process under policy `topk`, and under `sere` every rank re-routes against the same,
EP-wide primary set (the OR of the ranks' own sets). In the DP=2 test (two simulated nodes, one
rank each) the live traffic counters of every layer equal a per-token loop over the recorded
dispatched ids, and merged slots change no output (every expert-kernel call of the run also
computed unmerged on the same inputs: the same output, more weighted rows).

Run directly (`python tests/test_vllm_ep.py dp-rank ...`) this file is one DP rank of the
DP=2 test: vLLM's offline data parallelism needs one process per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_vllm_traffic import loop_traffic  # noqa: E402 (the per-token loop oracle of the live counters)
from vllm_common import PROMPTS, cpu_expert_kernel, model_dir  # noqa: E402, F401 (a fixture)

MAX_TOKENS = 12
ENGINE_KW = dict(  # vLLM's default mode: compiled (the expert-map fix and the routing op are traced)
    gpu_memory_utilization=0.3,
    max_model_len=512,
    max_num_seqs=8,
    seed=0,
    enable_prefix_caching=False,  # policies are switched inside one engine
)
SERE = {"sere": {"policy": "sere", "num_primary": 2}}
E = 64


def _generate(llm, prompts) -> list[list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def _policy_tokens(llm, prompts, policy: str) -> list[list[int]]:
    llm.collective_rpc("sere_configure", kwargs={"policy": policy})
    llm.collective_rpc("sere_reset_stats")
    return _generate(llm, prompts)


def _local_primary(record) -> torch.Tensor:
    """This rank's own P from a record: top-2 by weight of its real (non-padding) tokens."""
    order = torch.argsort(record["router_topk_weights"], dim=1, descending=True, stable=True)
    head = record["router_topk_ids"].gather(1, order)[:, :2]  # [T, 2]
    if record["padding"] is not None:
        head = head[~record["padding"]]
    mask = torch.zeros(E, dtype=torch.bool)
    mask[head.reshape(-1).long()] = True
    return mask


# ---------------------------------------------------------------- fast: gloo collectives


class _FakeCommunicator:
    """The attributes of vLLM's CpuCommunicator that the patched methods use."""

    def __init__(self, rank: int, world_size: int):
        import torch.distributed as dist

        self.rank_in_group, self.world_size, self.device_group = rank, world_size, dist.group.WORLD

    def all_gather(self, tensor, dim=0):
        import torch.distributed as dist

        out = tensor.new_empty((self.world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.device_group)
        return out

    def reduce_scatter(self, tensor, dim=0):
        chunks = list(self.all_gather(tensor).chunk(self.world_size))
        return sum(chunk.chunk(self.world_size)[self.rank_in_group] for chunk in chunks)


def _collectives_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from sere.vllm import ep as vllm_ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    comm = _FakeCommunicator(rank, world_size)
    sizes = [3, 5]
    mine = torch.arange(sizes[rank] * 4, dtype=torch.float32).reshape(sizes[rank], 4) + 100 * rank  # [n_r, 4]
    ids = torch.full((sizes[rank], 2), rank, dtype=torch.int32)
    gathered, gathered_ids = vllm_ep.all_gatherv(comm, [mine, ids], dim=0, sizes=sizes)
    full = torch.arange(8 * 4, dtype=torch.bfloat16).reshape(8, 4) * (rank + 1)  # [sum sizes, 4]
    scattered = vllm_ep.reduce_scatterv(comm, full, dim=0, sizes=sizes)
    torch.save({"gathered": gathered, "ids": gathered_ids, "scattered": scattered}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_cpu_all_gatherv_and_reduce_scatterv_over_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_rank, args=(2, 29731, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) + 100 * r for r, n in enumerate([3, 5])]
    full = torch.arange(8 * 4, dtype=torch.bfloat16).reshape(8, 4) * 3  # rank 0 (x1) + rank 1 (x2)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(out["gathered"], torch.cat(parts))
        assert out["ids"].tolist() == [[0, 0]] * 3 + [[1, 1]] * 5
        assert torch.equal(out["scattered"], full[:3] if rank == 0 else full[3:])


# ---------------------------------------------------------------- fast: expert map for the CPU kernel


def test_cpu_experts_honour_the_expert_map():
    gen = torch.Generator().manual_seed(0)
    num_experts, tokens, top_k = 8, 5, 4
    topk_ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).int()
    topk_weights = torch.rand(tokens, top_k, generator=gen)  # [T, K] float32
    run = cpu_expert_kernel(0, tokens, topk_ids, topk_weights, num_experts)

    full = run(slice(None), None)
    halves = []
    for rank in range(2):
        owned = slice(rank * 4, rank * 4 + 4)
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[owned] = torch.arange(4, dtype=torch.int32)
        halves.append(run(owned, expert_map))
    torch.testing.assert_close(halves[0] + halves[1], full, atol=2e-2, rtol=2e-2)
    assert halves[0].abs().sum() > 0 and halves[1].abs().sum() > 0


# ---------------------------------------------------------------- slow: real engines


@pytest.fixture(scope="module")
def reference_tokens(model_dir) -> dict[str, list[list[int]]]:
    """Greedy tokens of one process (TP=1) under topk and sere."""
    from vllm import LLM

    llm = LLM(model=str(model_dir), hf_overrides=SERE, **ENGINE_KW)
    try:
        return {policy: _policy_tokens(llm, PROMPTS, policy) for policy in ("topk", "sere")}
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture()
def two_cpu_workers(monkeypatch):
    # vLLM's automatic binding wants one NUMA node per worker; give each worker one core.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("SERE_TEST_CPU_BIND", "0|1"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))


@pytest.mark.slow
def test_tp2_expert_parallel_matches_one_process(model_dir, reference_tokens, two_cpu_workers, monkeypatch, tmp_path):
    from vllm import LLM

    monkeypatch.setenv("SERE_RECORD", "1")
    monkeypatch.setenv("SERE_EP_ALLREDUCE", "1")  # TP ranks share tokens: force the collective anyway
    llm = LLM(model=str(model_dir), hf_overrides=SERE, tensor_parallel_size=2, enable_expert_parallel=True,
              **ENGINE_KW)
    try:
        assert _policy_tokens(llm, PROMPTS, "topk") == reference_tokens["topk"]
        sere_tokens = _policy_tokens(llm, PROMPTS, "sere")
        paths = llm.collective_rpc("sere_dump_records", args=(str(tmp_path / "tp"),))
        stats = llm.collective_rpc("sere_stats")
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert all(len(t) == MAX_TOKENS for t in sere_tokens)
    rank0, rank1 = (torch.load(p) for p in paths)
    sere_records = [(a, b) for a, b in zip(rank0, rank1) if a["policy"] == "sere"]
    assert len(sere_records) >= 4 * MAX_TOKENS
    for a, b in sere_records:
        assert torch.equal(a["primary"], a["local_primary"] | b["local_primary"])
        assert torch.equal(a["primary"], b["primary"]) and torch.equal(a["topk_ids"], b["topk_ids"])
    assert {s["rank"] for s in stats} == {"0", "1"}
    assert all(e["rerouted_slots"] > 0 for s in stats for e in s["layers"] if e["policy"] == "sere")


def _records_and_stats(worker, path: str) -> dict:
    """On a worker, in one RPC (no forward pass in between): its routing records (saved to
    `path`) and its counters (`sere_stats`)."""
    from sere.vllm import metrics, routing

    with routing._records_lock:
        records = list(routing._records)
    torch.save(records, path)
    return metrics.snapshot()


_APPLY_ARGS = ("output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation", "global_num_experts",
               "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2", "expert_tokens_meta",
               "apply_router_weight_on_input")  # vLLM 0.32's CPUUnquantizedExperts.apply


def _check_merging_on_every_call(worker) -> None:
    """On a worker: every EP call of the (sere-patched) CPU expert kernel also runs with merged
    slots off on the same inputs; keeps (max |merged - unmerged|, max |merged|, weighted rows
    merged, weighted rows unmerged) per call in `_merge_checks`."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    from sere.vllm import ep as vllm_ep

    patched, checks = CPUUnquantizedExperts.apply, []
    vllm_ep._merge_checks = checks

    def apply(self, *args, **kwargs):
        kwargs = {**dict(zip(_APPLY_ARGS, args)), **kwargs}
        expert_map = kwargs["expert_map"]
        if expert_map is None:
            return patched(self, **kwargs)
        unmerged = torch.zeros_like(kwargs["output"])  # the kernel overwrites its output
        old = vllm_ep.set_merge_slots(False)
        patched(self, **{**kwargs, "output": unmerged})
        vllm_ep.set_merge_slots(old)
        patched(self, **kwargs)
        ids, weights = kwargs["topk_ids"], kwargs["topk_weights"]
        rows = [int((vllm_ep.local_slots(ids, weights, expert_map, merge)[1] != 0).sum()) for merge in (True, False)]
        merged = kwargs["output"].float()
        checks.append(((merged - unmerged.float()).abs().max().item(), merged.abs().max().item(), *rows))

    CPUUnquantizedExperts.apply = apply


def _merge_checks(worker) -> list:
    from sere.vllm import ep as vllm_ep

    return list(vllm_ep._merge_checks)


def _dp_rank_main(rank: int, size: int, port: int, model: str, out: str) -> None:
    """One rank of the DP=2 + EP test (a process of its own, as vLLM's offline DP requires).

    Two simulated nodes (SERE_RANKS_PER_NODE=1). Callables go to the workers by collective_rpc
    (VLLM_ALLOW_INSECURE_SERIALIZATION, test only)."""
    os.environ.update(VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL=str(rank), VLLM_DP_SIZE=str(size),
                      VLLM_DP_MASTER_IP="127.0.0.1", VLLM_DP_MASTER_PORT=str(port), SERE_RECORD="1",
                      SERE_RANKS_PER_NODE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    from vllm import LLM

    llm = LLM(model=model, hf_overrides=SERE, enable_expert_parallel=True, **ENGINE_KW)
    prompts = PROMPTS[rank::size]
    result = {"topk": _policy_tokens(llm, prompts, "topk")}
    _barrier(out, "topk", rank, size)
    llm.collective_rpc("sere_configure", kwargs={"policy": "sere"})
    llm.collective_rpc("sere_reset_stats")
    llm.collective_rpc(_check_merging_on_every_call)
    _barrier(out, "ready", rank, size)
    result["sere"] = _generate(llm, prompts)  # merged slots (the default)
    result["records"] = f"{out}/dp{rank}.records.pt"
    [result["stats"]] = llm.collective_rpc(_records_and_stats, args=(result["records"],))
    [result["merge_checks"]] = llm.collective_rpc(_merge_checks)
    _barrier(out, "sere", rank, size)
    Path(f"{out}/dp{rank}.json").write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()


def _barrier(out: str, name: str, rank: int, size: int, timeout: float = 300) -> None:
    Path(f"{out}/{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(f"{out}/{name}.{r}").exists() for r in range(size)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"DP barrier {name}")
        time.sleep(0.2)


@pytest.mark.slow
def test_dp2_expert_parallel_matches_one_process_with_a_global_primary_set(
    model_dir, reference_tokens, two_cpu_workers, tmp_path
):
    port = 29000 + os.getpid() % 500
    procs = [
        subprocess.Popen([sys.executable, __file__, "dp-rank", str(rank), "2", str(port), str(model_dir), str(tmp_path)],
                         env=os.environ.copy())
        for rank in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=600) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = [json.loads((tmp_path / f"dp{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["topk"] == reference_tokens["topk"][rank::2]
        assert all(len(t) == MAX_TOKENS for t in result["sere"])
    rank0, rank1 = (torch.load(r["records"]) for r in results)
    # the ranks run every forward pass in lock step: pair their records by (layer, call)
    by_call = {(b["layer"], b["call"]): b for b in rank1 if b["policy"] == "sere"}
    pairs = [(a, by_call[a["layer"], a["call"]]) for a in rank0 if (a["layer"], a["call"]) in by_call]
    assert len(pairs) >= 4 * MAX_TOKENS
    differ = 0
    for a, b in pairs:
        assert a["layer"] == b["layer"]
        assert torch.equal(a["local_primary"], _local_primary(a))
        assert torch.equal(a["primary"], a["local_primary"] | b["local_primary"])
        assert torch.equal(a["primary"], b["primary"])
        differ += int(not torch.equal(a["local_primary"], b["local_primary"]))
    assert differ > 0, "the ranks routed the same tokens: the EP-wide primary set was not exercised"
    _check_live_traffic_counters(results, model_dir)
    _check_merged_slots_change_no_output(results)


def _check_merged_slots_change_no_output(results) -> None:
    """On every EP expert-kernel call of the sere run (real inputs), merged and unmerged slots
    give the same output to bf16 rounding, and merging left fewer weighted rows overall."""
    for rank, result in enumerate(results):
        checks = result["merge_checks"]
        assert len(checks) >= 4 * MAX_TOKENS, f"rank {rank}: the kernel check did not run"
        worst = max(diff / max(scale, 1e-6) for diff, scale, _, _ in checks)
        print(f"rank {rank}: {len(checks)} kernel calls, max |merged - unmerged| / max |out| = {worst:.2e}")
        assert worst <= 1e-2
        assert all(merged <= unmerged for _, _, merged, unmerged in checks)
        assert sum(merged for _, _, merged, _ in checks) < sum(unmerged for _, _, _, unmerged in checks)


def _check_live_traffic_counters(results, model_dir) -> None:
    """The live counters of each rank (per layer) equal a per-token loop over its recorded
    dispatched ids: vLLM's linear placement (rank r owns experts [32 r, 32 r + 32)), one rank per
    node, rows of hidden_size bf16 values."""
    from sere.vllm.metrics import TRAFFIC_FIELDS

    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_experts"] == E and config["dtype"] == "bfloat16"
    row_bytes = config["hidden_size"] * 2
    owner, node = [e // (E // 2) for e in range(E)], [0, 1]
    totals = dict.fromkeys(TRAFFIC_FIELDS, 0)
    for rank, result in enumerate(results):
        want: dict[int, dict] = {}
        for rec in torch.load(result["records"]):
            num_tokens = rec["topk_ids"].shape[0]
            assert rec["policy"] == "sere" and rec["ep_rows"] == (0, num_tokens, rank)  # routed where they live
            pad = rec["padding"]
            rows = [rec["topk_ids"][t].tolist() for t in range(num_tokens) if pad is None or not pad[t]]
            counts = loop_traffic(rows, rank, owner, node, row_bytes)
            layer = want.setdefault(rec["layer"], dict.fromkeys(TRAFFIC_FIELDS, 0))
            for name in TRAFFIC_FIELDS:
                layer[name] += counts[name]
        got = {e["layer"]: {name: e[name] for name in TRAFFIC_FIELDS}
               for e in result["stats"]["layers"] if e["policy"] == "sere"}
        assert got == want, f"rank {rank}"
        for counts in got.values():
            for name in TRAFFIC_FIELDS:
                totals[name] += counts[name]
    assert totals["ep_merged_slots"] > 0  # SERE made repeats, and they were merged
    assert 0 < totals["ep_cross_node_token_node_bytes"] <= totals["ep_tokens"] * row_bytes  # 2 nodes: <= 1 each


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "dp-rank":
    _dp_rank_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
