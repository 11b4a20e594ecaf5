"""The recipe's two training phases (the ``train`` and ``finetune`` stages' work).

Phase ``frozen`` builds the model and trains the head on a frozen backbone; phase
``finetune`` loads the best frozen-phase model and trains everything except
BatchNormalization at a lower learning rate. Both use early stopping, learning-rate
reduction on plateau, a best-model checkpoint by validation loss and balanced class
weights, every value from ``params.yaml``; each writes its model, a per-epoch history CSV,
a metrics JSON and figures, all atomically, and logs to MLflow through ``tracking``.

A phase is resumable: after every epoch it saves the training state (weights, optimizer,
callback counters, history) under its checkpoint folder; rerun after a kill, it continues
from the last completed epoch and ends where an uninterrupted run would (batch order and
random layers are reseeded from (seed, epoch), not carried in process state).

Keras is imported only after the stage (:mod:`braintumor.stages.train`) has set
``KERAS_BACKEND`` from ``train.backend``, so this module imports the Keras-dependent
modules inside functions.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from braintumor.core.files import atomic_path, write_json
from braintumor.core.schema import Params, PhaseParams
from braintumor.model.backend import seed_and_precision
from braintumor.reports import figures
from braintumor.training.checkpointing import (
    BEST_MODEL,
    PHASES,
    STATE_FILE,
    PhaseError,
    fingerprint,
    improves,
    load_resume_state,
    reset_checkpoint_dir,
    save_model_atomic,
)
from braintumor.training.features import (
    backbone_features,
    check_cacheable,
    features_key,
    head_model,
    head_steps_per_execution,
    load_features,
)
from braintumor.training.records import (
    numeric_metrics,
    session_epoch_seconds,
    summarise,
    write_history_csv,
)

if TYPE_CHECKING:
    import keras

    from braintumor.training.inputs import ProcessedData

FIGURE_EXAMPLES = 9


@dataclass(frozen=True)
class PhasePaths:
    """Where one phase reads and writes; ``dvc.yaml`` passes all of them."""

    model_dir: Path  # model.keras and mlflow_run.json
    checkpoint_dir: Path  # resumable state; a persist: true output
    metrics: Path
    history: Path
    figures: Path
    tensorboard: Path | None = None
    headline: Path | None = None  # the few numbers DVC compares (headline.phase_headline)
    init_model: Path | None = None  # finetune: the frozen phase's model.keras
    pretrained: Path | None = None  # frozen: the weights stage's converted backbone file
    features: Path | None = None  # frozen, cache_features: the audit's pooled features

    @property
    def model(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def run_file(self) -> Path:
        return self.model_dir / "mlflow_run.json"


@dataclass
class PhaseResult:
    model: keras.Model
    history: list[dict[str, float]]
    metrics: dict[str, Any]


class NullRun:
    """Stands in for ``tracking.PhaseRun`` when nothing is tracked (tests, benchmarks)."""

    run_id: str | None = None

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def log_dataset(self, data: ProcessedData, indices: np.ndarray) -> None:
        pass

    def log_metrics(self, values: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_model(self, model: keras.Model, examples: np.ndarray) -> None:
        pass


# --------------------------------------------------------------------------- pure helpers


def phase_params(params: Params, phase: str) -> PhaseParams:
    if phase not in PHASES:
        raise PhaseError(f"phase: unknown {phase!r} (known: {', '.join(PHASES)})")
    return getattr(params.train, phase)


def trainable_mode(phase: str, settings: PhaseParams) -> str:
    """What trains in ``phase``: the recipe's choice unless the parameters say otherwise."""
    if settings.trainable != "auto":
        return settings.trainable
    return "head" if phase == "frozen" else "all_but_batchnorm"


def find_checkpoint(
    params: Params, phase: str, data: ProcessedData, paths: PhasePaths
) -> tuple[str, dict[str, Any] | None]:
    """The phase's fingerprint and the state to resume from (None: start afresh)."""
    expected = fingerprint(params, phase, data.digest, paths.init_model, paths.pretrained)
    return expected, load_resume_state(paths.checkpoint_dir, expected)


# --------------------------------------------------------------------------- the phase


