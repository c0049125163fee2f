"""Expert-parallel dispatch over gloo with 2 and 4 processes.

One process group per world size runs every case (spawning is the slow part here): the EP output
must equal the single-process MoE with the same routing, the dispatch counts must equal the
brute-force accounting, and every invalid input must raise EPError on every rank without a hang.
"""

import pytest
import torch

import sere
from sere.ep import (
    EPError,
    RoutingPolicy,
    SwiGLUExperts,
    agree_placement,
    apply_policy,
    brute_force_traffic,
    ep_moe_forward,
    make_placement,
    moe_reference,
    random_expert_weights,
)
from benchmarks.harness.launch import RankFailure, run_group

E, H, I, K, S = 16, 24, 8, 4, 1
LABELS = ("topk", "sere", "sere+locality", "oea")


def _tokens_on(rank, world):
    return 0 if (world == 4 and rank == 3) else 5 + 3 * rank  # uneven, one empty rank at W = 4


def _inputs(world, seed, dtype=torch.float32):
    """Every rank's tokens, made identically on every rank: lists of [T_r, ...] tensors."""
    gen = torch.Generator().manual_seed(seed)
    xs, ids, ws, scores = [], [], [], []
    for rank in range(world):
        num_tokens = _tokens_on(rank, world)
        xs.append(torch.randn(num_tokens, H, generator=gen).to(dtype))
        probs = torch.randn(num_tokens, E, generator=gen).softmax(-1)  # [T, E]
        w, i = probs.topk(K, dim=-1)
        scores.append(probs)
        ids.append(i)
        ws.append(w / w.sum(-1, keepdim=True))
    sim = torch.rand(E, E, generator=gen)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return xs, ids, ws, scores, sim


def _expected(policy, placement, ids, ws, scores, sim, rank):
    """Single-process routing of `rank`'s tokens with the primary set of the whole group."""
    primary = torch.zeros(E, dtype=torch.bool)
    for i in ids:
        primary |= sere.primary_mask(i, E, S)
    return apply_policy(policy, ids[rank], ws[rank], placement, primary, sim, scores[rank])


def _expect_error(fn):
    try:
        fn()
    except EPError as exc:
        return ("EPError", str(exc))
    except Exception as exc:  # a wrong exception type is a test failure, reported to the parent
        return (type(exc).__name__, str(exc))
    return ("ok", "")


