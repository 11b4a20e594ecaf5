"""HiResCAM, Grad-CAM++ and the method-by-name call on a CNN that learned where a shape is.

Known answers: behind global average pooling every position of the last map has the same
gradient, so HiResCAM equals Grad-CAM there exactly (Draelos and Carin); at an earlier
layer they differ, and every method's peak lands on the shape the class depends on.
Grad-CAM++'s weights are checked against the closed form written out in NumPy. One
gradient pass for several methods (``gradient_maps``, what the localisation stage runs)
gives each method's maps as its own pass does, on real slices through EfficientNet-Lite0.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from braintumor.core.schema import ModelParams, PreprocessParams
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.evaluation.localisation import pointing_hits
from braintumor.explain.cams import INPUT_LAYER, METHODS, explanation_maps, gradient_maps
from braintumor.explain.gradcam import WEIGHTINGS, GradCam, _weighted_maps

from serving_helpers import random_batchnorm_statistics, real_images

pytestmark = pytest.mark.slow  # trains a small CNN (about 20 s on two idle cores)

SIZE, SHAPE = 32, 6


def make_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gray noise with one bright (class 0) or dark (class 1) square; its masks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3 * 255, 0.6 * 255, (count, SIZE, SIZE, 1)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    masks = np.zeros((count, SIZE, SIZE), dtype=bool)
    for index in range(count):
        top, left = rng.integers(0, SIZE - SHAPE, 2)
        images[index, top : top + SHAPE, left : left + SHAPE] = 255 if labels[index] == 0 else 0
        masks[index, top : top + SHAPE, left : left + SHAPE] = True
    return images, labels.astype(np.int64), masks


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv_last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    images, labels, _ = make_images(640, seed=100)
    model.compile(keras.optimizers.Adam(5e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=6, batch_size=32, verbose=0)
    test_images, test_labels, _ = make_images(64, seed=1)
    accuracy = np.mean(model.predict(test_images, verbose=0).argmax(axis=1) == test_labels)
    assert accuracy > 0.95, f"the CNN did not learn the task ({accuracy:.2f})"
    return model


def test_hirescam_equals_gradcam_behind_global_average_pooling(trained: keras.Model) -> None:
    images, labels, _ = make_images(16, seed=2)
    gradcam = explanation_maps(trained, images, "gradcam", "conv_last", labels)
    hirescam = explanation_maps(trained, images, "hirescam", "conv_last", labels)
    np.testing.assert_allclose(hirescam, gradcam, atol=1e-5)
    earlier_gradcam = explanation_maps(trained, images, "gradcam", "conv1", labels)
    earlier_hirescam = explanation_maps(trained, images, "hirescam", "conv1", labels)
    assert np.abs(earlier_hirescam - earlier_gradcam).max() > 0.05  # not the same method


@pytest.mark.parametrize("method", METHODS)
def test_every_method_points_at_the_shape(trained: keras.Model, method: str) -> None:
    images, labels, masks = make_images(24, seed=3)
    layer = INPUT_LAYER if method == "occlusion" else "conv_last"
    maps = explanation_maps(
        trained, images, method, layer, labels, occlusion_patch=6, occlusion_stride=2
    )
    assert maps.shape == (24, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert pointing_hits(maps, masks, 2).mean() >= 0.75


def test_gradcampp_weights_are_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    features = rng.uniform(0, 2, (2, 5, 5, 3)).astype(np.float32)
    gradients = rng.normal(0, 1, (2, 5, 5, 3)).astype(np.float32)
    squared, cubed = gradients**2, gradients**3
    sums = features.sum(axis=(1, 2), keepdims=True)
    alphas = squared / (2 * squared + sums * cubed)
    weights = (alphas * np.maximum(gradients, 0)).sum(axis=(1, 2))
    expected = np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0)
    actual = keras.ops.convert_to_numpy(_weighted_maps(features, gradients, "gradcampp"))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    hires = keras.ops.convert_to_numpy(_weighted_maps(features, gradients, "hirescam"))
    np.testing.assert_allclose(hires, np.maximum((features * gradients).sum(-1), 0), atol=1e-5)


def test_bad_method_or_layer_is_refused(trained: keras.Model) -> None:
    images, labels, _ = make_images(2, seed=4)
    with pytest.raises(ValueError, match="method must be one of"):
        explanation_maps(trained, images, "lime", "conv_last", labels)
    with pytest.raises(ValueError, match="occlusion works on the input"):
        explanation_maps(trained, images, "occlusion", "conv_last", labels)
    with pytest.raises(ValueError, match="not a top-level layer"):
        explanation_maps(trained, images, "hirescam", "nowhere", labels)


def lite0_with_random_statistics() -> keras.Model:
    """The quickstart's classifier (EfficientNet-Lite0 at 128 px, untrained) with seeded
    random BatchNormalization statistics, so every layer's gradient is non-trivial."""
    from braintumor.model.classifier import build_model

    keras.utils.set_random_seed(3)
    params = ModelParams(backbone="efficientnet_lite0", weights="none", dense_units=(16,))
    return random_batchnorm_statistics(build_model(params, 128, 4))


def test_one_pass_gives_each_method_as_its_own_pass_on_real_slices(mirror: Path) -> None:
    """The localisation stage's shared pass: every method's maps at both of its layers equal
    a pass of that method alone, and the methods still differ (not one map three times)."""
    model = lite0_with_random_statistics()
    paths = real_images(mirror, 3, "Testing", offset=60)
    preprocess = PreprocessParams()
    images = np.stack(
        [preprocess_gray(decode_image(p.read_bytes()).gray, 128, preprocess) for p in paths]
    )[..., None].astype(np.float32)
    classes = np.arange(len(images)) % 4
    for layer in ("top_activation", "block10_add"):
        shared = gradient_maps(model, images, WEIGHTINGS, layer, classes, batch_size=5)
        assert list(shared) == list(WEIGHTINGS)
        for method in WEIGHTINGS:
            alone = explanation_maps(model, images, method, layer, classes, batch_size=5)
            assert shared[method].shape == alone.shape == (len(images), 128, 128)
            np.testing.assert_allclose(shared[method], alone, rtol=0, atol=1e-6)
        assert np.abs(shared["gradcampp"] - shared["hirescam"]).max() > 0.05
    # Any order and subset; the first named is the instance's ``heatmaps``.
    pair = GradCam.for_model(model, "block10_add", weighting=("gradcampp", "gradcam"))
    result = pair.compute(images, classes)
    assert list(result.each) == ["gradcampp", "gradcam"]
    np.testing.assert_array_equal(result.heatmaps, result.each["gradcampp"])
    alone = GradCam.for_model(model, "block10_add", weighting="gradcampp").compute(images, classes)
    np.testing.assert_allclose(result.heatmaps, alone.heatmaps, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.class_indices, alone.class_indices)
    np.testing.assert_allclose(result.probabilities, alone.probabilities, rtol=0, atol=1e-6)
    assert list(alone.each) == ["gradcampp"]


def test_bad_gradient_methods_are_refused_in_one_line(trained: keras.Model) -> None:
    images, labels, _ = make_images(2, seed=4)
    for methods, message in [
        (("gradcam", "lime"), "gradient method must be one of"),
        (("occlusion",), "gradient method must be one of"),
        ((), "at least one"),
        (("hirescam", "hirescam"), "twice"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            gradient_maps(trained, images, methods, "conv_last", labels)
        assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="weighting must be one of") as raised:
        GradCam(trained, "conv_last", weighting=("gradcam", "lime"))  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
