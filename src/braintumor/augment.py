"""Training-time augmentation: the study's ``ImageDataGenerator`` settings as Keras layers.

The layers run per training batch inside the training graph (so on the accelerator, on any
backend) and are not part of the inference model that is saved, evaluated and served.
The values follow ``ImageDataGenerator``'s units, so ``params.yaml`` reads like the study:

- ``zoom`` z: height and width zoomed independently by a factor in [1 - z, 1 + z];
- ``width_shift`` / ``height_shift``: a fraction of the width / height;
- ``shear``: an angle in degrees, as ``ImageDataGenerator.shear_range`` (the study's 0.05
  is a 0.05 degree shear, a shift of under one pixel at 224 px, i.e. nearly a no-op);
- ``rotation``: degrees, as ``rotation_range``;
- ``fill_mode``: how pixels moved in from outside the image are filled.

Core layer: imports keras and the config only.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from braintumor.config import AugmentParams

AUGMENTER_NAME = "augmentation"


def augmentation_layers(params: AugmentParams, seed: int) -> list[keras.layers.Layer]:
    """The configured random layers, in the order ``ImageDataGenerator`` composes them."""
    layers: list[keras.layers.Layer] = []
    # float32 even under a mixed-precision policy: interpolating 0-255 images in float16
    # visibly bands them.
    fill = {"fill_mode": params.fill_mode, "interpolation": "bilinear", "dtype": "float32"}
    if params.rotation > 0:
        layers.append(
            keras.layers.RandomRotation(
                params.rotation / 360.0, seed=seed, name="aug_rotation", **fill
            )
        )
    if params.width_shift > 0 or params.height_shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                params.height_shift, params.width_shift, seed=seed + 1, name="aug_shift", **fill
            )
        )
    if params.shear > 0:
        factor = math.tan(math.radians(params.shear))
        layers.append(
            keras.layers.RandomShear(
                x_factor=factor, y_factor=0.0, seed=seed + 2, name="aug_shear", **fill
            )
        )
    if params.zoom > 0:
        zoom = (-params.zoom, params.zoom)
        layers.append(keras.layers.RandomZoom(zoom, zoom, seed=seed + 3, name="aug_zoom", **fill))
    if params.horizontal_flip:
        layers.append(
            keras.layers.RandomFlip("horizontal", seed=seed + 4, name="aug_flip", dtype="float32")
        )
    return layers


def build_augmenter(params: AugmentParams, image_size: int, seed: int) -> keras.Sequential:
    """A ``Sequential`` of the random layers (identity when none is configured), active
    only when called with ``training=True``."""
    augmenter = keras.Sequential(name=AUGMENTER_NAME)
    augmenter.add(keras.Input((image_size, image_size, 1), dtype="float32"))
    for layer in augmentation_layers(params, seed):
        augmenter.add(layer)
    return augmenter


def build_training_model(model: keras.Model, augmenter: keras.Sequential) -> keras.Model:
    """``model`` behind the augmenter, taking uint8 batches (a quarter of float32's bytes
    to move to the accelerator). Shares ``model``'s layers and weights; only ``model`` is
    saved for inference."""
    size = model.input_shape[1:]
    inputs = keras.Input(size, dtype="uint8", name="image_uint8")
    images = keras.ops.cast(inputs, "float32")
    outputs = model(augmenter(images))
    return keras.Model(inputs, outputs, name=f"{model.name}_training")


def augment_examples(augmenter: keras.Sequential, images: np.ndarray, seed: int) -> np.ndarray:
    """``images`` (N, H, W, 1) through the augmenter in training mode, as uint8.

    The random layers are reseeded from ``seed`` first, so the same call draws the same
    transformations (the figure is reproducible).
    """
    reseed_random_layers(augmenter, seed)
    augmented = augmenter(keras.ops.convert_to_tensor(images, dtype="float32"), training=True)
    return np.clip(np.rint(keras.ops.convert_to_numpy(augmented)), 0, 255).astype(np.uint8)


def reseed_random_layers(model: keras.Model, seed: int) -> None:
    """Set the generator state of every random layer in ``model`` (augmentation, dropout)
    from ``seed``.

    Keras keeps that state in ``seed_generator_state`` variables ([seed, counter]), which
    weight checkpoints do not save; reseeding them from (seed, epoch) at each epoch start
    makes an epoch's random stream independent of whether training was interrupted before.
    """
    states = [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(states))
    for state, value in zip(states, seeds, strict=True):
        state.assign(keras.ops.convert_to_tensor([int(value), 0], dtype=state.dtype))
