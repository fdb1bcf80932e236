"""``deltamem serve`` as a real process (the CLI): sessions survive a restart and a ``kill -9`` during a burst of writes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from peft_deltamem.serving.window import group_hashes, plan_window
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.serving import free_port, served_model
from tests.helpers.tiny_models import tiny_model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 base model directory and a δ-mem adapter on it that names it as its base."""
    root = tmp_path_factory.mktemp("served")
    base = tiny_model("qwen3", vocab_size=len(qwen3_tokenizer()))
    base.save_pretrained(root / "base")
    qwen3_tokenizer().save_pretrained(root / "base")
    model = served_model()
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def start(adapter: Path, store: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-c", "import sys; from peft_deltamem.cli import main; sys.exit(main())", "serve",
        "--adapter", str(adapter), "--port", str(port), "--store", str(store), "--keep-last", "1",
        "--api-key", KEY, "--device", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"deltamem serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("deltamem serve did not start in 120 s")


def conversation(session: int, turns: int) -> list[dict]:
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"s{session} fact {t}"}, {"role": "assistant", "content": f"ok {t}"}]
    return messages + [{"role": "user", "content": "and now?"}]


def ask(port: int, session: int, turns: int) -> tuple[int, int, int]:
    body = {"messages": conversation(session, turns), "max_tokens": 2, "temperature": 0, "session_id": f"s{session}"}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    return session, turns, response.status_code


def test_sessions_survive_a_restart(adapter_dir, tmp_path) -> None:
    store, port = tmp_path / "sessions.db", free_port()
    server = start(adapter_dir, store, port)
    try:
        assert ask(port, 0, 3)[2] == 200
        server.send_signal(signal.SIGTERM)  # graceful: finishes and commits
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
        server = start(adapter_dir, store, port)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/sessions", headers=AUTH).json()["data"]
        assert [s["id"] for s in listed] == ["s0"] and listed[0]["messages_in_memory"] == 5
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


@pytest.mark.slow  # two server starts and a burst: about 20 s on a loaded 2-core machine
def test_every_answered_request_survives_kill_9_during_a_burst(adapter_dir, tmp_path) -> None:
    store, port = tmp_path / "sessions.db", free_port()
    server = start(adapter_dir, store, port)
    try:
        # a burst of growing conversations in 4 sessions, killed midway
        answered: dict[int, int] = {}

        def burst(session: int) -> None:
            for turns in range(1, 40):
                try:
                    if ask(port, session, turns)[2] != 200:
                        return
                except httpx.HTTPError:
                    return
                answered[session] = turns

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(burst, s) for s in range(1, 5)]
            time.sleep(4)
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            for future in futures:
                future.result(timeout=120)
        assert sum(answered.values()) > 0
        assert sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for session, turns in answered.items():
            # every request answered with 200 is stored (a later one may have committed its writes before the kill)
            wanted = group_hashes(plan_window(conversation(session, turns), 1).groups)
            assert _chain(store, f"s{session}")[: len(wanted)] == wanted
        server = start(adapter_dir, store, port)
        assert ask(port, 1, 2)[2] == 200  # a session rewinds and goes on after the crash
        assert len(_chain(store, "s1")) == len(plan_window(conversation(1, 2), 1).groups)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def _chain(store: Path, session_id: str) -> list[str]:
    rows = sqlite3.connect(store).execute("SELECT hash FROM groups WHERE session_id = ? ORDER BY idx", (session_id,))
    return [r[0] for r in rows]
