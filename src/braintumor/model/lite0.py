"""EfficientNet-Lite0 as a flat Keras functional model, layer names matching the
PyTorch state dict of the packaged ImageNet weights.

Lite0 is what the CPU quickstart fine-tunes: no squeeze-excitation, ReLU6, stem and head
not scaled, so it runs on these 2 cores and quantises well. The architecture lives here,
the weights-file format beside it (:mod:`braintumor.model.weights.files`), and the
PyTorch-to-Keras conversion, which needs both, above them
(:mod:`braintumor.model.weights.convert`): no module imports one that imports it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras

from braintumor.model.weights.files import load_backbone_weights

# EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant of the TensorFlow TPU repository):
# MBConv blocks without squeeze-excitation, ReLU6, stem and head not scaled. One row per
# stage: (repeats, kernel, stride, expand ratio, input filters, output filters).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


LITE0_STEM = 32


LITE0_HEAD = 1280


LITE0_BN_EPSILON = 1e-3  # the TensorFlow original's; PyTorch's default 1e-5 would differ


LITE0_BN_MOMENTUM = 0.99


LITE0_DROP_CONNECT = 0.2  # stochastic depth, scaled by block index as in the original


def lite0_blocks() -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand, input filters, output filters) row per MBConv block."""
    blocks = []
    for repeats, kernel, stride, expand, filters_in, filters_out in LITE0_STAGES:
        for repeat in range(repeats):
            first = repeat == 0
            blocks.append(
                (
                    kernel,
                    stride if first else 1,
                    expand,
                    filters_in if first else filters_out,
                    filters_out,
                )
            )
    return blocks


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        epsilon=LITE0_BN_EPSILON, momentum=LITE0_BN_MOMENTUM, name=name
    )


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def efficientnet_lite0(
    include_top: bool,
    weights: str | None,
    input_tensor: Any,
    name: str = "efficientnet_lite0",
    classes: int = 1000,
) -> keras.Model:
    """EfficientNet-Lite0 as a flat functional model over ``input_tensor`` (3 channels,
    already normalised as ``(x - 127) / 128``).

    Layer names follow the PyTorch state dict of the packaged ImageNet weights
    (``stem_conv`` = ``_conv_stem``, ``block{i}_dwconv`` = ``_blocks.{i}._depthwise_conv``,
    ...; see :mod:`braintumor.model.weights.convert`). ``padding="same"`` is TensorFlow's
    asymmetric SAME padding, which the weights were trained with. The last activation,
    ``top_activation``, is the Grad-CAM layer. ``include_top`` adds the ImageNet
    classifier (pooling and ``predictions``, 1000 logits, no softmax): used to check a
    conversion against the reference. ``weights`` is a ``.weights.h5`` file written by the
    ``weights`` stage (or None).
    """
    # He-style initialisation (as keras.applications' EfficientNets): with Keras's default
    # Glorot, untrained activations shrink block after block and every output is uniform.
    initializer = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")
    conv_args = {"padding": "same", "use_bias": False, "kernel_initializer": initializer}
    x = keras.layers.Conv2D(LITE0_STEM, 3, strides=2, name="stem_conv", **conv_args)(input_tensor)
    x = _relu6("stem_activation")(_bn("stem_bn")(x))
    blocks = lite0_blocks()
    for index, (kernel, stride, expand, filters_in, filters_out) in enumerate(blocks):
        prefix = f"block{index}_"
        inputs = x
        if expand != 1:
            x = keras.layers.Conv2D(
                filters_in * expand, 1, name=prefix + "expand_conv", **conv_args
            )(x)
            x = _relu6(prefix + "expand_activation")(_bn(prefix + "expand_bn")(x))
        x = keras.layers.DepthwiseConv2D(
            kernel,
            strides=stride,
            name=prefix + "dwconv",
            padding="same",
            use_bias=False,
            depthwise_initializer=initializer,
        )(x)
        x = _relu6(prefix + "activation")(_bn(prefix + "bn")(x))
        x = keras.layers.Conv2D(filters_out, 1, name=prefix + "project_conv", **conv_args)(x)
        x = _bn(prefix + "project_bn")(x)
        if stride == 1 and filters_in == filters_out:
            rate = LITE0_DROP_CONNECT * index / len(blocks)
            if rate > 0:
                x = keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
            x = keras.layers.Add(name=prefix + "add")([x, inputs])
    x = keras.layers.Conv2D(LITE0_HEAD, 1, name="top_conv", **conv_args)(x)
    x = _relu6("top_activation")(_bn("top_bn")(x))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)
    if weights is not None:
        load_backbone_weights(model, Path(weights))
    return model
