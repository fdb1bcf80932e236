"""``deltamem serve --engine vllm``: the OpenAI-compatible server on the vLLM engine, as a real process on 127.0.0.1.

One server process for the module (an engine start costs 25-60 s on 2 idle cores): the official ``openai`` client
talks to it. The answers and memories are compared with this package's own ``MemorySession`` on the same adapter
(drop-in conversations, rewinds), sessions asked concurrently with the same sessions asked alone, and last the process
is killed with ``kill -9`` during a burst of writes and restarted on the same store (the only second engine start).
"""

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
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.chat.session import MemorySession
from peft_deltamem.cli.serve import main as serve_main
from peft_deltamem.serving.store import memory_from_bytes, memory_to_bytes
from peft_deltamem.serving.window import group_hashes, plan_window, write_messages
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.serving import free_port
from tests.helpers.tiny_models import randomize_adapter, tiny_model
from tests.vllm._engines import GEOMETRY, max_difference

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # a server process with a vLLM engine, started twice

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEEP_LAST = 2
TOLERANCE = 1e-5
SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = ["My cat is called Tom.", "The code is blue seven.", "I live in Paris.", "What is my cat called?", "Where?"]


class Server:
    """``deltamem serve --engine vllm`` in a child process; its stderr goes to a file (vLLM logs a lot)."""

    def __init__(self, adapter: Path, store: Path, log: Path) -> None:
        self.adapter, self.store, self.log = adapter, store, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-c", "import sys; from peft_deltamem.cli import main; sys.exit(main())", "serve",
            "--adapter", str(self.adapter), "--engine", "vllm", "--port", str(self.port), "--store", str(self.store),
            "--keep-last", str(KEEP_LAST), "--api-key", KEY, "--model-name", "tiny", "--log-level", "warning",
            "--vllm-option", 'dtype="float32"', "--vllm-option", "enforce_eager=true",
            "--vllm-option", "max_model_len=512",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 600  # 25-60 s idle; several minutes on a loaded machine
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deltamem serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop(signal.SIGKILL)
        raise RuntimeError("deltamem serve --engine vllm did not start in 600 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and the engine processes it started (a ``kill -9`` leaves them orphaned)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        for child in children:  # by pid: only the processes this server started
            try:
                child.wait(timeout=0 if sig == signal.SIGKILL else 30)
            except (psutil.TimeoutExpired, psutil.NoSuchProcess):
                pass
            if child.is_running():
                child.kill()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def memory(self, session_id: str) -> MemoryState:
        response = httpx.get(f"{self.url}/v1/sessions/{session_id}/memory", headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        return memory_from_bytes(response.content)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 (head_dim 32) with a random δ-mem adapter, saved with a tokenizer; the server on it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vllm-serve")
    tokenizer = qwen3_tokenizer()
    base = tiny_model("qwen3", vocab_size=len(tokenizer), **GEOMETRY["qwen3"])
    assert base.lm_head.weight is not base.get_input_embeddings().weight
    with torch.no_grad():  # a random model's logits are nearly flat: float noise would flip greedy near-ties
        base.lm_head.weight.mul_(30)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "k", "v", "o"]))
    randomize_adapter(model, seed=0, scale=0.3)
    model.requires_grad_(False).eval()
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    server = Server(root / "adapter", root / "sessions.db", root / "server.log")
    start = time.monotonic()
    server.start()
    print(f"\nengine start (export included): {time.monotonic() - start:.1f} s")
    yield model, tokenizer, server
    server.stop()


def chat(client, messages, session_id, **kwargs):
    return client.chat.completions.create(
        model="tiny",
        messages=messages,
        extra_body={"session_id": session_id} if session_id else None,
        **{"max_tokens": 6, "temperature": 0, **kwargs},
    )


def reference(model, tokenizer, groups) -> MemoryState:
    """A fresh memory fed the write groups in order (a fresh session fed the conversation), by this package."""
    memory = MemoryState()
    for group in groups:
        write_messages(model, tokenizer, memory, group)
    return memory


