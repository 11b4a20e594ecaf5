"""Phase 1 alone, on features already computed: a fresh head trained by the frozen phase's
recipe, for the questions that need many cheap models (the external-validation view, the
label screening in ``bench/label_screen.py``).

With the backbone frozen, phase 1 is a function of the pooled features only, so one
backbone pass serves any number of heads trained on different subsets of the rows, each in
seconds. The head is a fresh copy of the inference model's head (``head_model``, re-
initialised by ``clone_model``) trained with ``train.frozen``'s optimizer, learning rate,
early stopping, LR schedule and class weights; it is not saved and not tracked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from braintumor.core.schema import Params
from braintumor.training.features import head_model, head_steps_per_execution
from braintumor.training.inputs import ArrayBatches, class_weights
from braintumor.training.schedule import learning_rate

if TYPE_CHECKING:
    import keras


def fit_head(
    params: Params,
    model: keras.Model,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    *,
    seed: int,
    steps_per_execution: int | None = None,
) -> keras.Model:
    """A freshly initialised head of ``model`` trained on the features by phase 1's recipe
    (``train.frozen``); it takes pooled features and gives class probabilities.
    ``steps_per_execution``: None is ``features.head_steps_per_execution()`` (the same
    weights as 1, faster)."""
    import keras

    settings = params.train.frozen
    keras.utils.set_random_seed(seed)
    workers = params.train.loader_workers
    batches = ArrayBatches(
        train_features,
        train_labels,
        settings.batch_size,
        shuffle=True,
        seed=seed,
        workers=workers,
        drop_remainder=params.train.drop_remainder,
    )
    head = keras.models.clone_model(head_model(model))
    head.compile(
        optimizer=keras.optimizers.Adam(learning_rate(settings, len(batches))),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution or head_steps_per_execution(),
    )
    stopping, plateau = settings.early_stopping, settings.reduce_lr
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=stopping.monitor,
            min_delta=stopping.min_delta,
            patience=stopping.patience,
            restore_best_weights=stopping.restore_best_weights,
        )
    ]
    if settings.schedule == "plateau":  # a schedule owns the rate, as in the phase
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=plateau.monitor,
                factor=plateau.factor,
                patience=plateau.patience,
                min_lr=plateau.min_learning_rate,
            )
        )
    head.fit(
        batches,
        validation_data=ArrayBatches(
            val_features, val_labels, settings.batch_size, workers=workers
        ),
        epochs=settings.epochs,
        class_weight=class_weights(train_labels, len(params.common.classes), settings.class_weight),
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )
    return head


def predict_head(head: keras.Model, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (float64) of pooled features."""
    return np.asarray(head.predict(features, batch_size=batch_size, verbose=0), dtype=np.float64)
