"""Message / sentence ids from chat templates (peft_deltamem.chat.segments) and the offline tokenizer fixtures."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_deltamem.chat.segments import (
    NOT_WRITTEN,
    SegmentedConversation,
    encode_conversation,
    segment_ids_for,
    split_sentences,
    validate_messages,
)
from tests.helpers import chat_fixtures as cf
from tests.helpers.chat_fixtures import (
    VOCAB_SIZE,
    llama3_tokenizer,
    plain_tokenizer,
    qwen3_tokenizer,
    sample_conversation,
    smollm2_tokenizer,
    smollm3_tokenizer,
    unstable_tokenizer,
)

ALL_FIXTURES = [
    qwen3_tokenizer,
    llama3_tokenizer,
    smollm3_tokenizer,
    smollm2_tokenizer,
    unstable_tokenizer,
    plain_tokenizer,
]

# (fixture, chat_template_kwargs, role header, end of turn) for the prefix-stable / real templates
REAL = {
    "qwen3": (qwen3_tokenizer, {"enable_thinking": False}, "<|im_start|>{role}\n", "<|im_end|>\n"),
    "llama3": (llama3_tokenizer, None, "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    "smollm3": (smollm3_tokenizer, {"enable_thinking": False}, "<|im_start|>{role}\n", "<|im_end|>\n"),
    "smollm2": (smollm2_tokenizer, None, "<|im_start|>{role}\n", "<|im_end|>\n"),
}


def full_ids(tok, messages, add_generation_prompt=False, kwargs=None):
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(kwargs or {})
    )
    return text, tok(text, add_special_tokens=False)["input_ids"]


def groups(seg: SegmentedConversation, ids: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of equal ids: [(id, [token positions])]."""
    return [(k, list(g)) for k, g in itertools.groupby(range(len(seg)), key=lambda t: ids[t])]


def decode_runs(tok, seg, granularity="message"):
    ids = seg.segment_ids(granularity)
    return [(k, tok.decode([seg.input_ids[t] for t in pos])) for k, pos in groups(seg, ids)]


def check_invariants(seg: SegmentedConversation, messages) -> None:
    """Properties every encoding must have."""
    n = len(seg.input_ids)
    assert len(seg.message_ids) == len(seg.sentence_ids) == len(seg.offsets) == n
    written = [m for m in seg.message_ids if m != NOT_WRITTEN]
    assert written == sorted(written), "message ids must not decrease"
    for i, m in enumerate(messages):
        if m["role"] == "system":
            assert i not in seg.message_ids, f"system message {i} must be -1"
    # each message's tokens are contiguous
    runs = [k for k, _ in groups(seg, seg.message_ids) if k != NOT_WRITTEN]
    assert len(runs) == len(set(runs))
    # sentence ids: -1 exactly where message ids are -1, consecutive from 0, each inside one message
    assert [s == NOT_WRITTEN for s in seg.sentence_ids] == [m == NOT_WRITTEN for m in seg.message_ids]
    sent = [s for s in seg.sentence_ids if s != NOT_WRITTEN]
    assert sent == sorted(sent)
    assert sorted(set(sent)) == list(range(len(set(sent))))
    owner: dict[int, int] = {}
    for s, m in zip(seg.sentence_ids, seg.message_ids, strict=True):
        if s != NOT_WRITTEN:
            assert owner.setdefault(s, m) == m


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ALL_FIXTURES, ids=lambda f: f.__name__)
def test_fixture_tokenizer_properties(fixture):
    tok = fixture()
    assert fixture() is tok  # cached
    assert len(tok) == tok.vocab_size == VOCAB_SIZE <= 1024
    assert tok.pad_token is not None and tok.eos_token is not None
    assert 0 <= tok.pad_token_id < VOCAB_SIZE and 0 <= tok.eos_token_id < VOCAB_SIZE
    assert tok.is_fast
    text = "Hello, wörld! ünïcode “quotes” 🙂\n\n\tend"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < VOCAB_SIZE
    assert tok.decode(ids) == text
    for special in tok.all_special_tokens:
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert (tok.chat_template is None) == (fixture is plain_tokenizer)


