"""The classifier: a Keras application backbone, built flat, under the study's head.

The model takes what the preprocess stage caches: gray images of shape (N, H, W, 1) in the
0-255 range (uint8 or float). Inside the model the channel is replicated to three and the
input normalisation the backbone's weights expect is applied, so training, evaluation, the
app and the registered model all share one preprocessing path. The backbone is built with
``input_tensor=`` so its layers sit directly in the model (``conv5_block3_out`` stays
reachable for Grad-CAM; a nested base model gives "Graph disconnected").

Only built-in Keras layers are used, so ``keras.saving.load_model`` needs no custom
objects, on any backend.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from braintumor.core.schema import ConfigError, ModelParams
from braintumor.model.lite0 import efficientnet_lite0

GRAY_TO_RGB = "input_gray_to_rgb"
NORMALIZATION = "input_normalization"
HEAD_PREFIX = "head_"
OUTPUT = "head_predictions"

TRAINABLE_MODES = ("head", "all_but_batchnorm", "all", "from_block")
# A backbone block's layers are named ``block{index}_...`` (efficientnet_lite0).
BLOCK_NAME = re.compile(r"block(\d+)_")

# Backbones whose ImageNet weights the ``weights`` stage converts from a package (no hub).
PRETRAINED_BY_STAGE = ("efficientnet_lite0",)

# Per-channel constants of keras.applications.imagenet_utils.preprocess_input.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what its weights expect."""

    build: Callable[..., keras.Model]
    normalization: str  # what ``auto`` means for this backbone
    feature_layer: str  # its last convolutional block, for Grad-CAM
    min_size: int


def _resnet50(**kwargs: Any) -> keras.Model:
    return keras.applications.ResNet50(**kwargs)


def _mobilenetv3small(**kwargs: Any) -> keras.Model:
    # include_preprocessing: the model rescales 0-255 input itself.
    return keras.applications.MobileNetV3Small(include_preprocessing=True, **kwargs)


def _efficientnetv2b0(**kwargs: Any) -> keras.Model:
    return keras.applications.EfficientNetV2B0(include_preprocessing=True, **kwargs)


def _tinycnn(
    include_top: bool, weights: str | None, input_tensor: Any, name: str = "tinycnn"
) -> keras.Model:
    """Three conv-BN-ReLU blocks: a backbone that traces in seconds, for tests."""
    del include_top
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="tiny_rescaling")(input_tensor)
    for block, filters in enumerate((16, 32, 64), start=1):
        x = keras.layers.Conv2D(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{block}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"tiny_bn{block}")(x)
        x = keras.layers.Activation(
            "relu", name="top_activation" if block == 3 else f"tiny_relu{block}"
        )(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(_resnet50, "caffe", "conv5_block3_out", 32),
    "mobilenetv3small": BackboneSpec(_mobilenetv3small, "raw", "top_activation", 32),
    "efficientnetv2b0": BackboneSpec(_efficientnetv2b0, "raw", "top_activation", 32),
    "efficientnet_lite0": BackboneSpec(efficientnet_lite0, "lite", "top_activation", 32),
    "tinycnn": BackboneSpec(_tinycnn, "raw", "top_activation", 8),
}


def resolve_normalization(params: ModelParams) -> str:
    """The input scaling actually applied: ``auto`` becomes the backbone's own."""
    spec = _spec(params.backbone)
    return spec.normalization if params.normalization == "auto" else params.normalization


def feature_layer_name(backbone: str) -> str:
    """The backbone's last convolutional block (the Grad-CAM layer of the recipe)."""
    return _spec(backbone).feature_layer


