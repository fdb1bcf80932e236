"""``--max-questions``: only the conversations the selected questions need are written, and their results do not
change (a tiny random model, LoCoMo-format fixture written here)."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.evaluation import EvalSettings, evaluate_locomo, locomo_task, other_memory_pairing, parse_locomo
from peft_deltamem.evaluation import memories as memories_module
from peft_deltamem.evaluation.memories import needed_conversations
from tests.evaluation.test_protocol import _locomo_fixture
from tests.helpers.chat_fixtures import smollm2_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model_for


def _samples():
    data = _locomo_fixture()
    extra = [dict(s, sample_id=s["sample_id"] + "-2") for s in data]  # four conversations, two sessions each
    extra[0]["conversation"] = dict(
        extra[0]["conversation"], session_3=[{"speaker": "Ann", "dia_id": "D3:1", "text": "Hi."}]
    )
    return parse_locomo(data + extra)


@pytest.fixture(scope="module")
def setup():
    tokenizer = smollm2_tokenizer()
    model = get_peft_model(tiny_model_for(tokenizer), DeltaMemConfig(task_type="CAUSAL_LM", r=4, beta_bias_init=0.0))
    randomize_adapter(model)
    return model.eval(), tokenizer


def _count_written_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    real = memories_module.write_pass

    def counting(model, ids, *args, **kwargs):
        rows.append(int(ids.shape[0]))
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(memories_module, "write_pass", counting)
    return rows


def test_needed_conversations_follow_the_other_memory_pairing():
    task = locomo_task(_samples())
    task.questions = [q for q in task.questions if q.conversation == 1]
    pairing = other_memory_pairing(4, seed=0)
    assert needed_conversations(task, ("deltamem", "deltamem_other_memory")) == sorted({1, pairing[1]})
    assert needed_conversations(task, ("deltamem", "no_history")) == [1]


def test_max_questions_writes_only_what_the_questions_need_and_keeps_their_results(setup, monkeypatch):
    model, tokenizer = setup
    samples = _samples()
    settings = EvalSettings(max_new_tokens=3, bm25_k=2, batch_size=2, progress=False, n_resamples=50)
    rows = _count_written_rows(monkeypatch)
    full = evaluate_locomo(model, tokenizer, samples, settings=settings)
    sessions = [len(s.sessions) for s in samples]
    assert sum(rows) == sum(sessions) and full["n_conversations_written"] == 4

    rows.clear()
    subset = evaluate_locomo(model, tokenizer, samples, settings=settings, max_questions=4)  # conversation 0's
    needed = sorted({0, other_memory_pairing(4, seed=0)[0]})
    assert subset["n_conversations_written"] == len(needed) < 4
    assert sum(rows) == sum(sessions[c] for c in needed)  # one written row per (needed conversation, session)
    for system, records in subset["records"].items():
        for mine, reference in zip(records, full["records"][system][:4], strict=True):
            assert mine["id"] == reference["id"] and mine.get("memory_of") == reference.get("memory_of")
            assert mine["prediction"] == reference["prediction"] and mine["f1"] == reference["f1"]
            assert mine["gold_logprob"] == pytest.approx(reference["gold_logprob"], abs=1e-3)
