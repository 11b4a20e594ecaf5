"""Grad-CAM, occlusion sensitivity and the overlay, on a tiny CNN trained in the test.

The synthetic task puts the evidence in one place: a 6 x 6 square at a random position on
a noisy mid-gray 32 x 32 background, white for class 0 and black for class 1. A correct
explanation must therefore sit on the square and move with it. The network (two unpadded
convolutions, global average pooling, a softmax ``Dense``) trains to about 100 % in a few
seconds on two cores; without padding a constant image gives a constant feature map, the
natural "flat map" case.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from braintumor.explain import gradcam as gradcam_module
from braintumor.explain.gradcam import GradCam, gradcam, last_conv_layer_name
from braintumor.explain.maps import normalize_maps, resize_maps
from braintumor.explain.occlusion import occlusion_sensitivity
from braintumor.explain.overlay import overlay

SIZE = 32
SHAPE = 6
LAYER = "conv_last"


def make_images(
    count: int, seed: int, label: int | None = None, position: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images 0-255 float32 (N, 32, 32, 1), labels, shape centres (row, column))."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3 * 255, 0.6 * 255, (count, SIZE, SIZE, 1)).astype(np.float32)
    labels = rng.integers(0, 2, count) if label is None else np.full(count, label)
    centres = []
    for index in range(count):
        top, left = rng.integers(0, SIZE - SHAPE, 2) if position is None else position
        images[index, top : top + SHAPE, left : left + SHAPE] = 255 if labels[index] == 0 else 0
        centres.append((top + (SHAPE - 1) / 2, left + (SHAPE - 1) / 2))
    return images, labels.astype(np.int64), np.array(centres)


def build_cnn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name=LAYER)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"tiny_{seed}")


def train_cnn(seed: int) -> keras.Model:
    images, labels, _ = make_images(640, seed=100)
    model = build_cnn(seed)
    model.compile(keras.optimizers.Adam(5e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    model = train_cnn(0)
    images, labels, _ = make_images(64, seed=1)
    accuracy = np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels)
    assert accuracy > 0.95, f"the tiny CNN did not learn the task (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_images(16, seed=2)


def evidence_centre(maps: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass of each map above its median: a uniform background
    level (Grad-CAM maps often keep one) does not pull the centre towards the middle."""
    excess = np.maximum(maps - np.median(maps, axis=(1, 2), keepdims=True), 0)
    rows, columns = np.indices(maps.shape[1:])
    mass = excess.sum(axis=(1, 2))
    assert np.all(mass > 0), "a map has no mass above its median"
    return np.stack(
        [(excess * rows).sum(axis=(1, 2)) / mass, (excess * columns).sum(axis=(1, 2)) / mass],
        axis=1,
    )


