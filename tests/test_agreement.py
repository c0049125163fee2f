"""sere.agreement: what an EP group sums before routing, checked on a hand-worked two-rank step."""

import torch

from sere.agreement import agreed_primary, agreement_vector
from sere.config import SereConfig

E = 6


def _rank(ids, scores):
    ids = torch.tensor(ids)  # [T, 3]
    weights = torch.tensor([[0.5, 0.3, 0.2]] * ids.shape[0])  # [T, 3], slot 0 largest
    return ids, weights, torch.tensor(scores)  # scores [T, E]


# rank 0: two real tokens and one padding row; rank 1: one token
RANK0 = _rank([[0, 1, 2], [3, 1, 2], [5, 4, 2]],
              [[.5, .3, .2, 0, 0, 0], [0, .3, .2, .5, 0, 0], [0, 0, .2, 0, .3, .5]])
RANK1 = _rank([[2, 5, 4]], [[0, 0, .5, 0, .2, .3]])
PADDING0 = torch.tensor([False, False, True])


def test_padding_rows_are_kept_out_of_the_mask_and_the_mass():
    cfg = SereConfig(policy="xshare", num_primary=1, max_distinct=3)
    ids, weights, scores = RANK0
    vector = agreement_vector(cfg, ids, weights, E, scores, PADDING0)
    assert vector[:E].tolist() == [1, 0, 0, 1, 0, 0]  # top-1 of the two real tokens: 0 and 3
    torch.testing.assert_close(vector[E:], torch.tensor([.5, .6, .4, .5, 0, 0]))  # the padding row's .2/.3/.5 left out


def test_summed_vectors_give_the_union_and_xshares_group_selection():
    sere = SereConfig(policy="sere", num_primary=1)
    xshare = SereConfig(policy="xshare", num_primary=1, max_distinct=4)
    for cfg in (sere, xshare):
        (ids0, w0, s0), (ids1, w1, s1) = RANK0, RANK1
        summed = agreement_vector(cfg, ids0, w0, E, s0, PADDING0) + agreement_vector(cfg, ids1, w1, E, s1)
        primary = agreed_primary(cfg, summed)
        if cfg is sere:
            assert primary.tolist() == [True, False, True, True, False, False]  # {0, 3} | {2}
        else:
            # warm-up {0, 2, 3}; group mass 0:.5 1:.6 2:.9 3:.5 4:.2 5:.3 -> expert 1 joins (B = 4)
            assert primary.tolist() == [True, True, True, True, False, False]


def test_without_router_scores_the_mass_is_zero():
    cfg = SereConfig(policy="oea", num_primary=2)
    ids, weights, _ = RANK1
    vector = agreement_vector(cfg, ids, weights, E)
    assert vector.tolist() == [0, 0, 1, 0, 0, 1] + [0] * E  # top-2 of the token: 2 and 5
