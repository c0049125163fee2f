"""The loop oracles of tests/oracle.py checked by hand: each case draws its expected layout in a
comment (docs/spec.md §6-§9), so the oracles that the op, policy and reference tests compare
against are themselves checked against something independent.

Shape legend: T tokens, K top-k slots, S = num_primary, E experts.
"""

import math

import torch
from oracle import INF, f32, loop_oea, loop_reroute, loop_sere_err


def test_loop_reroute_by_hand():
    #   P = {0, 1}; sim[2] = (.3, .8, 1, 0) -> 1; sim[3] has a NaN to P -> kept (critical)
    #   [0 | 2]  [1 | 3]   ->   [0 | 1]  [1 | 3]
    sim = torch.eye(4)
    sim[2, 0], sim[2, 1], sim[3, 0], sim[3, 1] = 0.3, 0.8, math.nan, 0.9
    ids, stats = loop_reroute(torch.tensor([[0, 2], [1, 3]]), sim, 1)
    assert ids == [[0, 1], [1, 3]] and stats == [4, 3, 2, 1, 1]


def test_loop_sere_err_by_hand():
    # P = {0, 1}, tolerance .5, keep_cost .5: 2 -> 1 (err .2), 3 dropped (err .9), 4 kept (cost .57)
    #   [0 | 2 3] w [.5 .3 .2]  ->  [0 | 1 0] w [.5 .3 0];   [1 | 4 2]  ->  [1 | 4 1]
    error = torch.ones(5, 5).fill_diagonal_(0.0)
    error[2, 1], error[3, 0], error[4, 1] = 0.2, 0.9, 0.95
    ids, weights = torch.tensor([[0, 2, 3], [1, 4, 2]]), torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]])
    new_ids, new_w, stats = loop_sere_err(ids, weights, error, 1, 0.5, 0.5)
    assert new_ids == [[0, 1, 0], [1, 4, 1]] and stats == [5, 3, 2, 3, 1, 1]
    assert new_w[0] == [0.5, f32(0.3), 0.0]
    # refill: token 0's dropped slot takes the best loaded expert it lacks: loaded {0, 1, 4},
    # it holds {0, 1} -> 4 at score .4, weight .4 x (1.0 / (.1 + .1 + .1)) = 4/3
    scores = torch.tensor([[0.1, 0.2, 0.1, 0.1, 0.4], [0.2] * 5])
    new_ids, new_w, stats = loop_sere_err(ids, weights, error, 1, 0.5, 0.5, router_scores=scores)
    assert new_ids == [[0, 1, 4], [1, 4, 1]] and stats == [5, 3, 2, 3, 1, 1]
    assert math.isclose(new_w[0][2], 0.4 / 0.3, rel_tol=1e-6)


def test_loop_oea_by_hand():
    # S = 1, P = {0, 2, 3}; scores per token below.
    #   [0 | 1 2]  candidates 2, 3 tie at .3 -> 2 then 3             ->  [0 | 2 3]  raw [.1 .3 .3]
    #   [3 | 4 0]  candidates 2 (.5), 0 (.1)                         ->  [3 | 2 0]
    #   [2 | 0 1]  candidates 0 (.3); 3 is at -inf: never fills      ->  [2 | 0 2]  raw [.2 .3 0]
    ids = torch.tensor([[0, 1, 2], [3, 4, 0], [2, 0, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.3, 0.3, 0.2, -INF, 0.2]])
    new_ids, new_w, stats = loop_oea(ids, weights, scores, 1)
    assert new_ids == [[0, 2, 3], [3, 2, 0], [2, 0, 2]]
    assert stats == [5, 3, 3, 4, 0, 1]
    assert all(math.isclose(a, b / 0.7, rel_tol=1e-6) for a, b in zip(new_w[0], (0.1, 0.3, 0.3)))
    assert new_w[2][2] == 0.0
    # external P = {3}: token 0 gets 3 then nothing; tokens 1 and 2 have nothing left
    new_ids, new_w, stats = loop_oea(ids, weights, scores, 1, torch.tensor([False, False, False, True, False]))
    assert new_ids == [[0, 3, 0], [3, 3, 3], [2, 2, 2]]
    assert stats == [5, 3, 1, 6, 0, 5]
    assert math.isclose(new_w[1][0], 1.0, rel_tol=1e-6) and new_w[1][1:] == [0.0, 0.0]