def build_phase_model(
    params: Params, phase: str, init_model: Path | None, pretrained: Path | None = None
) -> keras.Model:
    """The inference model a phase starts from, with the phase's layers set trainable.

    The frozen phase builds it (ImageNet backbone weights from ``pretrained`` where the
    weights stage converted them); fine-tuning loads the frozen phase's best model."""
    import keras

    from braintumor.model.classifier import build_model, set_trainable

    num_classes = len(params.common.classes)
    size = params.common.image_size
    if phase == "frozen":
        model = build_model(params.model, size, num_classes, pretrained=pretrained)
    else:
        if init_model is None or not init_model.is_file():
            raise FileNotFoundError(f"{init_model}: the frozen phase's model is missing")
        model = keras.saving.load_model(init_model)
        expected = (None, size, size, 1)
        if tuple(model.input_shape) != expected or model.output_shape[-1] != num_classes:
            raise PhaseError(
                f"{init_model}: takes {model.input_shape} and gives {model.output_shape[-1]} "
                f"classes; the parameters need {expected} and {num_classes}"
            )
    settings = phase_params(params, phase)
    set_trainable(model, trainable_mode(phase, settings), settings.first_trainable_block)
    return model


@dataclass
class PhaseInputs:
    """What ``fit`` trains and validates on: the model it steps (the inference model with
    augmentation in front, or the head alone on cached backbone features) and batches."""

    training_model: keras.Model
    train_batches: Any
    val_batches: Any
    indices: np.ndarray  # training rows used (a per-class subset, or all)
    class_weight: dict[int, float] | None
    features_source: str | None = None  # cache_features: reused (from where) or computed, why


def phase_inputs(
    params: Params,
    phase: str,
    model: keras.Model,
    augmenter: Any,
    data: ProcessedData,
    initial_epoch: int,
    paths: PhasePaths | None = None,
) -> PhaseInputs:
    """The training model and batches of a phase, compiled with its optimizer."""
    import keras

    from braintumor.model.augment import build_training_model
    from braintumor.training.inputs import ArrayBatches, class_weights, subset_per_class
    from braintumor.training.schedule import learning_rate

    settings = phase_params(params, phase)
    train, val = data.splits["train"], data.splits["val"]
    indices = subset_per_class(train.labels, params.train.subset_per_class, params.common.seed)
    features_source = None
    if settings.cache_features:
        # The frozen backbone gives every epoch the same features: compute them once and
        # train the head alone (without augmentation, which would change them).
        check_cacheable(phase, trainable_mode(phase, settings))
        training_model = head_model(model)
        key = features_key(params, data.digest, paths.pretrained if paths else None)
        rows = {"train": len(train.labels), "val": len(val.labels)}
        saved, features_source = load_features(paths.features if paths else None, key, rows)
        if saved is not None:
            train_inputs, val_inputs = saved["train"][indices], saved["val"]
        else:
            features_source = f"computed: {features_source}"
            train_inputs = backbone_features(model, train.images, indices, settings.batch_size)
            val_inputs = backbone_features(model, val.images, None, settings.batch_size)
        train_labels, batch_indices = train.labels[indices], None
    else:
        training_model = build_training_model(model, augmenter)
        train_inputs, train_labels, val_inputs = train.images, train.labels, val.images
        batch_indices = indices
    workers = reader_threads(params)
    train_batches = ArrayBatches(
        train_inputs,
        train_labels,
        settings.batch_size,
        indices=batch_indices,
        shuffle=True,
        seed=params.common.seed,
        epoch=initial_epoch,
        steps=settings.steps_per_epoch,
        workers=workers,
        drop_remainder=params.train.drop_remainder,
    )
    val_batches = ArrayBatches(val_inputs, val.labels, settings.batch_size, workers=workers)
    training_model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate(settings, len(train_batches)),
            use_ema=settings.ema_momentum is not None,
            ema_momentum=settings.ema_momentum or 0.99,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=params.train.jit_compile,
        steps_per_execution=head_steps_per_execution() if settings.cache_features else 1,
    )
    weights = class_weights(
        train.labels[indices], len(params.common.classes), settings.class_weight
    )
    return PhaseInputs(
        training_model, train_batches, val_batches, indices, weights, features_source
    )


