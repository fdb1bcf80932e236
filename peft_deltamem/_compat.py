"""What differs between the transformers releases we support, decided in one place.

transformers 5.24 renamed the model / ``generate`` keyword ``past_key_values`` to ``cache`` (the old name is still
accepted, with a deprecation warning) and the model outputs' ``past_key_values`` field to ``cache``. Our own calls
pass the name the installed model expects, and everything that looks for a cache accepts both names.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# Every keyword a transformers release has used for the KV cache, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


@cache
def _forward_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), CACHE_KEYWORDS[-1])


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model`` (a transformers model or a PeftModel around one) takes its KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_keyword(type(base))


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of ``model`` or its ``generate``, under the name the installed model expects."""
    return {cache_keyword(model): cache}


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under any of its names, or None."""
    return next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)


def output_cache(outputs: Any) -> Any:
    """The cache a model call returned (``outputs.cache`` on new releases, ``outputs.past_key_values`` on old)."""
    for name in CACHE_KEYWORDS:
        # ModelOutput is a dict of its non-None fields: reading it as a mapping avoids deprecated-alias warnings.
        if name in outputs:
            return outputs[name]
    return None


# transformers 5.24 renamed the training arguments ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the
# old names still work, with a FutureWarning, until v6). Pairs (old name, new name).
CHECKPOINTING_ARGUMENTS = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def training_argument_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (training-argument fields) with the checkpointing fields under the names the installed
    ``TrainingArguments`` declares: the new ones where it has them, else the old ones. Recipes may use either name.

    Raises:
        ValueError: both names of one field are set.
    """
    from dataclasses import fields

    from transformers import TrainingArguments

    declared = {field.name for field in fields(TrainingArguments)}
    renamed = dict(values)
    for old, new in CHECKPOINTING_ARGUMENTS:
        if old in renamed and new in renamed:
            raise ValueError(
                f"{old!r} and {new!r} are the same setting (renamed in transformers 5.24): set only {new!r}"
            )
        wanted, other = (new, old) if new in declared else (old, new)
        if other in renamed:
            renamed[wanted] = renamed.pop(other)
    return renamed
