"""``deltamem data`` and ``deltamem eval`` with the working-style levels (6-7)."""

from __future__ import annotations

import json

import pytest

from peft_deltamem.cli import data
from peft_deltamem.cli import eval as eval_cli
from peft_deltamem.evaluation.ladder import make_ladder


def test_data_writes_working_style_records(tmp_path, capsys) -> None:
    out = tmp_path / "style.jsonl"
    assert data.main(["--level", "7", "--n", "12", "--fact-types", "capitals,language", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == make_ladder(7, 12, fact_types=("capitals", "language"))
    assert {r["fact_type"] for r in records} == {"capitals+language"}
    assert "wrote 12 L7 train conversations" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a fact type is not a preference kind: usage error, nothing written
        data.main(["--level", "6", "--n", "2", "--fact-types", "colour", "--out", str(tmp_path / "bad.jsonl")])
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--levels", "1,2", "--fact-types", "colour,capitals"], "['capitals'] are not used by level(s) [1, 2]"),
        (["--levels", "2,6", "--no-generate"], "drop --no-generate"),
    ],
)
def test_eval_rejects_style_misuse_before_loading_a_model(argv, message, capsys) -> None:
    assert eval_cli.main(["recall", *argv, "--base", "/nonexistent/model"]) == 2
    assert message in capsys.readouterr().err


def test_eval_accepts_style_levels() -> None:
    args = eval_cli.build_parser().parse_args(["recall", "--levels", "1,6,7", "--fact-types", "colour,capitals"])
    assert args.levels == [1, 6, 7]
    with pytest.raises(SystemExit):
        eval_cli.build_parser().parse_args(["recall", "--level", "8"])
