"""DeltaMemSFTTrainer on tiny random models: learning from memory, gradients, checkpoints, the write-only pass."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import TrainerCallback

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.training import DataError, DeltaMemSFTConfig, DeltaMemSFTTrainer
from tests.helpers.chat_fixtures import sample_conversation, smollm2_tokenizer
from tests.helpers.recall import recall_conversations
from tests.helpers.tiny_models import tiny_model

TOK = smollm2_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def base_model(seed: int = 0, **overrides):
    # A larger init scale than the default 0.02 gives the random model confident logits that the corrections can move.
    return tiny_model("llama", seed=seed, vocab_size=len(TOK), pad_token_id=TOK.pad_token_id, **overrides)


def make_trainer(tmp_path, rows: list[dict], *, peft: dict | None = None, model=None, **args) -> DeltaMemSFTTrainer:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    settings.update(args)
    return DeltaMemSFTTrainer(
        model=model if model is not None else base_model(),
        args=DeltaMemSFTConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=TOK,
        peft_config=DeltaMemConfig(task_type="CAUSAL_LM", **(peft or {})),
    )


def batch_of(trainer: DeltaMemSFTTrainer, n: int | None = None) -> dict[str, torch.Tensor]:
    data = trainer.train_dataset
    return trainer.data_collator([data[i] for i in range(n or len(data))])


def read_losses(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Answer-token loss of the read pass with the right memory, another episode's memory, and an empty memory."""
    model.eval()
    losses = {}
    with torch.no_grad():
        for name in ("right", "wrong", "empty"):
            memory = MemoryState()
            history, mask = batch["write_input_ids"], batch["write_attention_mask"]
            if name == "wrong":
                history, mask = history.roll(1, 0), mask.roll(1, 0)
            if name != "empty":
                model(input_ids=history, attention_mask=mask, memory=memory)
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                fused_lm_head=True,
                memory=memory,
                memory_write=False,
            )
            losses[name] = (-out.log_probs.sum() / out.label_mask.sum()).item()
    model.train()
    return losses


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


