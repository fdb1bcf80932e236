"""The recipes parse into the published settings; bad recipes fail with one line naming the file and field."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.cli import main as cli_main
from peft_deltamem.cli.train import main
from peft_deltamem.training.recipe import RECIPES_DIR, RecipeError, parse_recipe
from tests.helpers.tiny_models import qwen3_4b_on_meta

RECIPES = RECIPES_DIR
CPU_RECIPE = RECIPES / "smollm2-135m" / "tsw-cpu.yaml"
PUBLISHED = sorted(p for p in RECIPES.glob("*/*.yaml") if p.parent.name not in ("accelerate", "smollm2-135m"))
VARIANTS = {"tsw": ("token", 1), "ssw": ("message", 1), "msw": ("token", 4)}
CPU = ["--use_cpu", "true"]  # bf16 recipes only validate on a CPU-only machine with use_cpu


def test_every_published_recipe_is_there() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in PUBLISHED}
    assert names == {f"{m}/{v}" for m in ("qwen3-4b-instruct", "qwen3-8b", "smollm3-3b") for v in VARIANTS}


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_published_recipes_have_the_published_settings(path: Path) -> None:
    recipe = parse_recipe([str(path), *CPU])
    granularity, heads = VARIANTS[path.stem]
    adapter = recipe.adapter
    assert (adapter.write_granularity, adapter.num_state_heads) == (granularity, heads)
    assert (adapter.r, adapter.alpha, adapter.delta_heads, adapter.layers_to_transform) == (8, 16, ["q", "o"], None)
    assert (adapter.init_delta_heads, adapter.base_slice_width, adapter.online_gain) == ("base_slice_fixed", 8, 0.05)
    assert (adapter.beta_bias_init, adapter.couple_lambda, adapter.state_update_mode) == (-1.5, True, "standard")
    assert adapter.rankwise_gates and adapter.task_type == "CAUSAL_LM"
    args = recipe.training
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == (
        2e-4,
        "cosine",
        0.1,
        0.0,
    )
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 1, 4)
    assert args.bf16 and (args.max_length, args.max_write_length) == (512, 8192)
    assert (args.recent_messages, args.episode_turns, args.write_sparsity_target) == (1, "final", 0.05)
    assert args.write_sparsity_weight == (0.0 if path.parent.name == "smollm3-3b" else 0.01)
    thinking = args.chat_template_kwargs.get("enable_thinking")
    assert thinking is (None if path.parent.name == "qwen3-4b-instruct" else False)
    assert recipe.model.dtype == "bfloat16" and recipe.model.model_name_or_path


@pytest.mark.parametrize("name", ["activation_checkpointing", "gradient_checkpointing"])
@pytest.mark.parametrize("value", [True, False])
def test_either_checkpointing_name_sets_checkpointing_without_a_deprecation_warning(
    tmp_path: Path, name: str, value: bool
) -> None:
    """transformers 5.24 renamed gradient_checkpointing to activation_checkpointing: a recipe may use either name,
    and it reaches the installed release under the name that release declares (no FutureWarning on 5.24)."""
    path = _bad(tmp_path, f"{name}: {str(value).lower()}\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        args = parse_recipe([path, *CPU]).training
    assert args.gradient_checkpointing is value
    assert getattr(args, "activation_checkpointing", value) is value


def _trainable(adapter: DeltaMemConfig) -> int:
    model = get_peft_model(qwen3_4b_on_meta(), adapter)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _expected_count(heads: int, layers: int = 36, hidden: int = 2560, q_out: int = 4096, r: int = 8) -> int:
    d = heads * r
    per_layer = 3 * d * hidden + q_out * d + hidden * d + heads * r * hidden + heads * r  # mem q/k/v, Δq, Δo, β
    return layers * per_layer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qwen3_4b_trainable_parameter_counts(variant: str) -> None:
    count = _trainable(parse_recipe([str(RECIPES / "qwen3-4b-instruct" / f"{variant}.yaml"), *CPU]).adapter)
    if variant == "msw":
        assert count == _expected_count(heads=4) == 19_465_344
    else:
        assert count == _expected_count(heads=1) == 4_866_336


def test_cpu_recipe_parses() -> None:
    recipe = parse_recipe([str(RECIPES / "smollm2-135m" / "tsw-cpu.yaml")])
    args = recipe.training
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
    assert recipe.adapter.beta_bias_init == -2.0 and recipe.adapter.write_granularity == "token"
    assert recipe.adapter.online_gain == 0.5 and list(recipe.adapter.layers_to_transform) == list(range(24, 30))
    assert (args.learning_rate, args.per_device_train_batch_size, args.write_pass_reads) == (1e-2, 8, False)
    assert recipe.script.dataset_name.endswith(".jsonl")


def test_accelerate_configs_and_readme() -> None:
    kinds = {p.stem: yaml.safe_load(p.read_text())["distributed_type"] for p in (RECIPES / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}
    readme = (RECIPES / "README.md").read_text()
    for path in RECIPES.glob("*/*.yaml"):
        assert str(path.relative_to(RECIPES.parent)) in readme, path


# ----- overrides and errors ------------------------------------------------------------------------------------------
def test_command_line_overrides_training_and_adapter_fields() -> None:
    path = str(RECIPES / "qwen3-4b-instruct" / "tsw.yaml")
    recipe = parse_recipe(
        [path, *CPU, "--learning_rate", "1e-3", "--deltamem.r", "16", "--num_state_heads=2", "--recent_messages", "0"]
    )
    assert recipe.training.learning_rate == 1e-3 and recipe.training.recent_messages == 0
    assert (recipe.adapter.r, recipe.adapter.num_state_heads) == (16, 2)


def _bad(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nuse_cpu: true\n" + text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lerning_rate: 0.1\n", "unknown field 'lerning_rate' (did you mean 'learning_rate'?)"),
        ("learning_rate: fast\n", "learning_rate: invalid float value: 'fast'"),
        ("episode_turns: last\n", "DeltaMemSFTConfig.episode_turns must be one of ['final', 'all'], got 'last'"),
        ("deltamem:\n  r: 0\n", "deltamem: DeltaMemConfig.r must be a positive integer, got 0"),
        ("deltamem:\n  write_granularity: word\n", "deltamem: DeltaMemConfig.write_granularity must be one of"),
        ("deltamem:\n  heads: [q]\n", "deltamem: unknown field 'heads'"),
        ("deltamem: 8\n", "'deltamem' must be a mapping"),
        ("r: 8\ndeltamem:\n  r: 8\n", "'r' is set both flat and in the 'deltamem' block"),
        ("learning_rate: [\n", "not valid YAML at line"),
        (
            "gradient_checkpointing: true\nactivation_checkpointing: true\n",
            "'gradient_checkpointing' and 'activation_checkpointing' are the same setting",
        ),
    ],
)
def test_bad_recipe_values_give_one_line_naming_file_and_field(tmp_path, capsys, text: str, message: str) -> None:
    path = _bad(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        parse_recipe([path])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert main([path]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltamem train: error: {path}: ")
    assert cli_main(["train", path]) == 2  # `deltamem train` is the same
    assert capsys.readouterr().err.strip() == lines[0]


def test_bad_command_line_values_name_the_command_line(tmp_path) -> None:
    path = _bad(tmp_path, "")
    with pytest.raises(RecipeError, match=r"^command line: learning_rate: invalid float value: 'fast'"):
        parse_recipe([path, "--learning_rate", "fast"])
    with pytest.raises(RecipeError, match=r"^command line: unknown arguments \['--no_such_field', '1'\]"):
        parse_recipe([path, "--no_such_field", "1"])
    with pytest.raises(RecipeError, match=r"^command line: deltamem: DeltaMemConfig.r must be a positive integer"):
        parse_recipe([path, "--deltamem.r", "0"])
    with pytest.raises(RecipeError, match=r"^command line: unknown adapter field 'rank'"):
        parse_recipe([path, "--deltamem.rank", "4"])
    with pytest.raises(RecipeError, match=r"^no/such.yaml: no such recipe file"):
        parse_recipe(["no/such.yaml"])


def test_bad_data_gives_one_line_naming_the_file_and_row(tmp_path, capsys) -> None:
    from tests.helpers.chat_fixtures import smollm2_tokenizer
    from tests.helpers.tiny_models import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    smollm2_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()  # forget the progress output of the set-up
    argv = [_bad(tmp_path, ""), "--model_name_or_path", str(model_dir), "--dataset_name", str(data)]
    assert main([*argv, "--output_dir", str(tmp_path / "out"), "--report_to", "none"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"deltamem train: error: {data}: line 2 (row 1): message 1 (assistant) has empty content; fix the data or "
        "set invalid_rows='skip' to skip such rows"
    ]


def test_a_bundled_recipe_is_found_by_its_documented_name_from_anywhere(tmp_path, monkeypatch) -> None:
    from peft_deltamem.training.recipe import recipe_file

    monkeypatch.chdir(tmp_path)  # no recipes/ directory here: the name resolves to the package's copy
    for name in ("recipes/smollm2-135m/tsw-cpu.yaml", "smollm2-135m/tsw-cpu"):
        assert recipe_file(name) == RECIPES / "smollm2-135m" / "tsw-cpu.yaml"
    assert parse_recipe(["recipes/smollm2-135m/tsw-cpu.yaml"]).adapter.r == parse_recipe([str(CPU_RECIPE)]).adapter.r
    local = tmp_path / "recipes" / "smollm2-135m" / "tsw-cpu.yaml"  # an existing file wins over the bundled name
    local.parent.mkdir(parents=True)
    local.write_text("deltamem: {r: 4}\n")
    assert recipe_file("recipes/smollm2-135m/tsw-cpu.yaml") == Path("recipes/smollm2-135m/tsw-cpu.yaml")
    assert str(recipe_file("recipes/nope.yaml")) == "recipes/nope.yaml"
