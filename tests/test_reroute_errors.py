"""Bad input raises a clear error naming the argument, with the same message on both paths."""

import warnings

import pytest
import torch

import sere.ops


def _base():
    """A valid call: T = 2, K = 3, E = 4, S = 1 (P = {0, 3})."""
    return {
        "topk_ids": torch.tensor([[0, 1, 2], [3, 0, 1]]),  # [2, 3] int64
        "topk_weights": torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]),  # [2, 3]
        "similarity": torch.eye(4),  # [4, 4]
        "num_primary": 1,
        "threshold": 0.0,
        "primary": None,
    }


def _with(**changes):
    args = _base()
    args.update(changes)
    return args


def _nan_at(row, col, value=float("nan")):
    sim = torch.eye(4)
    sim[row, col] = value
    return sim


# (id, arguments, exception type, regex the message must match)
CASES = [
    ("ids_1d", _with(topk_ids=torch.arange(3), topk_weights=torch.rand(3)), ValueError,
     r"topk_ids must be 2-D \[num_tokens, top_k\], got shape \[3\]"),
    ("ids_3d", _with(topk_ids=torch.zeros(1, 2, 3, dtype=torch.long), topk_weights=torch.rand(1, 2, 3)),
     ValueError, r"topk_ids must be 2-D"),
    ("ids_float", _with(topk_ids=torch.zeros(2, 3)), TypeError, r"topk_ids must be int32 or int64, got float32"),
    ("ids_int16", _with(topk_ids=torch.zeros(2, 3, dtype=torch.int16)), TypeError, r"topk_ids .* got int16"),
    ("ids_not_contiguous", _with(topk_ids=torch.zeros(3, 2, dtype=torch.long).t(),), ValueError,
     r"topk_ids must be contiguous"),
    ("ids_too_large", _with(topk_ids=torch.tensor([[0, 1, 2], [3, 0, 4]])), ValueError,
     r"topk_ids\[1, 2\] = 4 is outside \[0, num_experts=4\)"),
    ("ids_negative", _with(topk_ids=torch.tensor([[0, -1, 2], [3, 0, 1]], dtype=torch.int32)), ValueError,
     r"topk_ids\[0, 1\] = -1 is outside \[0, num_experts=4\)"),
    ("ids_beyond_similarity", _with(similarity=torch.eye(3)), ValueError,
     r"topk_ids\[1, 0\] = 3 is outside \[0, num_experts=3\)"),
    ("num_primary_zero", _with(num_primary=0), ValueError, r"num_primary must be in \[1, top_k=3\), got 0"),
    ("num_primary_negative", _with(num_primary=-1), ValueError, r"num_primary must be in \[1, top_k=3\), got -1"),
    ("num_primary_equals_k", _with(num_primary=3), ValueError, r"num_primary must be in \[1, top_k=3\), got 3"),
    ("num_primary_above_k", _with(num_primary=5), ValueError, r"num_primary .* got 5"),
    ("similarity_not_square", _with(similarity=torch.rand(4, 5)), ValueError,
     r"similarity must be a square \[num_experts, num_experts\] matrix .* got shape \[4, 5\]"),
    ("similarity_1d", _with(similarity=torch.rand(4)), ValueError, r"similarity must be a square .* \[4\]"),
    ("similarity_3d", _with(similarity=torch.rand(1, 4, 4)), ValueError, r"similarity must be a square"),
    ("similarity_empty", _with(similarity=torch.zeros(0, 0)), ValueError, r"similarity .* num_experts >= 1"),
    ("similarity_float64", _with(similarity=torch.eye(4, dtype=torch.float64)), TypeError,
     r"similarity must be float32, bfloat16 or float16, got float64"),
    ("similarity_int", _with(similarity=torch.eye(4, dtype=torch.int32)), TypeError, r"similarity .* got int32"),
    ("similarity_not_contiguous", _with(similarity=torch.rand(4, 8)[:, :4]), ValueError,
     r"similarity must be contiguous"),
    ("similarity_nan_read", _with(similarity=_nan_at(1, 3)), ValueError,
     r"similarity\[1, 3\] = nan is not finite"),
    ("similarity_inf_read", _with(similarity=_nan_at(2, 0, float("inf"))), ValueError,
     r"similarity\[2, 0\] = inf is not finite"),
    ("threshold_negative", _with(threshold=-0.1), ValueError, r"threshold must be in \[0, 1\], got -0.1"),
    ("threshold_above_one", _with(threshold=1.5), ValueError, r"threshold must be in \[0, 1\], got 1.5"),
    ("threshold_nan", _with(threshold=float("nan")), ValueError, r"threshold must be in \[0, 1\], got nan"),
    ("primary_wrong_length", _with(primary=torch.ones(5, dtype=torch.bool)), ValueError,
     r"primary must be a 1-D \[num_experts=4\] mask, got shape \[5\]"),
    ("primary_2d", _with(primary=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"primary must be a 1-D"),
    ("primary_int", _with(primary=torch.ones(4, dtype=torch.int64)), TypeError, r"primary must be bool, got int64"),
    ("primary_not_contiguous", _with(primary=torch.ones(8, dtype=torch.bool)[::2]), ValueError,
     r"primary must be contiguous"),
    ("similarity_other_device", _with(similarity=torch.eye(4, device="meta")), ValueError,
     r"similarity must be on the device of topk_ids \(cpu\), got meta"),
    ("primary_other_device", _with(primary=torch.ones(4, dtype=torch.bool, device="meta")), ValueError,
     r"primary must be on the device of topk_ids \(cpu\), got meta"),
    ("weights_wrong_shape", _with(topk_weights=torch.rand(2, 4)), ValueError,
     r"topk_weights must have the shape of topk_ids \[2, 3\], got \[2, 4\]"),
    ("weights_int", _with(topk_weights=torch.ones(2, 3, dtype=torch.int64)), TypeError,
     r"topk_weights must be floating-point, got int64"),
]


def _call(args):
    return sere.ops.reroute_with_stats(**args)


@pytest.mark.parametrize(("args", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(reroute_path, args, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(args)


@pytest.mark.usefixtures("compiled_op")
@pytest.mark.parametrize("args", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_same_message_on_both_paths(monkeypatch, args):
    with pytest.raises((ValueError, TypeError)) as compiled:
        _call(args)
    monkeypatch.setattr(sere.ops, "_COMPILED_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(sere.ops, "_warned_fallback", True)
    with pytest.raises((ValueError, TypeError)) as python:
        _call(args)
    assert (compiled.type, str(compiled.value)) == (python.type, str(python.value))


@pytest.mark.parametrize(
    ("topk_ids", "num_experts", "num_primary", "error", "pattern"),
    [
        (torch.tensor([[0, 5]]), 4, 1, ValueError, r"topk_ids\[0, 1\] = 5 is outside \[0, num_experts=4\)"),
        (torch.tensor([[0, 1]]), 4, 2, ValueError, r"num_primary must be in \[1, top_k=2\), got 2"),
        (torch.tensor([[0, 1]]), 0, 1, ValueError, r"num_experts must be >= 1, got 0"),
        (torch.tensor([0, 1]), 4, 1, ValueError, r"topk_ids must be 2-D"),
        (torch.tensor([[0.0, 1.0]]), 4, 1, TypeError, r"topk_ids must be int32 or int64"),
    ],
)
def test_primary_mask_bad_input(reroute_path, topk_ids, num_experts, num_primary, error, pattern):
    with pytest.raises(error, match=pattern):
        sere.ops.primary_mask(topk_ids, num_experts, num_primary)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(sere.ops, "_COMPILED_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(sere.ops, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            sere.ops.reroute(**_base())
        sere.ops.primary_mask(_base()["topk_ids"], 4, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "sere.reference.reroute_reference" in messages[0]