class GradientProbe(TrainerCallback):
    """Keeps the gradients of the first optimizer step (after accumulation, before clipping and the update)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = adapter_grads(model)


# ----- the objective learns what only the memory holds ------------------------------------------------------------
@pytest.mark.slow
def test_episode_training_recalls_answers_that_are_only_in_the_history(tmp_path) -> None:
    trainer = make_trainer(
        tmp_path,
        recall_conversations(60 * 16, seed=0),
        model=base_model(initializer_range=0.3),
        per_device_train_batch_size=16,
        max_steps=60,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=20,
    )
    held_out = make_trainer(tmp_path, recall_conversations(64, seed=1))  # only used to build held-out episodes
    batch = batch_of(held_out)
    assert batch["write_attention_mask"].sum(1).min() > 0  # every held-out episode has a history
    before = read_losses(trainer.model, batch)
    trainer.train()
    after = read_losses(trainer.model, batch)
    print(f"read-pass loss before {before}, after {after}")
    # Untrained, the memory barely matters yet (the correction heads start small).
    assert max(before.values()) - min(before.values()) < 0.05
    assert after["right"] < before["right"] / 5
    # An empty memory gives no corrections at all: the base model's loss, far above the trained adapter's.
    assert after["empty"] == pytest.approx(before["empty"], abs=1e-4)
    assert after["right"] < after["empty"] - 3
    # Another conversation's memory gets the answer format but not the answer: recall, not a learned prior.
    assert after["right"] < after["wrong"] - 1


# ----- gradients -----------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path) -> None:
    grads = {}
    for checkpointing in (False, True):
        probe = GradientProbe()
        trainer = make_trainer(
            tmp_path, [{"messages": sample_conversation()}] * 4, max_steps=1, gradient_checkpointing=checkpointing
        )
        trainer.add_callback(probe)
        trainer.train()
        grads[checkpointing] = probe.grads
    assert trainer.model.base_model.model.model.layers[0].gradient_checkpointing  # it really was on
    assert set(grads[True]) == set(grads[False]) and len(grads[False]) == 2 * 7  # 2 layers × 7 adapter tensors
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-8)


def test_training_changes_only_adapter_weights(tmp_path) -> None:
    trainer = make_trainer(tmp_path, recall_conversations(12, seed=0), max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    adapter = {n for n in before if "deltamem_" in n}
    assert adapter == {n for n, p in after.items() if p.requires_grad}
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (name in adapter), name


def test_sparsity_penalty_reaches_the_write_gate(tmp_path) -> None:
    # Zero correction heads: the read-pass loss cannot depend on the memory, so β gets gradient from the penalty only.
    grads = {}
    for weight in (0.0, 0.5):
        trainer = make_trainer(
            tmp_path,
            recall_conversations(4, seed=0),
            peft={"init_delta_heads": "zero"},
            write_sparsity_weight=weight,
            write_sparsity_target=0.05,
        )
        trainer.compute_loss(trainer.model, batch_of(trainer)).backward()
        grads[weight] = adapter_grads(trainer.model)
    bias = [n for n in grads[0.0] if "deltamem_write_gate" in n and n.endswith("bias")]
    assert len(bias) == 2
    for name in bias:
        assert grads[0.0][name].abs().max() == 0
        # β = sigmoid(−1.5) on every written token, so d/db of w·(mean β − t)² is 2w(β − t)·β(1 − β)/(layers · r).
        beta = torch.sigmoid(torch.tensor(-1.5))
        expected = 2 * 0.5 * (beta - 0.05) * beta * (1 - beta) / (2 * 8)
        torch.testing.assert_close(grads[0.5][name], torch.full((8,), expected.item()), rtol=1e-4, atol=0)


def test_write_pass_projects_nothing_onto_the_vocabulary(tmp_path) -> None:
    trainer = make_trainer(tmp_path, recall_conversations(4, seed=0))
    shapes = []
    lm_head = trainer.model.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        loss = trainer.compute_loss(trainer.model, batch_of(trainer))
    finally:
        handle.remove()
    assert torch.isfinite(loss)
    # The write pass calls the head on zero positions; the read pass uses TRL's fused head (the weight, not a call).
    assert shapes == [(4, 0, len(TOK))]


def test_episodes_without_history_train_from_an_empty_memory(tmp_path) -> None:
    trainer = make_trainer(tmp_path, [{"messages": sample_conversation()}] * 2, recent_messages=10)
    batch = batch_of(trainer)
    assert batch["write_attention_mask"].sum() == 0
    loss = trainer.compute_loss(trainer.model, batch)
    # An empty memory reads zeros, so the loss is exactly the base model's cross-entropy on the answer tokens.
    with trainer.model.disable_adapter():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()  # and it trains without error (the adapter gets zero gradient from such batches)


@pytest.mark.parametrize("granularity", ["message", "sentence"])
def test_segment_writes_train_with_segment_ids(tmp_path, granularity: str) -> None:
    trainer = make_trainer(tmp_path, [{"messages": sample_conversation()}] * 4, peft={"write_granularity": granularity})
    batch = batch_of(trainer)
    assert batch["write_segment_ids"].max() > 0 and (batch["write_segment_ids"] == -1).any()
    trainer.compute_loss(trainer.model, batch).backward()
    grads = adapter_grads(trainer.model)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "write_gate" in n or "memory_k" in n)


def test_token_writes_of_user_turns_only_train_with_segment_ids(tmp_path) -> None:
    from peft_deltamem.chat.segments import encode_conversation

    chat = sample_conversation()
    trainer = make_trainer(tmp_path, [{"messages": chat}] * 2, peft={"write_roles": ["user"]})
    batch = batch_of(trainer)
    history = encode_conversation(TOK, chat[:5])  # system + two turns: the final answer's write history
    roles = [chat[m]["role"] if m >= 0 else None for m in history.message_ids]
    expected = [m if role == "user" else -1 for m, role in zip(history.message_ids, roles, strict=True)]
    assert batch["write_segment_ids"][0].tolist() == expected and "assistant" in roles
    trainer.compute_loss(trainer.model, batch).backward()
    grads = adapter_grads(trainer.model)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "write_gate" in n or "memory_k" in n)


def test_read_pass_writes_with_write_roles_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"read_pass_writes=True .* only the messages of \['user'\]"):
        make_trainer(
            tmp_path, [{"messages": sample_conversation()}], peft={"write_roles": ["user"]}, read_pass_writes=True
        )


# ----- the write-only pass (memory_read=False) --------------------------------------------------------------------------
def test_write_only_call_writes_without_corrections() -> None:
    model = get_peft_model(base_model(), DeltaMemConfig(task_type="CAUSAL_LM", delta_heads=["q", "k", "v", "o"]))
    ids = torch.randint(3, len(TOK), (2, 9), generator=torch.Generator().manual_seed(0))
    full, write_only = MemoryState(), MemoryState()
    model(input_ids=ids, memory=full)
    logits = model(input_ids=ids, memory=write_only, memory_read=False).logits
    with model.disable_adapter():
        torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=0, atol=0)  # no corrections at all
    first, second = sorted(full.states)
    # The first adapted layer sees the same inputs either way; later ones see uncorrected inputs.
    torch.testing.assert_close(write_only.states[first], full.states[first])
    assert write_only.states[second].abs().sum() > 0
    sum(state.sum() for state in write_only.states.values()).backward()
    grads = adapter_grads(model)
    assert all(grads[n].abs().sum() > 0 for n in grads if "memory_k" in n or "memory_v" in n or "write_gate" in n)
    assert not any("delta_" in n or "memory_q" in n for n in grads)  # nothing read, nothing corrected


def test_trainer_with_a_write_only_pass(tmp_path) -> None:
    probe = GradientProbe()
    trainer = make_trainer(tmp_path, recall_conversations(4, seed=0), write_pass_reads=False, max_steps=1)
    trainer.add_callback(probe)
    trainer.train()
    assert all(g.abs().sum() > 0 for g in probe.grads.values())  # the read pass reaches the write path via memory


# ----- checkpoints ---------------------------------------------------------------------------------------------------
def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "deltamem_" in n}


def test_checkpoints_are_adapters_and_resuming_continues_exactly(tmp_path) -> None:
    rows = recall_conversations(32, seed=0)
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, data_seed=7)
    settings["gradient_accumulation_steps"] = 2
    straight = make_trainer(tmp_path / "a", rows, **settings)
    straight.train()
    final = _adapter_state(straight.model)
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "a" / "out" / "checkpoint-4"))
    for name, value in _adapter_state(loaded).items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)
    # Another seed gives another initial adapter: only the checkpoint can bring the run back onto the same path.
    resumed = make_trainer(tmp_path / "b", rows, seed=1, **settings)
    assert any(not torch.equal(v, final[n]) for n, v in _adapter_state(resumed.model).items())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    losses = [(log["step"], log["loss"]) for log in resumed.state.log_history if "loss" in log]
    assert losses == [(log["step"], log["loss"]) for log in straight.state.log_history if "loss" in log]
    assert [step for step, _ in losses] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer state
    for name, value in _adapter_state(resumed.model).items():
        torch.testing.assert_close(value, final[name], rtol=1e-6, atol=1e-7)


# ----- data errors ---------------------------------------------------------------------------------------------------
def test_malformed_rows_are_rejected_before_training_or_skipped(tmp_path) -> None:
    rows = [*recall_conversations(3, seed=0), {"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataError, match=r"^train dataset: row 3: no assistant turn to train on; "):
        make_trainer(tmp_path, rows)
    trainer = make_trainer(tmp_path, rows, invalid_rows="skip")
    assert len(trainer.train_dataset) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("episode_turns", "last"),
        ("recent_messages", -1),
        ("max_write_length", 0),
        ("write_sparsity_weight", -0.1),
        ("invalid_rows", "ignore"),
        ("packing", True),
        ("chat_template_kwargs", "enable_thinking=false"),
        ("memory_learning_rate", 0.0),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field: str, value) -> None:
    with pytest.raises(ValueError, match=f"DeltaMemSFTConfig.{field} must be"):
        DeltaMemSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})


def test_memory_learning_rate_gives_the_memory_projections_their_own_rate(tmp_path) -> None:
    rows = recall_conversations(8, seed=0)
    trainer = make_trainer(tmp_path, rows, learning_rate=1e-2, memory_learning_rate=3e-4, max_steps=1)
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    optimizer = trainer.create_optimizer()
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rates[names[id(param)]] = group["lr"]
    assert set(rates) == set(names.values())  # every trainable parameter once, nothing else
    memory = {n for n in rates if ".deltamem_memory_" in n}
    assert memory and all(rates[n] == 3e-4 for n in memory)
    assert all(rate == 1e-2 for n, rate in rates.items() if n not in memory)
    # The schedule (warmup) scales both rates alike.
    trainer.args.warmup_steps = 4
    trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    by_rate = {round(g["initial_lr"], 8): g["lr"] for g in optimizer.param_groups}
    assert by_rate[3e-4] / 3e-4 == pytest.approx(by_rate[1e-2] / 1e-2)


def test_without_memory_learning_rate_every_parameter_has_the_learning_rate(tmp_path) -> None:
    trainer = make_trainer(tmp_path, recall_conversations(8, seed=0), learning_rate=1e-2, max_steps=1)
    assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {1e-2}
