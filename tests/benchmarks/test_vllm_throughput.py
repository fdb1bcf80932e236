"""benchmarks/vllm_throughput.py without vLLM: its command line and how it turns rounds into ratios.

The run itself needs vLLM (``.venv-vllm``) and two engine starts, minutes on this machine: docs/vllm.md records a run.
"""

from __future__ import annotations

import pytest

from tests.helpers.benchmarks import load_benchmark


def test_help_names_the_systems_and_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("vllm_throughput")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--smoke", "--out", "--sessions", "--prompt-tokens", "--history-tokens", "--max-tokens", "--rounds"):
        assert flag in text
    for system in bench.SYSTEMS:
        assert system in text
    assert "--work WORK" not in text  # the worker processes' flags are internal


def test_ratios_pair_the_rounds() -> None:
    bench = load_benchmark("vllm_throughput")
    rates = {
        "vllm+deltamem write": [90.0, 40.0, 70.0],
        "vllm+deltamem read-only": [100.0, 45.0, 60.0],
        "vllm base": [100.0, 50.0, 100.0],
        "transformers+deltamem write": [30.0, 20.0, 35.0],
    }
    rows = {row["measure"]: row for row in bench.ratio_rows(rates)}
    write = rows["vllm+deltamem write / vllm base"]
    # Per-round ratios 0.9, 0.8, 0.7: their median, not the ratio of the medians (70 / 100).
    assert write["per_round"] == pytest.approx([0.9, 0.8, 0.7])
    assert write["ratio"] == pytest.approx(0.8) and write["met"] is True and write["target"] == bench.TARGET_RATIO
    read_only = rows["vllm+deltamem read-only / vllm base"]
    assert read_only["ratio"] == pytest.approx(0.9) and read_only["met"] is True
    versus = rows["vllm+deltamem write / transformers+deltamem write"]
    assert versus["ratio"] == pytest.approx(2.0) and "met" not in versus
    rates["vllm+deltamem write"] = [70.0, 30.0, 70.0]
    assert bench.ratio_rows(rates)[0]["met"] is False


def test_agreement_counts_identical_answers_and_common_prefixes() -> None:
    bench = load_benchmark("vllm_throughput")
    same = bench.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 0, 8]])
    assert same == {"identical": 0.5, "common_prefix": pytest.approx((1.0 + 0.5) / 2)}
    assert bench.agreement([[1, 2]], [[9, 2]]) == {"identical": 0.0, "common_prefix": 0.0}
