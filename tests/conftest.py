"""Shared fixtures. Test modules mirror the package (``tests/<part>/test_*.py``); helpers live in ``tests/helpers``."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs 2 workers), each worker and the processes it starts use its share of the
    cores: the tests' torch work is mostly tiny ops, which several threads per process on busy cores make many times
    slower, and the workers already use every core between them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses the tests start
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules marked ``early`` first, then the rest by their number of tests, largest first.

    ``make test`` hands whole files to its workers in this order (``--dist loadfile --no-loadscope-reorder``). The
    ``early`` modules have a setup of minutes (training SmolLM2): started first, they run beside the rest of the suite
    instead of after it. pytest-xdist's own reordering sorts by test count alone, which put the two-test training module
    last, where one worker trained alone at one thread while the other core idled.
    """
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    ordered = sorted(modules.values(), key=lambda group: (group[0].get_closest_marker("early") is None, -len(group)))
    items[:] = [item for group in ordered for item in group]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared machine extra threads make them many times slower.

    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
