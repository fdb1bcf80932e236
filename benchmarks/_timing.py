"""Shared helpers for the benchmark scripts in this folder.

Conventions every script follows:

- ``python benchmarks/<name>.py [--smoke] [--out benchmarks/results/<name>.json]``: ``--smoke`` runs tiny sizes in a
  few seconds (used by the tests); the full run writes its JSON to ``--out`` and prints a markdown table.
- Times are medians over ``repeats`` timed calls after ``warmup`` untimed ones (CUDA is synchronised around each
  call); the JSON records the repeats actually used and the machine (:func:`machine_info`).
- JSON is written atomically (:func:`write_json`), so a crashed or interrupted run never leaves half a file.
- Where several systems are compared, they are timed in turn, round by round (:func:`interleaved`), so background
  load on a shared machine falls on all of them alike; the JSON records the load average (:func:`load_average`).
- Peak memory is measured in the running process (:func:`peak_mb`) or, for a clean baseline, in a fresh
  subprocess that runs the script with ``--probe ...`` (:func:`measure_peak`, :func:`probe_in_subprocess`,
  :func:`print_probe`).

A script's ``main`` reads: :func:`benchmark_parser` + its own flags, :func:`parse_args`, :func:`start_report`, the
measurements, :func:`print_report`, :func:`save_result`.

Scripts import this module as ``import _timing`` (the script's own folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
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
    return summarize(times, warmup=warmup)


def summarize(values: Sequence[float], warmup: int = 0) -> dict[str, Any]:
    """:func:`time_fn`'s result format for a list of timings (``warmup``: how many untimed calls came first)."""
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "mean_s": statistics.fmean(values),
        "warmup": warmup,
        "repeats": len(values),
        "times_s": list(values),
    }


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Time every call once per round, in turn (``warmup`` untimed rounds first); per call: median etc. over rounds.

    Interleaving makes background load on a shared machine fall on all calls alike, so their ratios are fair.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: summarize(values, warmup=warmup) for name, values in times.items()}


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


def peak_mb(fn: Callable[[], Any], *, process_rss: bool = False) -> dict[str, Any]:
    """:func:`peak_memory` of one call of ``fn`` on the CPU, in MiB: ``{"peak_mb", "method", "process_peak_rss_mb"}``.

    ``process_peak_rss_mb`` is this process's peak RSS afterwards (:func:`max_rss_mb`) with ``process_rss``, else None
    (in a process that has run other measurements before, it says nothing about this call).
    """
    peak = peak_memory(fn)
    return {
        "peak_mb": peak["peak_bytes"] / 2**20,
        "method": peak["method"],
        "process_peak_rss_mb": max_rss_mb() if process_rss else None,
    }


