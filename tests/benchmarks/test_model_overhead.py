"""The model_overhead and history_scaling benchmarks run (smoke mode: tiny random Llama) and write sane JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.benchmarks import load_benchmark, run_benchmark


def _check_common(data: dict, returned: dict, name: str, out: Path) -> None:
    assert data == json.loads(json.dumps(returned))
    assert data["benchmark"] == name and data["smoke"] is True
    assert {"cpu", "cpu_count", "torch", "python", "torch_threads"} <= data["machine"].keys()
    assert data["machine"]["torch_threads"] == 1
    for key in ("load_average_start", "load_average_end"):
        assert data[key] is None or len(data[key]) == 3
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file


def test_model_overhead_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("model_overhead")
    out = tmp_path / "nested" / "model_overhead.json"
    returned = run_benchmark(bench, ["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_common(data, returned, "model_overhead", out)
    assert data["settings"]["memory"] == "in-process"

    rows = {row["key"]: row for row in data["rows"]}
    assert set(rows) == {key for key, _ in bench.METRICS}
    for key, row in rows.items():
        values = [row[system] for system in bench.SYSTEMS]
        if key == "trainable_params":
            assert row["base"] == 0 and 0 < row["lora"] and 0 < row["deltamem"]
            continue
        assert all(isinstance(v, float) and v >= 0 for v in values), row
        if key.endswith("_s") or key.endswith("per_token"):  # times: positive, ratios of the medians
            assert all(v > 0 for v in values), row
            assert row["deltamem_over_base"] == pytest.approx(row["deltamem"] / row["base"])
            assert row["deltamem_over_lora"] == pytest.approx(row["deltamem"] / row["lora"])
    for key, phase in bench.TARGET_OF.items():
        reference, limit = bench.TARGETS[phase]
        assert rows[key]["met"] == ("yes" if rows[key][f"deltamem_over_{reference}"] <= limit else "no")
    decode_roofline = data["roofline"]["decode"]
    for system in bench.SYSTEMS:
        # % of limit: the roofline limit of a decode step over its measured median time
        limit, measured = data["systems"][system]["decode_limit_ms_per_token"], rows["decode_ms_per_token"][system]
        assert 0 < limit and data["systems"][system]["decode_limit_pct"] == pytest.approx(100 * limit / measured)
        assert decode_roofline[f"{system}_bound"] in {"compute", "memory"}
        timing = data["timings"]["decode_ms_per_token"][system]
        assert timing["repeats"] == bench.SMOKE["decode_steps"] == len(timing["times_s"])  # every step timed
        assert data["timings"]["train_step_s"][system]["repeats"] == 1
    printed = capsys.readouterr().out
    assert "| metric | base | LoRA | δ-mem | δ-mem/base | δ-mem/LoRA |" in printed
    assert "training step (s)" in printed and "decode (ms/token)" in printed


def test_model_overhead_only_some_measurements(tmp_path: Path) -> None:
    bench = load_benchmark("model_overhead")
    data = run_benchmark(bench, ["--smoke", "--out", str(tmp_path / "r.json"), "--only", "decode"])
    assert [row["key"] for row in data["rows"]] == [
        "decode_ms_per_token",
        "decode_limit_ms_per_token",
        "decode_limit_pct",
        "trainable_params",
    ]


def test_decode_roofline_counts_parameters_and_kv_cache() -> None:
    bench = load_benchmark("model_overhead")
    model = bench.load_base(smoke=True)
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // 4) * 10
    # a huge matmul throughput: the memory side sets the limit; a huge bandwidth: the arithmetic side
    assert bench.decode_roofline(model, 10, gflops=1e9, gbs=1.0) == pytest.approx((4 * (params + kv) / 1e9, "memory"))
    assert bench.decode_roofline(model, 10, gflops=1.0, gbs=1e9) == pytest.approx((2 * params / 1e9, "compute"))


def test_history_scaling_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("history_scaling")
    out = tmp_path / "history_scaling.json"
    plot = tmp_path / "img" / "history.png"
    returned = run_benchmark(bench, ["--smoke", "--out", str(out), "--plot", str(plot)])
    data = json.loads(out.read_text())
    _check_common(data, returned, "history_scaling", out)
    sizes, window = bench.SMOKE, bench.SMOKE_POSITIONS
    assert data["settings"]["window"] == window
    rows = {(row["system"], row["history_tokens"]): row for row in data["rows"]}
    assert set(rows) == {(system, h) for system in bench.SYSTEMS for h in sizes["histories"]}

    short, middle, longest = sizes["histories"]
    room = window - sizes["question"] - sizes["answer"]
    assert rows[("in_context", short)]["history_in_context"] == short  # fits whole
    assert rows[("in_context", middle)]["history_in_context"] == room  # truncated to fit
    assert rows[("in_context", longest)]["possible"] is False and "exceeds" in rows[("in_context", longest)]["note"]
    assert rows[("in_context", longest)].get("total_s") is None
    for row in rows.values():
        if not row["possible"]:
            continue
        assert row["take_in_s"] > 0 and row["answer_s"] > 0
        assert row["total_s"] == pytest.approx(row["take_in_s"] + row["answer_s"])
        assert row["peak_mb"] >= 0 and row["carrier_mb"] > 0
    memory_sizes = {rows[("deltamem", h)]["carrier_mb"] for h in sizes["histories"]}
    assert len(memory_sizes) == 1  # the memory does not grow with the history
    assert rows[("in_context", middle)]["carrier_mb"] > rows[("in_context", short)]["carrier_mb"]  # the KV cache does
    summary = data["summary"]
    assert {"deltamem_peak_growth_longest_vs_smallest", "target", "met"} <= summary.keys()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and data["plot"] == str(plot)
    printed = capsys.readouterr().out
    assert "| system | history tokens | possible |" in printed


def test_read_only_decoding_leaves_the_prefilled_memory(tmp_path: Path) -> None:
    """``--decode-read-only``: the prefill writes δ-mem's memory, the decode steps only read it."""
    bench = load_benchmark("model_overhead")
    model = bench.wrap(bench.load_base(smoke=True), "deltamem")
    prompt = bench.random_ids(8, model.config.vocab_size, seed=0)
    written = {}
    for read_only in (True, False):
        decoder = bench.Decoder("deltamem", model, prompt, read_only=read_only)
        decoder.start()
        prefilled = {k: v.clone() for k, v in decoder.kwargs["memory"].states.items()}
        decoder.step()
        decoder.step()
        after = decoder.kwargs["memory"].states
        written[read_only] = any(not torch.equal(after[k], v) for k, v in prefilled.items())
    assert written == {True: False, False: True}
    data = run_benchmark(
        bench, ["--smoke", "--out", str(tmp_path / "r.json"), "--only", "decode", "--decode-read-only"]
    )
    assert data["settings"]["decode_read_only"] is True
