"""The frozen phase on cached features: the backbone's pooled output computed once, and the
head trained alone on it.

A frozen backbone gives every epoch the same features, so the head can train on them in
seconds instead of running the backbone every step; the price is no augmentation (which
would change the features), so only a phase that trains the head alone may do it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from braintumor.training.checkpointing import PhaseError

if TYPE_CHECKING:
    import keras


def check_cacheable(phase: str, trainable: str) -> None:
    """Refuse cached features for a phase whose ``trainable`` mode is not the head alone."""
    if trainable != "head":
        raise PhaseError(
            f"train.{phase}.cache_features: only a phase that trains the head alone can "
            f"reuse backbone features (trainable is {trainable!r})"
        )


def head_model(model: keras.Model) -> keras.Model:
    """The head of a ``build_model`` model as a model of its own, taking pooled backbone
    features. It shares the layers (and so the weights) of ``model``: training it trains
    ``model``'s head, and ``model`` is what gets saved."""
    import keras

    from braintumor.model.classifier import HEAD_PREFIX, is_head_layer

    layers = [layer for layer in model.layers if is_head_layer(layer)]
    pool = model.get_layer(f"{HEAD_PREFIX}pool")
    if not layers or layers[0] is not pool:
        raise PhaseError("model has no head_pool layer first in its head")
    inputs = keras.Input(pool.output.shape[1:], name="features")
    x = inputs
    for layer in layers[1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def backbone_features(
    model: keras.Model, images: np.ndarray, indices: np.ndarray | None, batch_size: int
) -> np.ndarray:
    """Pooled backbone features (float32) of ``images[indices]``, batch by batch, with the
    backbone in inference mode (as a frozen backbone runs while its head trains)."""
    import keras

    from braintumor.model.classifier import HEAD_PREFIX

    extractor = keras.Model(model.inputs, model.get_layer(f"{HEAD_PREFIX}pool").output)
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    features = np.zeros((len(rows), extractor.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        # Read each batch in file order (memory map), write it back in the caller's order.
        order = start + np.argsort(rows[start : start + batch_size])
        batch = np.asarray(images[rows[order]], dtype=np.float32)
        features[order] = np.asarray(extractor.predict_on_batch(batch), dtype=np.float32)
    return features
