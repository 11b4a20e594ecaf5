"""training.checkpointing: what a phase keeps between epochs decides whether a rerun
resumes, and from what."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from braintumor.training.checkpointing import (
    BEST_MODEL,
    STATE_FILE,
    callback_state,
    epoch_seed,
    improves,
    load_resume_state,
    lower_is_better,
    reset_checkpoint_dir,
)


def test_epoch_seeds_are_a_function_of_seed_phase_and_epoch() -> None:
    assert epoch_seed(42, "frozen", 3) == epoch_seed(42, "frozen", 3)
    seeds = {
        tuple(epoch_seed(seed, phase, epoch))
        for seed in (1, 2)
        for phase in ("frozen", "finetune")
        for epoch in range(3)
    }
    assert len(seeds) == 12
    with pytest.raises(ValueError):
        epoch_seed(1, "warmup", 0)


@pytest.mark.parametrize(
    ("monitor", "best", "start", "expected"),
    [
        ("val_loss", 0.2, 0.3, True),
        ("val_loss", 0.3, 0.2, False),
        ("val_loss", 0.3, 0.3, False),
        ("val_accuracy", 0.9, 0.8, True),
        ("val_accuracy", 0.8, 0.9, False),
        ("val_loss", None, 0.3, False),
    ],
)
def test_one_rule_for_better(
    monitor: str, best: float | None, start: float, expected: bool
) -> None:
    assert improves(best, start, monitor) is expected
    assert lower_is_better(monitor) is ("loss" in monitor)


def test_callback_counters_become_json_numbers() -> None:
    import numpy as np

    stopping = SimpleNamespace(
        wait=np.int64(2), stopped_epoch=0, best=np.float32(0.25), best_epoch=None
    )
    state = callback_state("early_stopping", stopping)
    assert state == {"wait": 2, "stopped_epoch": 0, "best": 0.25, "best_epoch": None}
    assert json.loads(json.dumps(state)) == state


def _state(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state-epoch0002.weights.h5").write_bytes(b"w")
    (folder / BEST_MODEL).write_bytes(b"m")
    state = {
        "fingerprint": "abc",
        "complete": False,
        "epoch": 2,
        "weights": "state-epoch0002.weights.h5",
    }
    state.update(changes)
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def test_a_matching_unfinished_state_resumes(tmp_path: Path) -> None:
    state = load_resume_state(_state(tmp_path / "c"), "abc")
    assert state is not None and state["epoch"] == 2


@pytest.mark.parametrize(
    "spoil",
    [
        "other parameters",
        "finished",
        "no weights file",
        "no best model",
        "corrupt json",
        "no state",
    ],
)
def test_anything_else_starts_fresh(tmp_path: Path, spoil: str) -> None:
    folder = _state(tmp_path / "c", complete=spoil == "finished")
    if spoil == "no weights file":
        (folder / "state-epoch0002.weights.h5").unlink()
    elif spoil == "no best model":
        (folder / BEST_MODEL).unlink()
    elif spoil == "corrupt json":
        (folder / STATE_FILE).write_text('{"fingerprint": "abc", ')
    elif spoil == "no state":
        (folder / STATE_FILE).unlink()
    expected = "other" if spoil == "other parameters" else "abc"
    assert load_resume_state(folder, expected) is None


def test_reset_empties_but_keeps_the_folder(tmp_path: Path) -> None:
    folder = _state(tmp_path / "checkpoints")
    reset_checkpoint_dir(folder)
    assert folder.is_dir() and not any(folder.iterdir())
    reset_checkpoint_dir(tmp_path / "new")
    assert (tmp_path / "new").is_dir()
