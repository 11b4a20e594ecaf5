"""The model builder and the augmentation layers, on small random inputs."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest

from braintumor.core.schema import AugmentParams, ModelParams
from braintumor.model.augment import (
    RandomAffine,
    augment_examples,
    augmentation_layers,
    build_augmenter,
    build_training_model,
)
from braintumor.model.classifier import (
    GRAY_TO_RGB,
    NORMALIZATION,
    backbone_layers,
    build_model,
    feature_layer_name,
    normalization_layer,
    resolve_normalization,
    set_trainable,
)

SIZE = 32


def tiny(**changes) -> ModelParams:
    return ModelParams(
        **{"backbone": "tinycnn", "weights": "none", "dense_units": (16, 8), **changes}
    )


def gray_batch(count: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 1)).astype(np.float32)


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_resnet50_is_built_flat_with_its_gradcam_layer_reachable() -> None:
    model = build_model(ModelParams(weights="none"), SIZE, 4)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "no nested model"
    conv = model.get_layer("conv5_block3_out")
    grad_model = keras.Model(model.input, [conv.output, model.output])
    features, probabilities = grad_model(gray_batch())
    assert features.shape == (2, 1, 1, 2048) and probabilities.shape == (2, 4)
    names = [layer.name for layer in model.layers]
    assert names[1:3] == [GRAY_TO_RGB, NORMALIZATION]
    assert names[-1] == "head_predictions" and model.layers[-1].units == 4
    head = [n for n in names if n.startswith("head_")]
    assert head == [
        "head_pool",
        "head_bn_in",
        "head_dense1",
        "head_dropout1",
        "head_dense2",
        "head_dropout2",
        "head_bn_out",
        "head_predictions",
    ]
    assert model.get_layer("head_dense1").units == 512
    assert model.get_layer("head_dropout1").rate == pytest.approx(0.4)
    assert len(backbone_layers(model)) == len(names) - 3 - len(head)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", lambda x: keras.applications.resnet50.preprocess_input(x)),
        ("torch", lambda x: keras.applications.imagenet_utils.preprocess_input(x, mode="torch")),
        ("tf", lambda x: keras.applications.imagenet_utils.preprocess_input(x, mode="tf")),
        ("unit", lambda x: x / 255.0),
        ("raw", lambda x: x),
    ],
)
def test_normalization_matches_keras_preprocess_input(mode: str, reference) -> None:
    gray = gray_batch()
    rgb = np.repeat(gray, 3, axis=-1)
    ours = keras.ops.convert_to_numpy(normalization_layer(mode)(rgb))
    np.testing.assert_allclose(ours, reference(rgb.copy()), rtol=1e-5, atol=1e-4)


def test_auto_normalization_follows_the_backbone() -> None:
    assert resolve_normalization(ModelParams(backbone="resnet50")) == "caffe"
    assert resolve_normalization(ModelParams(backbone="mobilenetv3small")) == "raw"
    assert resolve_normalization(ModelParams(backbone="efficientnetv2b0")) == "raw"
    assert resolve_normalization(ModelParams(backbone="resnet50", normalization="unit")) == "unit"


def test_model_input_pipeline_applies_the_normalisation() -> None:
    model = build_model(ModelParams(weights="none", normalization="caffe"), SIZE, 4)
    probe = keras.Model(model.input, model.get_layer(NORMALIZATION).output)
    gray = gray_batch()
    expected = keras.applications.resnet50.preprocess_input(np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(probe(gray), expected, atol=1e-4)


def test_small_application_builds_with_a_stable_gradcam_layer() -> None:
    params = ModelParams(backbone="mobilenetv3small", weights="none", batchnorm_momentum=0.9)
    first = build_model(params, SIZE, 4)
    second = build_model(params, SIZE, 4)  # auto-names differ between builds; this does not
    for model in (first, second):
        layer = model.get_layer(feature_layer_name("mobilenetv3small"))
        assert layer.output.shape[-1] == 576
    momenta = {
        layer.momentum
        for layer in backbone_layers(first)
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}
    assert first.predict(gray_batch(), verbose=0).shape == (2, 4)


def test_weights_from_a_local_file(tmp_path: Path) -> None:
    source = build_model(tiny(), SIZE, 4)
    backbone = keras.Model(source.input, source.get_layer("top_activation").output)
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(path)
    loaded = build_model(tiny(weights=str(path)), SIZE, 4)
    for layer in backbone_layers(source):
        for a, b in zip(
            layer.get_weights(), loaded.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not 'imagenet', 'none' or an existing weights file"):
        build_model(tiny(weights=str(tmp_path / "missing.h5")), SIZE, 4)


def test_rejects_images_below_the_backbone_minimum() -> None:
    with pytest.raises(ValueError, match="below resnet50's minimum"):
        build_model(ModelParams(weights="none"), 16, 4)


def test_trainable_modes() -> None:
    model = build_model(tiny(), SIZE, 4)
    backbone = {id(layer) for layer in backbone_layers(model)}
    set_trainable(model, "head")
    assert all(not layer.trainable for layer in model.layers if id(layer) in backbone)
    assert model.get_layer("head_dense1").trainable
    set_trainable(model, "all_but_batchnorm")
    for layer in model.layers:
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable != is_batchnorm, layer.name
    set_trainable(model, "all")
    assert all(layer.trainable for layer in model.layers)
    with pytest.raises(ValueError, match="unknown mode"):
        set_trainable(model, "some")


def lite0_trainable_weight_owners(model: keras.Model) -> set[str]:
    """The names of the layers whose weights the optimizer would step."""
    owners = set()
    for layer in model.layers:
        if layer.trainable_weights:
            owners.add(layer.name)
    return owners


def test_from_block_trains_exactly_the_blocks_from_the_first_trainable_one() -> None:
    """Lite0 at 32 px, blocks 0-4 frozen: the stem and block0_ ... block4_ have no
    trainable weights, every other non-BatchNormalization layer with weights does (blocks
    5-15, top_conv, the head's dense layers), and no BatchNormalization layer does."""
    model = build_model(ModelParams(backbone="efficientnet_lite0", weights="none"), SIZE, 4)
    set_trainable(model, "from_block", 5)
    with_weights = {layer.name for layer in model.layers if layer.weights}
    batchnorm = {
        layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    }
    early = {
        name
        for name in with_weights
        if name.startswith("stem_") or any(name.startswith(f"block{i}_") for i in range(5))
    }
    assert "block4_project_conv" in early and "block5_project_conv" not in early
    assert lite0_trainable_weight_owners(model) == with_weights - batchnorm - early
    assert {"block5_dwconv", "block15_project_conv", "top_conv", "head_dense1"} <= (
        lite0_trainable_weight_owners(model)
    )
    # Mode 0 freezes the stem alone; 16 leaves only top_conv and the head.
    set_trainable(model, "from_block", 0)
    assert "stem_conv" not in lite0_trainable_weight_owners(model)
    assert "block0_dwconv" in lite0_trainable_weight_owners(model)
    set_trainable(model, "from_block", 16)
    assert {name for name in lite0_trainable_weight_owners(model) if "block" in name} == set()
    # all_but_batchnorm afterwards undoes it: the stem trains again.
    set_trainable(model, "all_but_batchnorm")
    assert "stem_conv" in lite0_trainable_weight_owners(model)


def test_from_block_refuses_a_block_the_backbone_lacks_and_a_backbone_without_blocks() -> None:
    model = build_model(ModelParams(backbone="efficientnet_lite0", weights="none"), SIZE, 4)
    with pytest.raises(ValueError, match=r"first_trainable_block: 17 is outside \[0, 16\]"):
        set_trainable(model, "from_block", 17)
    with pytest.raises(ValueError, match="first_trainable_block: .*numbered blocks"):
        set_trainable(build_model(tiny(), SIZE, 4), "from_block", 1)


def test_saved_model_needs_no_custom_objects(tmp_path: Path) -> None:
    model = build_model(tiny(), SIZE, 4)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        loaded.predict(gray_batch(), verbose=0), model.predict(gray_batch(), verbose=0), atol=1e-6
    )
    assert [len(backbone_layers(m)) for m in (model, loaded)] == [10, 10]


