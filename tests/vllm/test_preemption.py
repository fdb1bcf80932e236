"""A request preempted for lack of KV blocks is recomputed from its start, and starts again from its memory.

The engine gets a tiny KV budget (5 blocks; a request holds a state block and its attention blocks) and six requests
of 204 tokens: the admitted requests outgrow their first attention blocks and some are preempted (the connector
counts each request's starts). Tokens and final memories still equal this package's forward.
"""

from __future__ import annotations

import pytest
import torch

from peft_deltamem import MemoryState
from peft_deltamem.vllm import memory_request, wait_for_saved_memory
from tests.vllm._engines import build, hf_generate, hf_written, ids, max_difference, stop_engine

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # engine starts take 30-200 s; `make test-vllm` runs them
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

NEW_TOKENS = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    built = build(
        "llama",
        8,
        1,
        ("q", "o"),
        tmp_path_factory.mktemp("preemption"),
        num_gpu_blocks_override=5,
        scheduler_reserve_full_isl=False,
        max_num_batched_tokens=64,
    )
    yield built
    stop_engine(built.llm)


def test_preempted_requests_resume_with_their_memory(setup):
    root, model = setup.root, setup.model
    start = hf_written(model, ids(24, 7))
    start.save(root / "start.safetensors")
    prompts = [ids(4, 20 + i) for i in range(6)]
    params = [
        SamplingParams(
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            extra_args={
                "kv_transfer_params": memory_request(load=root / "start.safetensors", save=root / f"p{i}.safetensors")
            },
        )
        for i in range(len(prompts))
    ]
    outs = setup.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    starts = [out.kv_transfer_params["deltamem_starts"] for out in outs]
    assert max(starts) > 1, f"no request was preempted (starts per request: {starts}): the KV budget is too large"
    for out, prompt, count in zip(outs, prompts, starts, strict=True):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == hf_generate(model, prompt, NEW_TOKENS, start), f"tokens differ (starts {count})"
        saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
        difference = max_difference(saved, hf_written(model, prompt + tokens[:-1], start))
        # 204 tokens: the chunked scan and the token loop drift apart by float32 round-off a little more than on
        # the short requests of test_engine.py.
        assert difference < 2e-5, f"memory differs by {difference} (starts {count})"
