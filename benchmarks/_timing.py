"""Shared helpers for the benchmark scripts in this folder.

Conventions every script follows:

- ``python benchmarks/<name>.py [--smoke] [--out benchmarks/results/<name>.json]``: ``--smoke`` runs tiny sizes in a
  few seconds (used by the tests); the full run writes its JSON to ``--out`` and prints a markdown table.
- Times are medians over ``repeats`` timed calls after ``warmup`` untimed ones (CUDA is synchronised around each
  call); the JSON records the repeats actually used and the machine (:func:`machine_info`).
- JSON is written atomically (:func:`write_json`), so a crashed or interrupted run never leaves half a file.

Scripts import this module as ``import _timing`` (the script's own folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 5,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (wall clock, ``time.perf_counter``).

    Returns ``{"median_s", "min_s", "max_s", "mean_s", "warmup", "repeats", "times_s"}``. On CUDA devices the
    device is synchronised before and after each call so the time covers the kernels, not just their launch.
    """
    if repeats < 1:
        raise ValueError(f"time_fn: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "mean_s": statistics.fmean(times),
        "warmup": warmup,
        "repeats": repeats,
        "times_s": times,
    }


def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
    """Peak memory that one call of ``fn`` adds on top of what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (exact, allocator bytes). CPU: the process's resident
    set size sampled every ~0.5 ms in a background thread (torch's CPU tensors are invisible to ``tracemalloc``);
    falls back to the growth of ``ru_maxrss`` (a process-lifetime high-water mark, so 0 once an earlier call went
    higher) where /proc is unavailable. Returns ``{"peak_bytes", "method"}``.
    """
    if device is not None and torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before, "method": "cuda_max_allocated"}

    base = _rss_bytes()
    if base is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": max(0, after - before), "method": "ru_maxrss_growth"}
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _rss_bytes() or 0
            peak[0] = max(peak[0], rss)
            done.wait(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
        peak[0] = max(peak[0], _rss_bytes() or 0)
    finally:
        done.set()
        thread.join()
    return {"peak_bytes": peak[0] - base, "method": "rss_sampled"}


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | dict[str, str]) -> str:
    """Render ``rows`` as a GitHub markdown table. ``columns`` lists row keys, or maps row keys to header titles.

    Floats are shown with 3 significant digits (scientific below 1e-3), None as an empty cell.
    """
    titles = dict(columns) if isinstance(columns, dict) else {c: c for c in columns}

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            if value != 0 and abs(value) < 1e-3:
                return f"{value:.1e}"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(titles.values()) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in titles) + " |" for row in rows]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | dict[str, str]) -> None:
    """Print :func:`markdown_table` to stdout."""
    print(markdown_table(rows, columns), flush=True)


def add_common_args(parser: argparse.ArgumentParser, default_out: str | os.PathLike[str]) -> argparse.ArgumentParser:
    """Add the flags every benchmark script takes: ``--smoke`` (tiny sizes), ``--out`` (JSON path), ``--threads``."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 repeat: checks the script runs")
    parser.add_argument(
        "--out", default=str(default_out), help="where to write the JSON results (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """A description of where the numbers were taken: CPU model, cores, threads, torch/python versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device or "cpu"),
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the top of a report."""
    parts = [f"{info['cpu']} ({info['cpu_affinity'] or info['cpu_count']} cores, {info['torch_threads']} threads)"]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    parts.append(f"torch {info['torch']}, python {info['python']}")
    if "load_avg_1m" in info:
        parts.append(f"load avg {info['load_avg_1m']:.2f}")
    return "; ".join(parts)