def test_mixed_precision_keeps_float32_probabilities(float32_policy) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model(tiny(), SIZE, 4)
    assert model.get_layer("head_dense1").compute_dtype == "float16"
    assert keras.backend.standardize_dtype(model(gray_batch()).dtype) == "float32"


def test_augmentation_matches_the_recipe_settings() -> None:
    layers = augmentation_layers(AugmentParams(), seed=1)
    assert [layer.name for layer in layers] == ["aug_affine", "aug_flip"]
    affine = layers[0]
    assert (affine.zoom, affine.width_shift, affine.height_shift) == (0.1, 0.05, 0.05)
    assert (affine.shear, affine.rotation) == (0.05, 0.0)  # degrees, as ImageDataGenerator
    assert affine.fill_mode == "nearest" and affine.interpolation == "bilinear"
    assert layers[1].mode == "horizontal"
    assert (
        augmentation_layers(
            AugmentParams(zoom=0, width_shift=0, height_shift=0, shear=0, horizontal_flip=False), 1
        )
        == []
    )


def test_random_affine_draws_within_the_ranges() -> None:
    """Each factor alone: the sampled matrices stay inside the configured ranges."""
    count, size = 256, 32
    centre = (size - 1) / 2

    def rows(**factor: float) -> np.ndarray:
        return keras.ops.convert_to_numpy(
            RandomAffine(seed=3, **factor).transforms(count, size, size)
        )

    zoom = rows(zoom=0.1)
    assert np.all(np.abs(zoom[:, [0, 4]] - 1) <= 0.1 + 1e-6)
    assert np.allclose(zoom[:, [1, 3, 6, 7]], 0)
    assert not np.allclose(zoom[:, 0], zoom[:, 4]), "x and y zoom are drawn independently"
    np.testing.assert_allclose(zoom[:, 2], centre * (1 - zoom[:, 0]), atol=1e-4)
    shift = rows(width_shift=0.05, height_shift=0.05)
    assert np.allclose(shift[:, [0, 4]], 1) and np.all(np.abs(shift[:, [2, 5]]) <= 0.05 * size)
    rotation = rows(rotation=30.0)
    angles = np.degrees(np.arctan2(rotation[:, 3], rotation[:, 0]))
    assert np.all(np.abs(angles) <= 30 + 1e-4) and angles.std() > 5
    np.testing.assert_allclose(
        rotation[:, 0] * rotation[:, 4] - rotation[:, 1] * rotation[:, 3], 1, atol=1e-5
    )
    shear = rows(shear=10.0)
    assert np.allclose(shear[:, 1], 0) and np.allclose(shear[:, 4], 1)
    assert np.all(np.abs(shear[:, 3]) <= math.sin(math.radians(10)) + 1e-6)


