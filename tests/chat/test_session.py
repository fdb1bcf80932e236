"""MemorySession: short prompts, memory writes per turn, save/load with adapter identity, SSW writes, streaming."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import peft_deltamem.chat.session as session_module
from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.chat.segments import encode_conversation
from peft_deltamem.chat.session import AdapterMismatchError, MemorySession
from peft_deltamem.serving.window import plan_window
from tests.helpers.chat_fixtures import llama3_tokenizer, qwen3_tokenizer, sample_conversation
from tests.helpers.tiny_models import randomize_adapter, tiny_model

GREEDY = {"max_new_tokens": 5, "do_sample": False}
QUESTION = "What is the name of my cat?"
FACTS = sample_conversation(system=False)[:4]  # two turns: the cat Tom, the code blue seven


def adapted(seed: int = 0, *, tokenizer=None, base_seed: int = 0, **config) -> torch.nn.Module:
    """A tiny Qwen3 with a δ-mem adapter whose weights are random enough for the memory to matter."""
    vocab = len(tokenizer or qwen3_tokenizer())
    model = get_peft_model(
        tiny_model("qwen3", seed=base_seed, vocab_size=vocab), DeltaMemConfig(task_type="CAUSAL_LM", **config)
    )
    randomize_adapter(model, seed, scale=0.3)
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def model():
    return adapted()


def same_memory(a: MemoryState, b: MemoryState) -> bool:
    return a.states.keys() == b.states.keys() and all(torch.equal(a.states[k], b.states[k]) for k in a.states)


class GenerateSpy:
    """Records what ``generate`` receives and the logits of its first model call (the prefill)."""

    def __init__(self, model, monkeypatch) -> None:
        self.calls: list[dict] = []
        self.first_logits: list[torch.Tensor] = []
        self._model, original = model, model.generate

        def generate(*args, **kwargs):
            self.calls.append(kwargs)
            handle = model.base_model.model.register_forward_hook(self._hook)
            try:
                return original(*args, **kwargs)
            finally:
                handle.remove()

        monkeypatch.setattr(model, "generate", generate)

    def _hook(self, module, args, output) -> None:
        if len(self.first_logits) < len(self.calls):
            self.first_logits.append(output.logits[:, -1].detach().clone())

    def prompt(self, index: int = -1) -> list[int]:
        return self.calls[index]["input_ids"][0].tolist()


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Prompt and memory
# ----------------------------------------------------------------------------------------------------------------


def test_reply_prompt_holds_no_history_but_the_memory_changes_its_logits(model, monkeypatch) -> None:
    tok = qwen3_tokenizer()
    spy = GenerateSpy(model, monkeypatch)
    remembering = MemorySession(model, tok)
    remembering.write(FACTS)
    remembering.reply(QUESTION, **GREEDY)
    MemorySession(model, tok).reply(QUESTION, **GREEDY)

    expected = prompt_ids(tok, [{"role": "user", "content": QUESTION}])
    assert spy.prompt(0) == expected == spy.prompt(1)
    assert "Tom" not in tok.decode(spy.prompt(0)) and "seven" not in tok.decode(spy.prompt(0))
    assert spy.calls[0]["memory_write"] is False  # generation only reads the memory
    assert (spy.first_logits[0] - spy.first_logits[1]).abs().max() > 1e-3


def test_reply_reads_while_generating_then_writes_the_new_turn(model) -> None:
    tok = qwen3_tokenizer()
    session = MemorySession(model, tok)
    session.write(FACTS)
    answer = session.reply(QUESTION, **GREEDY)
    turn = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    assert session.history == [*FACTS, *turn]

    reference = MemorySession(model, tok)
    reference.write(FACTS)
    reference.write(turn)
    assert same_memory(session.memory, reference.memory)


def test_keep_last_keeps_that_many_messages_and_writes_each_message_once_when_it_leaves_the_window(
    model, monkeypatch
) -> None:
    """docs/design.md §8: prompt = system + the last keep_last non-system messages + the new turn; every older message is
    in the memory, written once, in order (never in the prompt and the memory together)."""
    tok = qwen3_tokenizer()
    spy = GenerateSpy(model, monkeypatch)
    system = {"role": "system", "content": "Be brief."}
    questions = ["Hello! How are you today?", "Where do you live?", QUESTION]
    for keep_last in (1, 2, 3, 5):
        session = MemorySession(model, tok, keep_last=keep_last, system=system["content"])
        session.write(FACTS)  # an explicit write goes into the memory at once
        assert session.prompt_messages(QUESTION) == [system, {"role": "user", "content": QUESTION}]
        turns: list[dict] = []
        for question in questions:
            session.reply(question, **GREEDY)
            kept = turns[max(0, len(turns) - keep_last) :] if keep_last else []
            assert spy.prompt() == prompt_ids(tok, [system, *kept, {"role": "user", "content": question}])
            turns = session.history[len(FACTS) :]
            assert session.written == len(session.history) - min(keep_last, len(turns))
        reference = MemorySession(model, tok)
        reference.write(FACTS)
        for group in plan_window([*turns, {"role": "user", "content": ""}], keep_last).groups:
            reference.write(group)
        assert same_memory(session.memory, reference.memory)


def test_stream_reply_streams_the_answer_and_writes_like_reply(model) -> None:
    tok = qwen3_tokenizer()
    streamed, plain = MemorySession(model, tok), MemorySession(model, tok)
    for session in (streamed, plain):
        session.write(FACTS)
    chunks = list(streamed.stream_reply(QUESTION, **GREEDY))
    answer = plain.reply(QUESTION, **GREEDY)
    assert "".join(chunks).strip() == answer
    assert streamed.history == plain.history
    assert same_memory(streamed.memory, plain.memory)


def test_write_during_generation_writes_the_prompt_and_answer_while_generating(model) -> None:
    tok = qwen3_tokenizer()
    session = MemorySession(model, tok, write_during_generation=True)
    answer = session.reply(QUESTION, **GREEDY)
    reference = MemoryState()
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": QUESTION}])])
    with torch.no_grad():
        model.generate(
            input_ids=ids, memory=reference, pad_token_id=tok.pad_token_id, eos_token_id=[2, tok.eos_token_id], **GREEDY
        )
    assert same_memory(session.memory, reference)
    assert session.history[-1] == {"role": "assistant", "content": answer}
    with pytest.raises(ValueError, match="needs a 'token' adapter"):
        MemorySession(adapted(write_granularity="message"), tok, write_during_generation=True)
    with pytest.raises(ValueError, match=r"writes the answer's tokens, but this adapter writes only \['user'\]"):
        MemorySession(adapted(write_roles=["user"]), tok, write_during_generation=True)


def test_memory_report_and_reset(model) -> None:
    session = MemorySession(model, qwen3_tokenizer())
    assert session.memory_report() == {}
    session.write(FACTS)
    report = session.memory_report()
    norms = session.memory.norms()
    assert report.keys() == norms.keys() and len(report) == 2
    for layer, entry in report.items():
        assert entry["norm"] == pytest.approx(float(norms[layer].norm()))
        assert entry["writes"] == sum(m >= 0 for m in encode_conversation(qwen3_tokenizer(), FACTS).message_ids)
        assert 0 < entry["beta_mean"] < entry["beta_max"] < 1
    session.reset()
    assert session.history == [] and session.memory.is_empty and session.memory_report() == {}


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


def test_save_then_load_then_reply_gives_the_same_answer(model, tmp_path) -> None:
    tok = qwen3_tokenizer()
    session = MemorySession(model, tok, keep_last=1, system="Be brief.")
    session.write(FACTS)
    session.reply("Hello there.", **GREEDY)
    session.save(tmp_path / "chat")
    assert sorted(p.name for p in (tmp_path / "chat").iterdir()) == ["memory.safetensors", "session.json"]

    loaded = MemorySession.load(tmp_path / "chat", model, tok)
    assert (loaded.keep_last, loaded.system, loaded.history) == (1, "Be brief.", session.history)
    assert loaded.memory_report() == session.memory_report()
    assert loaded.reply(QUESTION, **GREEDY) == session.reply(QUESTION, **GREEDY)
    assert same_memory(loaded.memory, session.memory)


def test_a_session_with_an_empty_memory_saves_and_loads(model, tmp_path) -> None:
    MemorySession(model, qwen3_tokenizer(), keep_last=3).save(tmp_path / "empty")
    loaded = MemorySession.load(tmp_path / "empty", model, qwen3_tokenizer(), keep_last=2)
    assert loaded.memory.is_empty and loaded.history == [] and loaded.keep_last == 2


def test_loading_into_another_adapter_is_refused(model, tmp_path) -> None:
    tok = qwen3_tokenizer()
    session = MemorySession(model, tok)
    session.write(FACTS)
    session.save(tmp_path / "chat")
    with pytest.raises(AdapterMismatchError, match="adapter weights differ"):
        MemorySession.load(tmp_path / "chat", adapted(seed=1), tok)
    with pytest.raises(AdapterMismatchError, match="r: saved 8, model 4"):
        MemorySession.load(tmp_path / "chat", adapted(r=4), tok)
    with pytest.raises(AdapterMismatchError, match="write_granularity: saved 'token', model 'message'"):
        MemorySession.load(tmp_path / "chat", adapted(write_granularity="message"), tok)
    # The same adapter loaded elsewhere (inference mode, another base path) is accepted.
    twin = copy.deepcopy(model)
    twin.peft_config["default"].inference_mode = True
    twin.peft_config["default"].base_model_name_or_path = "/elsewhere"
    assert MemorySession.load(tmp_path / "chat", twin, tok).history == FACTS


def test_a_crash_mid_save_leaves_the_previous_save_intact(model, tmp_path, monkeypatch) -> None:
    tok = qwen3_tokenizer()
    target = tmp_path / "chat"
    session = MemorySession(model, tok)
    session.write(FACTS[:2])
    session.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    session.write(FACTS[2:])

    def crash(path, data):
        raise RuntimeError("disk full")

    monkeypatch.setattr(session_module, "_write_json", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        session.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat"]  # no temporary directory left behind
    assert MemorySession.load(target, model, tok).history == FACTS[:2]


def test_load_rejects_a_directory_that_is_not_a_session(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a saved MemorySession"):
        MemorySession.load(tmp_path, model, qwen3_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Segment-level writes (SSW)
# ----------------------------------------------------------------------------------------------------------------


def reference_message_writes(model, tokenizer, messages) -> torch.Tensor:
    """Layer 0's state after one delta-rule write per message from the mean of its tokens' attention inputs.

    Layer 0's attention input is input_layernorm(embeddings), which does not depend on memory reads or on attention
    context, so it can be computed here without the adapter (docs/design.md §1, standard mode, coupled λ, one head).
    """
    seg = encode_conversation(tokenizer, messages)
    base = model.base_model.model.model
    attention = base.layers[0].self_attn
    with torch.no_grad():
        hidden = base.layers[0].input_layernorm(base.embed_tokens(torch.tensor(seg.input_ids)))
        ids = torch.tensor(seg.message_ids)
        state = torch.zeros(8, 8)
        for message in sorted(set(seg.message_ids) - {-1}):  # the system message is -1: not written
            h = hidden[ids == message].mean(0)
            k = F.normalize(torch.tanh(attention.deltamem_memory_k["default"](h)), dim=-1)
            v = attention.deltamem_memory_v["default"](h)
            beta = torch.sigmoid(attention.deltamem_write_gate["default"](h))
            state = (
                (1 - beta)[:, None] * state
                - beta[:, None] * torch.outer(state @ k, k)
                + beta[:, None] * torch.outer(v, k)
            )
    return state


def test_message_adapter_writes_once_per_message() -> None:
    tok = llama3_tokenizer()  # prefix-stable, with a preamble (bos + date block) that is context only
    layer0 = r".*layers\.0\.self_attn"
    ssw = adapted(seed=2, tokenizer=tok, target_modules=layer0, write_granularity="message")
    messages = sample_conversation(system=True)[:5]  # system + two turns

    at_once = MemorySession(ssw, tok)
    at_once.write(messages)
    one_by_one = MemorySession(ssw, tok)
    for message in messages:
        one_by_one.write([message])
    (layer,) = at_once.memory.states
    assert at_once.memory_report()[layer]["writes"] == 4  # the system message is not written
    state = at_once.memory.states[layer][0, 0]
    torch.testing.assert_close(state, reference_message_writes(ssw, tok, messages), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_by_one.memory.states[layer][0, 0], state, rtol=1e-4, atol=1e-5)

    tsw = adapted(seed=2, tokenizer=tok, target_modules=layer0, write_granularity="token")
    tsw.load_state_dict(ssw.state_dict())
    token_session = MemorySession(tsw, tok)
    token_session.write(messages)
    assert (token_session.memory.states[layer] - at_once.memory.states[layer]).abs().max() > 1e-3


def test_sentence_adapter_writes_once_per_sentence() -> None:
    tok = qwen3_tokenizer()
    session = MemorySession(adapted(write_granularity="sentence"), tok)
    session.write(FACTS)
    sentences = {s for s in encode_conversation(tok, FACTS).sentence_ids if s >= 0}
    assert all(entry["writes"] == len(sentences) for entry in session.memory_report().values())
