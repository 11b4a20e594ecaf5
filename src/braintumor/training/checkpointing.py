"""What a resumable training phase keeps between epochs, without Keras.

A phase saves, after every epoch, its weights and optimizer state, the counters of its
stateful callbacks and its history, under its checkpoint folder; rerun after a kill, it
continues from there. This module holds the file names, the pieces of state and the rules
that both ``train`` (which must not import Keras before the backend is chosen) and the
Keras callbacks in ``callbacks`` use, so neither imports the other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

PHASES = ("frozen", "finetune")
HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "seconds",
    "train_seconds",
)
STATE_FILE = "state.json"
BEST_MODEL = "best.keras"

# The counters each stateful callback keeps between epochs (restored on resume). Early
# stopping's best_weights are not among them: the phase's result is the best checkpoint.
CALLBACK_STATE = {
    "early_stopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "reduce_lr": ("wait", "cooldown_counter", "best"),
    "best_checkpoint": ("best", "best_epoch"),
}


class TrainingInterrupted(RuntimeError):
    """Raised by the test hook that stops a phase after some epochs (a simulated kill)."""


def epoch_seed(seed: int, phase: str, epoch: int) -> list[int]:
    """The seed of one epoch's random layers: a pure function of (seed, phase, epoch)."""
    return [seed, PHASES.index(phase), epoch]


def lower_is_better(monitor: str) -> bool:
    """How Keras's callbacks read a monitored value: accuracies up, losses down. One rule
    for the best checkpoint, the summary and the fine-tuning guard."""
    return "acc" not in monitor


def improves(best: float | None, start: float, monitor: str) -> bool:
    """Whether the best epoch's ``monitor`` is better than the starting value."""
    if best is None:
        return False
    return best < start if lower_is_better(monitor) else best > start


def callback_state(name: str, callback: Any) -> dict[str, Any]:
    """The counters of one stateful callback, as JSON numbers."""
    values = {}
    for key in CALLBACK_STATE[name]:
        value = getattr(callback, key)
        if value is not None:
            value = float(value) if key == "best" else int(value)
        values[key] = value
    return values


def load_resume_state(checkpoint_dir: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state to continue from, or None (absent, finished, or made from other
    parameters or data)."""
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("complete") or state.get("fingerprint") != expected_fingerprint:
        return None
    for name in (state.get("weights", ""), BEST_MODEL):
        if not name or not (checkpoint_dir / name).is_file():
            return None
    return state


def reset_checkpoint_dir(checkpoint_dir: Path) -> None:
    """Empty the checkpoint folder (it is a DVC output, so the folder itself stays)."""
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """``model.save`` to a temporary ``.keras`` name beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
