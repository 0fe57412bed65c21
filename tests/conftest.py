"""Test-wide set-up: Triton's interpreter on CPU-only machines (must precede any triton import),
deterministic seeds, and the `gpu` marker skipping cleanly where there is no CUDA device."""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _r2d2_logger_restored():
    """Tests that call ``r2d2.cli.main`` in-process attach the CLI's stderr handler to the ``r2d2``
    logger; that handler holds pytest's capture stream, which is closed after the test. Restore
    the library state (NullHandler only, propagating) so later tests neither write to a closed
    stream nor see CLI output."""
    logger = logging.getLogger("r2d2")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on two shared cores, at these tiny sizes, extra threads only spin against the other
    processes of the distributed tests and the rest of the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
