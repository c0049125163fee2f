"""Hand-computed cases of the re-routing rule (docs/spec.md §6), on both paths of sere.ops.

Layouts: rows are tokens, columns slots; `|` separates the S primary slots from the secondaries.
Stats are in STAT_FIELDS order: [distinct_before, distinct_after, |P|, rerouted, critical].
"""

import pytest
import torch

import sere.ops

pytestmark = pytest.mark.usefixtures("compiled_op")


def _similarity(entries, num_experts=4, dtype=torch.float32):
    """[E, E] matrix, diagonal 1, 0 elsewhere except `entries` {(row, col): value}."""
    sim = torch.eye(num_experts)
    for (row, col), value in entries.items():
        sim[row, col] = value
    return sim.to(dtype)


def _run(topk_ids, similarity, num_primary, threshold=0.0, primary=None, dtype=torch.int64):
    topk_ids = torch.tensor(topk_ids, dtype=dtype)
    weights = torch.linspace(1.0, 0.1, topk_ids.numel()).reshape(topk_ids.shape)
    weights_before = weights.clone()
    new_ids, new_weights, stats = sere.ops.reroute_with_stats(
        topk_ids, weights, similarity, num_primary, threshold, primary
    )
    assert new_weights is weights and torch.equal(weights, weights_before)  # weights untouched
    assert new_ids.dtype == dtype and new_ids.shape == topk_ids.shape
    assert stats.dtype == torch.int64 and stats.shape == (5,)
    return new_ids.tolist(), stats.tolist()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_secondary_goes_to_nearest_primary(dtype):
    #   in: [0 | 2]    P = {0, 1}     sim[2] = (0.3, 0.8, 1, 0) -> 1     out: [0 | 1]
    #       [1 | 3]                   sim[3] = (0.9, 0.2, 0, 1) -> 0          [1 | 0]
    sim = _similarity({(2, 0): 0.3, (2, 1): 0.8, (3, 0): 0.9, (3, 1): 0.2})
    ids, stats = _run([[0, 2], [1, 3]], sim, num_primary=1, dtype=dtype)
    assert ids == [[0, 1], [1, 0]]
    assert stats == [4, 2, 2, 2, 0]


def test_tie_goes_to_lowest_id():
    #   in: [1 | 3]    P = {1, 2}     sim[3, 1] = sim[3, 2] = 0.5 -> 1 (lower id)   out: [1 | 1]
    #       [2 | 0]                   sim[0, 1] = sim[0, 2] = 0.0 -> 1                   [2 | 1]
    sim = _similarity({(3, 1): 0.5, (3, 2): 0.5})
    ids, stats = _run([[1, 3], [2, 0]], sim, num_primary=1)
    assert ids == [[1, 1], [2, 1]]
    assert stats == [4, 2, 2, 2, 0]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float32, 2), (torch.bfloat16, 1), (torch.float16, 2)],
)
def test_ties_are_judged_after_the_dtype_rounds(dtype, expected):
    #   in: [1 | 3]    P = {1, 2}    sim[3, 1] = 0.5, sim[3, 2] = 0.501
    #   float32, float16: 0.501 > 0.5 -> 2;  bfloat16 rounds 0.501 to 0.5: a tie -> 1
    sim = _similarity({(3, 1): 0.5, (3, 2): 0.501}, dtype=dtype)
    ids, _ = _run([[1, 3], [2, 1]], sim, num_primary=1)
    assert ids == [[1, expected], [2, 1]]


def test_critical_expert_kept_with_threshold():
    #   rho = 0.5      P = {0, 1}
    #   in: [0 | 2]    best of 2: sim[2, 1] = 0.5 (not < rho) -> 1       out: [0 | 1]
    #       [1 | 3]    best of 3: sim[3, 0] = 0.4 < rho -> kept (critical)    [1 | 3]
    sim = _similarity({(2, 0): 0.2, (2, 1): 0.5, (3, 0): 0.4, (3, 1): 0.1})
    ids, stats = _run([[0, 2], [1, 3]], sim, num_primary=1, threshold=0.5)
    assert ids == [[0, 1], [1, 3]]
    assert stats == [4, 3, 2, 1, 1]


def test_threshold_zero_disables_preservation():
    #   rho = 0: the same input as above re-routes both      out: [0 | 1]
    #                                                             [1 | 0]
    sim = _similarity({(2, 0): 0.2, (2, 1): 0.5, (3, 0): 0.4, (3, 1): 0.1})
    ids, stats = _run([[0, 2], [1, 3]], sim, num_primary=1, threshold=0.0)
    assert ids == [[0, 1], [1, 0]]
    assert stats == [4, 2, 2, 2, 0]


def test_critical_expert_does_not_join_primary_set():
    #   rho = 0.5        P = {0, 1}; 3 is critical (best 0.3 < rho) and stays outside P,
    #   in: [0 | 3  2]   so 2 (whose most similar expert is 3: 0.95) goes to 1 (0.7), not 3
    #       [1 | 2  3]
    #  out: [0 | 3  1]
    #       [1 | 1  3]
    sim = _similarity({(2, 3): 0.95, (2, 0): 0.6, (2, 1): 0.7, (3, 0): 0.2, (3, 1): 0.3})
    ids, stats = _run([[0, 3, 2], [1, 2, 3]], sim, num_primary=1, threshold=0.5)
    assert ids == [[0, 3, 1], [1, 1, 3]]
    assert stats == [4, 3, 2, 2, 2]


