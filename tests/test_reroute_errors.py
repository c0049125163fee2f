"""Bad input raises a clear error naming the argument; a missing compiled kernel raises too
(there is no Python fallback)."""

import subprocess
import sys

import pytest
import torch

import sere.ops

pytestmark = pytest.mark.usefixtures("compiled_op")


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
def test_bad_input_names_the_argument(args, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(args)


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
def test_primary_mask_bad_input(topk_ids, num_experts, num_primary, error, pattern):
    with pytest.raises(error, match=pattern):
        sere.ops.primary_mask(topk_ids, num_experts, num_primary)


BUILD = r"build it with `pip install --no-build-isolation -e \.`"


@pytest.mark.parametrize("attribute", ["_COMPILED_DEVICE_TYPES", "_COMPILED_ERR_DEVICE_TYPES"])
def test_missing_device_kernel_is_an_error(monkeypatch, attribute):
    """A build without kernels for the device raises, naming the op and the build command."""
    monkeypatch.setattr(sere.ops, attribute, frozenset({"cuda"}))
    error = torch.ones(4, 4).fill_diagonal_(0.0)
    base = _base()
    calls = {
        "_COMPILED_DEVICE_TYPES": [
            ("reroute", lambda: sere.ops.reroute(**base)),
            ("reroute", lambda: sere.ops.reroute_with_stats(**base)),
            ("primary_mask", lambda: sere.ops.primary_mask(base["topk_ids"], 4, 1)),
        ],
        "_COMPILED_ERR_DEVICE_TYPES": [
            ("reroute_err", lambda: sere.ops.reroute_err(base["topk_ids"], base["topk_weights"], error, 1)),
            ("reroute_err", lambda: sere.ops.reroute_err_with_stats(base["topk_ids"], base["topk_weights"], error, 1)),
        ],
    }[attribute]
    for op_name, call in calls:
        with pytest.raises(RuntimeError, match=rf"sere\._C has no cpu kernel for sere::{op_name}; {BUILD}"):
            call()


def test_import_without_the_extension_then_every_call_raises():
    """`import sere.ops` works without sere._C; each public function then raises RuntimeError
    naming the missing extension and the build command (run in a fresh interpreter in which
    importing sere._C fails)."""
    script = """
import importlib.abc, sys, torch

class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sere._C":
            raise ImportError("blocked for this test")

sys.meta_path.insert(0, NoExtension())
import sere.ops
assert not sere.ops.HAS_COMPILED_OP
ids, w, m = torch.tensor([[0, 1]]), torch.ones(1, 2), torch.eye(2)
for call in (
    lambda: sere.ops.reroute(ids, w, m, 1),
    lambda: sere.ops.reroute_err_with_stats(ids, w, m, 1),
    lambda: sere.ops.oea_with_stats(ids, w, torch.ones(1, 2), 1),
    lambda: sere.ops.primary_mask(ids, 2, 1),
):
    try:
        call()
    except RuntimeError as exc:
        print(exc)
    else:
        raise SystemExit("no error")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        assert "the extension sere._C is not built (blocked for this test)" in line
        assert "`pip install --no-build-isolation -e .`" in line
