"""Loading and checking conversational training data (TRL's ``messages`` format).

A row is ``{"messages": [{"role": ..., "content": ...}, ...]}``. A row is malformed when ``messages`` is missing or
not a list, a message is not a role/content object, a role is unknown, a content is not a non-empty string, a system
message is not the first message, or there is no assistant turn to train on. Malformed rows are reported with their
index (and, for files, their line) and either rejected with one clear error line or skipped with a warning, per
``invalid_rows`` (``"raise"`` | ``"skip"``), so nothing malformed ever reaches the collator.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..chat.segments import VALID_ROLES

logger = logging.getLogger(__name__)

INVALID_ROWS = ("raise", "skip")
"""What to do with malformed rows."""

_SHOWN = 5  # malformed rows named in a skip warning


class DataError(ValueError):
    """Malformed training data; the message is one line naming the source, the row and the problem."""


def check_conversation(messages: Any) -> str | None:
    """The first problem of a ``messages`` value as a short phrase, or ``None`` if it is a valid training example."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        return "'messages' is missing or not a list of messages"
    if len(messages) == 0:
        return "'messages' is empty"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"message {i} is not an object with 'role' and 'content'"
        role = message.get("role")
        if role not in VALID_ROLES:
            return f"message {i} has unknown role {role!r} (expected one of {', '.join(VALID_ROLES)})"
        content = message.get("content")
        if not isinstance(content, str):
            return f"message {i} ({role}) has no text content"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
        if role == "system" and i > 0:
            return f"message {i} is a system message; only the first message may be one"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to train on"
    return None


def _normalise(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    # Only role and content are used; dropping the rest keeps one Arrow schema for every row.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def report_invalid(problems: Sequence[tuple[str, str]], source: str, invalid_rows: str) -> None:
    """Raise :class:`DataError` for the first problem (``invalid_rows="raise"``) or warn about all of them.

    ``problems`` holds ``(where, what)`` pairs such as ``("row 3", "no assistant turn to train on")``.
    """
    if invalid_rows not in INVALID_ROWS:
        raise ValueError(f"invalid_rows must be one of {list(INVALID_ROWS)}, got {invalid_rows!r}")
    if not problems:
        return
    if invalid_rows == "raise":
        where, what = problems[0]
        more = f" ({len(problems)} malformed rows in all)" if len(problems) > 1 else ""
        raise DataError(f"{source}: {where}: {what}{more}; fix the data or set invalid_rows='skip' to skip such rows")
    shown = "; ".join(f"{where}: {what}" for where, what in problems[:_SHOWN])
    rest = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    logger.warning("%s: skipping %d malformed rows: %s%s", source, len(problems), shown, rest)


def validate_dataset(dataset: Dataset, source: str, invalid_rows: str = "raise") -> Dataset:
    """Check every row of a dataset with a ``messages`` column; return it without the malformed rows (or raise)."""
    if "messages" not in dataset.column_names:
        raise DataError(
            f"{source}: no 'messages' column (columns: {dataset.column_names}); δ-mem trains on conversational "
            "data, rows like {'messages': [{'role': 'user', 'content': ...}, ...]}"
        )
    problems, good = [], []
    for index, messages in enumerate(dataset["messages"]):
        problem = check_conversation(messages)
        if problem is None:
            good.append(index)
        else:
            problems.append((f"row {index}", problem))
    report_invalid(problems, source, invalid_rows)
    if not good:
        raise DataError(f"{source}: no valid conversation to train on")
    return dataset if len(good) == len(dataset) else dataset.select(good)


def _json_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """``(where, row)`` for each record of a JSON array file or a JSON Lines file; ``row`` is an error for bad lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
        yield from ((f"row {i}", record) for i, record in enumerate(records))
        return
    row = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record = DataError(f"not valid JSON ({err.msg})")
        yield f"line {line_number} (row {row})", record
        row += 1


def load_conversation_file(path: str | os.PathLike[str], invalid_rows: str = "raise") -> Dataset:
    """Read a ``.json`` (array of rows) or ``.jsonl`` file of ``{"messages": [...]}`` rows into a checked dataset."""
    path = Path(path)
    problems, rows = [], []
    for where, record in _json_rows(path):
        if isinstance(record, DataError):
            problems.append((where, str(record)))
            continue
        if not isinstance(record, Mapping):
            problems.append((where, "a row must be a JSON object with a 'messages' list"))
            continue
        problem = check_conversation(record.get("messages"))
        if problem is None:
            rows.append({"messages": _normalise(record["messages"])})
        else:
            problems.append((where, problem))
    report_invalid(problems, str(path), invalid_rows)
    if not rows:
        raise DataError(f"{path}: no valid conversation to train on")
    return Dataset.from_list(rows)


def load_conversations(
    source: str | os.PathLike[str] | Dataset | DatasetDict,
    *,
    split: str = "train",
    name: str | None = None,
    invalid_rows: str = "raise",
) -> Dataset:
    """Load conversational training data and check it.

    Args:
        source: a ``.json`` / ``.jsonl`` file, a directory written by ``Dataset.save_to_disk``, a ``datasets``
            dataset (or dict of splits), or a dataset name for :func:`datasets.load_dataset`.
        split: the split to use when ``source`` holds several.
        name: the dataset configuration name, for :func:`datasets.load_dataset`.
        invalid_rows: ``"raise"`` (one error line naming the first malformed row) or ``"skip"`` (warn, drop them).

    Raises:
        DataError: malformed data (with ``invalid_rows="raise"``), a missing ``messages`` column, no valid row.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            return load_conversation_file(path, invalid_rows)
        if path.is_file():
            raise DataError(f"{path}: unsupported file type; use a .json or .jsonl file of {{'messages': [...]}} rows")
        label = str(source)
        source = load_from_disk(str(path)) if path.is_dir() else load_dataset(str(source), name, split=split)
    else:
        label = "dataset"
    if isinstance(source, DatasetDict):
        if split not in source:
            raise DataError(f"{label}: no split {split!r} (splits: {list(source)})")
        source, label = source[split], f"{label} [{split}]"
    return validate_dataset(source, label, invalid_rows)


__all__ = [
    "INVALID_ROWS",
    "DataError",
    "check_conversation",
    "load_conversation_file",
    "load_conversations",
    "report_invalid",
    "validate_dataset",
]
