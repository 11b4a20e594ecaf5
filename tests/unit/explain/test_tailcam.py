"""The NumPy tail (``explain.tailcam``): HiResCAM and Grad-CAM at an earlier block from
one forward pass's maps equal the GradientTape's (``gradcam.GradCam``) on real slices.

The two backbones the study serves, built flat as the classifier builds them (untrained:
``weights="none"``, so their BatchNormalization statistics are set from a seeded random
draw to make every affine step non-trivial): EfficientNet-Lite0 at ``block10_add`` (its
tail: 1x1 and 5x5 depthwise convolutions, one strided, BN, ReLU6, residual adds and
drop-connect Dropout) and ResNet50 at ``conv4_block6_out`` (strided 1x1 and 3x3
convolutions with bias, a projection shortcut, BN, ReLU activations, adds). Also: a layer
that does not separate the model, a layer type the tail cannot differentiate, the file
round trip, and the fused plan serving runs on the layer cases the backbones do not reach.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from braintumor.core.schema import ModelParams, PreprocessParams
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.explain.gradcam import GradCam, tape_with_values
from braintumor.explain.tailcam import TailError, TailParams, tail_cam, tail_from_model
from braintumor.serving.export import POOL_LAYER, head_params

from serving_helpers import random_batchnorm_statistics, real_images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mirror")]

TOLERANCE = 1e-4  # serving.export.PARITY_TOLERANCE


def slices(mirror: Path, size: int) -> np.ndarray:
    """Two real msoud test slices per class, preprocessed as served: (8, S, S, 1)."""
    params = PreprocessParams()
    paths = real_images(mirror, 2, "Testing", offset=40)
    gray = [preprocess_gray(decode_image(p.read_bytes()).gray, size, params) for p in paths]
    return np.stack(gray)[..., None].astype(np.float32)


def classifier(backbone: str, size: int) -> keras.Model:
    """The classifier over ``backbone`` with random (seeded) BN statistics everywhere."""
    keras.utils.set_random_seed(3)
    return random_batchnorm_statistics(build(backbone, size))


def build(backbone: str, size: int) -> keras.Model:
    from braintumor.model.classifier import build_model

    return build_model(ModelParams(backbone=backbone, weights="none", dense_units=(16,)), size, 4)


def numpy_maps(model: keras.Model, layer: str, images: np.ndarray, method: str) -> np.ndarray:
    """What serving computes: the layer's map and the pooled features of one forward pass,
    then the head and the tail in NumPy."""
    tail = tail_from_model(model, layer, POOL_LAYER)
    taps = keras.Model(
        model.input, [model.get_layer(layer).output, model.get_layer(POOL_LAYER).output]
    )
    layer_maps, pooled = (np.asarray(v) for v in taps.predict_on_batch(images))
    size = images.shape[1:3]
    return tail_cam(head_params(model), tail, pooled, layer_maps, size, method).heatmaps


@pytest.mark.parametrize(
    ("backbone", "size", "layer"),
    [("efficientnet_lite0", 128, "block10_add"), ("resnet50", 64, "conv4_block6_out")],
)
def test_tail_maps_equal_the_gradient_tape_on_real_slices(
    mirror: Path, backbone: str, size: int, layer: str
) -> None:
    model = classifier(backbone, size)
    images = slices(mirror, size)
    for method in ("hirescam", "gradcam"):
        served = numpy_maps(model, layer, images, method)
        reference = GradCam.for_model(model, layer, "centred", method).compute(images).heatmaps  # type: ignore[arg-type]
        difference = float(np.abs(served - reference).max())
        assert difference <= TOLERANCE, (backbone, method, difference)
        assert reference.max() == 1.0  # real, non-flat maps compared
    # HiResCAM at the block is not Grad-CAM at the last map (the check can tell them apart).
    last = GradCam.for_model(
        model, "top_activation" if backbone != "resnet50" else "conv5_block3_out"
    )
    assert np.abs(numpy_maps(model, layer, images, "hirescam") - last(images)).max() > 0.05


def test_keras_values_give_the_tape_maps_and_their_gates(mirror: Path) -> None:
    """The export's parity check runs the tail's backward on Keras's own values at every
    tail layer (``TailParams.value_layers``), so a ReLU6 input within float rounding of 0
    or 6, which the NumPy forward may gate the other way, cannot move the compared map.
    Those maps equal the GradientTape's; the gates really come from the values given
    (saturating some of them moves the map); a wrong number of values is refused."""
    model = classifier("efficientnet_lite0", 128)
    images = slices(mirror, 128)
    tail = tail_from_model(model, "block10_add", POOL_LAYER)
    names = tail.value_layers
    assert names[0] == "block10_add" and names[-1] == "top_activation"
    assert len(set(names)) == len(names) and len(names) < len(tail.steps) + 1  # fused
    taps = keras.Model(
        model.input,
        [*(model.get_layer(n).output for n in names), model.get_layer(POOL_LAYER).output],
    )
    *values, pooled = (np.asarray(v) for v in taps.predict_on_batch(images))
    head = head_params(model)
    given = tail_cam(head, tail, pooled, values[0], (128, 128), "hirescam", values=values)
    reference = GradCam.for_model(model, "block10_add", "centred", "hirescam").compute(images)  # type: ignore[arg-type]
    assert np.abs(given.heatmaps - reference.heatmaps).max() <= TOLERANCE
    own_pooled, own = tail.forward(values[0])
    for mine, theirs in zip(own[1:], values[1:], strict=True):
        assert np.abs(mine - theirs).max() <= 1e-5 * max(1.0, float(np.abs(theirs).max()))
    assert np.abs(own_pooled - pooled).max() <= 1e-4
    # Saturate every other open ReLU6 gate of the last activation: the gradient stops there.
    last = values[-1].copy()
    open_gates = (last > 0) & (last < 6)
    open_gates[..., ::2] = False
    last[open_gates] = 6.0
    flipped = tail_cam(
        head, tail, pooled, values[0], (128, 128), "hirescam", values=[*values[:-1], last]
    )
    assert np.abs(flipped.heatmaps - given.heatmaps).max() > 0.05
    with pytest.raises(TailError, match="values given") as caught:
        tail_cam(head, tail, pooled, values[0], (128, 128), "hirescam", values=values[:-1])
    assert "\n" not in str(caught.value)


def test_tape_with_values_is_one_pass_of_gradcam_with_its_values(mirror: Path) -> None:
    """The export's parity reference: GradCam's maps, classes and the tail's values from
    one forward pass, on which the NumPy tail's backward equals the tape to float rounding
    (two passes may round a ReLU input across its gate; one pass cannot)."""
    model = classifier("efficientnet_lite0", 128)
    images = slices(mirror, 128)
    tail = tail_from_model(model, "block10_add", POOL_LAYER)
    maps, classes, found = tape_with_values(
        model, "block10_add", images, [*tail.value_layers, POOL_LAYER], "hirescam"
    )
    reference = GradCam.for_model(model, "block10_add", "centred", "hirescam").compute(images)  # type: ignore[arg-type]
    assert np.abs(maps - reference.heatmaps).max() <= TOLERANCE
    np.testing.assert_array_equal(classes, reference.class_indices)
    *values, pooled = found
    taps = keras.Model(model.input, model.get_layer(POOL_LAYER).output)
    assert np.abs(pooled - np.asarray(taps.predict_on_batch(images))).max() <= 1e-4
    numpy = tail_cam(head_params(model), tail, pooled, values[0], (128, 128), values=values)
    assert np.abs(numpy.heatmaps - maps).max() <= 1e-5
    np.testing.assert_array_equal(numpy.class_indices, classes)


def test_tail_is_read_as_the_backbone_has_it() -> None:
    model = build("efficientnet_lite0", 64)
    tail = tail_from_model(model, "block10_add", POOL_LAYER)
    kinds = [step.kind for step in tail.steps]
    assert kinds.count("depthwise") == 5 and kinds.count("add") == 3  # blocks 11-15
    assert kinds[-3:] == ["conv", "affine", "relu"]  # top_conv, top_bn, top_activation
    strided = [step.name for step in tail.steps if step.config.get("stride") == 2]
    assert strided == ["block11_dwconv"]
    assert all(len(step.inputs) == 2 for step in tail.steps if step.kind == "add")


def test_layer_that_does_not_separate_the_model_is_refused() -> None:
    """Inside a residual block the skip connection bypasses the layer."""
    model = build("efficientnet_lite0", 64)
    with pytest.raises(TailError, match="'block12_project_bn' does not separate") as caught:
        tail_from_model(model, "block12_project_bn", POOL_LAYER)
    assert "\n" not in str(caught.value)


def test_unsupported_layer_is_refused_in_one_line() -> None:
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="first")(inputs)
    x = keras.layers.MaxPooling2D(name="pooling")(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    with pytest.raises(TailError, match=r"tail layer 'pooling' \(MaxPooling2D\)") as caught:
        tail_from_model(model, "first", POOL_LAYER)
    assert "\n" not in str(caught.value)


def test_file_round_trip_and_a_bad_file(tmp_path: Path) -> None:
    model = build("resnet50", 64)
    tail = tail_from_model(model, "conv4_block6_out", POOL_LAYER)
    tail.save(tmp_path / "tail.npz")
    loaded = TailParams.load(tmp_path / "tail.npz")
    assert loaded.layer == "conv4_block6_out" and len(loaded.steps) == len(tail.steps)
    maps = np.random.default_rng(0).uniform(0, 1, (1, 4, 4, 1024)).astype(np.float32)
    assert np.array_equal(loaded.forward(maps)[0], tail.forward(maps)[0])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(TailError, match=r"bad\.npz: not a tail-parameters file"):
        TailParams.load(tmp_path / "bad.npz")


def fused_cases() -> keras.Model:
    """The layer cases the two backbones do not reach, from the input (the chosen map,
    ``start``) to the pooling: a valid, strided depthwise with bias, an odd map, channel
    multiplier 2, a 3 x 3 strided convolution with BN and ReLU6, BN after an add (not
    folded), zero padding and a ReLU whose input two steps read (not fused)."""
    keras.utils.set_random_seed(7)
    layers = keras.layers
    inputs = keras.Input((9, 9, 6))
    start = layers.Activation("linear", name="start")(inputs)  # the chosen map: the input
    x = layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=True, name="dw")(start)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(6.0, name="dw_relu")(x)
    y = layers.DepthwiseConv2D(5, padding="same", depth_multiplier=2, name="dw2")(x)
    y = layers.Conv2D(6, 1, name="project")(y)
    y = layers.Add(name="add")([x, y])
    y = layers.BatchNormalization(name="add_bn")(y)
    z = layers.ReLU(name="shared_relu")(y)
    z = layers.Add(name="add2")([z, layers.Conv2D(6, 1, name="side")(z)])
    z = layers.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(z)
    z = layers.Conv2D(8, 3, strides=2, padding="same", name="conv3")(z)
    z = layers.BatchNormalization(name="conv3_bn")(z)
    z = layers.Activation("relu6", name="conv3_relu")(z)
    pooled = layers.GlobalAveragePooling2D(name=POOL_LAYER)(z)
    model = keras.Model(inputs, pooled)
    rng = np.random.default_rng(2)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, shape).astype("float32"))
    return model


def tape_gradient(model: keras.Model, maps: np.ndarray, weights: np.ndarray) -> tuple[Any, Any]:
    """The model's output on ``maps`` and the GradientTape gradient of ``sum(out * w)``."""
    import tensorflow as tf

    tensor = tf.constant(maps)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        out = model(tensor, training=False)
        score = tf.reduce_sum(out * weights)
    return np.asarray(out), np.asarray(tape.gradient(score, tensor))