def fit_phase(
    settings: PhaseParams,
    inputs: PhaseInputs,
    callbacks: list[Any],
    resume: dict[str, Any] | None,
    checkpoint_dir: Path,
    verbose: int,
) -> None:
    """``fit`` from the resumed state (weights and optimizer slots), unless the saved
    state says the phase had already finished."""
    model = inputs.training_model
    if resume is not None:
        # Optimizer slots must exist before load_weights can fill them.
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint_dir / resume["weights"])
        if resume["stopped"] or resume["epoch"] >= settings.epochs:
            return
    model.fit(
        inputs.train_batches,
        validation_data=inputs.val_batches,
        epochs=settings.epochs,
        initial_epoch=resume["epoch"] if resume else 0,
        class_weight=inputs.class_weight,
        callbacks=callbacks,
        shuffle=False,  # ArrayBatches shuffles itself, seeded per epoch
        verbose=verbose,
    )


def run_phase(
    params: Params,
    phase: str,
    data: ProcessedData,
    paths: PhasePaths,
    run: Any | None = None,
    *,
    checkpoint: tuple[str, dict[str, Any] | None] | None = None,
    verbose: int = 0,
    stop_after_epochs: int | None = None,
) -> PhaseResult:
    """Train one phase, resuming from ``paths.checkpoint_dir`` when it holds a matching
    unfinished state, and write the phase's outputs; over every local device when
    ``train.distribution`` is ``data_parallel`` (``braintumor.training.distribution``).

    ``run`` is a ``tracking.PhaseRun`` (None: nothing is logged). ``checkpoint`` is
    ``find_checkpoint``'s answer when the caller already has it. ``stop_after_epochs`` is
    a test hook: raise ``TrainingInterrupted`` after that many epochs, as if killed.
    """
    from braintumor.training.distribution import check_batch, data_parallel

    with data_parallel(params.train.distribution, params.train.backend) as devices:
        settings = phase_params(params, phase)
        check_batch(settings.batch_size, devices, f"train.{phase}.batch_size")
        return _train_phase(
            params, phase, data, paths, run, checkpoint, verbose, stop_after_epochs, devices
        )


def _train_phase(
    params: Params,
    phase: str,
    data: ProcessedData,
    paths: PhasePaths,
    run: Any | None,
    checkpoint: tuple[str, dict[str, Any] | None] | None,
    verbose: int,
    stop_after_epochs: int | None,
    devices: int,
) -> PhaseResult:
    from braintumor.model.augment import build_augmenter
    from braintumor.training.callbacks import phase_callbacks
    from braintumor.training.compile_stats import CompileMeter

    run = run or NullRun()
    settings = phase_params(params, phase)
    monitor = settings.early_stopping.monitor
    started = time.perf_counter()
    seed_and_precision(params.common.seed, params.train.mixed_precision)
    expected, resume = _open_checkpoint(params, phase, data, paths, checkpoint, verbose)
    history: list[dict[str, float]] = list(resume["history"]) if resume else []
    # Counted from the model's build: on JAX its weight initialisers compile too.
    with CompileMeter() as meter:
        model = build_phase_model(params, phase, paths.init_model, paths.pretrained)
        augmenter = build_augmenter(params.augment, params.common.image_size, params.common.seed)
        inputs = phase_inputs(
            params, phase, model, augmenter, data, resume["epoch"] if resume else 0, paths
        )
        run.log_dataset(data, inputs.indices)
        tensorboard = _tensorboard(paths.tensorboard, params.train.backend)
        callbacks, epoch_state = phase_callbacks(
            settings,
            model,
            paths.checkpoint_dir,
            [tensorboard] if tensorboard else [],
            phase=phase,
            seed=params.common.seed,
            fingerprint=expected,
            history=history,
            images_per_epoch=inputs.train_batches.images_per_epoch,
            run=run,
            resume=resume,
            stop_after_epochs=stop_after_epochs,
        )
        guard = settings.must_improve and paths.init_model is not None
        start = starting_point(model, inputs, monitor) if guard else None
        guard_start = (
            guard_score(model, data, settings.batch_size)
            if guard and settings.guard_metric == "balanced_accuracy"
            else None
        )
        fit_phase(settings, inputs, callbacks, resume, paths.checkpoint_dir, verbose)
    kept_start = _keep_best_weights(model, paths, history, start, monitor)
    guard_scores: dict[str, Any] = {}
    if guard_start is not None and start is not None:
        # Judged on what the bars measure: the best epoch must beat the start there too.
        guard_best = guard_score(model, data, settings.batch_size)
        guard_scores = {"guard_start": round(guard_start, 6), "guard_best": round(guard_best, 6)}
        if not kept_start and guard_best <= guard_start:
            model.set_weights(start[1])
            kept_start = True
    metrics = {
        **phase_metrics(params, phase, model, history, inputs, resume, started, start, kept_start),
        **guard_scores,
        **session_epoch_seconds(history, epoch_state.epochs_this_session),
        **meter.summary(),
        "devices": devices,
    }
    _write_outputs(
        params, phase, paths, model, augmenter, data, inputs.indices, history, metrics, run
    )
    _close_checkpoint(paths.checkpoint_dir, expected, len(history))
    return PhaseResult(model=model, history=history, metrics=metrics)


