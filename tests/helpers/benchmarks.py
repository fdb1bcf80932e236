"""Shared helpers for the benchmark tests: import a script of ``benchmarks/`` and run it on one thread."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` by path (the folder is not a package)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(module, argv: list[str]) -> dict:
    """``module.main(argv)`` with ``--threads 1``; the caller's torch thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:  # one thread: the smoke run stays quick on a shared, busy machine
        return module.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
