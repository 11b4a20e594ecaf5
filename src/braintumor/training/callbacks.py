"""The Keras callbacks of a training phase: per-epoch state for resuming, and the best model.

Imports Keras at module level, so ``train`` imports this module only after it has set the
backend. The state they save and the rules they share live in ``checkpointing``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from braintumor.core.files import write_json
from braintumor.core.schema import PhaseParams
from braintumor.training.checkpointing import (
    BEST_MODEL,
    HISTORY_COLUMNS,
    STATE_FILE,
    TrainingInterrupted,
    callback_state,
    epoch_seed,
    improves,
    save_model_atomic,
)


class EpochState(keras.callbacks.Callback):
    """Reseeds random layers, times and records each epoch, and saves the state.

    Must come after the callbacks whose counters it saves (early stopping, learning-rate
    reduction, best checkpoint), so it sees their end-of-epoch values.
    """

    def __init__(
        self,
        *,
        phase: str,
        seed: int,
        checkpoint_dir: Path,
        fingerprint: str,
        stateful: dict[str, Any],
        history: list[dict[str, float]],
        images_per_epoch: int,
        run: Any,
        resume: dict[str, Any] | None,
        stop_after_epochs: int | None,
    ) -> None:
        super().__init__()
        self.phase = phase
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = fingerprint
        self.stateful = stateful
        self.history = history
        self.images_per_epoch = images_per_epoch
        self.run = run
        self.resume = resume
        self.stop_after_epochs = stop_after_epochs
        self.epochs_this_session = 0
        self.stopped = False
        self.phase_started = time.perf_counter()
        self.previous_wall_seconds = (resume or {}).get("wall_seconds", 0.0)

    def on_train_begin(self, logs: dict | None = None) -> None:
        # The other callbacks reset their counters in their own on_train_begin, which ran
        # before this one: restore what the checkpoint saved.
        if self.resume is None:
            return
        for name, callback in self.stateful.items():
            for key, value in self.resume["callbacks"][name].items():
                setattr(callback, key, value)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        from braintumor.model.augment import reseed_random_layers

        reseed_random_layers(self.model, epoch_seed(self.seed, self.phase, epoch))
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.learning_rate = float(f"{rate:.6g}")  # 1e-4, not float32's 9.9999997e-05
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.train_ended: float | None = None

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self.train_ended is None:
            # JAX (and PyTorch on a GPU) return from a step before it has run: wait for the
            # last one by reading a value it wrote, or the time is dispatch only.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            self.train_ended = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = self._history_row(epoch, logs or {})
        self.history.append(row)
        self.run.log_epoch(epoch + 1, {k: row[k] for k in HISTORY_COLUMNS[1:]})
        self.stopped = bool(self.model.stop_training)
        self.save(epoch + 1)
        self.epochs_this_session += 1
        if self.stop_after_epochs is not None:
            if self.epochs_this_session >= self.stop_after_epochs and not self.stopped:
                raise TrainingInterrupted(
                    f"{self.phase}: stopped after {self.epochs_this_session} epoch(s) "
                    "by request (test hook); rerun to resume"
                )

    def _history_row(self, epoch: int, logs: dict[str, Any]) -> dict[str, float]:
        now = time.perf_counter()
        train_seconds = (self.train_ended or now) - self.started
        row = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"]),
            "accuracy": float(logs["accuracy"]),
            "val_loss": float(logs["val_loss"]),
            "val_accuracy": float(logs["val_accuracy"]),
            "learning_rate": self.learning_rate,
            "seconds": round(now - self.started, 3),
            "train_seconds": round(train_seconds, 3),
            "cpu_seconds": round(time.process_time() - self.cpu_started, 3),
        }
        if self.epochs_this_session > 0:  # the first one includes compilation
            row["images_per_second"] = round(self.images_per_epoch / train_seconds, 2)
        return row

    def save(self, epochs_done: int) -> None:
        """Write weights and optimizer state, then the JSON that points at them.

        The JSON is replaced last and atomically, so a kill at any moment leaves either the
        previous complete state or the new one.
        """
        weights = f"state-epoch{epochs_done:04d}.weights.h5"
        self.model.save_weights(self.checkpoint_dir / weights)
        state = {
            "fingerprint": self.fingerprint,
            "complete": False,
            "epoch": epochs_done,
            "stopped": self.stopped,
            "weights": weights,
            "callbacks": {
                name: callback_state(name, callback) for name, callback in self.stateful.items()
            },
            "wall_seconds": round(
                self.previous_wall_seconds + time.perf_counter() - self.phase_started, 3
            ),
            "history": self.history,
            "run_id": self.run.run_id,
        }
        write_json(self.checkpoint_dir / STATE_FILE, state)
        for old in self.checkpoint_dir.glob("state-epoch*.weights.h5"):
            if old.name != weights:
                old.unlink()


class BestModelCheckpoint(keras.callbacks.Callback):
    """Saves ``target`` (the inference model) when ``monitor`` improves on its best."""

    def __init__(self, target: keras.Model, path: Path, monitor: str) -> None:
        super().__init__()
        self.target = target
        self.path = path
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ValueError(f"best checkpoint: metric {self.monitor!r} was not computed")
        value = float(value)
        if self.best is None or improves(value, self.best, self.monitor):
            self.best, self.best_epoch = value, epoch
            with ema_weights(getattr(self.model, "optimizer", None)):
                save_model_atomic(self.target, self.path)


def _ema_optimizer(optimizer: Any) -> Any | None:
    """The optimizer that holds the weight averages (inside a loss-scale wrapper), or None
    when averaging is off."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "use_ema", False):
        return None
    if not hasattr(inner, "_model_variables_moving_average"):
        return None  # not built yet: no step has run
    return inner