def pearson_per_image(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps; 0 where a map is flat (no ranking)."""
    values = []
    for a, b in zip(first, second, strict=True):
        if a.std() == 0 or b.std() == 0:
            values.append(0.0)
        else:
            values.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    return np.array(values)


# --------------------------------------------------------------------------- Grad-CAM


def test_heatmaps_have_input_size_unit_range_and_no_nan(trained, held_out) -> None:
    images, labels, _ = held_out
    maps = gradcam(trained, images, LAYER)
    assert maps.shape == (16, SIZE, SIZE)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps.max(axis=(1, 2)), 1.0)  # each map uses the full range


def test_compute_reports_the_predicted_class_and_the_model_probabilities(trained, held_out):
    images, _, _ = held_out
    result = GradCam.for_model(trained, LAYER).compute(images)
    expected = trained.predict(images, verbose=0)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.class_indices, expected.argmax(axis=1))
    chosen = GradCam.for_model(trained, LAYER).compute(images, class_index=1)
    np.testing.assert_array_equal(chosen.class_indices, np.ones(16))


@pytest.mark.parametrize("score", ["centred", "logit"])
def test_gradcam_equals_cam_for_a_pooling_dense_network(trained, held_out, score) -> None:
    """For global average pooling + Dense, Grad-CAM is CAM (Zhou et al., 2016) computed
    from the class weights (centred across classes for the centred logit): an exact check
    of the gradient code and of the logits recomputed from the softmax layer."""
    images, labels, _ = held_out
    features = keras.Model(trained.input, trained.get_layer(LAYER).output)(images)
    features = keras.ops.convert_to_numpy(features)
    kernel = keras.ops.convert_to_numpy(trained.get_layer("predictions").kernel)
    if score == "centred":
        kernel = kernel - kernel.mean(axis=1, keepdims=True)
    cams = np.maximum(np.einsum("nhwc,cn->nhw", features, kernel[:, labels]), 0)
    expected = normalize_maps(resize_maps(cams.astype(np.float32), SIZE, SIZE))
    maps = gradcam(trained, images, LAYER, labels, score=score)
    np.testing.assert_allclose(maps, expected, atol=1e-4)


def test_constant_image_gives_zero_maps_not_nan(trained) -> None:
    images = np.stack([np.zeros((SIZE, SIZE, 1)), np.full((SIZE, SIZE, 1), 128.0)])
    maps = gradcam(trained, images, LAYER)
    assert np.isfinite(maps).all()
    assert np.all(maps == 0.0)


def test_normalize_maps_turns_flat_maps_into_zeros() -> None:
    maps = np.stack([np.zeros((4, 4)), np.full((4, 4), 3.0), np.arange(16.0).reshape(4, 4)])
    scaled = normalize_maps(maps)
    assert np.all(scaled[:2] == 0.0)
    assert scaled[2].min() == 0.0 and scaled[2].max() == 1.0
    assert np.all(normalize_maps(np.full((1, 3, 3), np.nan)) == 0.0)


def test_gradcam_does_not_mutate_the_model(held_out) -> None:
    model = build_cnn(3)  # fresh, so building the auxiliary models is part of the check
    images, _, _ = held_out

    def snapshot() -> dict:
        return {
            "weights": [keras.ops.convert_to_numpy(w).tobytes() for w in model.weights],
            "trainable": [(layer.name, layer.trainable) for layer in model.layers],
            "nodes": [
                (len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in model.layers
            ],
            "activation": model.get_layer("predictions").activation,
            "config": json.dumps(model.get_config(), sort_keys=True, default=str),
        }

    before = snapshot()
    gradcam(model, images, LAYER)
    gradcam(model, images, "conv1", class_index=0)
    occlusion_sensitivity(model, images[:2], patch_size=8, stride=8)
    assert snapshot() == before


def test_batched_equals_one_by_one(trained, held_out) -> None:
    images, labels, _ = held_out
    batched = gradcam(trained, images, LAYER, labels, batch_size=16)
    uneven = gradcam(trained, images, LAYER, labels, batch_size=5)
    single = np.concatenate(
        [gradcam(trained, images[i : i + 1], LAYER, int(labels[i])) for i in range(4)]
    )
    np.testing.assert_allclose(uneven, batched, atol=1e-5)
    np.testing.assert_allclose(single, batched[:4], atol=1e-5)


def test_instance_is_cached_per_model_and_layer_and_released_with_the_model() -> None:
    model = build_cnn(5)
    first = GradCam.for_model(model, LAYER)
    assert GradCam.for_model(model, LAYER) is first
    assert GradCam.for_model(model, "conv1") is not first
    assert model in gradcam_module._CACHE
    alive = weakref.ref(model)
    del model, first
    gc.collect()
    assert alive() is None, "the cache keeps the model alive"


def test_cached_instance_reads_the_current_weights(trained, held_out) -> None:
    images, labels, _ = held_out
    model = build_cnn(6)
    GradCam.for_model(model, LAYER)(images, labels)  # built and traced on random weights
    model.set_weights(trained.get_weights())
    np.testing.assert_allclose(
        gradcam(model, images, LAYER, labels), gradcam(trained, images, LAYER, labels), atol=1e-5
    )


@pytest.mark.slow
def test_randomised_weights_change_the_maps(trained, held_out) -> None:
    """The model-randomisation sanity check of Adebayo et al. (2018).

    An explanation that does not change when the weights are randomised explains the
    image, not the model. The reference for "similar" is a second model of the same
    architecture trained on the same task from another seed: its maps must agree with the
    first model's (mean per-image Pearson 0.95 observed; required > 0.7), while maps of
    the same architecture with random weights must not (0.01 observed, averaged over three
    random initialisations whose single means ranged from -0.2 to 0.1; required < 0.3),
    and the gap must be wide (> 0.5). Pearson is 0 for a flat map (nothing to rank).
    """
    images, labels, _ = held_out
    maps = gradcam(trained, images, LAYER, labels)
    retrained = pearson_per_image(maps, gradcam(train_cnn(1), images, LAYER, labels)).mean()
    randomised = np.mean(
        [
            pearson_per_image(maps, gradcam(build_cnn(seed), images, LAYER, labels)).mean()
            for seed in (100, 101, 102)
        ]
    )
    print(f"Pearson: retrained {retrained:.3f}, randomised {randomised:.3f}")
    assert retrained > 0.7, f"two trained models disagree (Pearson {retrained:.2f})"
    assert randomised < 0.3, f"random weights give similar maps (Pearson {randomised:.2f})"
    assert retrained - randomised > 0.5


def test_map_follows_the_evidence(trained) -> None:
    """Move the square 16 px down and 20 px right: the class-0 map's centre moves the same
    way, and sits on the square."""
    before, _, before_centres = make_images(8, seed=4, label=0, position=(6, 3))
    after, _, after_centres = make_images(8, seed=4, label=0, position=(22, 23))
    before_maps = evidence_centre(gradcam(trained, before, LAYER, 0))
    after_maps = evidence_centre(gradcam(trained, after, LAYER, 0))
    shift = (after_maps - before_maps).mean(axis=0)
    print(f"map centre moved by {shift}")
    assert shift[0] > 8 and shift[1] > 10, f"map moved by {shift}, the square by (16, 20)"
    assert np.abs(before_maps - before_centres).mean() < 2.5
    assert np.abs(after_maps - after_centres).mean() < 2.5


def test_gradcam_maps_concentrate_on_the_evidence(trained, held_out) -> None:
    images, labels, centres = held_out
    maps = gradcam(trained, images, LAYER, labels)
    assert np.abs(evidence_centre(maps) - centres).mean() < 2.5
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    assert np.mean(np.abs(peaks - centres).max(axis=1) <= SHAPE / 2 + 1) >= 0.9


def test_rejects_bad_input(trained, held_out) -> None:
    images, _, _ = held_out
    with pytest.raises(ValueError, match="not a top-level layer"):
        gradcam(trained, images, "no_such_layer")
    with pytest.raises(ValueError, match="convolutional"):
        gradcam(trained, images, "pool")
    with pytest.raises(ValueError, match="axis 1"):
        gradcam(trained, np.zeros((2, 16, SIZE, 1)), LAYER)
    with pytest.raises(ValueError, match="shape"):
        gradcam(trained, np.zeros((SIZE, SIZE, 1)), LAYER)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(trained, images, LAYER, class_index=2)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(trained, images, LAYER, class_index=[0, 1])
    with pytest.raises(ValueError, match="NaN"):
        gradcam(trained, np.full((1, SIZE, SIZE, 1), np.nan), LAYER)
    with pytest.raises(ValueError, match="batch_size"):
        gradcam(trained, images, LAYER, batch_size=0)
    with pytest.raises(ValueError, match="score"):
        gradcam(trained, images, LAYER, score="probability")


def test_last_conv_layer_name(trained) -> None:
    assert last_conv_layer_name(trained) == LAYER


def test_works_on_the_project_model_builder() -> None:
    """The pipeline's own model (tinycnn backbone, the study's head with batch norm and
    dropout): the Grad-CAM layer resolves and the maps are well formed."""
    from braintumor.core.schema import ModelParams
    from braintumor.model.classifier import build_model, feature_layer_name

    params = ModelParams(backbone="tinycnn", weights="none", dense_units=(16,))
    model = build_model(params, image_size=32, num_classes=4)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
    result = GradCam.for_model(model, feature_layer_name("tinycnn")).compute(images)
    assert result.heatmaps.shape == (3, 32, 32)
    assert np.isfinite(result.heatmaps).all()
    np.testing.assert_allclose(result.probabilities, model.predict(images, verbose=0), atol=1e-5)


# --------------------------------------------------------------------------- occlusion


def test_occlusion_map_peaks_on_the_evidence(trained, held_out) -> None:
    images, labels, centres = held_out
    maps = occlusion_sensitivity(trained, images[:8], labels[:8], patch_size=6, stride=2)
    assert maps.shape == (8, SIZE, SIZE)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    assert np.all(np.abs(peaks - centres[:8]).max(axis=1) <= SHAPE / 2 + 1)
    assert np.abs(evidence_centre(maps) - centres[:8]).mean() < 1.5


def test_occlusion_of_a_constant_image_is_zero_and_bad_input_raises(trained) -> None:
    maps = occlusion_sensitivity(trained, np.full((1, SIZE, SIZE, 1), 50.0), patch_size=8)
    assert np.all(maps == 0.0)
    with pytest.raises(ValueError, match="patch_size"):
        occlusion_sensitivity(trained, np.zeros((1, SIZE, SIZE, 1)), patch_size=64)
    with pytest.raises(ValueError, match="stride"):
        occlusion_sensitivity(trained, np.zeros((1, SIZE, SIZE, 1)), stride=0)
    with pytest.raises(ValueError, match="fill"):
        occlusion_sensitivity(trained, np.zeros((1, SIZE, SIZE, 1)), fill="noise")


# --------------------------------------------------------------------------- overlay


def test_overlay_returns_rgb_uint8_and_blends() -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:4, :4] = 1.0
    blended = overlay(gray, heat, alpha=0.5)
    assert blended.shape == (16, 16, 3) and blended.dtype == np.uint8
    np.testing.assert_array_equal(overlay(gray[:, :, None], heat, alpha=0.0)[:, :, 0], gray)
    # jet maps 1.0 to dark red: the hot corner is redder than the cold one
    assert blended[:8, :8, 0].mean() - blended[:8, :8, 2].mean() > 20
    with pytest.raises(ValueError, match="uint8"):
        overlay(gray.astype(np.float32), heat)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overlay(gray, heat * 2)
    with pytest.raises(ValueError, match="alpha"):
        overlay(gray, heat, alpha=1.5)


# --------------------------------------------------------------------------- JAX


_JAX_SCRIPT = """
import sys
import weakref
import numpy as np
import keras
from braintumor.explain.gradcam import gradcam
assert keras.backend.backend() == "jax", keras.backend.backend()
model = keras.saving.load_model(sys.argv[1])
images = np.load(sys.argv[2])
labels = np.load(sys.argv[3])
np.save(sys.argv[4], gradcam(model, images, "conv_last", labels, batch_size=5))
np.save(sys.argv[5], gradcam(model, images[:3], "conv_last"))
"""


def _run_on_backend(
    backend: str,
    script: str,
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    outputs: tuple[str, ...],
    folder: Path,
    *leading: str,
) -> list[Path]:
    """``script`` in a fresh process on ``backend`` (fixed at import), with ``leading``
    arguments, then the saved model, images, labels and the ``outputs`` it writes; the
    paths, images and labels first. Fails with the process's stderr."""
    model_path = folder / "model.keras"
    model.save(model_path)
    paths = [folder / name for name in ("images.npy", "labels.npy", *outputs)]
    np.save(paths[0], images)
    np.save(paths[1], labels)
    environment = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", script, *leading, str(model_path), *map(str, paths)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return paths


