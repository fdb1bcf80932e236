"""The memory-only evaluation pipeline end to end on a tiny random model: systems, controls, scoring, JSON, reports."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.evaluation import (
    SYSTEMS,
    EvalSettings,
    evaluate_locomo,
    evaluate_recall,
    evaluate_task,
    load_locomo,
    make_ladder,
    other_memory_pairing,
    recall_task,
    write_memories,
)
from peft_deltamem.evaluation.model_scoring import score_continuations
from peft_deltamem.evaluation.report import levels_table, markdown_table, plot_results, strip_records, write_json
from tests.helpers.chat_fixtures import smollm2_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model, tiny_model_for

FAST = dict(batch_size=4, progress=False, n_resamples=200, max_new_tokens=3)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def _peft_model(tokenizer, granularity: str = "token"):
    base = tiny_model_for(tokenizer)
    config = DeltaMemConfig(
        task_type="CAUSAL_LM", r=4, delta_heads=["q", "k", "v", "o"], write_granularity=granularity, beta_bias_init=0.0
    )
    model = get_peft_model(base, config)
    # Random, large adapter weights: the memory must visibly change the outputs for the controls to mean anything.
    randomize_adapter(model)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _peft_model(tokenizer)


@pytest.fixture(scope="module")
def l1_result(model, tokenizer):
    return evaluate_recall(model, tokenizer, 1, 6, fact_types=("colour",), settings=EvalSettings(**FAST))


def _choice_logprobs(result, system):
    return torch.tensor([r["choice_logprobs"] for r in result["records"][system]])


def test_recall_result_has_every_system_and_a_valid_schema(l1_result) -> None:
    assert list(l1_result["systems"]) == list(SYSTEMS)
    assert l1_result["metric"] == "forced_choice"
    assert l1_result["n_questions"] == 6 and l1_result["level"] == 1
    for name, summary in l1_result["systems"].items():
        assert summary["n"] == 6, name
        for metric in ("accuracy", "exact_match", "contains_match", "forced_choice"):
            lo, hi = summary[f"{metric}_ci"]
            assert 0.0 <= lo <= summary[metric] <= hi <= 1.0, (name, metric)
        assert len(l1_result["records"][name]) == 6
        assert all(len(r["choice_logprobs"]) == 10 for r in l1_result["records"][name])
    assert l1_result["diagnostics"]["chance"] == pytest.approx(0.1)
    assert "own_minus_other_gold_logprob" in l1_result["diagnostics"]
    assert 0.0 <= l1_result["diagnostics"]["other_memory_answers_source_value"]["mean"] <= 1.0
    json.loads(json.dumps(l1_result))  # plain JSON, no tensors or numpy scalars


def test_prompts_of_each_system(l1_result) -> None:
    records = l1_result["records"]
    assert all(r["history_turns_in_prompt"] == 0 for r in records["no_history"])
    assert all(r["history_turns_in_prompt"] == 2 for r in records["full_history"])  # L1: fact + acknowledgement
    assert all(r["history_turns_in_prompt"] == 2 for r in records["bm25"])  # k = 2 keeps both
    for system in ("deltamem", "deltamem_empty_memory", "deltamem_other_memory"):
        assert [r["prompt_tokens"] for r in records[system]] == [r["prompt_tokens"] for r in records["no_history"]]
    ids = [r["id"] for r in records["deltamem"]]
    pairing = other_memory_pairing(len(ids), seed=0)
    assert [r["memory_of"] for r in records["deltamem_other_memory"]] == [ids[j] for j in pairing]


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_other_memory_pairing_never_reads_the_own_memory(n) -> None:
    pairing = other_memory_pairing(n, seed=3)
    assert sorted(pairing) == list(range(n)) and all(pairing[c] != c for c in range(n))
    assert pairing == other_memory_pairing(n, seed=3) and (n < 10 or pairing != other_memory_pairing(n, seed=4))


def test_empty_memory_control_is_the_base_model_and_memory_matters(l1_result) -> None:
    # A zero memory reads zero, so the corrections vanish: exactly the base model without history.
    torch.testing.assert_close(
        _choice_logprobs(l1_result, "deltamem_empty_memory"),
        _choice_logprobs(l1_result, "no_history"),
        atol=1e-4,
        rtol=0,
    )
    own = _choice_logprobs(l1_result, "deltamem")
    assert (own - _choice_logprobs(l1_result, "no_history")).abs().max() > 1e-2
    assert (own - _choice_logprobs(l1_result, "deltamem_other_memory")).abs().max() > 1e-2


def test_other_memory_control_reads_the_paired_conversations_memory(model, tokenizer) -> None:
    examples = make_ladder(1, 4, seed=5, split="test", fact_types=("colour",))
    task = recall_task(examples)
    rotated = copy.deepcopy(task)
    pairing = other_memory_pairing(4, seed=0)
    for i, conv in enumerate(rotated.conversations):
        conv.sessions = copy.deepcopy(task.conversations[pairing[i]].sessions)
    settings = EvalSettings(systems=("deltamem", "deltamem_other_memory"), generate=False, **FAST)
    result = evaluate_task(model, tokenizer, task, settings)
    expected = evaluate_task(model, tokenizer, rotated, settings)
    torch.testing.assert_close(
        _choice_logprobs(result, "deltamem_other_memory"), _choice_logprobs(expected, "deltamem"), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("with_memory", [False, True])
def test_forced_choice_scores_equal_a_full_forward(model, tokenizer, with_memory) -> None:
    prompts = [[5, 9, 11, 30], [7, 8], [40, 41, 42, 43, 44, 45]]  # different lengths: left padding
    continuations = [[[3], [4, 5, 6]], [[9, 9]], [[12], [13], [14, 15]]]
    memory = None
    if with_memory:
        memory = MemoryState()
        with torch.no_grad():
            model(input_ids=torch.randint(3, 400, (3, 9), generator=torch.Generator().manual_seed(1)), memory=memory)
    # Without a memory the base systems run with the adapter disabled.
    context = contextlib.nullcontext() if with_memory else model.disable_adapter()
    with context:
        scores = score_continuations(model, prompts, continuations, pad_id=tokenizer.pad_token_id, memory=memory)
        for i, (prompt, conts) in enumerate(zip(prompts, continuations, strict=True)):
            for j, cont in enumerate(conts):
                ids = torch.tensor([prompt + cont])
                kwargs = {"memory": memory[i], "memory_write": False} if memory is not None else {}
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(input_ids=ids, **kwargs).logits[0].float(), -1)
                expected = sum(float(logprobs[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))
                assert scores[i][j] == pytest.approx(expected, abs=1e-3)


def test_full_history_is_left_truncated_to_the_budget(model, tokenizer) -> None:
    examples = make_ladder(3, 3, seed=1, split="test")
    budget = 90
    settings = EvalSettings(systems=("full_history", "bm25"), max_context_tokens=budget, bm25_k=1, **FAST)
    result = evaluate_task(model, tokenizer, recall_task(examples), settings)
    for record, ex in zip(result["records"]["full_history"], examples, strict=True):
        assert record["prompt_tokens"] <= budget
        assert record["history_turns_in_prompt"] < len(ex["messages"]) - 2
    assert all(r["history_turns_in_prompt"] == 1 for r in result["records"]["bm25"])


def test_write_memories_batches_equal_one_conversation_at_a_time(model, tokenizer) -> None:
    task = recall_task(make_ladder(2, 3, seed=2, split="test"))  # different history lengths: padding
    batched = write_memories(model, tokenizer, task, EvalSettings(batch_size=3, progress=False))
    for i in range(3):
        single = copy.deepcopy(task)
        single.conversations, single.questions = [task.conversations[i]], []
        alone = write_memories(model, tokenizer, single, EvalSettings(batch_size=1, progress=False))
        for name in alone.states:
            torch.testing.assert_close(batched.states[name][i : i + 1], alone.states[name], atol=1e-5, rtol=1e-4)


def test_segment_adapters_are_evaluated_with_message_writes(tokenizer) -> None:
    model = _peft_model(tokenizer, granularity="message")
    settings = EvalSettings(systems=("deltamem", "deltamem_other_memory"), generate=False, **FAST)
    result = evaluate_recall(model, tokenizer, 1, 4, fact_types=("digit",), settings=settings)
    own, other = _choice_logprobs(result, "deltamem"), _choice_logprobs(result, "deltamem_other_memory")
    assert (own - other).abs().max() > 1e-2


def test_base_systems_run_on_a_plain_model(tokenizer) -> None:
    base = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    settings = EvalSettings(systems=("no_history", "full_history", "bm25"), **FAST)
    result = evaluate_recall(base, tokenizer, 1, 3, settings=settings)
    assert list(result["systems"]) == ["no_history", "full_history", "bm25"]
    with pytest.raises(ValueError, match="PeftModel"):
        evaluate_recall(base, tokenizer, 1, 3, settings=EvalSettings(**FAST))


def test_open_answers_use_exact_match_and_still_record_the_gold_log_prob(model, tokenizer) -> None:
    result = evaluate_recall(model, tokenizer, 5, 4, settings=EvalSettings(**FAST))
    assert result["metric"] == "exact_match"
    assert all(r["gold_logprob"] is not None and "choice" not in r for r in result["records"]["deltamem"])
    assert "chance" not in result["diagnostics"]


def _locomo_fixture() -> list[dict]:
    """Two tiny conversations in LoCoMo's format (invented text; LoCoMo itself is never shipped)."""

    def sample(sid: str, a: str, b: str, pet: str) -> dict:
        return {
            "sample_id": sid,
            "conversation": {
                "speaker_a": a,
                "speaker_b": b,
                "session_1_date_time": "1:00 pm on 1 May, 2023",
                "session_1": [
                    {"speaker": a, "dia_id": "D1:1", "text": f"I adopted a {pet} last week."},
                    {"speaker": b, "dia_id": "D1:2", "text": "That is lovely! What is its name?"},
                ],
                "session_2_date_time": "2:00 pm on 9 May, 2023",
                "session_2": [
                    {"speaker": a, "dia_id": "D2:1", "text": "We went hiking in the hills on Sunday."},
                    {"speaker": b, "dia_id": "D2:2", "text": "Sounds fun, I went swimming."},
                ],
            },
            "qa": [
                {"question": f"What pet did {a} adopt?", "answer": pet, "evidence": ["D1:1"], "category": 4},
                {"question": f"When did {a} go hiking?", "answer": "7 May 2023", "evidence": ["D2:1"], "category": 2},
                {"question": f"What did {a} and {b} do?", "answer": "hiking, swimming", "evidence": [], "category": 1},
                {"question": "Would they like a zoo?", "answer": "Likely yes; pets", "evidence": [], "category": 3},
                {"question": "Did they adopt a cow?", "adversarial_answer": "no", "evidence": [], "category": 5},
            ],
        }

    return [sample("conv-a", "Ann", "Bo", "kitten"), sample("conv-b", "Cy", "Di", "parrot")]


