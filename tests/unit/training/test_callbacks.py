"""training.callbacks on a tiny real Keras model: the best model is saved when, and only
when, the monitored value improves; the epoch state written is what a rerun resumes from."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from braintumor.training.callbacks import BestModelCheckpoint, EpochState
from braintumor.training.checkpointing import (
    BEST_MODEL,
    STATE_FILE,
    TrainingInterrupted,
    load_resume_state,
)
from braintumor.training.phase import NullRun


def _model() -> keras.Model:
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


def test_the_best_model_is_saved_only_on_improvement(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / BEST_MODEL
    checkpoint = BestModelCheckpoint(model, path, "val_loss")
    checkpoint.on_epoch_end(0, {"val_loss": 0.5})
    first = path.stat().st_mtime_ns
    model.layers[-1].kernel.assign(np.ones((3, 2), np.float32))
    checkpoint.on_epoch_end(1, {"val_loss": 0.6})  # worse: the file stays
    assert path.stat().st_mtime_ns == first and checkpoint.best_epoch == 0
    checkpoint.on_epoch_end(2, {"val_loss": 0.4})
    assert checkpoint.best == pytest.approx(0.4) and checkpoint.best_epoch == 2
    saved = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(saved.layers[-1].kernel.numpy(), np.ones((3, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_MODEL]  # no temporary left
    with pytest.raises(ValueError, match="'val_loss' was not computed"):
        checkpoint.on_epoch_end(3, {"loss": 0.1})


def test_accuracy_is_better_when_higher(tmp_path: Path) -> None:
    checkpoint = BestModelCheckpoint(_model(), tmp_path / BEST_MODEL, "val_accuracy")
    for epoch, value in enumerate((0.5, 0.7, 0.6)):
        checkpoint.on_epoch_end(epoch, {"val_accuracy": value})
    assert checkpoint.best_epoch == 1


def _epoch_state(tmp_path: Path, model: keras.Model, **options: object) -> EpochState:
    stopping = keras.callbacks.EarlyStopping(patience=3)
    stopping.set_model(model)
    stopping.on_train_begin()  # as fit does, before EpochState's own on_train_begin
    (tmp_path / BEST_MODEL).write_bytes(b"best")
    state = EpochState(
        phase="frozen",
        seed=1,
        checkpoint_dir=tmp_path,
        fingerprint="fp",
        stateful={"early_stopping": stopping},
        history=[],
        images_per_epoch=8,
        run=NullRun(),
        resume=options.pop("resume", None),  # type: ignore[arg-type]
        stop_after_epochs=options.pop("stop_after_epochs", None),  # type: ignore[arg-type]
    )
    state.set_model(model)
    return state


def _epoch(state: EpochState, epoch: int) -> None:
    state.on_epoch_begin(epoch)
    state.on_test_begin()
    logs = {"loss": 1.0 / (epoch + 1), "accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.4}
    state.on_epoch_end(epoch, logs)


def test_each_epoch_leaves_a_state_to_resume_from(tmp_path: Path) -> None:
    model = _model()
    state = _epoch_state(tmp_path, model)
    state.stateful["early_stopping"].wait = 2
    _epoch(state, 0)
    _epoch(state, 1)
    resume = load_resume_state(tmp_path, "fp")
    assert resume is not None and resume["epoch"] == 2
    assert [row["epoch"] for row in resume["history"]] == [1, 2]
    assert "images_per_second" not in resume["history"][0]  # the first epoch compiles
    assert resume["callbacks"]["early_stopping"]["wait"] == 2
    weights = sorted(p.name for p in tmp_path.glob("state-epoch*.weights.h5"))
    assert weights == ["state-epoch0002.weights.h5"]  # the older one was removed
    assert (tmp_path / STATE_FILE).is_file()
    # A rerun restores the counters that the callbacks reset in their own on_train_begin.
    again = _epoch_state(tmp_path, _model(), resume=resume)
    assert again.stateful["early_stopping"].wait == 0
    again.on_train_begin()
    assert again.stateful["early_stopping"].wait == 2


def test_the_test_hook_interrupts_after_the_asked_epochs(tmp_path: Path) -> None:
    state = _epoch_state(tmp_path, _model(), stop_after_epochs=1)
    with pytest.raises(TrainingInterrupted, match="stopped after 1 epoch"):
        _epoch(state, 0)
    assert load_resume_state(tmp_path, "fp") is not None  # saved before the interruption