def _jax_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax"], capture_output=True, env={**os.environ}
    )
    return probe.returncode == 0


@pytest.mark.slow  # a fresh process imports jax and keras: about a minute on 2 cores
def test_gradcam_on_the_jax_backend_matches_tensorflow(trained, held_out, tmp_path: Path):
    """The same saved model explained on JAX (in a subprocess: the backend is fixed at
    import) gives the TensorFlow maps."""
    if not _jax_available():
        pytest.skip("jax is not installed in this environment")
    images, labels, _ = held_out
    paths = _run_on_backend(
        "jax", _JAX_SCRIPT, trained, images, labels, ("maps.npy", "pred.npy"), tmp_path
    )
    np.testing.assert_allclose(
        np.load(paths[2]), gradcam(trained, images, LAYER, labels), atol=1e-3
    )
    np.testing.assert_allclose(np.load(paths[3]), gradcam(trained, images[:3], LAYER), atol=1e-3)


_WEIGHTINGS_SCRIPT = """
import sys
import numpy as np
import keras
from braintumor.explain.gradcam import WEIGHTINGS, GradCam
assert keras.backend.backend() == sys.argv[1], keras.backend.backend()
model = keras.saving.load_model(sys.argv[2])
images, labels = np.load(sys.argv[3]), np.load(sys.argv[4])
shared = GradCam(model, "conv1", weighting=WEIGHTINGS).compute(images, labels, batch_size=5)
alone = [GradCam(model, "conv1", weighting=w)(images, labels, batch_size=5) for w in WEIGHTINGS]
np.save(sys.argv[5], np.stack([shared.each[name] for name in WEIGHTINGS]))
np.save(sys.argv[6], np.stack(alone))
"""


