"""Expert-parallel dispatch over gloo with 2 and 4 processes.

One process group per world size runs every case (spawning is the slow part here): the EP output
must equal the single-process MoE with the same routing, the dispatch counts must equal the
brute-force accounting, and every invalid input must raise EPError on every rank without a hang.
"""

import pytest
import torch

from sere import policy as policies
from sere.config import SereConfig
from sere.ep import (
    EPError,
    SwiGLUExperts,
    agree_placement,
    brute_force_traffic,
    ep_moe_forward,
    make_placement,
    moe_reference,
    random_expert_weights,
)
from benchmarks.harness.launch import RankFailure, run_group

E, H, I, K, S = 16, 24, 8, 4, 1
CONFIGS = {
    "topk": SereConfig(policy="topk"),
    "sere": SereConfig(policy="sere", num_primary=S),
    "sere+locality": SereConfig(policy="sere", num_primary=S, locality_epsilon=0.1),
    "oea": SereConfig(policy="oea", num_primary=S),
    "sere-err": SereConfig(policy="sere-err", num_primary=S, tolerance=0.6, renormalize=True),
    "sere-err budget refill": SereConfig(policy="sere-err", num_primary=S, keep_cost=0.0, max_distinct=6,
                                         refill=True, renormalize=True),
    "sere-node": SereConfig(policy="sere", num_primary=S, node_limit="primary_nodes"),
    "oea-node": SereConfig(policy="oea", num_primary=S, node_limit="primary_nodes"),
    "sere-err-node refill": SereConfig(policy="sere-err", num_primary=S, tolerance=0.6, refill=True,
                                       node_limit="primary_nodes", node_scope="rank"),
    "xshare": SereConfig(policy="xshare", num_primary=S, max_distinct=9),
}
LABELS = tuple(CONFIGS)
SERE = CONFIGS["sere"]


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


def _matrix(cfg, sim):
    """The layer matrix `cfg` reads: the similarity, or a substitution error made from it."""
    kind = policies.matrix_kind(cfg)
    return {"similarity": sim, "substitution_error": (1.0 - sim) * 1.5, None: None}[kind]


def _expected(cfg, placement, ids, ws, scores, sim, rank):
    """Single-process routing of `rank`'s tokens with the primary set of the whole group (the union
    of every token's top-S experts, written out here as a loop)."""
    primary = torch.zeros(E, dtype=torch.bool)
    for rank_ids in ids:
        for token in rank_ids.tolist():
            for expert in token[:S]:
                primary[expert] = True
    total = sum(i.shape[0] for i in ids)
    if cfg.policy == "xshare":  # XShare's greedy: the experts of largest mass over ALL the group's tokens
        mass = [sum(float(rank_scores[t, e]) for rank_scores in scores for t in range(rank_scores.shape[0]))
                for e in range(E)]
        for expert in sorted(range(E), key=lambda e: (-mass[e], e)):
            if int(primary.sum()) >= cfg.max_distinct:
                break
            primary[expert] = True
    routed = policies.route(cfg, ids[rank], ws[rank], num_experts=E, matrix=_matrix(cfg, sim),
                            router_scores=scores[rank], primary=primary, placement=placement, step_tokens=total)
    return routed.ids, routed.weights


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
    for label, cfg in CONFIGS.items():
        xs, ids, ws, scores, sim = _inputs(world, seed=11)
        y, info = ep_moe_forward(xs[rank], ids[rank], ws[rank], experts, placement, cfg, _matrix(cfg, sim), scores[rank])
        exp_ids, exp_w = _expected(cfg, placement, ids, ws, scores, sim, rank)
        ref = moe_reference(xs[rank], exp_ids, exp_w, gu, dn)
        out["steps"][label] = {
            "max_err": float((y - ref).abs().max()) if y.numel() else 0.0,
            "ids_equal": bool(torch.equal(info.topk_ids, exp_ids)),
            "weights_equal": bool(torch.allclose(info.topk_weights, exp_w)),
            "ids_changed": bool((info.topk_ids != ids[rank]).any()),
            "ids": info.topk_ids.tolist(),
            "send_rows": info.send_rows.tolist(),
            "recv_rows": info.recv_rows.tolist(),
            "computed": info.local_experts_computed,
        }
    xs, ids, ws, scores, sim = _inputs(world, seed=5, dtype=torch.bfloat16)
    y, _ = ep_moe_forward(xs[rank], ids[rank], ws[rank], experts, placement, SERE, sim)
    exp_ids, exp_w = _expected(SERE, placement, ids, ws, scores, sim, rank)
    ref = moe_reference(xs[rank].float(), exp_ids, exp_w, gu, dn)
    out["bf16_err"] = float((y.float() - ref).abs().max()) if y.numel() else 0.0

    xs, ids, ws, scores, sim = _inputs(world, seed=3)
    last = world - 2  # a rank with tokens
    bad_table = placement.rank_experts.tolist()
    if rank == 1:
        bad_table[1][0] = bad_table[0][0]  # expert owned twice, another one missing
    def step(x=None, i=None, w=None, sim_=sim, cfg=SERE):
        x = xs[rank] if x is None else x
        i = ids[rank] if i is None else i
        w = ws[rank] if w is None else w
        return ep_moe_forward(x, i, w, experts, placement, cfg, sim_)

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
    errors["num_primary"] = _expect_error(lambda: step(cfg=SereConfig(policy="sere", num_primary=K)))
    y, _ = step()  # the group still works after every rejected step
    out["after_errors_finite"] = bool(torch.isfinite(y).all())
    total = sum(_tokens_on(r, world) for r in range(world))
    _, info = step(cfg=SereConfig(policy="sere", num_primary=S, max_decode_tokens=total - 1))  # prefill-sized
    out["skipped_above_max_tokens"] = bool(torch.equal(info.topk_ids, ids[rank]))
    _, info = step(cfg=SereConfig(policy="sere", num_primary=S, max_decode_tokens=total))
    out["rerouted_at_max_tokens"] = bool(torch.equal(info.topk_ids, _expected(SERE, placement, ids, ws, scores, sim, rank)[0]))
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
        assert step["weights_equal"], (rank, label)
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
        ("no_similarity", "similarity matrix"),
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