def test_random_affine_is_one_resampling_and_identity_when_empty() -> None:
    images = gray_batch(3)
    identity = RandomAffine(seed=1)
    np.testing.assert_array_equal(identity(images, training=True), images)
    nearest = RandomAffine(zoom=0.1, width_shift=0.05, interpolation="nearest", seed=1)
    values = set(np.unique(keras.ops.convert_to_numpy(nearest(images, training=True))))
    assert values <= set(np.unique(images)), "nearest keeps the original pixel values"


def test_augmentation_is_active_in_training_only() -> None:
    augmenter = build_augmenter(AugmentParams(shear=20.0, rotation=10.0), SIZE, seed=3)
    images = gray_batch(4)
    np.testing.assert_array_equal(augmenter(images, training=False), images)
    first = augment_examples(augmenter, images.astype(np.uint8), seed=5)
    again = augment_examples(augmenter, images.astype(np.uint8), seed=5)
    assert first.shape == (4, SIZE, SIZE, 1) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, images.astype(np.uint8))


def test_training_model_wraps_but_does_not_change_the_inference_model() -> None:
    model = build_model(tiny(), SIZE, 4)
    augmenter = build_augmenter(AugmentParams(), SIZE, seed=3)
    training = build_training_model(model, augmenter)
    assert training.input.dtype == "uint8"
    assert not any(layer.name.startswith("aug_") for layer in model.layers)
    images = gray_batch().astype(np.uint8)
    np.testing.assert_allclose(
        training.predict(images, verbose=0),
        model.predict(images.astype(np.float32), verbose=0),
        atol=1e-6,
    )