@pytest.mark.slow  # a fresh process imports the backend and keras: about a minute on 2 cores
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_one_pass_for_every_weighting_on_the_other_backends(
    trained, held_out, tmp_path: Path, backend: str
) -> None:
    """Each backend's step weighs one pass's gradients every way: the maps equal that
    backend's single-weighting passes, and the TensorFlow ones (at ``conv1``, where the
    three methods differ)."""
    probe = subprocess.run([sys.executable, "-c", f"import {backend}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{backend} is not installed in this environment")
    images, labels, _ = held_out
    paths = _run_on_backend(
        backend,
        _WEIGHTINGS_SCRIPT,
        trained,
        images,
        labels,
        ("shared.npy", "alone.npy"),
        tmp_path,
        backend,
    )
    shared, alone = np.load(paths[2]), np.load(paths[3])
    assert shared.shape == (3, len(images), SIZE, SIZE)
    np.testing.assert_allclose(shared, alone, rtol=0, atol=1e-6)
    for name, maps in zip(gradcam_module.WEIGHTINGS, shared, strict=True):
        expected = gradcam(trained, images, "conv1", labels, weighting=name)  # type: ignore[arg-type]
        np.testing.assert_allclose(maps, expected, atol=1e-3)
    assert np.abs(shared[1] - shared[0]).max() > 0.05  # hirescam is not gradcam at conv1


# --------------------------------------------------------------------------- soft ReLU gates


def build_separate_relu_cnn(seed: int) -> keras.Model:
    """``build_cnn`` with every ReLU a layer of its own (ReLU6, then a plain ReLU after
    ``LAYER``), as soft gates need."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, name="conv1")(x)
    x = keras.layers.ReLU(6.0, name="relu1")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, name=LAYER)(x)
    x = keras.layers.Conv2D(32, 3, name="conv3")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.Activation("relu", name="relu3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"separate_{seed}")


def test_soft_gates_keep_the_forward_and_follow_the_current_weights(held_out) -> None:
    """``gate_width`` > 0 explains a clone: its probabilities are the model's exactly, its
    maps change with the model's weights after it was built (copied at every call), they
    differ from the exact gradient's and the width is part of the cache key."""
    images, labels, _ = held_out
    model = build_separate_relu_cnn(3)
    soft = GradCam.for_model(model, LAYER, "centred", "hirescam", 0.5)
    assert soft is not GradCam.for_model(model, LAYER, "centred", "hirescam")
    first = soft.compute(images, labels)
    np.testing.assert_array_equal(first.probabilities, np.asarray(model.predict_on_batch(images)))
    exact = GradCam.for_model(model, LAYER, "centred", "hirescam")(images, labels)
    assert np.abs(first.heatmaps - exact).max() > 1e-3
    model.set_weights(build_separate_relu_cnn(4).get_weights())
    second = soft.compute(images, labels)
    np.testing.assert_array_equal(second.probabilities, np.asarray(model.predict_on_batch(images)))
    assert np.abs(second.heatmaps - first.heatmaps).max() > 0.05


def test_soft_gates_refuse_a_relu_built_into_a_convolution_and_a_bad_width(trained) -> None:
    with pytest.raises(ValueError, match=r"'conv1' \(Conv2D\) has activation 'relu' built in"):
        GradCam(trained, LAYER, weighting="hirescam", gate_width=0.25)
    for width in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gate_width must be in \[0, 1.0\]"):
            GradCam(trained, LAYER, gate_width=width)


_SOFT_SCRIPT = """
import sys
import numpy as np
import keras
from braintumor.explain.gradcam import GradCam
assert keras.backend.backend() == sys.argv[1], keras.backend.backend()
model = keras.saving.load_model(sys.argv[2])
images, labels = np.load(sys.argv[3]), np.load(sys.argv[4])
soft = GradCam(model, "conv_last", weighting="hirescam", gate_width=0.5).compute(images, labels)
np.save(sys.argv[5], soft.heatmaps)
np.save(sys.argv[6], soft.probabilities)
"""


@pytest.mark.slow  # a fresh process imports the backend and keras: about a minute on 2 cores
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_soft_gates_on_the_other_backends_match_tensorflow(
    held_out, tmp_path: Path, backend: str
) -> None:
    """The localisation stage of the JAX profile measures the served map with soft gates:
    JAX (a split clone) and torch (autograd through the clone) give TensorFlow's maps."""
    probe = subprocess.run([sys.executable, "-c", f"import {backend}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{backend} is not installed in this environment")
    images, labels, _ = held_out
    model = build_separate_relu_cnn(3)
    paths = _run_on_backend(
        backend, _SOFT_SCRIPT, model, images, labels, ("maps.npy", "p.npy"), tmp_path, backend
    )
    expected = GradCam(model, LAYER, weighting="hirescam", gate_width=0.5).compute(images, labels)
    np.testing.assert_allclose(np.load(paths[3]), expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(np.load(paths[2]), expected.heatmaps, atol=1e-3)
    exact = GradCam(model, LAYER, weighting="hirescam")(images, labels)
    assert np.abs(expected.heatmaps - exact).max() > 1e-3  # the soft gates are in use
