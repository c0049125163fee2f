"""Node-aware routing (`SereConfig.node_limit`) through `sere.policy.route`, against a plain
per-token loop oracle written here, plus hand-worked cases and the traffic it saves."""

import pytest
import torch

from sere.config import SereConfig
from sere.ep import linear_placement, round_robin_placement
from sere.ep.accounting import UNIT_FIELDS, unit_counts
from sere.policy import route


def allowed_units(row, unit, num_primary, max_units):
    seen = []
    for e in row:
        if unit[e] not in seen:
            seen.append(unit[e])
    ok = {unit[e] for e in row[:num_primary]}
    if max_units is not None:
        ok |= set(seen[:max_units])
    return ok


def loop_route(cfg, ids, w, matrix, scores, unit):
    """The rules of docs/spec.md's node-aware option, one token at a time."""
    S, K = cfg.num_primary, len(ids[0])
    P = {e for row in ids for e in row[:S]}
    out_ids, out_w, crit_mass, crit = [], [], {}, []
    token_p = []
    for row, wr in zip(ids, w):
        ok = allowed_units(row, unit, S, cfg.max_nodes)
        pt = sorted(p for p in P if unit[p] in ok)
        token_p.append((ok, pt))
    if cfg.policy == "sere-err":  # first pass: critical candidates and their summed cost
        for t, (row, wr) in enumerate(zip(ids, w)):
            ok, pt = token_p[t]
            for k in range(S, K):
                e = row[k]
                if e in pt:
                    continue
                best = min((matrix[e][p], p) for p in pt) if pt else (float("inf"), None)
                cost = wr[k] * min(best[0], 1.0)
                keep_cost = float("inf") if cfg.keep_cost is None else cfg.keep_cost
                if unit[e] in ok and cost > keep_cost:
                    crit.append((t, k))
                    crit_mass[e] = crit_mass.get(e, 0.0) + cost
        if cfg.max_distinct is not None:
            budget = max(0, cfg.max_distinct - len(P))
            chosen = {e for e, _ in sorted(crit_mass.items(), key=lambda kv: (-kv[1], kv[0]))[:budget]}
            crit = [(t, k) for t, k in crit if ids[t][k] in chosen]
    kept_critical = {ids[t][k] for t, k in crit}
    for t, (row, wr) in enumerate(zip(ids, w)):
        ok, pt = token_p[t]
        new, nw = list(row), list(wr)
        if cfg.policy == "sere":
            for k in range(S, K):
                e = row[k]
                if e in pt or not pt:
                    continue
                val, p = max((matrix[e][p], -p) for p in pt)
                if cfg.threshold > 0 and unit[e] in ok and val < cfg.threshold:
                    continue
                new[k] = -p
        elif cfg.policy == "oea":
            head = row[:S]
            cands = sorted((p for p in pt if p not in head), key=lambda p: (-scores[t][p], p))[: K - S]
            new = head + cands + [head[0]] * (K - S - len(cands))
            raw = [scores[t][e] for e in head + cands] + [0.0] * (K - S - len(cands))
            nw = [r * sum(wr) / sum(raw) for r in raw]
        else:
            live = []
            for k in range(S, K):
                e = row[k]
                if e in pt or (t, k) in crit:
                    continue
                val, p = min((matrix[e][p], p) for p in pt) if pt else (float("inf"), row[0])
                if val < cfg.tolerance:
                    new[k] = p
                else:
                    new[k], nw[k] = row[0], 0.0
                    if wr[k] != 0:
                        live.append(k)
            if cfg.refill:
                loaded = {e for e in P | kept_critical if unit[e] in ok}
                cands = sorted((e for e in loaded if e not in new), key=lambda e: (-scores[t][e], e))
                scale = sum(wr) / sum(scores[t][e] for e in row)
                for j, k in enumerate(live[: len(cands)]):
                    new[k], nw[k] = cands[j], scores[t][cands[j]] * scale
            if cfg.renormalize:
                nw = [x * sum(wr) / sum(nw) for x in nw]
        out_ids.append(new)
        out_w.append(nw)
    return out_ids, out_w


def make_step(num_tokens, num_experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen).softmax(1)  # distinct scores, no ties
    w, ids = scores.topk(top_k, dim=1)
    matrix = torch.rand(num_experts, num_experts, generator=gen)
    return ids, w / w.sum(1, keepdim=True), scores, matrix


CASES = [
    dict(policy="sere"),
    dict(policy="sere", threshold=0.9),
    dict(policy="sere", node_scope="rank"),
    dict(policy="sere", max_nodes=3),
    dict(policy="oea"),
    dict(policy="oea", max_nodes=2),
    dict(policy="sere-err", tolerance=0.1),
    dict(policy="sere-err", tolerance=0.08, renormalize=True),
    dict(policy="sere-err", tolerance=0.1, refill=True, keep_cost=0.02),
    dict(policy="sere-err", tolerance=0.15, keep_cost=0.005, max_distinct=25, node_scope="rank", max_nodes=3),
]


