"""Two CPU processes (torchrun, gloo) train a few steps from a recipe: identical adapters on both ranks, a loadable save."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

import peft_deltamem  # noqa: F401  (registers the δ-mem PEFT type for from_pretrained)
from tests.helpers.chat_fixtures import smollm2_tokenizer
from tests.helpers.recall import recall_conversations
from tests.helpers.tiny_models import tiny_model

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_identical_adapters(tmp_path) -> None:
    tokenizer = smollm2_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in recall_conversations(16, seed=0)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(model_dir),
                "dataset_name": str(data),
                "output_dir": str(tmp_path / "out"),
                "deltamem": {"r": 4, "write_granularity": "message"},
                "use_cpu": True,
                "bf16": False,
                "gradient_checkpointing": True,  # DDP without unused-parameter search, checkpointed layers
                "per_device_train_batch_size": 2,
                "max_steps": 3,
                "learning_rate": 1e-2,
                "save_strategy": "no",
                "report_to": "none",
                "disable_tqdm": True,
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(_free_port()), str(WORKER), str(tmp_path), str(recipe)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) == 2 * 7
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    # The saved adapter loads and holds the trained weights, which moved away from the initial ones.
    base = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    weights = {n: p for n, p in loaded.named_parameters() if "deltamem_" in n}
    assert weights.keys() == rank0.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, rank0[name], rtol=0, atol=0)
    gate_bias = next(name for name in rank0 if "write_gate" in name and name.endswith("bias"))
    assert not torch.allclose(rank0[gate_bias], torch.full_like(rank0[gate_bias], -1.5))
