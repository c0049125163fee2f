"""Shared pytest setup: the `gpu` marker (skipped where no CUDA device is visible), and the
compiled CPU op, which the test command builds: its absence is a failure, never a skip."""

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


BUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."


@pytest.fixture
def compiled_op():
    """Fail (not skip) when sere._C or its CPU kernels were not built."""
    import sere.ops

    assert sere.ops.HAS_COMPILED_OP, f"sere._C is not built ({sere.ops._IMPORT_ERROR}); run `{BUILD_COMMAND}`"
    for op in ("reroute", "reroute_err", "oea", "primary_mask"):
        assert hasattr(torch.ops.sere, op), f"sere._C predates sere::{op}; run `{BUILD_COMMAND}`"


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread avoids spin-waiting (several
    times faster here). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
