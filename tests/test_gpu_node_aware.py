"""The CUDA re-routing ops with node-aware routing (`allowed`, docs/spec.md §21) against the
plain per-token loop oracle of tests/test_node_aware_op.py (written from §21 with tests/oracle.py's
helpers, never `sere`; the CPU op's tests use it too), and inside a captured CUDA graph.

`allowed[t, e]`: token t may use expert e; its primary set is P_t = P & allowed[t]. sere: a
secondary outside P_t goes to its most similar member of P_t, kept as critical only when it is
allowed itself; oea: fills from P_t; sere-err: substitutes from P_t, a critical candidate must be
allowed, the budget counts the global |P|, the refill draws from (P | kept critical) & allowed[t].
Every call also checks that an all-True mask gives exactly the result of allowed=None.

Marker `gpu`: skipped where no CUDA device is visible (tests/conftest.py). Small sweeps (the GPU
check's budget is tight). Shapes: T tokens, K top-k slots, E experts, S num_primary.
"""

from __future__ import annotations

import math
import random

import oracle
import pytest
import torch
from test_gpu_route_capture import capture
from test_node_aware_op import loop_oea, loop_sere, loop_sere_err, loop_stats
from test_reroute_err_op import compare

import sere.ops

pytestmark = pytest.mark.gpu

K = 8
TOKEN_COUNTS = (1, 5, 64, 300)
EXPERT_COUNTS = (64, 128)
MULTI_BLOCK_TOKENS = 1100  # T * K > kSingleBlockMaxSlots (8192): sere::reroute's two-launch path
DTYPES = [(ids, w) for w in (torch.float32, torch.bfloat16) for ids in (torch.int32, torch.int64)]


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    kernels = {"reroute": sere.ops._COMPILED_DEVICE_TYPES, "reroute_err": sere.ops._COMPILED_ERR_DEVICE_TYPES,
               "oea": sere.ops._COMPILED_OEA_DEVICE_TYPES}
    for name, types in kernels.items():
        assert "cuda" in types, f"sere._C has no CUDA kernel for sere::{name}: rebuild ({sere.ops.BUILD_COMMAND})"


# ------------------------------------------------------------------------------ the oracle


def expected(case: str, py: dict, num_primary: int, option) -> tuple:
    """The loop oracle's outputs of the op of `case` (tests/test_node_aware_op.py's loops, shared
    with the CPU op's tests): sere ([T][K] ids, [5] stats); oea and sere-err (ids, weights, [6]
    stats). `option`: sere's threshold, or sere-err's knobs (err_knobs)."""
    ids, P, allowed = py["ids"], py["primaries"], py["allowed"]
    if case.startswith("sere-err"):
        tolerance, keep_cost, max_distinct, renormalize, refill = option
        new_ids, new_w, critical, dropped = loop_sere_err(
            ids, py["weights"], py["error"], num_primary, P, allowed, tolerance, keep_cost, max_distinct, renormalize,
            py["scores"] if refill else None)
    elif case == "oea":
        new_ids, new_w, critical, dropped = loop_oea(ids, py["weights"], py["scores"], num_primary, P, allowed)
    else:
        new_ids, critical = loop_sere(ids, py["similarity"], num_primary, option, P, allowed)
        return new_ids, loop_stats(ids, new_ids, P, critical, 0)[:5]
    return new_ids, new_w, loop_stats(ids, new_ids, P, critical, dropped)


# ------------------------------------------------------------------------------------- inputs