@pytest.mark.parametrize("fields", CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("placement", [linear_placement(32, 8, 2), round_robin_placement(32, 8, 4)], ids=["lin", "rr"])
def test_route_matches_loop_oracle(fields, placement):
    cfg = SereConfig(num_primary=2, node_limit="primary_nodes", max_decode_tokens=4096, **fields)
    ids, w, scores, matrix = make_step(24, 32, 6, seed=len(str(fields)))
    routed = route(cfg, ids, w, num_experts=32, matrix=matrix, router_scores=scores, placement=placement)
    unit = (placement.expert_to_rank if cfg.node_scope == "rank" else placement.expert_to_node()).tolist()
    want_ids, want_w = loop_route(cfg, ids.tolist(), w.tolist(), matrix.tolist(), scores.tolist(), unit)
    assert routed.ids.tolist() == want_ids
    assert torch.allclose(routed.weights, torch.tensor(want_w), atol=1e-6)


def test_hand_worked_sere_stays_on_primary_node():
    # E = 8 on 4 ranks, 2 per node: node 0 = experts 0-3, node 1 = experts 4-7.
    # Token 0 top-2 = (0, 1): node 0 only. Token 1 top-2 = (4, 2): nodes 1 and 0. P = {0, 1, 2, 4}.
    # Token 0's secondaries 5 and 6: plain SERE sends them to 4 (their most similar), node-aware
    # must stay on node 0: 5 -> 2 (0.5 > 0.3, 0.2), 6 -> 1 (0.6 > 0.1, 0.2).
    pl = linear_placement(8, 4, ranks_per_node=2)
    sim = torch.eye(8)
    sim[5, 4], sim[5, 2], sim[5, 0], sim[5, 1] = 0.9, 0.5, 0.3, 0.2
    sim[6, 4], sim[6, 1], sim[6, 0], sim[6, 2] = 0.9, 0.6, 0.1, 0.2
    sim[3, 1], sim[3, 4] = 0.4, 0.8
    ids = torch.tensor([[0, 1, 5, 6], [4, 2, 3, 7]])
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    plain = route(SereConfig(policy="sere"), ids, w, num_experts=8, matrix=sim, placement=pl)
    node = route(SereConfig(policy="sere", node_limit="primary_nodes"), ids, w, num_experts=8, matrix=sim, placement=pl)
    assert plain.ids.tolist() == [[0, 1, 4, 4], [4, 2, 4, 0]]
    assert node.ids.tolist() == [[0, 1, 2, 1], [4, 2, 4, 0]]  # token 1 may use nodes 0 and 1
    src = torch.tensor([0, 2])  # token 0 lives on node 0, token 1 on node 1
    cross = UNIT_FIELDS.index("cross_node_token_node_pairs")
    assert int(unit_counts(plain.ids, pl.expert_to_rank, pl.rank_to_node, src)[cross]) == 2
    assert int(unit_counts(node.ids, pl.expert_to_rank, pl.rank_to_node, src)[cross]) == 1


def test_every_token_stays_on_its_primary_nodes():
    pl = linear_placement(64, 16, ranks_per_node=2)  # 8 nodes
    ids, w, scores, matrix = make_step(64, 64, 8, seed=1)
    for policy in ("sere", "oea", "sere-err"):
        cfg = SereConfig(policy=policy, num_primary=2, node_limit="primary_nodes", max_decode_tokens=4096)
        got = route(cfg, ids, w, num_experts=64, matrix=matrix, router_scores=scores, placement=pl)
        node = pl.expert_to_node()
        for t in range(64):
            used = {int(node[e]) for e, x in zip(got.ids[t].tolist(), got.weights[t].tolist()) if x != 0}
            assert used <= {int(node[e]) for e in got.ids[t, :2].tolist()}, (policy, t)


def test_bad_config_and_missing_placement_are_named():
    with pytest.raises(ValueError, match="node_limit"):
        SereConfig(policy="topk", node_limit="primary_nodes")
    with pytest.raises(ValueError, match="node_limit"):
        SereConfig(policy="sere", node_limit="nodes")
    with pytest.raises(ValueError, match="max_nodes"):
        SereConfig(policy="sere", max_nodes=2)
    with pytest.raises(ValueError, match="node_scope"):
        SereConfig(policy="sere", node_limit="primary_nodes", node_scope="host")
    ids, w, _, matrix = make_step(4, 8, 4, seed=0)
    with pytest.raises(ValueError, match="placement"):
        route(SereConfig(policy="sere", node_limit="primary_nodes"), ids, w, num_experts=8, matrix=matrix)