def test_locomo_end_to_end_on_a_fixture(model, tokenizer, tmp_path) -> None:
    path = tmp_path / "locomo_fixture.json"
    path.write_text(json.dumps(_locomo_fixture()))
    samples = load_locomo(path)
    settings = EvalSettings(max_new_tokens=4, bm25_k=2, batch_size=3, progress=False, n_resamples=100)
    result = evaluate_locomo(model, tokenizer, samples, settings=settings)
    assert result["benchmark"] == "locomo" and result["metric"] == "f1"
    assert result["n_questions"] == 8 and result["n_conversations"] == 2  # category 5 is not scored
    for summary in result["systems"].values():
        assert set(summary["by_group"]) == {"1-multi-hop", "2-temporal", "3-open-domain", "4-single-hop"}
        assert 0.0 <= summary["accuracy"] <= 1.0
    assert all("f1" in r for r in result["records"]["deltamem"])
    assert "own_minus_other_gold_logprob" in result["diagnostics"]

    # Two sessions are written one call each, in order, into one memory per conversation.
    from peft_deltamem.evaluation import locomo_task

    task = locomo_task(samples)
    memories = write_memories(model, tokenizer, task, settings)
    manual = MemoryState()
    with torch.no_grad():
        for session in task.conversations[1].sessions:
            text = tokenizer.apply_chat_template(session, tokenize=False)
            model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]), memory=manual)
    for name in manual.states:
        torch.testing.assert_close(memories.states[name][1:2], manual.states[name], atol=1e-5, rtol=1e-4)


