"""``deltamem serve`` in tests: a tiny δ-mem model, and the real app under uvicorn in a thread on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model


def served_model(seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny Qwen3 with a δ-mem adapter random enough for the memory to change answers (qwen3_tokenizer's vocab)."""
    model = get_peft_model(
        tiny_model("qwen3", vocab_size=len(qwen3_tokenizer())), DeltaMemConfig(task_type="CAUSAL_LM", **config)
    )
    randomize_adapter(model, seed, scale=0.3)
    return model.requires_grad_(False).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs ``app`` with uvicorn on 127.0.0.1 in a daemon thread; a context manager."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, api_key: str = "none") -> Any:
        """The official OpenAI client, pointed at this server (no retries, bounded timeout)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)
