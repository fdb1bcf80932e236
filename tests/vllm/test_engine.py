"""δ-mem on vLLM equals this package's own forward: tokens, final memories, sessions (docs/vllm.md).

One engine per geometry (module-scoped; an engine start costs ~30-60 s on 2 cores). Three geometries here and the
preemption engine's (test_preemption.py: Llama, r 16, four state heads, q,k,v,o) cover Llama and Qwen3, each with
r 8 and r 16, one and four state heads, corrections on q,o and on q,k,v,o. Each engine serves one batch that mixes a
request starting from a saved memory, one starting empty, a long prompt prefilled in chunks beside the others'
decodes, and a read-only request; then history writes, a stop-token finish, and memory files crossing both ways
between vLLM, ``PeftModel.generate`` and ``MemorySession`` directories.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from peft_deltamem import MemoryState
from peft_deltamem.chat.session import MEMORY_FILE, MemorySession
from peft_deltamem.vllm import memory_request, wait_for_saved_memory
from tests.helpers.chat_fixtures import VOCAB_SIZE, llama3_tokenizer, qwen3_tokenizer
from tests.vllm._engines import (
    build,
    generate,
    hf_generate,
    hf_written,
    ids,
    max_difference,
    relative_difference,
    sampling,
    save_start,
    stop_engine,
)

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.slow  # engine starts take 30-200 s; `make test-vllm` runs them
from vllm import SamplingParams  # noqa: E402

TOLERANCE = 1e-5

GEOMETRIES = [
    pytest.param(("llama", 8, 1, ("q", "o")), id="llama-r8-n1-qo"),
    pytest.param(("qwen3", 16, 4, ("q", "k", "v", "o")), id="qwen3-r16-n4-qkvo"),
    pytest.param(("qwen3", 8, 1, ("q", "o")), id="qwen3-r8-n1-qo"),
]
# Chat tokenizers for the MemorySession checks (the tiny models get their vocabulary size).
SESSION_TOKENIZERS = {"llama": llama3_tokenizer, "qwen3": qwen3_tokenizer}
CONVERSATION = [
    {"role": "user", "content": "Please remember this: the secret code is blue seven."},
    {"role": "assistant", "content": "Sure, I will remember it."},
]


@pytest.fixture(scope="module", params=GEOMETRIES)
def setup(request, tmp_path_factory):
    arch, r, heads, delta_heads = request.param
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"{arch}-r{r}-n{heads}")
    built = build(arch, r, heads, delta_heads, root, vocab=VOCAB_SIZE)
    save_start(built)  # a saved memory to start from: a history written by this package
    yield built
    stop_engine(built.llm)


def test_mixed_batch_equals_peft(setup):
    """From a saved memory, from an empty one, a long chunked prompt and a read-only request, in one batch."""
    root, model, start = setup.root, setup.model, setup.start
    from_memory, empty, long, read_only = ids(10, 1), ids(7, 2), ids(75, 3), ids(9, 4)
    outs = generate(
        setup.llm,
        [
            (from_memory, sampling(6, load=root / "start.safetensors", save=root / "a.safetensors")),
            (empty, sampling(6, save=root / "b.safetensors")),
            (long, sampling(4, load=root / "start.safetensors", save=root / "c.safetensors")),
            (read_only, sampling(5, load=root / "start.safetensors", read_only=True)),
        ],
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert tokens[0] == hf_generate(model, from_memory, 6, start)
    assert tokens[1] == hf_generate(model, empty, 6)
    assert tokens[2] == hf_generate(model, long, 4, start)
    assert tokens[3] == hf_generate(model, read_only, 5, start, write=False)
    # The final memory covers the prompt and every generated token but the last (never fed through the model).
    for out, prompt, memory in zip(outs[:3], (from_memory, empty, long), (start, None, start), strict=True):
        saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
        expected = hf_written(model, prompt + list(out.outputs[0].token_ids[:-1]), memory)
        assert relative_difference(saved, expected) < TOLERANCE
    assert "deltamem_saved" not in outs[3].kv_transfer_params  # a read-only request saves nothing
    assert max_difference(MemoryState.load(root / "start.safetensors"), start) == 0.0  # its memory is untouched


def test_history_write(setup):
    """A write-only request (max_tokens=1) writes its prompt, unwritten context positions read but not written."""
    root, model, start = setup.root, setup.model, setup.start
    history, context = ids(40, 5), ids(30, 6)
    outs = generate(
        setup.llm,
        [
            (history, sampling(1, load=root / "start.safetensors", save=root / "h1.safetensors")),
            (context, sampling(1, save=root / "h2.safetensors", unwritten=[(0, 4), (20, 23)])),
        ],
    )
    first = MemoryState.load(wait_for_saved_memory(outs[0], timeout=0.5))  # saved before the answer came back
    assert relative_difference(first, hf_written(model, history, start)) < TOLERANCE
    second = MemoryState.load(wait_for_saved_memory(outs[1], timeout=0.5))
    assert relative_difference(second, hf_written(model, context, None, unwritten=[(0, 4), (20, 23)])) < TOLERANCE


def test_stop_token_finish_is_saved(setup):
    """A request that ends on a stop token is saved by the engine's next step; the caller waits for the file."""
    root, model, start = setup.root, setup.model, setup.start
    prompt = ids(12, 8)
    reference = hf_generate(model, prompt, 6, start)
    stop = reference[2]
    stop_at = reference.index(stop)
    params = SamplingParams(
        max_tokens=6,
        temperature=0.0,
        stop_token_ids=[stop],
        extra_args={"kv_transfer_params": memory_request(load=root / "start.safetensors", save=root / "s.safetensors")},
    )
    out = generate(setup.llm, [(prompt, params)])[0]
    assert list(out.outputs[0].token_ids) == reference[: stop_at + 1]
    saved = MemoryState.load(wait_for_saved_memory(out, timeout=30))
    assert relative_difference(saved, hf_written(model, prompt + reference[:stop_at], start)) < TOLERANCE