def test_a_drop_in_conversation_equals_a_memory_session(setup) -> None:
    """Sent in full each turn: the answers and memory of MemorySession with the same keep_last (and a stream)."""
    model, tokenizer, server = setup
    session = MemorySession(model, tokenizer, keep_last=KEEP_LAST, system=SYSTEM["content"])
    client, conversation = server.client(), [SYSTEM]
    for i, text in enumerate(TURNS):
        conversation.append({"role": "user", "content": text})
        if i == 2:  # streamed: the deltas add up to the answer
            chunks = list(chat(client, conversation, "drop-in", stream=True))
            answer_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            response = chat(client, conversation, "drop-in")
            answer_text = response.choices[0].message.content
            prompt = tokenizer.apply_chat_template(
                plan_window(conversation, KEEP_LAST).prompt, tokenize=False, add_generation_prompt=True
            )
            assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        held = server.memory("drop-in")
        if session.memory.is_empty:
            assert all(not v.any() for v in held.states.values())
        else:
            assert max_difference(held, session.memory) < TOLERANCE  # what the session held when answering
        assert answer_text == session.reply(text, max_new_tokens=6, do_sample=False)
        conversation.append({"role": "assistant", "content": answer_text})
    info = httpx.get(f"{server.url}/v1/sessions/drop-in", headers=AUTH).json()
    assert info["messages_in_memory"] == len(plan_window(conversation[:-1], KEEP_LAST).written) > 0
    # A memory MemorySession saved imports into the vLLM server (the engines' memories are interchangeable) ...
    url = f"{server.url}/v1/sessions/imported/memory"
    assert httpx.put(url, content=memory_to_bytes(session.memory), headers=AUTH).status_code == 200
    assert max_difference(server.memory("imported"), session.memory) == 0.0
    # ... and another adapter's memory does not.
    other = session.memory.clone()
    other.adapter_config = {**other.adapter_config, "r": 16}
    response = httpx.put(url, content=memory_to_bytes(other), headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["code"] == "adapter_mismatch"


def test_an_edited_turn_rewinds(setup) -> None:
    """Editing an earlier turn gives the memory of a fresh session fed the edited conversation; going back restores."""
    model, tokenizer, server = setup
    conversation = [SYSTEM]
    for i, text in enumerate(TURNS[:4]):
        conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": f"Noted {i}."}]
    question = {"role": "user", "content": "Tell me everything."}
    edited = [dict(m) for m in conversation]
    edited[3] = {"role": "user", "content": "The code is red nine."}
    client = server.client()
    chat(client, [*conversation, question], "rewind")
    original = server.memory("rewind")
    assert max_difference(original, reference(model, tokenizer, plan_window([*conversation, question], 2).groups)) < (
        TOLERANCE
    )
    chat(client, [*edited, question], "rewind")
    rewound = server.memory("rewind")
    assert max_difference(rewound, reference(model, tokenizer, plan_window([*edited, question], 2).groups)) < TOLERANCE
    assert max_difference(rewound, original) > 5 * TOLERANCE  # the edit changed the memory (beyond the tolerance)
    chat(client, [*conversation, question], "rewind")
    assert max_difference(server.memory("rewind"), original) < TOLERANCE


def test_stop_strings_seeds_and_limits(setup) -> None:
    """A stop string cuts the answer as the transformers engine does; a seed repeats a sampled answer; a prompt over
    the engine's max_model_len is a 400, not a failed request."""
    _, _, server = setup
    client, messages = server.client(), [SYSTEM, {"role": "user", "content": "Say something long."}]
    full = chat(client, messages, None).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(full) >= 4 and stop.strip(), full
    cut = chat(client, messages, None, stop=[stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full[: full.find(stop)].strip(), "stop")
    sampled = [chat(client, messages, None, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 2},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def _conversation(session: int, turns: int) -> list[dict]:
    messages = [SYSTEM]
    for t in range(turns):
        messages += [{"role": "user", "content": f"s{session} fact {t}"}, {"role": "assistant", "content": f"ok {t}"}]
    return messages + [{"role": "user", "content": "and now?"}]


def test_concurrent_sessions_each_get_what_they_get_alone(setup) -> None:
    """Six sessions asked at once (batched by vLLM) answer and remember exactly what each does alone, and their
    memories are this package's (each write starts from the memory its session saved last)."""
    model, tokenizer, server = setup
    client = server.client()

    def ask(session: int, prefix: str) -> tuple[str, MemoryState]:
        reply = chat(client, _conversation(session, 4), f"{prefix}{session}")
        return reply.choices[0].message.content, server.memory(f"{prefix}{session}")

    with cf.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda s: ask(s, "together-"), range(6)))
    alone = [ask(s, "alone-") for s in range(6)]
    for session, ((text, memory), (text_alone, memory_alone)) in enumerate(zip(together, alone, strict=True)):
        expected = reference(model, tokenizer, plan_window(_conversation(session, 4), KEEP_LAST).groups)
        assert max_difference(memory, expected) < TOLERANCE
        assert max_difference(memory_alone, expected) < TOLERANCE
        assert text == text_alone
    assert len({text for text, _ in alone}) > 1  # the sessions differ, so equality means something
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    single = _metric(metrics, 'deltamem_batch_size_bucket{le="1.0"}')
    assert _metric(metrics, "deltamem_batch_size_count") > single  # some answers shared a batch


def _metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_every_answered_request_survives_kill_9_during_writes(setup) -> None:
    """kill -9 during a burst of writes, restart on the same store: every 200'd request is in its session."""
    _, _, server = setup
    answered: dict[int, int] = {}

    def burst(session: int) -> None:
        for turns in range(1, 40):
            body = {"messages": _conversation(session, turns), "max_tokens": 2, "temperature": 0}
            try:
                response = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={**body, "session_id": f"crash{session}"},
                    headers=AUTH,
                    timeout=120,
                )
            except httpx.HTTPError:
                return
            if response.status_code != 200:
                return
            answered[session] = turns

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(burst, s) for s in range(4)]
        deadline = time.monotonic() + 120
        while sum(answered.values()) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        server.stop(signal.SIGKILL)
        for future in futures:
            future.result(timeout=180)
    assert sum(answered.values()) >= 8
    assert sqlite3.connect(server.store).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for session, turns in answered.items():
        wanted = group_hashes(plan_window(_conversation(session, turns), KEEP_LAST).groups)
        assert _chain(server.store, f"crash{session}")[: len(wanted)] == wanted
    caches = list((server.store.parent / "deltamem-vllm-cache").iterdir())
    server.start()  # the checkpoint exported by the first start is reused
    assert list((server.store.parent / "deltamem-vllm-cache").iterdir()) == caches
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": _conversation(0, 2), "max_tokens": 2, "temperature": 0, "session_id": "crash0"},
        headers=AUTH,
        timeout=120,
    )
    assert response.status_code == 200  # the session rewinds and goes on after the crash
    assert len(_chain(server.store, "crash0")) == len(plan_window(_conversation(0, 2), KEEP_LAST).groups)


def _chain(store: Path, session_id: str) -> list[str]:
    rows = sqlite3.connect(store).execute("SELECT hash FROM groups WHERE session_id = ? ORDER BY idx", (session_id,))
    return [r[0] for r in rows]


def test_message_write_adapters_are_refused_in_one_line(tmp_path, capsys) -> None:
    """export-vllm refuses message / sentence writes; serve says so in one line and starts nothing."""
    base = tiny_model("qwen3", **GEOMETRY["qwen3"])
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", write_granularity="message"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    argv = ["--adapter", str(tmp_path / "adapter"), "--engine", "vllm", "--store", str(tmp_path / "s.db")]
    capsys.readouterr()  # save_pretrained's progress bar
    assert serve_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "token writes only" in err and "'message'" in err, err
    assert not (tmp_path / "deltamem-vllm-cache").exists() or not any((tmp_path / "deltamem-vllm-cache").iterdir())
    assert not (tmp_path / "s.db").exists()
