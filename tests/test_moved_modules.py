"""Modules that moved keep their old import path for one release: same module object, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

MOVED = {
    "peft_deltamem.cli_chat": "peft_deltamem.cli.chat",
    "peft_deltamem.cli_convert": "peft_deltamem.cli.convert",
    "peft_deltamem.cli_eval": "peft_deltamem.cli.eval",
    "peft_deltamem.demo": "peft_deltamem.cli.demo",
    "peft_deltamem.train": "peft_deltamem.cli.train",
    "peft_deltamem.convert": "peft_deltamem.interop.convert",
    "peft_deltamem.hub": "peft_deltamem.interop.hub",
    "peft_deltamem.models": "peft_deltamem.interop.base_models",
    "peft_deltamem.state": "peft_deltamem.memory.state",
    "peft_deltamem.context": "peft_deltamem.memory.hooks",
    "peft_deltamem.checkpointing": "peft_deltamem.memory.checkpointing",
    "peft_deltamem.generation": "peft_deltamem.memory.generation",
    "peft_deltamem.segments": "peft_deltamem.chat.segments",
    "peft_deltamem.session": "peft_deltamem.chat.session",
    "peft_deltamem.evaluation.scoring": "peft_deltamem.evaluation.metrics",
}


@pytest.mark.parametrize(("old", "new"), MOVED.items())
def test_old_module_path_still_imports_with_a_deprecation_warning(old, new) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    sys.modules.pop(old, None)


def test_the_split_evaluation_pipeline_still_imports_with_a_deprecation_warning() -> None:
    import peft_deltamem.evaluation as evaluation

    sys.modules.pop("peft_deltamem.evaluation.pipeline", None)
    with pytest.warns(DeprecationWarning, match="peft_deltamem.evaluation.protocol"):
        pipeline = importlib.import_module("peft_deltamem.evaluation.pipeline")
    assert pipeline.evaluate_task is evaluation.evaluate_task and pipeline.EvalSettings is evaluation.EvalSettings
    sys.modules.pop("peft_deltamem.evaluation.pipeline", None)