def test_memory_files_cross_between_engines(setup):
    """Memory files cross both ways. One written by vLLM starts ``PeftModel.generate`` and, as a ``MemorySession``
    directory's memory file, a session that continues (writes, replies) exactly as the session holding this package's
    memory of the same history; a ``MemorySession``'s saved memory starts vLLM requests that continue from it as this
    package does."""
    root, model = setup.root, setup.model
    tokenizer = SESSION_TOKENIZERS[setup.arch]()
    history, question, more = ids(20, 9), ids(8, 10), ids(15, 11)
    session = MemorySession(model, tokenizer)  # a session of this package, saved as a directory
    session.write(CONVERSATION)
    session.save(root / "session")
    session_memory = root / "session" / MEMORY_FILE
    outs = generate(
        setup.llm,
        [
            (history, sampling(1, save=root / "x.safetensors")),
            (more, sampling(1, load=session_memory, save=root / "y.safetensors")),
            (question, sampling(5, load=session_memory, read_only=True)),
        ],
    )
    # The session's memory in vLLM: a history write and a read-only answer, as this package continues it.
    continued = MemoryState.load(wait_for_saved_memory(outs[1], timeout=0.5))
    assert relative_difference(continued, hf_written(model, more, session.memory)) < TOLERANCE
    assert list(outs[2].outputs[0].token_ids) == hf_generate(model, question, 5, session.memory, write=False)

    # vLLM's memory in this package: same layout and adapter config as the package's own memories.
    from_vllm = MemoryState.load(wait_for_saved_memory(outs[0], timeout=0.5))
    own = hf_written(model, history)
    assert from_vllm.layout == own.layout
    assert from_vllm.adapter_config["r"] == own.adapter_config["r"]
    ours = hf_generate(model, question, 5, from_vllm, write=False)
    theirs = generate(setup.llm, [(question, sampling(5, load=root / "x.safetensors", read_only=True))])[0]
    assert list(theirs.outputs[0].token_ids) == ours

    # ... and in a MemorySession: a session directory holding vLLM's file continues as the one holding the package's.
    package_dir, vllm_dir = root / "package-session", root / "vllm-session"
    written = MemorySession(model, tokenizer)
    written.memory = own
    written.save(package_dir)
    shutil.copytree(package_dir, vllm_dir)
    shutil.copyfile(root / "x.safetensors", vllm_dir / MEMORY_FILE)
    replies, memories = [], []
    for directory in (package_dir, vllm_dir):
        loaded = MemorySession.load(directory, model, tokenizer)
        loaded.write(CONVERSATION)
        replies.append(loaded.reply("What is the secret code?", max_new_tokens=5, do_sample=False))
        memories.append(loaded.memory)
    assert max_difference(memories[0], own) > 1e-3  # the sessions did write: the check below can fail
    assert relative_difference(memories[1], memories[0]) < TOLERANCE
    assert replies[0] == replies[1]