def test_fixture_specials_match_the_real_tokenizers():
    q = qwen3_tokenizer()
    assert (q.bos_token, q.eos_token, q.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert q.convert_ids_to_tokens(q("<think></think>", add_special_tokens=False)["input_ids"]) == [
        "<think>",
        "</think>",
    ]
    assert q.decode(q("<think>x", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "<think>x"
    ll = llama3_tokenizer()
    assert (ll.bos_token, ll.eos_token, ll.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    s2 = smollm2_tokenizer()
    assert (s2.bos_token, s2.eos_token, s2.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    s3 = smollm3_tokenizer()
    assert (s3.eos_token, s3.pad_token) == ("<|im_end|>", "<|finetune_right_pad_id|>")
    u = unstable_tokenizer()
    assert (u.bos_token, u.eos_token, u.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    # role names are single tokens, like in real vocabularies
    for role in ("system", "user", "assistant"):
        assert len(q(role, add_special_tokens=False)["input_ids"]) == 1


def test_fixture_bpe_is_deterministic():
    a = cf._train_byte_bpe(["<|x|>"]).to_str()
    b = cf._train_byte_bpe(["<|x|>"]).to_str()
    assert a == b
    assert json.loads(a)["model"]["vocab"]["<|x|>"] == VOCAB_SIZE - 1


def test_fixture_templates_render_as_published():
    msgs = [{"role": "user", "content": "Hi."}]
    assert smollm2_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen3_tokenizer().apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    ) == ("<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert llama3_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    s3 = smollm3_tokenizer().apply_chat_template(msgs, tokenize=False, enable_thinking=False)
    assert s3.startswith("<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n")
    assert "Reasoning Mode: /no_think\n\n" in s3 and s3.endswith("<|im_start|>user\nHi.<|im_end|>\n")


# ------------------------------------------------------------------------------------------------------------------
# encode_conversation on real templates
# ------------------------------------------------------------------------------------------------------------------


def expected_block(name: str, messages, i: int) -> str:
    """The exact text of message i's tokens in the full rendering of `messages` (no generation prompt)."""
    _, kwargs, header, end = REAL[name]
    m = messages[i]
    content = m["content"].strip() if name == "llama3" else m["content"]
    middle = ""
    last = i == len(messages) - 1
    if name == "qwen3" and m["role"] == "assistant" and last:
        middle = "<think>\n\n</think>\n\n"  # the Qwen3 template's empty think block on the final answer
    if name == "smollm3" and m["role"] == "assistant":
        middle = "<think>\n\n</think>\n"  # no-think mode
    return header.format(role=m["role"]) + middle + content + end


@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("gen", [False, True])
def test_real_templates_exact(name, system, gen):
    fixture, kwargs, header, end = REAL[name]
    tok = fixture()
    messages = sample_conversation(system=system)
    if gen:
        messages = messages[:-1]  # end on a user turn
    seg = encode_conversation(tok, messages, add_generation_prompt=gen, chat_template_kwargs=kwargs)
    text, ids = full_ids(tok, messages, gen, kwargs)
    assert seg.input_ids == ids
    assert seg.text == text
    check_invariants(seg, messages)
    runs = decode_runs(tok, seg)
    written = [(k, s) for k, s in runs if k != NOT_WRITTEN]
    assert [k for k, _ in written] == [i for i, m in enumerate(messages) if m["role"] != "system"]
    for k, s in written:
        assert header.format(role=messages[k]["role"]) in s
        assert messages[k]["content"].strip() in s
        if not (gen and name == "qwen3"):
            assert s == expected_block(name, messages, k)
    # what is not written: preamble / system prompt at the start, generation prompt at the end
    unwritten = [s for k, s in runs if k == NOT_WRITTEN]
    if gen:
        gen_text = text[len(tok.apply_chat_template(messages, tokenize=False, **(kwargs or {}))) :]
        assert unwritten[-1] == gen_text
        assert gen_text.startswith(header.format(role="assistant"))
    if system:
        assert "You are a helpful assistant." in unwritten[0]
    elif name == "smollm2":
        assert unwritten[0] == (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        )
    elif name == "qwen3":
        assert runs[0][0] == 0  # Qwen3 has no default system prompt
    else:
        assert "<|im_start|>system\n" in unwritten[0] or "Cutting Knowledge Date" in unwritten[0]
    assert len(unwritten) == int(system or name != "qwen3") + int(gen)


def test_qwen3_multi_turn_think_block_rollback():
    """Qwen3 renders an empty <think> block on the final answer only; earlier answers keep their own content."""
    tok = qwen3_tokenizer()
    messages = sample_conversation(system=False)
    seg = encode_conversation(tok, messages)  # default chat_template_kwargs: enable_thinking not set
    assert seg.input_ids == full_ids(tok, messages)[1]
    runs = dict(decode_runs(tok, seg))
    assert runs[1] == f"<|im_start|>assistant\n{messages[1]['content']}<|im_end|>\n"
    assert runs[3] == f"<|im_start|>assistant\n{messages[3]['content']}<|im_end|>\n"
    assert runs[5] == f"<|im_start|>assistant\n<think>\n\n</think>\n\n{messages[5]['content']}<|im_end|>\n"
    # with a limit below the 4 dropped <think> tokens, the same conversation is an error
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_conversation(tok, messages, max_rollback_tokens=3)
    encode_conversation(tok, messages, max_rollback_tokens=4)


def test_qwen3_enable_thinking_false_generation_prompt():
    tok = qwen3_tokenizer()
    messages = sample_conversation()[:-1]
    kw = {"enable_thinking": False}
    seg = encode_conversation(tok, messages, add_generation_prompt=True, chat_template_kwargs=kw)
    assert seg.input_ids == full_ids(tok, messages, True, kw)[1]
    runs = decode_runs(tok, seg)
    assert runs[-1] == (NOT_WRITTEN, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seg_think = encode_conversation(tok, messages, add_generation_prompt=True)
    assert decode_runs(tok, seg_think)[-1] == (NOT_WRITTEN, "<|im_start|>assistant\n")
    assert seg_think.message_ids == seg.message_ids[: len(seg_think)]


def test_qwen3_reasoning_in_history_needs_a_larger_rollback():
    tok = qwen3_tokenizer()
    reasoning = "The user greets me. I should greet back politely and offer to help them with anything."
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\nHello! How can I help?"},
        {"role": "user", "content": "Bye."},
    ]
    with pytest.raises(ValueError, match=r"messages\[2\] \(user\).*max_rollback_tokens=16"):
        encode_conversation(tok, messages)
    seg = encode_conversation(tok, messages, max_rollback_tokens=200)
    assert seg.input_ids == full_ids(tok, messages)[1]
    runs = dict(decode_runs(tok, seg))
    assert runs[1] == "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"  # reasoning removed by template
    assert decode_runs(tok, seg, "sentence")[1:3] == [
        (1, "<|im_start|>assistant\nHello!"),
        (2, " How can I help?<|im_end|>\n"),
    ]


def test_qwen3_tools_and_mid_conversation_system():
    tok = qwen3_tokenizer()
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "21 degrees"},
        {"role": "assistant", "content": "It is sunny. It is 21 degrees."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Thanks!"},
    ]
    seg = encode_conversation(tok, messages)
    assert seg.input_ids == full_ids(tok, messages)[1]
    check_invariants(seg, messages)
    assert decode_runs(tok, seg) == [
        (0, "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"),
        (
            1,
            '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        ),
        (2, "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"),
        (3, "<tool_response>\n21 degrees\n</tool_response><|im_end|>\n"),
        (4, "<|im_start|>assistant\nIt is sunny. It is 21 degrees.<|im_end|>\n"),
        (NOT_WRITTEN, "<|im_start|>system\nBe brief.<|im_end|>\n"),
        (6, "<|im_start|>user\nThanks!<|im_end|>\n"),
    ]
    # with tools, Qwen3 puts the tool list into a system block: not written
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    seg_t = encode_conversation(tok, messages[:2], chat_template_kwargs={"tools": tools})
    first = decode_runs(tok, seg_t)[0]
    assert first[0] == NOT_WRITTEN and first[1].startswith("<|im_start|>system\n# Tools")


def test_smollm3_thinking_mode_and_llama_trim():
    tok = smollm3_tokenizer()
    messages = sample_conversation(system=False)[:2]
    seg = encode_conversation(tok, messages)  # /think mode: long default system prompt, not written
    runs = decode_runs(tok, seg)
    assert runs[0][0] == NOT_WRITTEN and "Reasoning Mode: /think" in runs[0][1]
    assert runs[1:] == [
        (0, f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n"),
        (1, f"<|im_start|>assistant\n{messages[1]['content']}<|im_end|>\n"),
    ]
    tok = llama3_tokenizer()
    messages = [{"role": "user", "content": "  Hi there. How are you?\n"}]
    seg = encode_conversation(tok, messages)
    assert decode_runs(tok, seg, "sentence")[1:] == [
        (0, "<|start_header_id|>user<|end_header_id|>\n\nHi there."),
        (1, " How are you?<|eot_id|>"),
    ]


# ------------------------------------------------------------------------------------------------------------------
# templates that are not prefix-stable
# ------------------------------------------------------------------------------------------------------------------


def test_unstable_template_tail_is_reattributed():
    tok = unstable_tokenizer()
    messages = sample_conversation()
    seg = encode_conversation(tok, messages, add_generation_prompt=True)
    assert seg.input_ids == full_ids(tok, messages, True)[1]
    check_invariants(seg, messages)
    runs = decode_runs(tok, seg)
    assert runs[0] == (NOT_WRITTEN, "<|bos|><|start|>system\nYou are a helpful assistant.<|end|>\n")
    assert runs[2] == (2, f"<|start|>assistant\n{messages[2]['content']}<|end|>\n")  # no "(final answer)"
    # the final answer's suffix and the changing trailer belong to the newest message
    assert runs[-2] == (
        6,
        f"<|start|>assistant\n{messages[6]['content']} (final answer)<|end|>\n<|meta|>messages=7<|end|>\n",
    )
    assert runs[-1] == (NOT_WRITTEN, "<|start|>assistant\n")
    # first message without a system message: the bos token is preamble
    seg1 = encode_conversation(tok, messages[1:2])
    assert decode_runs(tok, seg1) == [
        (NOT_WRITTEN, "<|bos|>"),
        (0, f"<|start|>user\n{messages[1]['content']}<|end|>\n<|meta|>messages=1<|end|>\n"),
    ]


def test_unstable_template_over_long_rollback_raises():
    tok = unstable_tokenizer()
    messages = sample_conversation()
    with pytest.raises(ValueError, match=r"not prefix-stable: adding messages\[1\] \(user\)"):
        encode_conversation(tok, messages, max_rollback_tokens=2)
    # a template whose preamble changes with every message can never be segmented
    counting = (
        "<s>conversation of {{ messages | length }} messages, last role {{ messages[-1].role }}\n"
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_conversation(tok, messages[1:3], chat_template_kwargs={"chat_template": counting})


def test_template_without_system_support_attributes_preamble_to_first_message():
    tok = unstable_tokenizer()
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|start|>{{ m.role }}\n{{ m.content }}<|end|>\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "One. Two."}, {"role": "assistant", "content": "Three."}]
    seg = encode_conversation(tok, messages, chat_template_kwargs={"chat_template": template})
    assert seg.message_ids[0] == 0 and NOT_WRITTEN not in seg.message_ids
    assert decode_runs(tok, seg, "sentence") == [
        (0, "<|start|>user\nOne. "),  # a lone space token belongs to the sentence before it
        (1, "Two.<|end|>\n"),
        (2, "<|start|>assistant\nThree.<|end|>\n"),
    ]


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------


def test_tokenizer_without_chat_template():
    with pytest.raises(ValueError, match="no chat template"):
        encode_conversation(plain_tokenizer(), [{"role": "user", "content": "hi"}])
    # ... unless one is passed explicitly
    seg = encode_conversation(
        plain_tokenizer(),
        [{"role": "user", "content": "hi"}],
        chat_template_kwargs={"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"},
    )
    assert plain_tokenizer().decode(seg.input_ids) == "user: hi\n" and set(seg.message_ids) == {0}


def test_slow_or_foreign_tokenizer_rejected():
    class Slow:
        chat_template = "{{ messages }}"
        is_fast = False

        def apply_chat_template(self, *a, **k):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        encode_conversation(Slow(), [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="apply_chat_template"):
        encode_conversation(object(), [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ("hello", "list of dicts"),
        ({"role": "user", "content": "x"}, "list of dicts"),
        ([], "empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"messages\[1\]: role must be one of"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
            r"messages\[1\] \(assistant\): content must be a str",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            r"messages\[0\] \(user\): content must be a str",
        ),
    ],
)
def test_message_validation(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_messages(messages)
    with pytest.raises(ValueError, match=pattern):
        encode_conversation(qwen3_tokenizer(), messages)


def test_argument_errors():
    tok = qwen3_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="add_generation_prompt"):
        encode_conversation(tok, msgs, chat_template_kwargs={"add_generation_prompt": True})
    with pytest.raises(ValueError, match="max_rollback_tokens"):
        encode_conversation(tok, msgs, max_rollback_tokens=-1)
    with pytest.raises(ValueError, match="granularity"):
        segment_ids_for(tok, msgs, "token")
    with pytest.raises(ValueError, match="granularity"):
        encode_conversation(tok, msgs).segment_ids("paragraph")
    with pytest.raises(ValueError, match="failed to render"):
        encode_conversation(tok, msgs, chat_template_kwargs={"chat_template": "{{ raise_exception('boom') }}"})
    with pytest.raises(ValueError, match="lengths differ"):
        SegmentedConversation(input_ids=[1, 2], message_ids=[0], sentence_ids=[0, 0])


# ------------------------------------------------------------------------------------------------------------------
# sentences
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hi. I am Bob!\n\nOK", ["Hi.", "I am Bob!", "OK"]),
        ('He said "Stop!" Then he left.', ['He said "Stop!"', "Then he left."]),
        ("(See above.) Next one", ["(See above.)", "Next one"]),
        ("‘Quoted.’ Next", ["‘Quoted.’", "Next"]),
        ("a [b?] c {d!} e", ["a [b?]", "c {d!}", "e"]),
        ("Pi is 3.14 and e.g. not 2.71", ["Pi is 3.14 and e.g.", "not 2.71"]),  # abbreviations split
        ("Mr. Smith", ["Mr.", "Smith"]),
        ("a:b c; d: e", ["a:b c;", "d:", "e"]),
        ("Wait... what?!  Really", ["Wait...", "what?!", "Really"]),
        ("Line one\nline two", ["Line one\nline two"]),  # a single newline does not split
        ("End.\nNext", ["End.", "Next"]),  # but terminator + newline does
        ("Para one\n \t\nPara two", ["Para one", "Para two"]),
        ("Para one\r\n\r\nPara two", ["Para one", "Para two"]),
        ("End.\n\n\n\nNext", ["End.", "Next"]),
        ("No terminator at the end", ["No terminator at the end"]),
        ("Ends here.", ["Ends here."]),
        ("x.y", ["x.y"]),
        ("  padded.  ", ["padded."]),
        ("", []),
        (" \n\n \t", []),
        ("...", ["..."]),
        (". . .", [".", ".", "."]),
    ],
)
def test_split_sentences_cases(text, pieces):
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == pieces


def test_split_sentences_exact_spans():
    assert split_sentences("Hi. I am Bob!\n\nOK") == [(0, 3), (4, 13), (15, 17)]
    assert split_sentences(' "Yes." No') == [(1, 7), (8, 10)]
    with pytest.raises(TypeError):
        split_sentences(None)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .!?;:\"')]}\n\t”’")), max_size=40))
def test_split_sentences_properties(text):
    spans = split_sentences(text)
    prev_end = 0
    for a, b in spans:
        assert prev_end <= a < b <= len(text)
        assert not text[a].isspace() and not text[b - 1].isspace()
        prev_end = b
    # nothing but whitespace is lost
    assert "".join(text.split()) == "".join("".join(text[a:b].split()) for a, b in spans)
    # every cut is at a documented boundary, and no span contains one
    boundary = re.compile(r"[.!?;:][\"'”’)\]}]*\s|\n[^\S\n]*\n")
    for a, b in spans:
        assert boundary.search(text[a:b]) is None
    for (_, b), (a2, _) in itertools.pairwise(spans):
        gap = text[b:a2]
        assert gap and gap.strip() == ""
        assert re.search(r"\n[^\S\n]*\n", gap) or re.search(r"[.!?;:][\"'”’)\]}]*$", text[:b])


def test_sentence_ids_over_a_conversation():
    tok = smollm2_tokenizer()
    messages = sample_conversation()
    seg = encode_conversation(tok, messages)
    check_invariants(seg, messages)
    assert decode_runs(tok, seg, "sentence") == [
        (NOT_WRITTEN, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
        (0, "<|im_start|>user\nHi."),
        (1, " I am Bob! "),
        (2, "Please remember this:"),
        (3, " my cat is called Tom.<|im_end|>\n"),
        (4, "<|im_start|>assistant\nNice to meet you, Bob."),
        (5, " I will remember that your cat is called Tom.<|im_end|>\n"),
        (6, "<|im_start|>user\nThe secret code is blue seven.\n\n"),
        (7, "Do not forget it!<|im_end|>\n"),
        (8, "<|im_start|>assistant\nSure;"),
        (9, " the code is blue seven."),
        (10, " Anything else?<|im_end|>\n"),
        (11, "<|im_start|>user\nWhat is the name of my cat?<|im_end|>\n"),
        (12, "<|im_start|>assistant\nYour cat is called Tom.<|im_end|>\n"),
    ]
    # the number of sentence ids per message is what split_sentences finds in its content
    per_message = {
        m: len({s for s, mm in zip(seg.sentence_ids, seg.message_ids, strict=True) if mm == m}) for m in range(1, 7)
    }
    assert per_message == {m: len(split_sentences(messages[m]["content"])) for m in range(1, 7)}


def test_empty_content_gets_one_sentence():
    tok = smollm2_tokenizer()
    messages = [{"role": "user", "content": "Hi. There."}, {"role": "assistant", "content": ""}]
    seg = encode_conversation(tok, messages)
    runs = decode_runs(tok, seg, "sentence")
    assert runs[-1] == (2, "<|im_start|>assistant\n<|im_end|>\n")
    assert runs[-3:-1] == [(0, "<|im_start|>user\nHi."), (1, " There.<|im_end|>\n")]


def test_segment_ids_for_and_segment_ids():
    tok = llama3_tokenizer()
    messages = sample_conversation()
    seg = encode_conversation(tok, messages, add_generation_prompt=True)
    ids, mids = segment_ids_for(tok, messages, "message", add_generation_prompt=True)
    assert ids == seg.input_ids and mids == seg.message_ids
    ids, sids = segment_ids_for(tok, messages, "sentence", add_generation_prompt=True)
    assert ids == seg.input_ids and sids == seg.sentence_ids
    assert sids != mids
    got = seg.segment_ids("message")
    got.append(99)  # a copy
    assert len(seg.message_ids) == len(seg.input_ids)
    assert len(seg) == len(seg.input_ids)
    # offsets index the rendered text
    assert "".join(seg.text[a:b] for a, b in seg.offsets) == seg.text
