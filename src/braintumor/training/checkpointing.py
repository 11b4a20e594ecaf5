"""What a resumable training phase keeps between epochs, without Keras.

A phase saves, after every epoch, its weights and optimizer state, the counters of its
stateful callbacks and its history, under its checkpoint folder; rerun after a kill, it
continues from there. This module holds the file names, the pieces of state and the rules
that both ``train`` (which must not import Keras before the backend is chosen) and the
Keras callbacks in ``callbacks`` use, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from braintumor.core.files import atomic_path, file_sha256, optional_sha256
from braintumor.core.schema import Params

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
    # The process's CPU time in the epoch (every thread). Beside the wall seconds it tells
    # two slowdowns apart: other processes on the cores leave it as it was and lower
    # cpu_seconds / seconds; a host that takes the virtual CPUs away (unseen from inside a
    # microVM, where steal reads 0) raises it for the same work.
    "cpu_seconds",
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


class PhaseError(ValueError):
    """A phase cannot run on what it was given (a model of another shape, no epoch run)."""


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
    """``model.save`` to a temporary name beside ``path`` (ending ``.keras``, which Keras
    requires), renamed into place once complete."""
    with atomic_path(path, suffix=".keras") as temporary:
        model.save(temporary)


def fingerprint(
    params: Params,
    phase: str,
    data_digest: str,
    init_model: Path | None,
    pretrained: Path | None = None,
) -> str:
    """What a checkpoint was made from: resuming is only allowed when this matches.

    Covers every parameter that shapes the phase (the other phase's settings and the
    settings that only change speed excepted: a frozen-phase checkpoint is still valid when
    only fine-tuning, the backend or the compiler settings change), the data digest and,
    for fine-tuning, the starting model's bytes (for the frozen phase, the pretrained
    backbone file's).
    """
    train = dataclasses.asdict(params.train)
    train.pop("frozen" if phase == "finetune" else "finetune")
    for speed_only in ("backend", "loader_workers", "compilation_cache", "xla_gpu_autotune_level"):
        train.pop(speed_only)
    content = {
        "phase": phase,
        "common": dataclasses.asdict(params.common),
        "model": dataclasses.asdict(params.model),
        "augment": dataclasses.asdict(params.augment),
        "train": train,
        "data": data_digest,
        "init_model": file_sha256(init_model) if init_model is not None else None,
        "pretrained": optional_sha256(pretrained),
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