def _spec(backbone: str) -> BackboneSpec:
    if backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown {backbone!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[backbone]


def _resolve_weights(backbone: str, weights: str, pretrained: Path | None) -> str | None:
    """What the backbone builder gets: None, ``"imagenet"`` (Keras downloads it) or a file.

    For ``efficientnet_lite0`` ImageNet weights come from a package, converted once by the
    ``weights`` stage (``pretrained.py``) into the file ``pretrained`` names.
    """
    if weights == "none":
        return None
    if weights == "imagenet":
        if backbone not in PRETRAINED_BY_STAGE:
            return "imagenet"
        if pretrained is None or not Path(pretrained).is_file():
            raise ConfigError(
                f"model.weights: imagenet for {backbone} needs the converted weights file "
                f"{pretrained or 'models/pretrained/...'}; run `dvc repro weights` "
                "(or set model.weights: none)"
            )
        return str(pretrained)
    if not Path(weights).is_file():
        raise ConfigError(
            f"model.weights: {weights!r} is not 'imagenet', 'none' or an existing weights file"
        )
    return str(weights)


def normalization_layer(mode: str) -> keras.layers.Layer:
    """A ``Rescaling`` layer mapping replicated-gray 0-255 input to what ``mode`` expects.

    ``caffe`` is ``keras.applications.resnet50.preprocess_input`` (RGB to BGR, minus the
    ImageNet mean; the channel flip is a no-op on gray but the per-channel means are not),
    ``torch`` divides by 255 and standardises per channel, ``tf`` maps to [-1, 1], ``unit``
    divides by 255 (the study), ``lite`` is ``(x - 127) / 128`` (what the EfficientNet-Lite
    ImageNet weights were trained on; ImageNet mean/std loses half their top-1 on photos),
    ``raw`` leaves the values (backbones that rescale
    themselves).
    """
    if mode == "caffe":
        scale: Any = 1.0
        offset: Any = [-mean for mean in _CAFFE_MEAN_BGR]
    elif mode == "torch":
        scale = [1.0 / (255.0 * s) for s in _TORCH_STD]
        offset = [-m / s for m, s in zip(_TORCH_MEAN, _TORCH_STD, strict=True)]
    elif mode == "tf":
        scale, offset = 1.0 / 127.5, -1.0
    elif mode == "lite":
        scale, offset = 1.0 / 128.0, -127.0 / 128.0
    elif mode == "unit":
        scale, offset = 1.0 / 255.0, 0.0
    elif mode == "raw":
        scale, offset = 1.0, 0.0
    else:
        raise ValueError(f"model.normalization: unknown {mode!r}")
    return keras.layers.Rescaling(scale, offset=offset, name=NORMALIZATION)


def build_model(
    params: ModelParams,
    image_size: int,
    num_classes: int,
    *,
    name: str = "braintumor",
    pretrained: Path | None = None,
) -> keras.Model:
    """The inference model: (N, size, size, 1) 0-255 gray in, class probabilities out.

    Structure: gray to 3 channels, input normalisation, the backbone (flat), then the
    study's head: global average pooling, BatchNormalization, ``dense_units`` ReLU layers
    each followed by dropout, BatchNormalization, and a float32 softmax (float32 even under
    a mixed-precision policy, so probabilities and the loss stay stable).
    ``pretrained`` is the weights stage's converted file, used when ``params.weights`` is
    ``imagenet`` for a backbone whose ImageNet weights come from a package.
    """
    spec = _spec(params.backbone)
    if image_size < spec.min_size:
        raise ConfigError(
            f"common.image_size: {image_size} is below {params.backbone}'s minimum {spec.min_size}"
        )
    weights = _resolve_weights(params.backbone, params.weights, pretrained)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    rgb = keras.layers.Concatenate(axis=-1, name=GRAY_TO_RGB)([inputs, inputs, inputs])
    normalised = normalization_layer(resolve_normalization(params))(rgb)
    backbone = spec.build(include_top=False, weights=weights, input_tensor=normalised)
    features = backbone.output
    last = features._keras_history.operation
    if last.name != spec.feature_layer:
        # Applications leave their final activation auto-named ("activation_17"), which
        # differs between builds; give it the stable name Grad-CAM looks up.
        last.name = spec.feature_layer
    if params.batchnorm_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = params.batchnorm_momentum
    x = keras.layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(features)
    x = keras.layers.BatchNormalization(name=f"{HEAD_PREFIX}bn_in")(x)
    for index, units in enumerate(params.dense_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"{HEAD_PREFIX}dense{index}")(x)
        x = keras.layers.Dropout(params.dropout, name=f"{HEAD_PREFIX}dropout{index}")(x)
    x = keras.layers.BatchNormalization(name=f"{HEAD_PREFIX}bn_out")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=OUTPUT)(x)
    return keras.Model(inputs, outputs, name=name)


def is_head_layer(layer: keras.layers.Layer) -> bool:
    return layer.name.startswith(HEAD_PREFIX)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers of a model from ``build_model`` (also after loading it)."""
    return [
        layer
        for layer in model.layers
        if not is_head_layer(layer)
        and not isinstance(layer, keras.layers.InputLayer)
        and layer.name not in (GRAY_TO_RGB, NORMALIZATION)
    ]


def frozen_before_block(model: keras.Model, first_block: int) -> set[int]:
    """Ids of the backbone layers that come before block ``first_block``: the stem and
    every ``block{i}_`` layer with ``i < first_block``.

    By name, not by position: the stem's layers (``stem_*``) and numbered blocks are what
    a backbone built with ``lite0.efficientnet_lite0`` has; a backbone without numbered
    blocks, or a ``first_block`` past its last one, is refused with one line.
    """
    layers = backbone_layers(model)
    numbers = {
        id(layer): int(match.group(1))
        for layer in layers
        if (match := BLOCK_NAME.match(layer.name)) is not None
    }
    if not numbers:
        raise ConfigError(
            "first_trainable_block: trainable from_block needs a backbone with numbered "
            "blocks (block0_...), such as efficientnet_lite0"
        )
    last = max(numbers.values())
    if not 0 <= first_block <= last + 1:
        raise ConfigError(
            f"first_trainable_block: {first_block} is outside [0, {last + 1}] "
            f"(the backbone has blocks 0-{last})"
        )
    return {
        id(layer)
        for layer in layers
        if layer.name.startswith("stem_") or numbers.get(id(layer), first_block) < first_block
    }


def set_trainable(model: keras.Model, mode: str, first_block: int = 0) -> None:
    """Choose what trains; the caller must compile again afterwards.

    ``head``: only the head (the recipe's phase 1). ``all_but_batchnorm``: everything except
    BatchNormalization layers, which stay frozen and, being non-trainable, run in inference
    mode with their moving statistics unchanged (the recipe's phase 2, as Keras advises for
    fine-tuning). ``all``: everything, for training from scratch. ``from_block``: as
    ``all_but_batchnorm``, but the stem and the blocks before ``first_block`` stay frozen
    too (``frozen_before_block``), so back-propagation stops at block ``first_block``.
    """
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"trainable: unknown mode {mode!r} (known: {', '.join(TRAINABLE_MODES)})")
    model.trainable = True
    backbone = {id(layer) for layer in backbone_layers(model)}
    early = frozen_before_block(model, first_block) if mode == "from_block" else set()
    for layer in model.layers:
        if mode == "head":
            layer.trainable = id(layer) not in backbone
        elif mode in ("all_but_batchnorm", "from_block"):
            layer.trainable = (
                not isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in early
            )
        else:
            layer.trainable = True