def test_reports(l1_result, tmp_path) -> None:
    table = markdown_table(l1_result)
    for name in SYSTEMS:
        assert f"`{name}`" in table
    assert "chance 10.0 %" in table
    assert "own_minus_other" not in table and "own − other" in table
    both = levels_table({"L1": l1_result, "L1 again": l1_result})
    assert both.count("`deltamem`") == 1 and "L1 again" in both
    png = plot_results({"L1": l1_result}, tmp_path / "img" / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = write_json(strip_records(l1_result), tmp_path / "r.json")
    assert json.loads(path.read_text())["systems"]["deltamem"]["n"] == 6


def test_cli_eval_recall_and_locomo(tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from peft_deltamem.cli.eval import TRAINING_INFO_FILE, main

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(base_dir)
    copy.deepcopy(tokenizer).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(adapter_dir)
    (adapter_dir / TRAINING_INFO_FILE).write_text(json.dumps({"write_pass_reads": False}))
    common = ["--base", str(base_dir), "--adapter", str(adapter_dir), "--no-progress", "--max-new-tokens", "2"]

    out = tmp_path / "recall"
    assert main(["recall", "--levels", "1,2", "--n", "3", "--output", str(out), *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"L1", "L2"}
    assert list(results["L1"]["systems"]) == list(SYSTEMS)
    assert results["L1"]["settings"]["write_pass_reads"] is False  # read from the adapter directory
    assert "records" not in results["L1"] and (out / "records.json").is_file()
    assert (out / "results.png").is_file() and "`deltamem_other_memory`" in (out / "results.md").read_text()

    data = tmp_path / "locomo.json"
    data.write_text(json.dumps(_locomo_fixture()))
    out = tmp_path / "locomo"
    assert main(["locomo", "--data", str(data), "--max-questions", "3", "--output", str(out), *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["LoCoMo"]["metric"] == "f1" and results["LoCoMo"]["n_questions"] == 3

    assert main(["locomo", "--data", str(tmp_path / "missing.json"), *common]) == 2
