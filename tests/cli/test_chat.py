"""``deltamem chat`` driven through stdin: replies, /save, /load in a fresh process, /memory, errors."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_deltamem import DeltaMemConfig
from peft_deltamem.cli.chat import main
from tests.helpers import ROOT
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny base model directory (with a chat tokenizer) and a δ-mem adapter for it with random weights."""
    root = tmp_path_factory.mktemp("chat")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tokenizer = copy.deepcopy(qwen3_tokenizer())
    tiny_model("qwen3", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # so the adapter config names base_dir as its base
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, scale=0.3)
    model.save_pretrained(adapter_dir)
    return adapter_dir


def chat_in_process(adapter_dir: Path, script: str, *extra: str) -> tuple[int, str]:
    """Run ``deltamem chat``'s ``main`` here with ``script`` as stdin; returns (exit status, stdout)."""
    out = io.StringIO()
    argv = ["--adapter", str(adapter_dir), "--max-new-tokens", "6", *extra]
    return main(argv, stdin=io.StringIO(script), stdout=out), out.getvalue()


def chat_in_fresh_process(adapter_dir: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``deltamem chat`` in a fresh Python process with ``script`` on stdin (not a TTY)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "peft_deltamem.cli.chat", "--adapter", str(adapter_dir), "--max-new-tokens", "6"]
    return subprocess.run(command, input=script, capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)


def after(output: str, marker: str) -> str:
    """The part of ``output`` after the line that starts with ``marker``."""
    head, found, tail = output.partition(marker)
    assert found, f"{marker!r} not in {output!r}"
    return tail.split("\n", 1)[1]


def test_a_fact_saved_in_one_process_is_back_after_load_in_another(adapter_dir, tmp_path) -> None:
    saved = tmp_path / "session"
    # The first chat runs in this process (one fresh process is enough to show that nothing but DIR carries over).
    status, first = chat_in_process(
        adapter_dir, f"My cat is called Tom.\n/save {saved}\n/memory\nWhat is my cat called?\n/quit\nignored\n"
    )
    assert status == 0
    assert (saved / "session.json").is_file() and (saved / "memory.safetensors").is_file()
    before = after(first, "saved session to")
    assert "norm" in before and "you>" not in first  # no prompt decorations when stdin is not a TTY

    second = chat_in_fresh_process(adapter_dir, f"/load {saved}\n/memory\nWhat is my cat called?\n")
    assert second.returncode == 0, second.stderr
    assert "loaded session from" in second.stdout and "(2 messages)" in second.stdout
    # Same state norms and gate statistics, and (greedy) the same answer as the first chat gave.
    assert after(second.stdout, "loaded session from") == before


def test_commands_and_errors_in_process(adapter_dir, tmp_path) -> None:
    script = "\n".join(
        ["/memory", "Hello.", "/history", "/reset", "/memory", "/nonsense", f"/load {tmp_path}", "/help", ""]
    )
    status, text = chat_in_process(adapter_dir, script)
    assert status == 1  # /nonsense and the failed /load
    assert text.count("memory: empty") == 2
    assert "user: Hello." in text and "assistant: " in text
    assert "memory and history cleared" in text and "/save DIR" in text


def test_deltamem_dispatches_chat(capsys) -> None:
    from peft_deltamem import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--help"])
    assert exit_info.value.code == 0 and "deltamem chat" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
