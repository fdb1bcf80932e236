"""Sharing over real HTTP: push to a fake Hub on 127.0.0.1, load back with ``PeftModel.from_pretrained(base, repo)``.

``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import, and this test process has long imported it, so the client
side runs in a fresh Python process with ``HF_ENDPOINT`` pointing at the server this test starts. Nothing of
``huggingface_hub`` is mocked: the real client talks HTTP to :class:`fake_hub.FakeHub`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from peft_deltamem.interop.hub import render_model_card, summarize_directory
from tests.helpers import ROOT
from tests.helpers.fake_hub import FakeHub

BASE_NAME = "tiny-org/tiny-qwen3"
RESULTS = {"ladder": {"L1": {"accuracy": 0.9125, "ci95": [0.88, 0.94]}, "L5": {"accuracy": 0.41}}, "n": 200}

CLIENT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import peft_deltamem
    from huggingface_hub import HfApi
    from peft import PeftModel, get_peft_model
    from tests.helpers.tiny_models import random_ids, tiny_model
    from peft_deltamem import DeltaMemConfig, MemoryState
    from peft_deltamem.interop.convert import convert_reference_adapter, export_reference_adapter
    from peft_deltamem.interop.hub import push_adapter_to_hub

    def base():
        model = tiny_model("qwen3")
        model.config._name_or_path = "{base_name}"
        return model

    def memory_logits(model):
        memory = MemoryState()
        with torch.no_grad():
            model(input_ids=random_ids(2, 9, seed=11), memory=memory)
            return model(input_ids=random_ids(2, 5, seed=12), memory=memory).logits

    def max_diff(a, b):
        return float((a - b).abs().max())

    model = get_peft_model(base(), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["q", "k", "v", "o"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "deltamem_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    expected = memory_logits(model)
    report = {{}}

    # 1. The helper: adapter + δ-mem model card with evaluation results from a JSON file.
    push_adapter_to_hub(model, "user/deltamem-tiny", results=sys.argv[1])
    loaded = PeftModel.from_pretrained(base(), "user/deltamem-tiny")
    report["helper"] = max_diff(memory_logits(loaded), expected)

    # 2. Plain PeftModel.push_to_hub, exactly as for LoRA.
    model.push_to_hub("user/deltamem-plain")
    loaded = PeftModel.from_pretrained(base(), "user/deltamem-plain")
    report["plain"] = max_diff(memory_logits(loaded), expected)

    # 3. A reference-format adapter on the Hub converts from its repo id.
    export_reference_adapter(model, sys.argv[2] + "/reference", dtype=torch.float32)
    HfApi().create_repo("user/reference-format")
    HfApi().upload_folder(repo_id="user/reference-format", folder_path=sys.argv[2] + "/reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_reference_adapter("user/reference-format", sys.argv[2] + "/converted")
    converted = PeftModel.from_pretrained(base(), out)
    report["converted"] = max_diff(memory_logits(converted), expected)
    print("REPORT " + json.dumps(report))
    """
).format(base_name=BASE_NAME)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Run the client once against a fresh fake Hub; return (report, hub files per repo, requests log)."""
    tmp = tmp_path_factory.mktemp("hub")
    results = tmp / "results.json"
    results.write_text(json.dumps(RESULTS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    with FakeHub(max_seconds=180) as hub:
        env.update(
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp / "hf_home"),  # a private cache: nothing is read from or left in the user's
            HF_TOKEN="hf_fake_token_for_the_fake_hub",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            PYTHONPATH=str(ROOT),
        )
        run = subprocess.run(
            [sys.executable, "-c", CLIENT, str(results), str(tmp)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=150,
        )
        files = {repo: hub.files(repo) for repo in hub.repos}
        log, unhandled = list(hub.log), list(hub.unhandled)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert not unhandled, f"the client called endpoints the fake Hub lacks: {unhandled}"
    report = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("REPORT "))[7:])
    return report, files, log


def test_push_then_from_pretrained_reproduces_outputs(pushed):
    report, files, log = pushed
    assert report["helper"] < 1e-6
    assert report["plain"] < 1e-6
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files["user/deltamem-tiny"])
    # Everything went over HTTP: the commit endpoint received the files, resolve served them back.
    assert ("POST", "/api/models/user/deltamem-tiny/commit/main") in log
    assert ("GET", "/user/deltamem-tiny/resolve/main/adapter_model.safetensors") in log


def test_reference_adapter_converts_from_a_hub_repo_id(pushed):
    report, _, log = pushed
    assert report["converted"] < 1e-6
    assert ("GET", "/user/reference-format/resolve/main/delta_mem_adapter.pt") in log


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_model_card_yaml_and_content(pushed):
    _, files, _ = pushed
    metadata, body = _front_matter(files["user/deltamem-tiny"]["README.md"].decode())
    assert metadata["base_model"] == BASE_NAME
    assert metadata["library_name"] == "peft"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"deltamem", "peft", "tsw", f"base_model:adapter:{BASE_NAME}"} <= set(metadata["tags"])
    # The configuration in words: rank, heads, layers, state heads, parameter count and share of the base.
    assert "rank r = 8" in body and "8×8" in body
    assert "q_proj, k_proj, v_proj, o_proj" in body
    assert "all 2 decoder layers" in body
    assert "1 state head per layer" in body
    config = json.loads(files["user/deltamem-tiny"]["adapter_config.json"])
    assert config["r"] == 8
    # How to load and chat, with this repo and this base.
    assert (
        f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{BASE_NAME}"), "user/deltamem-tiny")' in body
    )
    assert "model.generate(**inputs, memory=memory" in body
    # The evaluation results from the JSON file.
    assert "## Evaluation results" in body
    assert "| ladder.L1.accuracy | 0.9125 |" in body and "| ladder.L1.ci95 | 0.88, 0.94 |" in body
    assert "| n | 200 |" in body


def test_model_card_parameter_count(pushed, tmp_path):
    _, files, _ = pushed
    repo = files["user/deltamem-tiny"]
    for name, content in repo.items():
        (tmp_path / name).write_bytes(content)
    summary = summarize_directory(tmp_path, base_num_parameters=1_000_000)
    # Per layer for the tiny qwen3 (H 64, q/o out 64, k/v out 32, r 8): memory q/k/v 3·8·64, β 8·64 + 8,
    # Δq, Δo 64·8 each, Δk, Δv 32·8 each.
    per_layer = 3 * 8 * 64 + 8 * 64 + 8 + 2 * 64 * 8 + 2 * 32 * 8
    assert summary.num_parameters == 2 * per_layer
    _, body = _front_matter(files["user/deltamem-tiny"]["README.md"].decode())
    assert f"**Trainable parameters:** {2 * per_layer:,} (" in body and " % of the base model's " in body
    text = str(render_model_card(summary, repo_id="user/x"))
    assert f"{2 * per_layer:,} ({100 * 2 * per_layer / 1_000_000:.3g} % of the base model's 1,000,000)" in text


@pytest.mark.parametrize(
    "granularity, heads, tag",
    [("token", 1, "tsw"), ("token", 4, "msw"), ("message", 1, "ssw"), ("sentence", 1, "ssw")],
)
def test_write_strategy_tag(tmp_path, granularity, heads, tag):
    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.interop.hub import AdapterSummary

    config = DeltaMemConfig(write_granularity=granularity, num_state_heads=heads, layers_to_transform=[0, 1, 2, 5])
    summary = AdapterSummary(config=config, layers=[0, 1, 2, 5], num_parameters=10, base_model="org/base", num_layers=8)
    metadata, body = _front_matter(str(render_model_card(summary)))
    assert tag in metadata["tags"] and "base_model:adapter:org/base" in metadata["tags"]
    assert "4 of 8 decoder layers (0-2, 5)" in body
    assert ("memory_segment_ids" in body) == (granularity != "token")


def test_a_user_turns_only_adapter_card_says_so_and_shows_segment_ids():
    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.interop.hub import AdapterSummary

    config = DeltaMemConfig(num_state_heads=4, write_roles=["user"])
    summary = AdapterSummary(config=config, layers=[0], num_parameters=10, base_model="org/base", num_layers=1)
    _, body = _front_matter(str(render_model_card(summary)))
    assert "only user messages are written" in body
    assert (
        "segment_ids_for(tokenizer, chat, \"message\", write_roles=['user'])" in body and "memory_segment_ids" in body
    )
