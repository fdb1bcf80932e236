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
