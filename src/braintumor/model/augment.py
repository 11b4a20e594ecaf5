"""Training-time augmentation: the study's ``ImageDataGenerator`` settings as Keras layers.

The layers run per training batch inside the training graph (so on the accelerator, on any
backend) and are not part of the inference model that is saved, evaluated and served.
The values follow ``ImageDataGenerator``'s units, so ``params.yaml`` reads like the study:

- ``zoom`` z: height and width zoomed independently by a factor in [1 - z, 1 + z];
- ``width_shift`` / ``height_shift``: a fraction of the width / height;
- ``shear``: an angle in degrees, as ``ImageDataGenerator.shear_range`` (the study's 0.05
  is a 0.05 degree shear, a shift of under one pixel at 224 px, i.e. nearly a no-op);
- ``rotation``: degrees, as ``rotation_range``;
- ``fill_mode``: how pixels moved in from outside the image are filled;
- ``interpolation``: ``bilinear`` as ``ImageDataGenerator``. A bilinear resampling
  softens the image, and only training images are resampled: a model trained from scratch
  learns the softness (measured with one Keras layer per transform, i.e. three resamplings:
  0.86 accuracy on augmented training images, 0.66 on the same images unaugmented).
  ``nearest`` keeps pixel values and sharpness.

The geometry is one ``RandomAffine`` layer (a single resampling, like the generator's
``apply_affine_transform``), followed by ``RandomFlip``.

Beyond the study (off by default, each 0 in ``params.yaml``), ``RandomIntensity`` changes
the gray values of each image at random, for robustness to scanners and exports that
window the intensities or add noise differently: ``gamma`` (a log-uniform gamma factor),
``contrast`` (about the image's mean), ``brightness`` (an additive shift, a fraction of
255) and ``noise`` (Gaussian, a standard deviation in gray levels drawn per image). It
comes last, so the noise is not smoothed by the resampling, and clips to [0, 255].
``RandomResolution`` (``downscale``) comes just before it: a round trip through a smaller
size, the blur of a coarser acquisition matrix, so that the noise lands on the blurred image
as it would on a real low-resolution scan.

Core layer: imports keras and the config only.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from braintumor.core.schema import AugmentParams

AUGMENTER_NAME = "augmentation"


class RandomAffine(keras.layers.Layer):
    """``ImageDataGenerator``'s random geometry as one resampling per image.

    Per image: rotation in [-rotation, rotation] degrees, shift in [-width_shift,
    width_shift] x width (and height), shear in [-shear, shear] degrees, and zoom factors
    for x and y drawn independently from [1 - zoom, 1 + zoom] (above 1 zooms out), composed
    about the image centre as ``ImageDataGenerator.apply_transform`` does, then applied in
    a single ``keras.ops.image.affine_transform`` (one interpolation instead of one per
    Keras preprocessing layer). Identity unless called with ``training=True``. Only the
    training model holds it; it is never saved with the inference model.
    """

    def __init__(
        self,
        zoom: float = 0.0,
        width_shift: float = 0.0,
        height_shift: float = 0.0,
        shear: float = 0.0,
        rotation: float = 0.0,
        fill_mode: str = "nearest",
        interpolation: str = "bilinear",
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.zoom = zoom
        self.width_shift = width_shift
        self.height_shift = height_shift
        self.shear = shear
        self.rotation = rotation
        self.fill_mode = fill_mode
        self.interpolation = interpolation
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, count: Any, bound: float) -> Any:
        return keras.random.uniform(
            (count,), -bound, bound, dtype="float32", seed=self.seed_generator
        )

    def transforms(self, count: Any, height: int, width: int) -> Any:
        """(count, 8) ``affine_transform`` rows mapping output pixels to input pixels."""
        ops = keras.ops
        theta = self._uniform(count, math.radians(self.rotation))
        shear = self._uniform(count, math.radians(self.shear))
        shift_x = self._uniform(count, self.width_shift) * width
        shift_y = self._uniform(count, self.height_shift) * height
        zoom_x = 1.0 + self._uniform(count, self.zoom)
        zoom_y = 1.0 + self._uniform(count, self.zoom)
        cos, sin = ops.cos(theta), ops.sin(theta)
        shear_cos, shear_sin = ops.cos(shear), ops.sin(shear)
        # A = rotation @ shear @ zoom in (x, y) coordinates. The generator's shear
        # [[1, -sin s], [0, cos s]] in (row, column) is [[cos s, 0], [-sin s, 1]] in (x, y).
        a00 = (cos * shear_cos + sin * shear_sin) * zoom_x
        a01 = -sin * zoom_y
        a10 = (sin * shear_cos - cos * shear_sin) * zoom_x
        a11 = cos * zoom_y
        centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
        a02 = centre_x + shift_x - a00 * centre_x - a01 * centre_y
        a12 = centre_y + shift_y - a10 * centre_x - a11 * centre_y
        zeros = ops.zeros_like(a00)
        return ops.stack([a00, a01, a02, a10, a11, a12, zeros, zeros], axis=1)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        height, width = images.shape[1], images.shape[2]
        transforms = self.transforms(keras.ops.shape(images)[0], height, width)
        return keras.ops.image.affine_transform(
            images,
            transforms,
            interpolation=self.interpolation,
            fill_mode=self.fill_mode,
            data_format="channels_last",
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        keys = ("zoom", "width_shift", "height_shift", "shear", "rotation", "fill_mode")
        config.update({key: getattr(self, key) for key in keys})
        config.update(interpolation=self.interpolation, seed=self.seed)
        return config


class RandomIntensity(keras.layers.Layer):
    """Random per-image intensity changes of 0-255 gray images, in this order:

    - gamma: ``255 * (x / 255) ** g`` with ``g = exp(U(-gamma, gamma))``, so darkening
      and brightening the mid-tones are equally likely;
    - contrast: ``(x - mean) * c + mean`` with ``c`` in [1 - contrast, 1 + contrast] and
      ``mean`` the image's own mean (as ``tf.image.adjust_contrast``);
    - brightness: ``x + 255 * b`` with ``b`` in [-brightness, brightness];
    - noise: ``x + s * N(0, 1)`` per pixel, with ``s`` in [0, noise] gray levels per
      image (some images clean, some noisy).

    A factor of 0 skips its step (and its random draws). The result is clipped to
    [0, 255]. Identity unless called with ``training=True``; only the training model
    holds it. Uses ``keras.ops`` and ``keras.random`` only, so it runs inside the
    compiled training step on every backend.
    """

    def __init__(
        self,
        gamma: float = 0.0,
        contrast: float = 0.0,
        brightness: float = 0.0,
        noise: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        factors = {"gamma": gamma, "contrast": contrast, "brightness": brightness, "noise": noise}
        for key, value in factors.items():
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if contrast >= 1:
            raise ValueError(f"contrast must be < 1 (the factor stays positive), got {contrast}")
        self.gamma = gamma
        self.contrast = contrast
        self.brightness = brightness
        self.noise = noise
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _per_image(self, count: Any, low: float, high: float) -> Any:
        """One uniform draw per image, shaped (count, 1, 1, 1) to broadcast over pixels."""
        values = keras.random.uniform(
            (count,), low, high, dtype="float32", seed=self.seed_generator
        )
        return keras.ops.reshape(values, (-1, 1, 1, 1))

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        ops = keras.ops
        count = ops.shape(images)[0]
        images = ops.clip(ops.cast(images, "float32"), 0.0, 255.0)
        if self.gamma > 0:
            exponent = ops.exp(self._per_image(count, -self.gamma, self.gamma))
            images = 255.0 * ops.power(images / 255.0, exponent)
        if self.contrast > 0:
            factor = self._per_image(count, 1.0 - self.contrast, 1.0 + self.contrast)
            mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
            images = (images - mean) * factor + mean
        if self.brightness > 0:
            images = images + 255.0 * self._per_image(count, -self.brightness, self.brightness)
        if self.noise > 0:
            deviation = self._per_image(count, 0.0, self.noise)
            normal = keras.random.normal(
                ops.shape(images), dtype="float32", seed=self.seed_generator
            )
            images = images + deviation * normal
        return ops.clip(images, 0.0, 255.0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            gamma=self.gamma,
            contrast=self.contrast,
            brightness=self.brightness,
            noise=self.noise,
            seed=self.seed,
        )
        return config


class RandomResolution(keras.layers.Layer):
    """Per image, a round trip through a smaller size: down to a scale of
    ``1 - d/3, 1 - 2d/3`` or ``1 - d`` of the side (a box filter of about 1/scale pixels,
    then bilinear: close to an area average) and back up (bilinear). A share ``share`` of
    the images takes the trip, the three scales equally often; the rest stay as they were.
    ``share`` 0.75 is a uniform draw over the four scales 1, ..., 1 - d; a smaller share
    teaches the blur with fewer blurred images (each blurred image makes the model less
    sure of sharp ones, which temperature scaling does not undo; docs/training.md).

    Four fixed scales, not a continuous one: each is a resize of static shape (so the step
    compiles once under XLA and JAX); the batch goes through all of them and each image
    keeps the one it drew. At 128 px that is three extra resizes of the batch, nothing
    beside the network. Identity unless called with ``training=True``.
    """

    LEVELS = 4

    def __init__(
        self,
        downscale: float = 0.0,
        seed: int | None = None,
        share: float = 0.75,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= downscale < 1:
            raise ValueError(f"downscale must be in [0, 1), got {downscale}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.downscale = downscale
        self.share = share
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def scales(self) -> list[float]:
        """The scales an image may draw, 1 (unchanged) first."""
        step = self.downscale / (self.LEVELS - 1)
        return [1.0 - level * step for level in range(self.LEVELS)]

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training or self.downscale <= 0:
            return images
        ops = keras.ops
        height, width = images.shape[1], images.shape[2]
        count = ops.shape(images)[0]
        # u < share: level 1 + floor(3 u / share) (one of the reduced scales), else 1.
        draw = keras.random.uniform((count,), seed=self.seed_generator)
        reduced_level = 1 + ops.floor(draw * ((self.LEVELS - 1) / self.share))
        choice = ops.where(draw < self.share, ops.minimum(reduced_level, self.LEVELS - 1), 0)
        choice = ops.reshape(ops.cast(choice, "int32"), (-1, 1, 1, 1))
        result = images
        for level, scale in enumerate(self.scales()[1:], start=1):
            small = (max(1, round(height * scale)), max(1, round(width * scale)))
            # A box filter of the scale's footprint, then bilinear: the antialiased resize
            # (ScaleAndTranslate on TensorFlow) does not compile under XLA.
            window = int(1.0 / scale + 0.5)
            smoothed = images
            if window > 1:
                smoothed = ops.average_pool(images, window, strides=1, padding="same")
            reduced = ops.image.resize(smoothed, small, interpolation="bilinear")
            restored = ops.image.resize(reduced, (height, width), interpolation="bilinear")
            result = ops.where(ops.equal(choice, level), restored, result)
        return result

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(downscale=self.downscale, seed=self.seed, share=self.share)
        return config


def augmentation_layers(params: AugmentParams, seed: int) -> list[keras.layers.Layer]:
    """The configured random layers: one affine resampling, the horizontal flip, the
    resolution round trip, then the intensity changes (each only when configured).

    float32 even under a mixed-precision policy: interpolating 0-255 images in float16
    visibly bands them.
    """
    layers: list[keras.layers.Layer] = []
    geometry = {
        "zoom": params.zoom,
        "width_shift": params.width_shift,
        "height_shift": params.height_shift,
        "shear": params.shear,
        "rotation": params.rotation,
    }
    if any(value > 0 for value in geometry.values()):
        layers.append(
            RandomAffine(
                **geometry,
                fill_mode=params.fill_mode,
                interpolation=params.interpolation,
                seed=seed,
                name="aug_affine",
                dtype="float32",
            )
        )
    if params.horizontal_flip:
        layers.append(
            keras.layers.RandomFlip("horizontal", seed=seed + 1, name="aug_flip", dtype="float32")
        )
    if params.downscale > 0:
        layers.append(
            RandomResolution(
                params.downscale,
                seed=seed + 3,
                share=params.downscale_share,
                name="aug_resolution",
                dtype="float32",
            )
        )
    intensity = {
        "gamma": params.gamma,
        "contrast": params.contrast,
        "brightness": params.brightness,
        "noise": params.noise,
    }
    if any(value > 0 for value in intensity.values()):
        layers.append(
            RandomIntensity(**intensity, seed=seed + 2, name="aug_intensity", dtype="float32")
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


def reseed_random_layers(model: keras.Model, seed: int | list[int]) -> None:
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