def _open_checkpoint(
    params: Params,
    phase: str,
    data: ProcessedData,
    paths: PhasePaths,
    checkpoint: tuple[str, dict[str, Any] | None] | None,
    verbose: int,
) -> tuple[str, dict[str, Any] | None]:
    """The phase's fingerprint and the state to resume from; without one, the checkpoint
    folder is emptied for a fresh start."""
    expected, resume = checkpoint or find_checkpoint(params, phase, data, paths)
    if resume is None:
        reset_checkpoint_dir(paths.checkpoint_dir)
    elif verbose:
        print(f"{phase}: resuming after epoch {resume['epoch']}")
    return expected, resume


def _keep_best_weights(
    model: keras.Model,
    paths: PhasePaths,
    history: list[dict[str, float]],
    start: tuple[float, list[np.ndarray]] | None,
    monitor: str,
) -> bool:
    """Give ``model`` the best epoch's weights, or the starting weights when no epoch beat
    them (a guarded fine-tuning); returns whether the start was kept."""
    import keras

    best = keras.saving.load_model(paths.checkpoint_dir / BEST_MODEL)
    model.set_weights(best.get_weights())
    best_value = summarise(history, monitor).get(f"best_{monitor}")
    kept_start = start is not None and not improves(best_value, start[0], monitor)
    if kept_start:
        model.set_weights(start[1])
    return kept_start


def phase_metrics(
    params: Params,
    phase: str,
    model: keras.Model,
    history: list[dict[str, float]],
    inputs: PhaseInputs,
    resume: dict[str, Any] | None,
    started: float,
    start: tuple[float, list[np.ndarray]] | None,
    kept_start: bool,
) -> dict[str, Any]:
    """The phase's metrics file (without the timing of this session's epochs)."""
    import keras

    settings = phase_params(params, phase)
    monitor = settings.early_stopping.monitor
    return {
        "phase": phase,
        **summarise(history, monitor),
        "stopped_early": bool(history and len(history) < settings.epochs),
        "resumed": resume is not None,
        "wall_seconds": round(
            time.perf_counter() - started + (resume or {}).get("wall_seconds", 0.0), 2
        ),
        "train_images": int(len(inputs.indices)),
        "val_images": int(len(inputs.val_batches.labels)),
        "trainable_mode": trainable_mode(phase, settings),
        "cached_features": settings.cache_features,
        "features_source": inputs.features_source,
        "start_" + monitor: None if start is None else round(start[0], 6),
        "kept_starting_weights": kept_start,
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "backbone": params.model.backbone,
        "backend": keras.backend.backend(),
    }


def _close_checkpoint(checkpoint_dir: Path, expected: str, epochs: int) -> None:
    """Mark the phase complete and drop its resumable state (outputs are written)."""
    write_json(
        checkpoint_dir / STATE_FILE, {"fingerprint": expected, "complete": True, "epoch": epochs}
    )
    for leftover in checkpoint_dir.iterdir():
        if leftover.name != STATE_FILE:
            leftover.unlink()


