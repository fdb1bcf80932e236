"""The scan benchmark runs (smoke mode) and writes sane JSON; the shared benchmark helpers behave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.benchmarks import BENCH_DIR, load_benchmark, run_benchmark


def test_scan_smoke_writes_expected_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan = load_benchmark("scan")
    out = tmp_path / "nested" / "scan.json"
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Before\n\n{scan.DOCS_BEGIN}\nold table\n{scan.DOCS_END}\n\nAfter.\n")
    returned = run_benchmark(scan, ["--smoke", "--out", str(out), "--docs", str(docs), "--in-process-memory"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["benchmark"] == "scan" and data["smoke"] is True
    assert {"cpu", "cpu_count", "torch", "python", "torch_threads"} <= data["machine"].keys()
    grid = scan.SMOKE
    expected = {(t, r, n) for t in grid["T"] for r in grid["r"] for n in grid["N"]}
    assert {(row["T"], row["r"], row["N"]) for row in data["rows"]} == expected
    assert len(data["rows"]) == len(expected)
    gflops, gbs = data["settings"]["matmul_gflops"], data["settings"]["copy_gbs"]
    assert gflops["used"] == max(gflops["start"], gflops["end"]) > 0
    assert gbs["used"] == max(gbs["start"], gbs["end"]) > 0
    for row in [*data["rows"], data["masked"]]:
        assert row["chunk_size"] == scan.default_chunk_size(row["N"], row["T"], row["r"])
        for mode in ("fwd", "fwdbwd"):
            for impl in ("recurrent", "chunked"):
                assert row[f"{mode}_{impl}_ms"] > 0 and len(row[f"{mode}_{impl}_times_s"]) == row["rounds"]
                # % of the limit: the longer of the FLOPs at the run's matmul throughput and the least traffic at
                # its copy bandwidth, over the measured time
                compute_ms = scan.scan_flops(row["N"], row["T"], row["r"])[mode] / gflops["used"] / 1e6
                memory_ms = scan.scan_bytes(row["N"], row["T"], row["r"], row["r"])[mode] / gbs["used"] / 1e6
                limit_ms = max(compute_ms, memory_ms)
                assert row[f"{mode}_limit_ms"] == pytest.approx(limit_ms)
                assert row[f"{mode}_bound"] == ("compute" if compute_ms >= memory_ms else "memory")
                assert row[f"{mode}_{impl}_limit_pct"] == pytest.approx(100 * limit_ms / row[f"{mode}_{impl}_ms"])
            assert row[f"{mode}_speedup"] == pytest.approx(row[f"{mode}_recurrent_ms"] / row[f"{mode}_chunked_ms"])
        assert set(row["max_diff_grad_by_input"]) == {"q", "k", "v", "keep", "erase", "write", "state"}
        assert row["max_diff_grads"] == max(row["max_diff_grad_by_input"].values())
        for key in ("max_diff_reads", "max_diff_state", "max_diff_grads"):
            assert 0 <= row[key] < 1e-5, (key, row)
        assert row["chunked_fwdbwd_peak_mb"] >= 0
    assert data["masked"]["masked_fraction"] == scan.MASKED_FRACTION
    assert (data["masked"]["T"], data["masked"]["r"], data["masked"]["N"]) == grid["masked"]
    bars = data["bars"]
    for key in ("fwd_speedup", "fwdbwd_speedup"):
        assert bars[key]["worst"] == min(row[key] for row in data["rows"])
        assert bars[key]["met"] == (bars[key]["worst"] >= scan.BARS[key]) and bars[key]["bar"] == scan.BARS[key]
    assert bars["masked_fwdbwd_speedup"]["value"] == data["masked"]["fwdbwd_speedup"]
    sweep_shapes = {(n, grid["chunk_sweep_T"], r) for r, n in grid["chunk_sweep_shapes"]}
    assert {(row["N"], row["T"], row["r"], row["chunk_size"]) for row in data["chunk_sweep"]} == {
        (*shape, size) for shape in sweep_shapes for size in grid["chunk_sweep"]
    }
    assert all(row["fwd_chunked_ms"] > 0 and row["fwdbwd_chunked_ms"] > 0 for row in data["chunk_sweep"])
    assert all(min(row[f"{mode}_rel"] for row in data["chunk_sweep"]) == 1 for mode in ("fwd", "fwdbwd"))
    assert {(row["T"], row["r"], row["N"]) for row in data["crossover"]} == {
        (t, r, n) for r, n in grid["crossover_shapes"] for t in grid["crossover_T"]
    }
    for row in data["crossover"]:
        assert row["fwd_speedup"] > 0 and row["fwdbwd_speedup"] > 0
        assert row["auto_fwdbwd"] == scan.auto_impl(row["N"], row["T"], row["r"], grad=True)
    printed = capsys.readouterr().out
    assert "| T | r | N |" in printed and "fwd+bwd ×" in printed and "% of limit" in printed
    assert not list(out.parent.glob("*.tmp"))  # the atomic write left no temp file
    # --docs rewrote only its section
    text = docs.read_text()
    assert text.startswith("# Before\n\n" + scan.DOCS_BEGIN) and text.endswith(scan.DOCS_END + "\n\nAfter.\n")
    assert "old table" not in text and "| T | r | N |" in text and "fwd+bwd chunked % of limit" in text


@pytest.mark.slow  # builds the fused solve (about a minute the first time)
def test_scan_fused_subset(tmp_path: Path) -> None:
    """--fused-scan with --n: only those rows of the grid, the chunked form through the fused solve (counted), its
    results as close to the token loop as the eager solve's; --docs refuses a subset."""
    scan = load_benchmark("scan")
    from peft_deltamem.ops import chunked, disable_fused_scan, fused

    calls = []
    original = fused.row_solve
    try:
        chunked.row_solve = lambda *a: calls.append(1) or original(*a)
        out = tmp_path / "scan_fused.json"
        data = run_benchmark(scan, ["--smoke", "--fused-scan", "--n", "2", "--out", str(out), "--in-process-memory"])
    finally:
        chunked.row_solve = original
        disable_fused_scan()
    assert calls and data["settings"]["fused_scan"] is True
    assert {row["N"] for row in data["rows"]} == {2} and data["chunk_sweep"] == [] and data["crossover"] == []
    assert all(row["max_diff"] < 1e-5 for row in data["rows"])
    with pytest.raises(SystemExit):
        run_benchmark(scan, ["--smoke", "--n", "2", "--docs", str(tmp_path / "x.md")])


