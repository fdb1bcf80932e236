"""Reporting evaluation results: JSON files, markdown tables and PNG charts (matplotlib, headless).

Inputs are the dicts returned by :func:`peft_deltamem.evaluation.protocol.evaluate_task` (one task) or a mapping
``{label: result}`` of several (e.g. the ladder levels).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_path, write_text_atomic
from .settings import SYSTEM_LABELS, SYSTEMS

Result = Mapping[str, Any]


def strip_records(result: Result) -> dict[str, Any]:
    """The result without its per-question records (for compact JSON summaries)."""
    return {k: v for k, v in result.items() if k != "records"}


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented UTF-8 JSON (atomically: a temporary file renamed into place); returns the path."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def write_jsonl(rows: Iterable[Any], path: str | os.PathLike[str]) -> int:
    """Write ``rows`` as JSON Lines, one UTF-8 JSON value a line (atomically, creating the parent directory); returns
    the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_run_results(
    output: str | os.PathLike[str],
    levels: Mapping[str, Result],
    *,
    level: int,
    targets: Mapping[str, bool],
    training: Mapping[str, Any],
    markdown: str,
    targets_heading: str = "Targets",
    extra: Mapping[str, Any] | None = None,
    started: float,
) -> dict[str, Any]:
    """The result files of a train-then-evaluate run (``deltamem demo``, ``deltamem climb``), in ``output``.

    ``results.json``: the headline level's systems at the top, then ``level``, ``metric``, ``targets`` (``{name:
    met}``), ``targets_met``, ``diagnostics``, every level of ``levels`` without its records, ``training``, the
    entries of ``extra`` and ``total_seconds`` (since ``started``, a :func:`time.perf_counter` value);
    ``records.json``: every level's records; ``results.md``: ``markdown``, then the targets under
    ``targets_heading``. Returns what ``results.json`` holds.
    """
    output = Path(output)
    main = levels[f"L{level}"]
    results: dict[str, Any] = {name: main["systems"][name] for name in main["systems"]}
    results.update(
        {
            "level": level,
            "metric": main["metric"],
            "targets": dict(targets),
            "targets_met": all(targets.values()),
            "diagnostics": main["diagnostics"],
            "levels": {label: strip_records(r) for label, r in levels.items()},
            "training": dict(training),
            **(extra or {}),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
    )
    write_json(results, output / "results.json")
    write_json({label: r["records"] for label, r in levels.items()}, output / "records.json")
    write_text_atomic(
        output / "results.md",
        f"{markdown}\n\n## {targets_heading}\n\n"
        + "".join(f"- {'met' if ok else '**not met**'}: {name}\n" for name, ok in targets.items()),
    )
    return results


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _fmt(value: float | None, ci: Sequence[float] | None = None, *, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if percent:
        text = f"{100 * value:.1f}"
        return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text
    return f"{value:.2f}"


def _systems(result: Result) -> list[str]:
    present = result.get("systems", {})
    return [s for s in SYSTEMS if s in present] + [s for s in present if s not in SYSTEMS]


def markdown_table(result: Result) -> str:
    """One task as a markdown table: a row per system; accuracy (the task's primary metric) with its 95 % interval,
    the other metrics, and the mean log-probability of the reference answer. Numbers are percentages."""
    metric = result.get("metric", "accuracy")
    columns = [("accuracy", f"accuracy ({metric}) [95% CI]")]
    columns += [
        (m, m.replace("_", " ")) for m in ("exact_match", "contains_match", "forced_choice", "f1") if m != metric
    ]
    present = [c for c in columns if any(c[0] in s for s in result["systems"].values())]
    header = ["system", *[c[1] for c in present], "gold log-prob", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _systems(result):
        s = result["systems"][name]
        cells = [f"`{name}`"]
        for key, _ in present:
            cells.append(_fmt(s.get(key), s.get(f"{key}_ci") if key == "accuracy" else None))
        cells.append(_fmt(s.get("gold_logprob"), percent=False))
        cells.append(str(s.get("n", "")))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    diag = result.get("diagnostics", {})
    if "chance" in diag:
        notes.append(f"chance {100 * diag['chance']:.1f} %")
    gap = diag.get("own_minus_other_gold_logprob")
    if gap:
        notes.append(
            f"gold log-prob own − other memory {gap['mean']:+.2f} [{gap['ci'][0]:+.2f}, {gap['ci'][1]:+.2f}] nats"
        )
    if notes:
        lines.append("")
        lines.append("_" + "; ".join(notes) + "_")
    return "\n".join(lines)


def group_table(result: Result, key: str = "by_group") -> str:
    """Per-group accuracy (LoCoMo categories, ladder fact types) as a markdown table; empty if there are no groups.

    ``key="by_preference"`` tabulates the working-style levels' per-preference following instead.
    """
    groups = sorted({g for s in result["systems"].values() for g in s.get(key, {})})
    if not groups:
        return ""
    header = ["system", *groups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _systems(result):
        by_group = result["systems"][name].get(key, {})
        cells = [f"`{name}`"] + [
            _fmt(by_group[g]["accuracy"], by_group[g]["accuracy_ci"]) if g in by_group else "–" for g in groups
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def levels_table(results: Mapping[str, Result]) -> str:
    """Several tasks side by side (columns), a row per system: accuracy with its 95 % interval, in percent."""
    labels = list(results)
    systems = [s for s in SYSTEMS if any(s in r["systems"] for r in results.values())]
    header = ["system", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in systems:
        cells = [f"`{name}`"]
        for label in labels:
            s = results[label]["systems"].get(name)
            cells.append(_fmt(s.get("accuracy"), s.get("accuracy_ci")) if s else "–")
        lines.append("| " + " | ".join(cells) + " |")
    gaps = [results[label].get("diagnostics", {}).get("own_minus_other_gold_logprob") for label in labels]
    if any(gaps):
        lines.append(
            "| own − other gold log-prob | "
            + " | ".join(f"{g['mean']:+.2f} [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}]" if g else "–" for g in gaps)
            + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- charts


_COLOURS = {
    "no_history": "#9e9e9e",
    "full_history": "#1f77b4",
    "bm25": "#17becf",
    "deltamem": "#d62728",
    "deltamem_empty_memory": "#f4a582",
    "deltamem_other_memory": "#fddbc7",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_results(
    results: Mapping[str, Result], path: str | os.PathLike[str], *, title: str = "Memory-only recall"
) -> Path:
    """Grouped bar chart: a group per task (e.g. ladder level), a bar per system, 95 % intervals as error bars and
    each task's chance level as a dashed line. Saved as PNG; returns the path."""
    plt = _pyplot()
    labels = list(results)
    systems = [s for s in SYSTEMS if any(s in r["systems"] for r in results.values())]
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 3), 4.2))
    for j, name in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            s = results[label]["systems"].get(name)
            if s is None or s.get("accuracy") is None:
                continue
            xs.append(i + (j - (len(systems) - 1) / 2) * width)
            ys.append(s["accuracy"])
            ci = s.get("accuracy_ci") or [s["accuracy"], s["accuracy"]]
            lo.append(s["accuracy"] - ci[0])
            hi.append(ci[1] - s["accuracy"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=_COLOURS.get(name), label=SYSTEM_LABELS.get(name, name))
    for i, label in enumerate(labels):
        chance = results[label].get("diagnostics", {}).get("chance")
        if chance is not None:
            ax.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    metrics = sorted({r.get("metric", "accuracy") for r in results.values()})
    ax.set_ylabel(" / ".join(metrics).replace("_", " ") + " (95 % CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        title + ("  (dashed: chance)" if any("chance" in r.get("diagnostics", {}) for r in results.values()) else "")
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_training_curve(
    curve: Sequence[Mapping[str, float]], path: str | os.PathLike[str], *, title: str = "Training-time curve"
) -> Path:
    """Accuracy from own / other memory and the training loss against training minutes.

    ``curve`` rows have ``minutes`` and any of ``own``, ``other``, ``empty`` (accuracies), ``loss``, and ``stage`` (a
    curriculum stage index; a dotted line marks where each later stage starts).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    minutes = [row["minutes"] for row in curve]
    for key, label, colour in (
        ("own", "own memory", _COLOURS["deltamem"]),
        ("other", "other conversation's memory", "#f4a582"),
        ("empty", "empty memory", "#9e9e9e"),
    ):
        points = [(m, row[key]) for m, row in zip(minutes, curve, strict=True) if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, color=colour, label=label)
    stage_ends = [a["minutes"] for a, b in zip(curve, curve[1:], strict=False) if a.get("stage") != b.get("stage")]
    for index, minute in enumerate(stage_ends):
        ax.axvline(
            minute, color="grey", linestyle=":", linewidth=1, label="next curriculum stage" if not index else None
        )
    ax.set_xlabel("training minutes (wall clock)")
    ax.set_ylabel("forced-choice accuracy")
    ax.set_ylim(0, 1.05)
    losses = [(m, row["loss"]) for m, row in zip(minutes, curve, strict=True) if row.get("loss") is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses, strict=True), color="black", linewidth=0.8, alpha=0.5, label="train loss")
        twin.set_ylabel("train loss")
        twin.legend(fontsize=7, loc="center right")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keep legends placed below the axes inside the image
    plt.close(fig)
    return path


__all__ = [
    "group_table",
    "levels_table",
    "markdown_table",
    "plot_results",
    "plot_training_curve",
    "strip_records",
    "write_json",
    "write_jsonl",
    "write_run_results",
]