def starting_point(
    model: keras.Model, inputs: PhaseInputs, monitor: str
) -> tuple[float, list[np.ndarray]] | None:
    """For a phase that starts from a trained model (fine-tuning): its ``monitor`` value on
    validation before any step, and its weights. The phase must beat it, or it keeps these
    weights: a fine-tuning that only made the model worse does not replace it. ``model``
    is the inference model whose weights are kept; ``inputs.training_model``
    (augmentation in front, an identity at evaluation) is what validation runs through
    during ``fit``."""
    if not monitor.startswith("val_"):
        return None
    values = inputs.training_model.evaluate(inputs.val_batches, return_dict=True, verbose=0)
    key = monitor.removeprefix("val_")
    if key not in values:
        return None
    return float(values[key]), [np.array(w) for w in model.get_weights()]


def guard_rows(data: ProcessedData) -> np.ndarray:
    """The validation rows the guard judges on: those without a training neighbour
    (``val_index.csv``'s ``leakage_free``), or every row of a folder that has no flag or
    no such row."""
    import pandas as pd

    count = len(data.splits["val"])
    index_path = data.folder / "val_index.csv"
    if not index_path.is_file():
        return np.ones(count, dtype=bool)
    index = pd.read_csv(index_path)
    if "leakage_free" not in index or len(index) != count:
        return np.ones(count, dtype=bool)
    flags = index["leakage_free"].astype(bool).to_numpy()
    return flags if flags.any() else np.ones(count, dtype=bool)


def guard_score(model: keras.Model, data: ProcessedData, batch_size: int) -> float:
    """Balanced accuracy (mean recall over the classes present) of ``model`` on the
    validation rows of ``guard_rows``: the fine-tuning guard's ``balanced_accuracy``."""
    val = data.splits["val"]
    rows = np.flatnonzero(guard_rows(data))
    predicted = np.argmax(
        model.predict(np.asarray(val.images[rows]), batch_size=batch_size, verbose=0), axis=1
    )
    labels = val.labels[rows]
    recalls = [float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def reader_threads(params: Params) -> int:
    """``train.loader_workers``, except 1 under TensorFlow's data parallelism: with Keras's
    reader threads there, two devices' loss curve left one device's by ~1e-3
    (``tests/integration/test_distribution.py``), with ``tf.data``'s own reading it stays
    within float rounding (its epoch-start stall is the price there)."""
    if params.train.distribution == "data_parallel" and params.train.backend == "tensorflow":
        return 1
    return params.train.loader_workers


def _tensorboard(log_dir: Path | None, backend: str) -> Any | None:
    """Keras's TensorBoard callback when it can work here (TF 2.21 no longer ships
    tensorboard; the history CSV is the log then)."""
    if (
        log_dir is None
        or backend != "tensorflow"
        or importlib.util.find_spec("tensorboard") is None
    ):
        return None
    import keras

    return keras.callbacks.TensorBoard(log_dir=str(log_dir))


def _write_outputs(
    params: Params,
    phase: str,
    paths: PhasePaths,
    model: keras.Model,
    augmenter: Any,
    data: ProcessedData,
    indices: np.ndarray,
    history: list[dict[str, float]],
    metrics: dict[str, Any],
    run: Any,
) -> None:
    from braintumor.model.augment import augment_examples

    save_model_atomic(model, paths.model)
    write_history_csv(paths.history, history)
    write_json(paths.metrics, metrics)
    if paths.headline is not None:
        from braintumor.reports.headline import phase_headline

        write_json(paths.headline, phase_headline(metrics))
    train = data.splits["train"]
    with atomic_path(paths.figures, directory=True) as folder:
        figures.history_figure(history, folder / "history.png", f"{phase} phase")
        rows = np.random.default_rng(params.common.seed).choice(
            indices, size=min(FIGURE_EXAMPLES, len(indices)), replace=False
        )
        rows = np.sort(rows)
        examples = augment_examples(augmenter, np.asarray(train.images[rows]), params.common.seed)
        titles = [params.common.classes[int(label)] for label in train.labels[rows]]
        figures.image_grid(
            list(examples), titles, folder / "augmentation.png", "Augmented training images"
        )
    run.log_metrics(numeric_metrics(metrics))
    run.log_artifact(paths.history, "history")
    run.log_artifact(paths.metrics, "metrics")
    for figure in sorted(paths.figures.glob("*.png")):
        run.log_artifact(figure, "figures")
    examples = np.asarray(train.images[indices[:2]], dtype=np.float32)
    run.log_model(model, examples)