def _swap_ema(optimizer: Any) -> None:
    for variable, average in zip(
        optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True
    ):
        current = keras.ops.convert_to_numpy(variable)
        variable.assign(average)
        average.assign(current)


@contextlib.contextmanager
def ema_weights(optimizer: Any) -> Iterator[None]:
    """The model holds the optimizer's moving averages of its weights inside the block (a
    no-op without ``use_ema``), its own weights again after it, so that what is saved as
    the best model is what validation measured (``SwapEMAWeights`` swaps for validation
    only) while the training state saved after each epoch keeps the raw weights and the
    averages apart, and a resumed run continues exactly."""
    holder = _ema_optimizer(optimizer)
    if holder is None:
        yield
        return
    _swap_ema(holder)
    try:
        yield
    finally:
        _swap_ema(holder)


def phase_callbacks(
    settings: PhaseParams,
    model: keras.Model,
    checkpoint_dir: Path,
    extra: list[keras.callbacks.Callback],
    **state: Any,
) -> tuple[list[keras.callbacks.Callback], EpochState]:
    """The phase's callbacks in the order they must run, and its ``EpochState`` (last: it
    saves the others' end-of-epoch counters). ``state`` holds ``EpochState``'s arguments
    other than the checkpoint folder and the stateful callbacks."""
    stopping, reduce = settings.early_stopping, settings.reduce_lr
    stateful = {
        "early_stopping": keras.callbacks.EarlyStopping(
            monitor=stopping.monitor,
            min_delta=stopping.min_delta,
            patience=stopping.patience,
            restore_best_weights=stopping.restore_best_weights,
        ),
        "reduce_lr": keras.callbacks.ReduceLROnPlateau(
            monitor=reduce.monitor,
            factor=reduce.factor,
            patience=reduce.patience,
            min_lr=reduce.min_learning_rate,
        ),
        "best_checkpoint": BestModelCheckpoint(
            model, checkpoint_dir / BEST_MODEL, stopping.monitor
        ),
    }
    if settings.schedule != "plateau":
        # A schedule owns the rate (Keras refuses to set it), so there is no plateau rule.
        del stateful["reduce_lr"]
    epoch_state = EpochState(checkpoint_dir=checkpoint_dir, stateful=stateful, **state)
    # With weight averaging, validation runs on the averages (swapped in for it, first).
    averaging = [keras.callbacks.SwapEMAWeights()] if settings.ema_momentum is not None else []
    return [*averaging, *stateful.values(), *extra, epoch_state], epoch_state