def make_inputs(seed: int, num_tokens: int, num_experts: int, num_primary: int, dtype, with_nan: bool) -> dict:
    """Router outputs (popular experts, so tokens share some), an [E] primary mask or None, an
    allowed mask with all-False and all-True rows, and both [E, E] matrices, on CPU."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + 1.5 * torch.randn(num_experts, generator=gen)
    scores = logits.softmax(-1)  # [T, E]
    weights, ids = scores.topk(K, dim=-1)  # [T, K]
    weights = weights / weights.sum(-1, keepdim=True)
    primary = None
    if seed % 3 == 0:  # an external mask (an EP group's): the own heads plus other experts
        primary = torch.rand(num_experts, generator=gen) < 0.2
        primary[ids[:, :num_primary].reshape(-1)] = True
    allowed = torch.rand(num_tokens, num_experts, generator=gen) < (0.3 if seed % 2 else 0.7)  # [T, E]
    row_kind = torch.rand(num_tokens, generator=gen)
    allowed[row_kind < 0.1] = False
    allowed[row_kind > 0.9] = True
    similarity = torch.rand(num_experts, num_experts, generator=gen).fill_diagonal_(1.0)
    error = (torch.rand(num_experts, num_experts, generator=gen) * 1.2).fill_diagonal_(0.0)
    if with_nan:
        for matrix in (similarity, error):
            matrix[torch.rand(num_experts, num_experts, generator=gen) < 0.02] = math.nan
    return dict(ids=ids, weights=weights.to(dtype), scores=scores.to(dtype), primary=primary, allowed=allowed,
                similarity=similarity.to(dtype), error=error.to(dtype), num_primary=num_primary)


def plain(inputs: dict) -> dict:
    """The inputs as Python lists for the oracles, P as a set."""
    ids = inputs["ids"].tolist()
    primary = inputs["primary"]
    primaries = oracle.primary_set(ids, inputs["num_primary"], primary)
    rows = {name: oracle.as_rows(inputs[name]) for name in ("weights", "scores", "similarity", "error")}
    return dict(ids=ids, allowed=inputs["allowed"].tolist(), primaries=primaries, **rows)


def on_gpu(inputs: dict, id_dtype) -> dict:
    """The inputs on the GPU, topk_ids as `id_dtype`."""
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    moved["ids"] = moved["ids"].to(id_dtype)
    return moved


# ------------------------------------------------------------------------------ the ops' calls


def run_sere(x: dict, threshold: float, allowed):
    return torch.ops.sere.reroute(x["ids"], x["similarity"], x["num_primary"], threshold, x["primary"], allowed=allowed)


def run_oea(x: dict, allowed):
    return torch.ops.sere.oea(x["ids"], x["weights"], x["scores"], x["num_primary"], x["primary"], allowed=allowed)


def run_err(x: dict, knobs, allowed):
    tolerance, keep_cost, max_distinct, renormalize, refill = knobs
    return torch.ops.sere.reroute_err(
        x["ids"], x["weights"], x["error"], x["num_primary"], tolerance, keep_cost, max_distinct or 0, renormalize,
        x["primary"], x["scores"] if refill else None, allowed=allowed)


def err_knobs(kind: str, num_primary_experts: int, rng: random.Random):
    """(tolerance, keep_cost, max_distinct, renormalize, refill); the budget leaves room for 0-3
    critical experts beyond the global |P|, so that it excludes some."""
    budget = num_primary_experts + rng.randrange(4)
    return {"plain": (0.5, math.inf, None, False, False),
            "budget": (0.6, 0.02, budget, False, False),
            "refill": (0.4, 0.01, budget, True, True)}[kind]


POLICY_CASES = ["sere", "sere-threshold", "oea", "sere-err-plain", "sere-err-budget", "sere-err-refill"]


def check_case(case: str, inputs: dict, id_dtype, rng: random.Random, name: str) -> None:
    """One call of the op of `case` with `allowed` against the oracle; and with an all-True mask,
    equal to the call without one (allowed=None keeps the plain policy)."""
    x, py = on_gpu(inputs, id_dtype), plain(inputs)
    everyone = torch.ones_like(x["allowed"])
    if case.startswith("sere-err"):
        knobs = err_knobs(case.removeprefix("sere-err-"), len(py["primaries"]), rng)
        compare(f"{name} {knobs}", run_err(x, knobs, x["allowed"]), expected(case, py, x["num_primary"], knobs),
                exact_weights=not (knobs[3] or knobs[4]))
        unmasked = (run_err(x, knobs, everyone), run_err(x, knobs, None))
    elif case == "oea":
        compare(name, run_oea(x, x["allowed"]), expected(case, py, x["num_primary"], None), exact_weights=False)
        unmasked = (run_oea(x, everyone), run_oea(x, None))
    else:
        threshold = 0.6 if case == "sere-threshold" else 0.0
        new_ids, stats = run_sere(x, threshold, x["allowed"])
        want_ids, want_stats = expected(case, py, x["num_primary"], threshold)
        assert new_ids.dtype == id_dtype and new_ids.tolist() == want_ids, name
        assert stats.tolist() == want_stats, f"{name}: {stats.tolist()} != {want_stats}"
        unmasked = (run_sere(x, threshold, everyone), run_sere(x, threshold, None))
    for with_mask, without in zip(*unmasked):
        assert torch.equal(with_mask, without), f"{name}: an all-True mask differs from allowed=None"


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", POLICY_CASES)
def test_node_aware_op_matches_the_loop_oracle(case):
    rng = random.Random(case)
    calls = [(t, e) for t in TOKEN_COUNTS for e in EXPERT_COUNTS]
    if case.startswith("sere") and not case.startswith("sere-err"):
        calls.append((MULTI_BLOCK_TOKENS, 64))
    for n, (num_tokens, num_experts) in enumerate(calls):
        id_dtype, dtype = DTYPES[n % len(DTYPES)]
        num_primary, seed = rng.randint(1, 3), rng.randrange(1 << 30)
        inputs = make_inputs(seed, num_tokens, num_experts, num_primary, dtype, with_nan=n % 3 == 2)
        name = (f"{case} T={num_tokens} E={num_experts} S={num_primary} {id_dtype} {dtype} seed={seed} "
                f"external={inputs['primary'] is not None}")
        check_case(case, inputs, id_dtype, rng, name)


def test_node_aware_ops_in_a_cuda_graph_replay_new_inputs_as_eager():
    """The three ops with `allowed` captured once, replayed on new contents of the same buffers."""
    num_tokens, num_experts, num_primary = 64, 128, 2
    knobs = (0.4, 0.01, 60, True, True)
    static = on_gpu(make_inputs(0, num_tokens, num_experts, num_primary, torch.bfloat16, False), torch.int32)
    static["primary"] = torch.zeros(num_experts, dtype=torch.bool, device="cuda")

    def fill(seed):
        new = make_inputs(seed, num_tokens, num_experts, num_primary, torch.bfloat16, with_nan=seed == 2)
        new["primary"] = torch.rand(num_experts, generator=torch.Generator().manual_seed(seed)) < 0.3
        new["primary"][new["ids"][:, :num_primary].reshape(-1)] = True
        for name, buffer in static.items():
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(new[name])

    def step():
        return (*run_sere(static, 0.6, static["allowed"]), *run_oea(static, static["allowed"]),
                *run_err(static, knobs, static["allowed"]))

    fill(0)
    graph, out = capture(step, warmups=1)
    for seed in range(1, 4):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for got, want in zip(out, eager):
            assert torch.equal(got, want), f"replay {seed}: the graph's result differs from an eager call"
        py = plain({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in static.items()})
        compare(f"replay {seed}", out[5:], expected("sere-err", py, num_primary, knobs), exact_weights=False)