def test_fused_layers_equal_the_gradient_tape() -> None:
    """The fused plan (BN folded into the convolution before it, ReLU clipped in place,
    depthwise as one einsum) on ``fused_cases``. Forward and input gradient, batch of 3."""
    model = fused_cases()
    rng = np.random.default_rng(2)
    tail = tail_from_model(model, "start", POOL_LAYER)
    assert len(tail._plan.ops) < len([s for s in tail.steps if s.kind != "identity"])
    maps = rng.uniform(-20, 40, (3, 9, 9, 6)).astype(np.float32)  # ReLU6 caps some
    weights = rng.normal(0, 1, (3, 8)).astype(np.float32)
    out, expected = tape_gradient(model, maps, weights)
    served, values = tail.forward(maps)
    assert all((values[i] == 6.0).any() for i in (1, -1))  # both ReLU6 masks have a cap
    assert np.abs(served - out).max() <= 1e-5
    gradient = tail.backward(values, weights)
    assert np.abs(gradient - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    assert np.abs(expected).max() > 0.01  # a real gradient compared


# --------------------------------------------------------------------------- soft gates


def test_soft_gates_equal_the_soft_clones_gradient_tape() -> None:
    """``gate_width`` > 0: the NumPy backward (fused and plain ReLUs, ReLU and ReLU6, both
    ramps) equals the GradientTape through ``softgates.soft_gate_clone``, whose forward is
    the model's exactly; the gradient differs from the exact one (the ramps are used)."""
    from braintumor.explain.softgates import copy_weights, soft_gate_clone

    model = fused_cases()
    clone = soft_gate_clone(model, 0.5)
    copy_weights(list(clone.variables), list(model.variables))
    rng = np.random.default_rng(4)
    maps = rng.uniform(-20, 40, (3, 9, 9, 6)).astype(np.float32)
    weights = rng.normal(0, 1, (3, 8)).astype(np.float32)
    out, exact = tape_gradient(model, maps, weights)
    clone_out, expected = tape_gradient(clone, maps, weights)
    np.testing.assert_array_equal(clone_out, out)
    soft = replace(tail_from_model(model, "start", POOL_LAYER), gate_width=0.5)
    _, values = soft.forward(maps)
    ramped = [v for v in values[1:] if ((v > 0) & (v < 0.5)).any() or ((v > 5.5) & (v < 6)).any()]
    assert ramped  # some units sit on the ramps
    gradient = soft.backward(values, weights)
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(gradient - expected).max() <= 1e-5 * scale
    assert np.abs(expected - exact).max() > 1e-3 * scale


def test_soft_gates_do_not_jump_where_an_exact_gate_flips(mirror: Path) -> None:
    """Real slices through Lite0's tail from ``block10_add``: the last ReLU6's open units
    within what LiteRT's and Keras's values differ by there (1e-4 to 3.5e-4 measured on the
    quickstart model) pushed to 0 close their exact gates, and the HiResCAM map moves
    beyond the parity bound; with soft gates of 0.25 it moves by that push's share of the
    ramp only (each gate by at most 2e-4 / 0.25)."""
    model = classifier("efficientnet_lite0", 128)
    images = slices(mirror, 128)
    exact = tail_from_model(model, "block10_add", POOL_LAYER)
    soft = replace(exact, gate_width=0.25)
    taps = keras.Model(
        model.input,
        [
            *(model.get_layer(n).output for n in exact.value_layers),
            model.get_layer(POOL_LAYER).output,
        ],
    )
    *values, pooled = (np.asarray(v) for v in taps.predict_on_batch(images))
    last = values[-1].copy()
    near = (last > 0) & (last < 2e-4)
    assert near.sum() >= 3  # units to flip on real slices
    last[near] = 0.0
    pushed = [*values[:-1], last]
    head = head_params(model)
    moved = {}
    for name, tail in (("exact", exact), ("soft", soft)):
        before, after = (
            tail_cam(head, tail, pooled, values[0], (128, 128), "hirescam", values=given).heatmaps
            for given in (values, pushed)
        )
        moved[name] = float(np.abs(after - before).max())
    assert moved["soft"] <= TOLERANCE / 10 and TOLERANCE < moved["exact"], moved
    assert moved["soft"] * 100 < moved["exact"], moved
