"""A phase's record: the per-epoch history as a CSV, its summary and the numbers MLflow
takes, as pure functions of the history (tested without training anything)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from braintumor.core.files import atomic_path
from braintumor.training.checkpointing import HISTORY_COLUMNS, PhaseError, lower_is_better


def summarise(history: list[dict[str, float]], monitor: str) -> dict[str, Any]:
    """Best epoch by ``monitor`` and throughput from the per-epoch history."""
    if not history:
        raise PhaseError("no epoch was run")
    values = [row[monitor] for row in history]
    best = (min if lower_is_better(monitor) else max)(range(len(values)), key=values.__getitem__)
    rates = [row["images_per_second"] for row in history if row.get("images_per_second")]
    return {
        "best_epoch": int(history[best]["epoch"]),
        "best_val_loss": float(history[best]["val_loss"]),
        "best_val_accuracy": float(history[best]["val_accuracy"]),
        "max_val_accuracy": float(max(row["val_accuracy"] for row in history)),
        "epochs_run": len(history),
        "total_train_seconds": round(sum(row["train_seconds"] for row in history), 2),
        "total_epoch_seconds": round(sum(row["seconds"] for row in history), 2),
        # The median ignores the first epoch of a process, which includes compilation.
        "images_per_second": round(statistics.median(rates), 2) if rates else None,
    }


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a phase's metrics for MLflow, one level of nesting flattened
    (``compiles: {train_step: 1}`` -> ``compiles/train_step``)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for inner, number in value.items():
                if isinstance(number, int | float):
                    flat[f"{key}/{inner}"] = number
        elif isinstance(value, int | float):
            flat[key] = value
    return flat


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)


def session_epoch_seconds(
    history: list[dict[str, float]], epochs_this_session: int
) -> dict[str, float | None]:
    """Wall seconds of the first epoch this process ran (it holds the compilations) and the
    median of the ones after it (steady state); None where there is no such epoch."""
    ran = history[len(history) - epochs_this_session :] if epochs_this_session else []
    later = [row["seconds"] for row in ran[1:]]
    return {
        "first_epoch_seconds": ran[0]["seconds"] if ran else None,
        "later_epoch_seconds": round(statistics.median(later), 3) if later else None,
    }