def test_scan_peak_probe_in_subprocess() -> None:
    """The peak memory of the full run is measured in a fresh interpreter running the script with --probe."""
    scan = load_benchmark("scan")
    timing = load_benchmark("_timing")
    result = timing.probe_in_subprocess(Path(scan.__file__), ["--probe", "64,4,2,1", "chunked", "--threads", "1"])
    assert result["method"] in {"rss_sampled", "ru_maxrss_growth"} and result["peak_mb"] >= 0


def test_scan_docs_section_must_exist(tmp_path: Path) -> None:
    scan = load_benchmark("scan")
    path = tmp_path / "x.md"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="scan-results"):
        scan.update_docs(path, "table")


def test_time_fn_median_and_repeats() -> None:
    timing = load_benchmark("_timing")
    calls = []
    result = timing.time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and result["repeats"] == 5 and len(result["times_s"]) == 5
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["median_s"] == sorted(result["times_s"])[2]
    with pytest.raises(ValueError):
        timing.time_fn(lambda: None, repeats=0)


def test_write_json_is_atomic_and_overwrites(tmp_path: Path) -> None:
    timing = load_benchmark("_timing")
    path = tmp_path / "a" / "r.json"
    timing.write_json(path, {"x": 1})
    timing.write_json(path, {"x": [2, 3]})
    assert json.loads(path.read_text()) == {"x": [2, 3]}
    with pytest.raises(TypeError):  # not serialisable: the old file stays, no temp file is left behind
        timing.write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": [2, 3]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_markdown_table_and_peak_memory() -> None:
    timing = load_benchmark("_timing")
    table = timing.markdown_table([{"a": 1, "b": 0.000012345}, {"a": 2.5, "b": None}], {"a": "A", "b": "B"})
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1 | 1.2e-05 |", "| 2.5 |  |"]

    # In a fresh interpreter: a long-lived test process (an xdist worker after hundreds of tests) saw no RSS growth
    # for a fresh 256 MiB tensor (peak 4096 bytes), so the sampler's check needs a process of its own.
    code = (
        "import sys, time, torch; sys.path.insert(0, sys.argv[1]); import _timing\n"
        "def hold():\n    x = torch.ones(64, 2**20); time.sleep(0.2); x.sum()\n"
        "print(_timing.peak_memory(hold)['peak_bytes'])"
    )
    result = subprocess.run([sys.executable, "-c", code, str(BENCH_DIR)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 200 * 2**20, result.stdout


def test_roofline_picks_the_longer_side_and_scan_bytes_counts_every_tensor() -> None:
    timing = load_benchmark("_timing")
    scan = load_benchmark("scan")
    assert timing.roofline_s(2e9, 1e9, gflops=1.0, gbs=1.0) == pytest.approx((2.0, "compute"))
    assert timing.roofline_s(1e9, 3e9, gflops=1.0, gbs=1.0) == pytest.approx((3.0, "memory"))
    # N 2, T 5, r 4, row gates: inputs 2·5·(12 + 3) + 2·16 = 182 floats, outputs 2·5·4 + 2·16 = 72 floats
    assert scan.scan_bytes(2, 5, 4, gate_width=1) == {"fwd": 4.0 * 254, "fwdbwd": 8.0 * 254}
    assert timing.memory_bandwidth_gbs("cpu", megabytes=8, seconds=0.01) > 0