def _suite(rank, world):
    kind = "linear" if world == 2 else "round_robin"
    gu, dn = random_expert_weights(E, H, I, seed=7)
    placement = agree_placement(kind, E, ranks_per_node=world // 2)
    experts = SwiGLUExperts.from_global(gu, dn, placement, rank)
    out = {"steps": {}, "errors": {}}
    for label in LABELS:
        xs, ids, ws, scores, sim = _inputs(world, seed=11)
        policy = RoutingPolicy.from_label(label, num_primary=S, epsilon=0.1)
        y, info = ep_moe_forward(xs[rank], ids[rank], ws[rank], experts, placement, policy, sim, scores[rank])
        exp_ids, exp_w = _expected(policy, placement, ids, ws, scores, sim, rank)
        ref = moe_reference(xs[rank], exp_ids, exp_w, gu, dn)
        out["steps"][label] = {
            "max_err": float((y - ref).abs().max()) if y.numel() else 0.0,
            "ids_equal": bool(torch.equal(info.topk_ids, exp_ids)),
            "ids_changed": bool((info.topk_ids != ids[rank]).any()),
            "ids": info.topk_ids.tolist(),
            "send_rows": info.send_rows.tolist(),
            "recv_rows": info.recv_rows.tolist(),
            "computed": info.local_experts_computed,
        }
    xs, ids, ws, scores, sim = _inputs(world, seed=5, dtype=torch.bfloat16)
    y, _ = ep_moe_forward(xs[rank], ids[rank], ws[rank], experts, placement, RoutingPolicy("sere", S), sim)
    exp_ids, exp_w = _expected(RoutingPolicy("sere", S), placement, ids, ws, scores, sim, rank)
    ref = moe_reference(xs[rank].float(), exp_ids, exp_w, gu, dn)
    out["bf16_err"] = float((y.float() - ref).abs().max()) if y.numel() else 0.0

    xs, ids, ws, scores, sim = _inputs(world, seed=3)
    last = world - 2  # a rank with tokens
    bad_table = placement.rank_experts.tolist()
    if rank == 1:
        bad_table[1][0] = bad_table[0][0]  # expert owned twice, another one missing
    sere_policy = RoutingPolicy("sere", S)

    def step(x=None, i=None, w=None, sim_=sim, policy=sere_policy):
        x = xs[rank] if x is None else x
        i = ids[rank] if i is None else i
        w = ws[rank] if w is None else w
        return ep_moe_forward(x, i, w, experts, placement, policy, sim_)

    errors = out["errors"]
    errors["placement"] = _expect_error(lambda: agree_placement(bad_table, E))
    errors["indivisible"] = _expect_error(lambda: agree_placement("linear", 7))
    wide = torch.randn(xs[rank].shape[0], H + 1)
    errors["hidden"] = _expect_error(lambda: step(x=wide if rank == last else None))
    out_of_range = ids[rank].clone()
    out_of_range[:, -1] = E
    errors["ids_range"] = _expect_error(lambda: step(i=out_of_range if rank == 0 else None))
    errors["no_similarity"] = _expect_error(lambda: step(sim_=None if rank == 1 else sim))
    errors["top_k"] = _expect_error(
        lambda: step(i=ids[rank][:, :3] if rank == 0 else None, w=ws[rank][:, :3] if rank == 0 else None)
    )
    errors["num_primary"] = _expect_error(lambda: step(policy=RoutingPolicy("sere", K)))
    y, _ = step()  # the group still works after every rejected step
    out["after_errors_finite"] = bool(torch.isfinite(y).all())
    total = sum(_tokens_on(r, world) for r in range(world))
    _, info = step(policy=RoutingPolicy("sere", S, max_tokens=total - 1))  # a prefill-sized step
    out["skipped_above_max_tokens"] = bool(torch.equal(info.topk_ids, ids[rank]))
    _, info = step(policy=RoutingPolicy("sere", S, max_tokens=total))
    out["rerouted_at_max_tokens"] = bool(torch.equal(info.topk_ids, _expected(sere_policy, placement, ids, ws, scores, sim, rank)[0]))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def group_results(request):
    world = request.param
    results = run_group(_suite, world, timeout_s=150)
    for r in results:
        if isinstance(r, RankFailure):
            pytest.fail(f"a rank failed: {r.kind}: {r.message}\n{r.trace}")
    return world, results


@pytest.mark.parametrize("label", LABELS)
def test_output_equals_single_process_moe(group_results, label):
    world, results = group_results
    for rank, res in enumerate(results):
        step = res["steps"][label]
        assert step["ids_equal"], (rank, label)
        assert step["max_err"] < 1e-5, (rank, label, step["max_err"])
    if label != "topk":
        assert any(res["steps"][label]["ids_changed"] for res in results)


def test_max_tokens_skips_rerouting_on_every_rank(group_results):
    _, results = group_results
    assert all(res["skipped_above_max_tokens"] and res["rerouted_at_max_tokens"] for res in results)


def test_bf16_rows(group_results):
    _, results = group_results
    assert max(res["bf16_err"] for res in results) < 3e-2


@pytest.mark.parametrize("label", LABELS)
def test_dispatch_counts_equal_brute_force(group_results, label):
    world, results = group_results
    placement = make_placement("linear" if world == 2 else "round_robin", E, world, world // 2)
    all_ids, src = [], []
    for rank, res in enumerate(results):
        all_ids += res["steps"][label]["ids"]
        src += [rank] * len(res["steps"][label]["ids"])
    count = brute_force_traffic(all_ids, src, placement, row_bytes=1)
    for rank, res in enumerate(results):
        step = res["steps"][label]
        assert step["send_rows"] == count["rows"][rank]
        assert step["recv_rows"] == [count["rows"][src_rank][rank] for src_rank in range(world)]
        assert step["computed"] == count["distinct_per_rank"][rank]


@pytest.mark.parametrize(
    "case,needle",
    [
        ("placement", "exactly once"),
        ("indivisible", "does not divide"),
        ("hidden", "hidden differs"),
        ("ids_range", "outside [0, 16)"),
        ("no_similarity", "needs similarity"),
        ("top_k", "top_k differs"),
        ("num_primary", "num_primary=4"),
    ],
)
def test_invalid_input_raises_on_every_rank(group_results, case, needle):
    _, results = group_results
    for rank, res in enumerate(results):
        kind, message = res["errors"][case]
        assert kind == "EPError", (rank, kind, message)
        assert needle in message, (rank, message)
    assert all(res["after_errors_finite"] for res in results)