def test_primary_slots_never_change():
    #   S = 2            P = {0, 1, 2, 3}: nothing to re-route although sim[3, 0] = 1
    #   in: [3  2 | 1]   out: identical
    #       [0  1 | 2]
    sim = _similarity({(3, 0): 1.0, (2, 0): 1.0, (1, 0): 1.0})
    ids, stats = _run([[3, 2, 1], [0, 1, 2]], sim, num_primary=2)
    assert ids == [[3, 2, 1], [0, 1, 2]]
    assert stats == [4, 4, 4, 0, 0]


def test_secondary_already_in_primary_set_is_kept():
    #   in: [0 | 1]    P = {0, 1}: 1 is loaded, so it stays even though sim[1, 0] = 1
    #       [1 | 0]
    sim = _similarity({(1, 0): 1.0})
    ids, stats = _run([[0, 1], [1, 0]], sim, num_primary=1)
    assert ids == [[0, 1], [1, 0]]
    assert stats == [2, 2, 2, 0, 0]


def test_duplicates_are_kept_and_weights_unchanged():
    #   in: [0 | 2  3]   P = {0}: both secondaries land on 0, the token carries 0 three times
    #  out: [0 | 0  0]   (the weights are not merged or changed; _run checks them)
    sim = _similarity({(2, 0): 0.1, (3, 0): 0.1})
    ids, stats = _run([[0, 2, 3]], sim, num_primary=1)
    assert ids == [[0, 0, 0]]
    assert stats == [3, 1, 1, 2, 0]


def test_external_primary_mask():
    #   primary = {2, 3} (e.g. the OR over an EP group); the token's own slot 0 (expert 0) is
    #   outside it but never changes; its secondary 1 goes to the nearest of {2, 3}
    #   in: [0 | 1]    sim[1] = (0, 1, 0.4, 0.6) -> 3     out: [0 | 3]
    sim = _similarity({(1, 2): 0.4, (1, 3): 0.6})
    primary = torch.tensor([False, False, True, True])
    ids, stats = _run([[0, 1]], sim, num_primary=1, primary=primary)
    assert ids == [[0, 3]]
    assert stats == [2, 2, 2, 1, 0]


def test_no_tokens():
    #   T = 0: nothing to do; |P| is that of the external mask when one is given
    sim = _similarity({})
    topk_ids = torch.zeros(0, 3, dtype=torch.int64)  # [0, 3]
    for primary, num_primary_experts in ((None, 0), (torch.tensor([True, False, True, False]), 2)):
        new_ids, _, stats = sere.ops.reroute_with_stats(topk_ids, topk_ids.float(), sim, 1, 0.0, primary)
        assert new_ids.shape == (0, 3)
        assert stats.tolist() == [0, 0, num_primary_experts, 0, 0]


def test_empty_primary_set_keeps_secondaries():
    #   primary = {} (no expert loaded anywhere): there is no p* to go to, every secondary is kept
    #   in: [0 | 1]   out: [0 | 1]
    sim = _similarity({(1, 0): 0.9})
    primary = torch.zeros(4, dtype=torch.bool)
    ids, stats = _run([[0, 1]], sim, num_primary=1, primary=primary)
    assert ids == [[0, 1]]
    assert stats == [2, 2, 0, 0, 1]


def test_nan_similarity_to_p_keeps_the_expert():
    #   P = {0, 1}; sim[2] = (0.9, NaN, 1, 0): its max over P is NaN, so 2 is kept (critical), as
    #   the spec's `~(max > -inf)` keeps it; sim[3] = (0.2, 0.7, 0, 1) -> 1
    #   in: [0 | 2]  [1 | 3]   ->   [0 | 2]  [1 | 1]
    sim = _similarity({(2, 0): 0.9, (2, 1): float("nan"), (3, 0): 0.2, (3, 1): 0.7})
    ids, stats = _run([[0, 2], [1, 3]], sim, num_primary=1)
    assert ids == [[0, 2], [1, 1]]
    assert stats == [4, 3, 2, 1, 1]


def test_nan_outside_p_and_infinities():
    #   P = {0, 1}; a NaN to a non-primary column is never read: sim[2] = (0.1, 0.6, 1, NaN) -> 1;
    #   sim[3] = (-inf, -inf, 0, 1): nothing comparable in P -> kept; sim[0] is never read;
    #   sim[4] = (inf, 0.5, ...) -> 0 (+inf is a maximum like any other)
    #   in: [0 | 2 3 4]  [1 | 4 0 2]   ->   [0 | 1 3 0]  [1 | 0 0 1]
    inf = float("inf")
    sim = _similarity({(2, 0): 0.1, (2, 1): 0.6, (2, 3): float("nan"), (3, 0): -inf, (3, 1): -inf,
                       (4, 0): inf, (4, 1): 0.5}, num_experts=5)
    ids, stats = _run([[0, 2, 3, 4], [1, 4, 0, 2]], sim, num_primary=1)
    assert ids == [[0, 1, 3, 0], [1, 0, 0, 1]]
    assert stats == [5, 3, 2, 4, 1]
