"""The compiled op against the per-token loop oracle `loop_reroute`: ids and stats exactly.

Full cross product on the small dimensions (E = 8: every T, K, S, threshold, dtype and primary
kind); a seeded sample on the large ones (E = 60, 64, 128, 256: 8 draws per token count). Similarities are quantised so
that ties are frequent (and sim == threshold happens); ids are drawn from a skewed distribution
so that P is small and many secondaries move. Some draws put NaN, +inf or -inf entries in the
similarity matrix (a NaN among a row's entries to P keeps that expert).
"""

import itertools
import random

import pytest
import torch
from oracle import loop_reroute

import sere.ops

pytestmark = pytest.mark.usefixtures("compiled_op", "one_thread")

TOKENS = (1, 2, 3, 7, 16, 33, 64, 128, 255, 512)
TOP_KS = (2, 4, 6, 8)
THRESHOLDS = (0.0, 0.3, 0.7)
ID_DTYPES = (torch.int32, torch.int64)
SIM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRIMARY_KINDS = ("own", "union", "foreign")  # None; own P OR other ranks'; an unrelated mask
QUANTISATIONS = (4, 10, 16, None)  # sim rounded to multiples of 1/q (10: hits 0.3 and 0.7)


def make_topk_ids(gen, num_tokens, num_experts, top_k, duplicates=False):
    """[T, K] ids, K distinct experts per token drawn with skewed popularity (or with repeats)."""
    popularity = torch.rand(num_experts, generator=gen) ** 4 + 1e-3  # [E]
    if duplicates:
        return torch.multinomial(popularity.expand(num_tokens, -1), top_k, True, generator=gen)
    return torch.multinomial(popularity.expand(num_tokens, -1), top_k, False, generator=gen)


def make_similarity(gen, num_experts, levels, non_finite=False):
    """[E, E] float32 in [0, 1], diagonal 1, rounded to multiples of 1/levels (None: not);
    `non_finite`: about 3% of the entries NaN, +inf or -inf."""
    sim = torch.rand(num_experts, num_experts, generator=gen)
    if levels is not None:
        sim = (sim * levels).round() / levels
    if non_finite:
        pick = torch.rand(num_experts, num_experts, generator=gen)  # [E, E]
        sim[pick < 0.01] = float("nan")
        sim[(pick >= 0.01) & (pick < 0.02)] = float("inf")
        sim[(pick >= 0.02) & (pick < 0.03)] = float("-inf")
    return sim.fill_diagonal_(1.0)


def make_primary(gen, kind, topk_ids, num_experts, num_primary):
    """None, or an external [E] bool mask (never empty: see test_empty_primary_set_*)."""
    if kind == "own":
        return None
    extra = torch.rand(num_experts, generator=gen) < 0.2  # [E]
    if kind == "union":
        own = torch.zeros(num_experts, dtype=torch.bool)
        own[topk_ids[:, :num_primary].reshape(-1)] = True
        return own | extra
    extra[int(torch.randint(num_experts, (1,), generator=gen))] = True
    return extra


def check_against_oracle(topk_ids, similarity, num_primary, threshold, primary):
    """The op on int32 and int64 copies of `topk_ids` against one oracle run."""
    want_ids, want_stats = loop_reroute(topk_ids, similarity, num_primary, threshold, primary)
    for id_dtype in ID_DTYPES:
        ids = topk_ids.to(id_dtype)
        new_ids, stats = torch.ops.sere.reroute(ids, similarity, num_primary, threshold, primary)
        case = (
            f"T={ids.shape[0]} E={similarity.shape[0]} K={ids.shape[1]} S={num_primary} rho={threshold} "
            f"ids={id_dtype} sim={similarity.dtype} primary={primary is not None}"
        )
        assert new_ids.dtype == id_dtype, case
        assert new_ids.tolist() == want_ids, case
        assert stats.tolist() == want_stats, case


@pytest.mark.parametrize("top_k", TOP_KS)
def test_small_experts_full_cross_product(top_k):
    """E = 8: every (T, S, threshold, sim dtype, primary kind, id dtype)."""
    num_experts = 8
    gen = torch.Generator().manual_seed(1000 + top_k)
    combos = itertools.product(TOKENS, range(1, top_k), SIM_DTYPES, PRIMARY_KINDS)
    for i, (num_tokens, num_primary, sim_dtype, kind) in enumerate(combos):
        ids = make_topk_ids(gen, num_tokens, num_experts, top_k, duplicates=i % 4 == 3)
        sim = make_similarity(gen, num_experts, QUANTISATIONS[i % len(QUANTISATIONS)], non_finite=i % 5 == 4)
        primary = make_primary(gen, kind, ids, num_experts, num_primary)
        for threshold in THRESHOLDS:
            check_against_oracle(ids, sim.to(sim_dtype), num_primary, threshold, primary)


@pytest.mark.parametrize("num_experts", (60, 64, 128, 256))
@pytest.mark.parametrize("top_k", TOP_KS)
def test_large_experts_sampled(num_experts, top_k):
    rng = random.Random(num_experts * 100 + top_k)
    gen = torch.Generator().manual_seed(num_experts * 100 + top_k)
    for num_tokens in TOKENS:
        for draw in range(8):
            num_primary = rng.randrange(1, top_k)
            ids = make_topk_ids(gen, num_tokens, num_experts, top_k, duplicates=draw == 7)
            sim = make_similarity(gen, num_experts, rng.choice(QUANTISATIONS), non_finite=draw == 6)
            primary = make_primary(gen, rng.choice(PRIMARY_KINDS), ids, num_experts, num_primary)
            threshold = rng.choice(THRESHOLDS)
            check_against_oracle(ids, sim.to(rng.choice(SIM_DTYPES)), num_primary, threshold, primary)


@pytest.mark.parametrize("num_experts", (8, 128))
def test_primary_mask_op_by_loop(num_experts):
    gen = torch.Generator().manual_seed(7)
    for num_tokens, top_k, id_dtype in itertools.product((1, 33, 512), TOP_KS, ID_DTYPES):
        ids = make_topk_ids(gen, num_tokens, num_experts, top_k).to(id_dtype)
        for num_primary in range(1, top_k):
            expected = [False] * num_experts
            for row in ids.tolist():
                for e in row[:num_primary]:
                    expected[e] = True
            assert sere.ops.primary_mask(ids, num_experts, num_primary).tolist() == expected
