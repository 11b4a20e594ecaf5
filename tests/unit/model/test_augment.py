"""The random intensity augmentation: identity at inference, its ranges, its seeding, and
the same layer on the JAX backend (in a subprocess: the backend is fixed at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from braintumor.core.schema import AugmentParams, ConfigError
from braintumor.model.augment import (
    RandomIntensity,
    RandomResolution,
    augment_examples,
    augmentation_layers,
    build_augmenter,
    build_training_model,
)

SIZE = 24
COUNT = 64


def ramp_batch(count: int = COUNT, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """``count`` copies of a horizontal ramp from ``low`` to ``high`` (N, SIZE, SIZE, 1)."""
    row = np.linspace(low, high, SIZE, dtype=np.float32)
    return np.broadcast_to(row[None, None, :, None], (count, SIZE, SIZE, 1)).copy()


def run(layer: keras.layers.Layer, images: np.ndarray, training: bool = True) -> np.ndarray:
    return keras.ops.convert_to_numpy(layer(images, training=training))


def test_intensity_layer_is_identity_at_inference() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 1)).astype(np.float32)
    layer = RandomIntensity(gamma=0.3, contrast=0.3, brightness=0.2, noise=10.0, seed=1)
    np.testing.assert_array_equal(run(layer, images, training=False), images)
    np.testing.assert_array_equal(run(layer, images, training=None), images)
    augmenter = build_augmenter(AugmentParams(gamma=0.3, noise=10.0), SIZE, seed=3)
    np.testing.assert_array_equal(augmenter(images, training=False), images)


def test_gamma_factors_stay_in_the_log_uniform_range() -> None:
    images = ramp_batch()
    out = run(RandomIntensity(gamma=0.2, seed=1), images)
    # Every pixel follows 255 * (x / 255) ** g with one g per image: recover g.
    inside = (images > 10) & (images < 245)
    exponents = np.log(out[inside] / 255.0) / np.log(images[inside] / 255.0)
    per_image = exponents.reshape(COUNT, -1)
    np.testing.assert_allclose(
        per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=1e-3
    )
    log_factors = np.log(per_image[:, 0])
    assert np.all(np.abs(log_factors) <= 0.2 + 1e-4)
    assert log_factors.min() < -0.1 and log_factors.max() > 0.1, "both directions are drawn"
    assert out[:, :, 0].max() == 0 and out[:, :, -1].min() == pytest.approx(255), "ends fixed"


def test_contrast_scales_about_each_images_mean() -> None:
    images = ramp_batch(low=100, high=156)  # stays inside [0, 255] at any factor below 2
    images += np.arange(COUNT, dtype=np.float32)[:, None, None, None] - COUNT / 2
    out = run(RandomIntensity(contrast=0.3, seed=2), images)
    means = images.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), means, atol=1e-3)
    factors = (out[:, 0, 0, 0] - means) / (images[:, 0, 0, 0] - means)
    assert np.all((factors >= 0.7 - 1e-4) & (factors <= 1.3 + 1e-4))
    assert factors.min() < 0.8 and factors.max() > 1.2


def test_brightness_is_one_shift_per_image_as_a_fraction_of_255() -> None:
    images = ramp_batch(low=80, high=170)
    out = run(RandomIntensity(brightness=0.2, seed=3), images)
    shifts = (out - images).reshape(COUNT, -1)
    np.testing.assert_allclose(shifts, np.broadcast_to(shifts[:, :1], shifts.shape), atol=1e-3)
    assert np.all(np.abs(shifts[:, 0]) <= 0.2 * 255 + 1e-3)
    assert shifts[:, 0].min() < -30 and shifts[:, 0].max() > 30


def test_noise_deviation_is_drawn_per_image_up_to_the_limit() -> None:
    images = np.full((COUNT, 48, 48, 1), 128.0, dtype=np.float32)
    out = run(RandomIntensity(noise=10.0, seed=4), images)
    deviations = (out - images).reshape(COUNT, -1).std(axis=1)
    assert np.all(deviations <= 10.0 * 1.1)
    assert deviations.min() < 3 and deviations.max() > 8, "some images nearly clean, some noisy"
    assert abs(float((out - images).mean())) < 0.5


def test_outputs_are_clipped_to_the_gray_range() -> None:
    images = ramp_batch()
    layer = RandomIntensity(gamma=1.0, contrast=0.9, brightness=0.9, noise=60.0, seed=5)
    out = run(layer, images)
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() == 0.0 and out.max() == 255.0


def test_same_seed_same_draws_and_another_seed_others() -> None:
    images = ramp_batch(8)
    settings = {"gamma": 0.2, "contrast": 0.2, "brightness": 0.1, "noise": 8.0}
    first = run(RandomIntensity(**settings, seed=7), images)
    np.testing.assert_array_equal(first, run(RandomIntensity(**settings, seed=7), images))
    assert not np.allclose(first, run(RandomIntensity(**settings, seed=8), images))
    augmenter = build_augmenter(AugmentParams(**settings), SIZE, seed=3)
    uint8 = images.astype(np.uint8)
    again = augment_examples(augmenter, uint8, seed=5)
    np.testing.assert_array_equal(augment_examples(augmenter, uint8, seed=5), again)
    assert not np.array_equal(augment_examples(augmenter, uint8, seed=6), again)


def test_no_layer_when_every_intensity_factor_is_zero() -> None:
    assert AugmentParams() == AugmentParams(gamma=0, contrast=0, brightness=0, noise=0)
    names = [layer.name for layer in augmentation_layers(AugmentParams(), seed=1)]
    assert names == ["aug_affine", "aug_flip"]
    layers = augmentation_layers(AugmentParams(brightness=0.1), seed=1)
    assert [layer.name for layer in layers] == ["aug_affine", "aug_flip", "aug_intensity"]
    intensity = layers[-1]
    assert (intensity.gamma, intensity.contrast, intensity.brightness, intensity.noise) == (
        0.0,
        0.0,
        0.1,
        0.0,
    )
    assert intensity.dtype_policy.compute_dtype == "float32"
    bare = AugmentParams(zoom=0, width_shift=0, height_shift=0, shear=0, horizontal_flip=False)
    assert augmentation_layers(bare, seed=1) == []


def test_config_round_trip() -> None:
    layer = RandomIntensity(gamma=0.2, contrast=0.1, brightness=0.05, noise=4.0, seed=9)
    clone = RandomIntensity.from_config(layer.get_config())
    for key in ("gamma", "contrast", "brightness", "noise", "seed"):
        assert getattr(clone, key) == getattr(layer, key)
    images = ramp_batch(4)
    np.testing.assert_array_equal(run(clone, images), run(layer, images))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"contrast": 1.0}, "contrast"),
        ({"brightness": -0.2}, "brightness"),
        ({"noise": 300.0}, "noise"),
    ],
)
def test_bad_intensity_params_are_refused(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        AugmentParams(**changes)


def test_layer_refuses_negative_factors() -> None:
    with pytest.raises(ValueError, match="noise must be >= 0"):
        RandomIntensity(noise=-1.0)
    with pytest.raises(ValueError, match="contrast must be < 1"):
        RandomIntensity(contrast=1.0)


def checkerboard(count: int, size: int = 32) -> np.ndarray:
    """``count`` copies of a 2-pixel checkerboard (0 / 255): the finest detail there is."""
    cells = (np.indices((size, size)).sum(axis=0) // 2) % 2
    return np.broadcast_to((255.0 * cells)[None, :, :, None], (count, size, size, 1)).astype(
        np.float32
    )


def test_resolution_round_trip_blurs_some_images_and_keeps_the_others() -> None:
    """Each image draws one of four scales: 1 leaves it exactly as it was, the others
    wash a fine checkerboard towards grey (more the smaller the scale)."""
    layer = RandomResolution(0.6, seed=4)
    assert layer.scales() == pytest.approx([1.0, 0.8, 0.6, 0.4])
    images = checkerboard(COUNT)
    out = run(layer, images)
    detail = out.std(axis=(1, 2, 3))
    untouched = np.all(out == images, axis=(1, 2, 3))
    # About a quarter of the images keep scale 1; the rest lost contrast.
    assert 4 <= untouched.sum() <= 32
    assert np.all(detail[~untouched] < 0.9 * images[0].std())
    # Three distinct blur levels besides the untouched images.
    assert len(np.unique(np.round(detail[~untouched], 1))) == 3
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(run(layer, images, training=False), images)


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_resolution_round_trip_blurs_the_configured_share(share: float) -> None:
    """``share`` of the images take the trip, spread over the three reduced scales; at 1
    none is left untouched."""
    count = 400
    layer = RandomResolution(0.6, seed=7, share=share)
    images = checkerboard(count)
    out = run(layer, images)
    untouched = np.all(out == images, axis=(1, 2, 3))
    blurred = count - untouched.sum()
    assert abs(blurred / count - share) < 0.08
    levels, counts = np.unique(np.round(out.std(axis=(1, 2, 3))[~untouched], 1), return_counts=True)
    assert len(levels) == 3 and counts.min() > 0.2 * blurred
    with pytest.raises(ValueError, match="share must be in"):
        RandomResolution(0.5, share=0.0)
    with pytest.raises(ConfigError, match="^downscale_share: "):
        AugmentParams(downscale=0.5, downscale_share=1.5)


def test_resolution_layer_is_configured_before_the_intensity_layer() -> None:
    params = AugmentParams(downscale=0.5, downscale_share=0.3, noise=4.0)
    layers = augmentation_layers(params, seed=1)
    assert [layer.name for layer in layers][-2:] == ["aug_resolution", "aug_intensity"]
    clone = RandomResolution.from_config(layers[-2].get_config())
    assert (clone.downscale, clone.seed, clone.share) == (0.5, 4, 0.3)
    with pytest.raises(ConfigError, match="^downscale: "):
        AugmentParams(downscale=0.9)
    with pytest.raises(ValueError, match="downscale must be in"):
        RandomResolution(1.0)


NO_GEOMETRY = {"zoom": 0, "width_shift": 0, "height_shift": 0, "shear": 0}


@pytest.mark.slow  # XLA compiles the training step: about 25 s on 2 shared cores
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "layers",
    [
        {"gamma": 0.2, "contrast": 0.2, "brightness": 0.1, "noise": 8.0},
        {"downscale": 0.6},
    ],
    ids=["intensity", "resolution"],
)
def test_random_layers_run_inside_a_compiled_training_step(
    jit_compile: bool, layers: dict[str, float]
) -> None:
    """A graph (or XLA) training step with a dynamic batch size, as ``train`` runs it
    (the antialiased resize, for one, does not compile under XLA)."""
    params = AugmentParams(**NO_GEOMETRY, horizontal_flip=False, **layers)
    augmenter = build_augmenter(params, SIZE, seed=3)
    inputs = keras.Input((SIZE, SIZE, 1))
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden))
    training = build_training_model(model, augmenter)
    training.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=jit_compile
    )
    images = np.random.default_rng(0).integers(0, 256, (10, SIZE, SIZE, 1)).astype(np.uint8)
    history = training.fit(images, np.arange(10) % 4, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


_JAX_SCRIPT = """
import json, sys
import keras
import numpy as np
from braintumor.model.augment import (
    RandomIntensity, augment_examples, build_augmenter, build_training_model,
)
from braintumor.core.schema import AugmentParams
assert keras.backend.backend() == "jax", keras.backend.backend()
size = 24
images = np.random.default_rng(0).integers(0, 256, (16, size, size, 1)).astype(np.uint8)
params = AugmentParams(gamma=0.2, contrast=0.2, brightness=0.1, noise=8.0)
augmenter = build_augmenter(params, size, seed=3)
first = augment_examples(augmenter, images, seed=5)
again = augment_examples(augmenter, images, seed=5)
inference = keras.ops.convert_to_numpy(augmenter(images.astype("float32"), training=False))
layer = RandomIntensity(noise=10.0, seed=1)
flat = np.full((32, size, size, 1), 128.0, dtype="float32")
jitted = keras.ops.convert_to_numpy(layer(flat, training=True))
inputs = keras.Input((size, size, 1))
hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden))
training = build_training_model(model, augmenter)
training.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
history = training.fit(images, np.arange(16) % 4, batch_size=8, epochs=2, verbose=0)
json.dump({
    "reproducible": bool(np.array_equal(first, again)),
    "changed": bool(not np.array_equal(first, images)),
    "identity": bool(np.array_equal(inference, images)),
    "dtype": str(first.dtype),
    "noise_std_max": float((jitted - 128).reshape(32, -1).std(axis=1).max()),
    "losses": [float(v) for v in history.history["loss"]],
}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow  # a fresh process imports jax and keras: over a minute on 2 cores
def test_intensity_augmentation_on_the_jax_backend(tmp_path) -> None:
    """The layers run, seeded, on JAX and inside a jit-compiled training step."""
    probe = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("jax is not installed in this environment")
    result = tmp_path / "result.json"
    environment = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT, str(result)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome["reproducible"] and outcome["changed"] and outcome["identity"]
    assert outcome["dtype"] == "uint8"
    assert 6 < outcome["noise_std_max"] <= 11
    assert all(np.isfinite(outcome["losses"]))
