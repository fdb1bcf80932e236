"""The ``deltamem`` commands: one dispatcher, one module per command, dashed flags with underscore aliases."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from peft_deltamem import cli
from peft_deltamem.cli._args import ArgumentParser
from peft_deltamem.cli.data import main
from peft_deltamem.evaluation.ladder import make_ladder


def test_every_command_is_a_module_of_the_cli_package_with_a_main() -> None:
    for name, target in cli.COMMANDS.items():
        module_name, function = target.split(":")
        assert module_name == f"peft_deltamem.cli.{name.replace('-', '_')}"  # export-vllm: export_vllm.py
        assert callable(getattr(importlib.import_module(module_name), function))


def test_dispatcher_usage_and_unknown_command(capsys) -> None:
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in cli.COMMANDS)
    assert cli.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err


def test_flags_take_both_spellings() -> None:
    parser = ArgumentParser(prog="x")
    parser.add_argument("--max-new-tokens", type=int, default=1)
    sub = parser.add_subparsers(dest="command").add_parser("recall")
    sub.add_mutually_exclusive_group().add_argument("--fact-types")
    assert parser.parse_args(["--max_new_tokens", "5", "recall", "--fact_types", "colour"]).max_new_tokens == 5
    args = parser.parse_args(["--max-new-tokens=7", "recall", "--fact-types=colour"])
    assert (args.max_new_tokens, args.fact_types) == (7, "colour")
    assert parser.parse_args(["--max_new_tokens=8"]).max_new_tokens == 8
    assert "max_new_tokens" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--max_new_token", "1"])  # not an option in either spelling


def test_old_python_m_entry_point_runs_the_new_command(tmp_path) -> None:
    out = tmp_path / "l1.jsonl"
    command = [sys.executable, "-W", "always::DeprecationWarning", "-m", "peft_deltamem.training.ladder_data"]
    result = subprocess.run([*command, "--n", "2", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # it still works (one process: importing torch takes seconds)
    assert "DeprecationWarning" in result.stderr and "peft_deltamem.cli.data" in result.stderr  # says what replaces it
    assert len(out.read_text().splitlines()) == 2


def test_ladder_data_cli_writes_the_generator_s_records(tmp_path, capsys):
    out = tmp_path / "data" / "l1.jsonl"
    assert main(["--level", "1", "--n", "20", "--fact-types", "colour", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == make_ladder(1, 20, seed=0, fact_types=("colour",))
    assert "wrote 20 L1 train conversations" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a bad fact type is a usage error, and nothing is written
        main(["--level", "1", "--n", "5", "--fact-types", "name", "--out", str(tmp_path / "bad.jsonl")])
    assert not (tmp_path / "bad.jsonl").exists()


def test_export_vllm_names_a_missing_adapter_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["export-vllm", str(tmp_path / "no-adapter"), str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("deltamem export-vllm: error: ") and "no-adapter" in captured.err
    assert captured.out == "" and not out.exists()