def max_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this program's own address space.
    (``ru_maxrss`` is no use in a subprocess: it keeps the parent's high-water mark across fork + exec.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# For the memory probes: glibc malloc serves every allocation above 128 KiB from its own mapping and returns freed
# memory at once (fixed thresholds; by default they rise with use and freed memory stays in the heap), so the
# resident set follows the memory actually in use instead of what the allocator keeps cached.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
PROBE_PREFIX = "PROBE "


def print_probe(result: dict[str, Any]) -> None:
    """The subprocess side of a memory probe: print its result as the one ``PROBE {json}`` line the parent reads."""
    print(PROBE_PREFIX + json.dumps(result), flush=True)


def probe_in_subprocess(script: Path, argv: Sequence[str]) -> dict[str, Any]:
    """Run ``script --probe ...`` in a fresh interpreter (with :data:`PROBE_ENV`); it prints one ``PROBE {json}``."""
    env = {**os.environ, **PROBE_ENV}
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, check=False, env=env)
    for line in result.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX) :])
    raise RuntimeError(f"memory probe {argv} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


def add_probe_args(parser: argparse.ArgumentParser, probe_metavar: tuple[str, str]) -> argparse.ArgumentParser:
    """Add the flags of the memory probes: ``--in-process-memory`` and the hidden ``--probe`` that
    :func:`measure_peak` passes to the subprocess (``probe_metavar``: what its two values name)."""
    parser.add_argument("--in-process-memory", action="store_true", help="measure peak memory in this process")
    parser.add_argument("--probe", nargs=2, metavar=probe_metavar, help=argparse.SUPPRESS)
    return parser


def measure_peak(
    call: Callable[[], Any], script: Path, probe_argv: Sequence[str], *, in_process: bool, threads: int | None
) -> dict[str, Any]:
    """Peak memory of one call, as :func:`peak_mb` returns it: measured here, or by a probe subprocess.

    ``in_process``: :func:`peak_mb` of ``call`` in this process (no process peak RSS). Otherwise ``call`` is not run:
    ``script`` runs with ``probe_argv`` (plus ``--threads`` where given) in a fresh interpreter
    (:func:`probe_in_subprocess`), which measures the same call itself and reports it with :func:`print_probe`.
    """
    if in_process:
        return peak_mb(call)
    argv = [*probe_argv, *(["--threads", str(threads)] if threads else [])]
    return probe_in_subprocess(script, argv)


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


def benchmark_parser(description: str | None, name: str) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script: ``description`` (its docstring) and the common flags
    (:func:`add_common_args`), ``--out`` defaulting to ``results/<name>.json``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_args(parser, RESULTS_DIR / f"{name}.json")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (None: the command line) and apply ``--threads`` (``torch.set_num_threads``)."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def sizes_from_args(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with every size that was given on the command line (``args.<name>`` not None or 0) in its place."""
    return {name: getattr(args, name) or value for name, value in defaults.items()}


def add_common_args(parser: argparse.ArgumentParser, default_out: str | os.PathLike[str]) -> argparse.ArgumentParser:
    """Add the flags every benchmark script takes: ``--smoke`` (tiny sizes), ``--out`` (JSON path), ``--threads``."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 repeat: checks the script runs")
    parser.add_argument(
        "--out", default=str(default_out), help="where to write the JSON results (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser


def matmul_gflops(device: torch.device | str, sizes: Sequence[int] = (256, 512), seconds: float = 0.3) -> float:
    """The best float32 matmul throughput (GFLOP/s) over square sizes, on the current thread setting: the
    arithmetic side of a roofline limit."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
        a @ b  # warm-up
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            a @ b
            calls += 1
        _sync(device)
        best = max(best, 2.0 * size**3 * calls / (time.perf_counter() - start) / 1e9)
    return best


def memory_bandwidth_gbs(device: torch.device | str, megabytes: int = 256, seconds: float = 0.3) -> float:
    """The best copy bandwidth (GB/s, bytes read + bytes written) of a buffer far larger than the caches, on the
    current thread setting: the memory-traffic side of a roofline limit."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: pages in both buffers
    best = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or best == 0.0:
        began = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = max(best, 2.0 * source.numel() * 4 / (time.perf_counter() - began) / 1e9)
    return best


def roofline_s(flops: float, bytes_moved: float, gflops: float, gbs: float) -> tuple[float, str]:
    """The least time an operation of ``flops`` arithmetic and ``bytes_moved`` memory traffic can take at the
    measured throughputs, and which side bounds it (``"compute"`` or ``"memory"``)."""
    compute_s, memory_s = flops / (gflops * 1e9), bytes_moved / (gbs * 1e9)
    return (compute_s, "compute") if compute_s >= memory_s else (memory_s, "memory")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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


def start_report(title: str, smoke: bool, device: torch.device | str | None = None) -> dict[str, Any]:
    """Print the report's first line, ``# <title>[ (smoke)]: <machine>``; returns :func:`machine_info`."""
    machine = machine_info(device)
    print(f"# {title}{' (smoke)' if smoke else ''}: {describe_machine(machine)}", flush=True)
    return machine


def print_report(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | dict[str, str],
    notes: Sequence[str],
    extra: Sequence[str] = (),
) -> None:
    """Print the results: a blank line, the table of ``rows``, a blank line, the ``extra`` lines, a list of notes."""
    print()
    print_table(rows, columns)
    print()
    for line in extra:
        print(line)
    for note in notes:
        print(f"- {note}")


def save_result(out: str | os.PathLike[str], result: dict[str, Any], *also: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``result`` to ``out`` (:func:`write_json`) and say so, naming the files in ``also`` too; returns it."""
    path = write_json(out, result)
    print("\nwrote " + " and ".join(str(p) for p in (path, *also)), flush=True)
    return result
