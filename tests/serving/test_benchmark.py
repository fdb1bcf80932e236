"""benchmarks/serving.py runs (smoke mode: tiny random Llama through the real HTTP path) and writes sane JSON."""

from __future__ import annotations

import json

from tests.helpers.benchmarks import load_benchmark, run_benchmark


def test_serving_benchmark_smoke(tmp_path) -> None:
    out = tmp_path / "serving.json"
    returned = run_benchmark(load_benchmark("serving"), ["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned)) and data["smoke"] is True
    rows = {row["measure"]: row for row in data["rows"]}
    assert rows["throughput ratio (concurrent / one at a time)"]["tokens_per_s"] > 0
    assert rows["snapshot bytes per write group"]["bytes"] > 0
    # the δ-mem prompt stays flat while the resent history grows
    assert rows["turn 4: δ-mem (keep_last 2)"]["prompt_tokens"] == rows["turn 2: δ-mem (keep_last 2)"]["prompt_tokens"]
    assert rows["turn 4: resend the history"]["prompt_tokens"] > rows["turn 2: resend the history"]["prompt_tokens"]
