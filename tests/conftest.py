"""Shared pytest setup: the `gpu` marker (skipped where no CUDA device is visible)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on machines without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["compiled", "python"])
def reroute_path(request, monkeypatch):
    """`sere.ops.reroute_with_stats` through the compiled op, or forced onto the Python fallback."""
    import sere.ops

    if request.param == "compiled":
        if not sere.ops.HAS_COMPILED_OP:
            pytest.skip("sere._C is not built (pip install --no-build-isolation -e .)")
    else:
        monkeypatch.setattr(sere.ops, "_COMPILED_DEVICE_TYPES", frozenset())
        monkeypatch.setattr(sere.ops, "_warned_fallback", True)  # the warning has its own test
    return request.param
