"""Small helpers the evaluation modules share: batches, progress bars, the model's device, the base-model switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..model import active_deltamem_adapter


def progress(items: Sequence[Any], desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, leave=False, dynamic_ncols=True))


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def is_deltamem(model: Any) -> bool:
    """True for a PeftModel whose active adapter is a δ-mem adapter."""
    return active_deltamem_adapter(model) is not None


def base_context(model: Any) -> contextlib.AbstractContextManager:
    """Run the base model: disable the adapter of a PeftModel (exact base outputs); a plain model is the base."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and is_deltamem(model) else contextlib.nullcontext()
