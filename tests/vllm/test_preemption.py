"""A request preempted for lack of KV blocks is recomputed from its start, and starts again from its memory.

The engine gets a tiny KV budget (5 blocks; a request holds a state block and its attention blocks) and six requests
of 204 tokens: the admitted requests outgrow their first attention blocks and some are preempted (the connector
counts each request's starts). Tokens and final memories still equal this package's forward.

The engine's geometry (Llama, r 16, four state heads, q,k,v,o) is one test_engine.py does not serve, so it also
answers a small batch (one request from a saved memory, one from an empty memory) checked like the mixed batch there.
"""

from __future__ import annotations

import pytest
import torch

from peft_deltamem import MemoryState
from peft_deltamem.vllm import memory_request, wait_for_saved_memory
from tests.vllm._engines import (
    build,
    generate,
    hf_generate,
    hf_written,
    ids,
    relative_difference,
    sampling,
    save_start,
    stop_engine,
)

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
        16,
        4,
        ("q", "k", "v", "o"),
        tmp_path_factory.mktemp("preemption"),
        num_gpu_blocks_override=5,
        scheduler_reserve_full_isl=False,
        max_num_batched_tokens=64,
    )
    save_start(built)
    yield built
    stop_engine(built.llm)


def test_small_batch_equals_peft(setup):
    """One request from a saved memory, one from an empty memory: greedy tokens and final memories as this package's."""
    root, model, start = setup.root, setup.model, setup.start
    from_memory, empty = ids(10, 1), ids(7, 2)
    outs = generate(
        setup.llm,
        [
            (from_memory, sampling(6, load=root / "start.safetensors", save=root / "a.safetensors")),
            (empty, sampling(6, save=root / "b.safetensors")),
        ],
    )
    for out, prompt, memory in zip(outs, (from_memory, empty), (start, None), strict=True):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == hf_generate(model, prompt, 6, memory)
        saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
        assert relative_difference(saved, hf_written(model, prompt + tokens[:-1], memory)) < 1e-5


def test_preempted_requests_resume_with_their_memory(setup):
    root, model, start = setup.root, setup.model, setup.start
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
        difference = relative_difference(saved, hf_written(model, prompt + tokens[:-1], start))
        # 204 tokens: the chunked scan and the token loop drift apart by float32 round-off a little more than on
        # the short requests of test_engine.py.
        assert difference < 2e-5, f"memory differs by {difference} (starts {count})"
