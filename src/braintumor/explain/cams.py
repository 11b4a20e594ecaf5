"""Every explanation method by name, at a named layer: one call for a comparison.

``explanation_maps(model, images, "hirescam", "block10_add", classes)`` returns maps on
the common [0, 1] scale at input size, whatever the method; the localisation stage loops
over methods and layers with it. The gradient methods (``gradcam``, ``hirescam``,
``gradcampp``: one forward and backward pass, :mod:`braintumor.explain.gradcam`) take a
layer; ``occlusion`` (:mod:`braintumor.explain.occlusion`) works on the input and takes
none (``INPUT_LAYER``); it costs a forward pass per patch position. To compare several
gradient methods at a layer, ``gradient_maps`` gives them all from one forward and backward
pass (the weightings share the layer's feature maps and gradients), each map equal to the
one ``explanation_maps`` gives for that method alone.

Layers are named in the parameters, not guessed: a backbone's block at output stride 16
(``block10_add`` of EfficientNet-Lite0, 8 x 8 at 128 px; ``conv4_block6_out`` of
ResNet50) places a small tumour where the last map (4 x 4 at 128 px for Lite0) cannot,
and the last layer at a stride is not always a block's output (Lite0's next block expands
at 8 x 8 before its strided convolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from braintumor.explain.gradcam import WEIGHTINGS, GradCam
from braintumor.explain.occlusion import occlusion_sensitivity

OCCLUSION = "occlusion"
METHODS: tuple[str, ...] = (*WEIGHTINGS, OCCLUSION)
INPUT_LAYER = "input"


def explanation_maps(
    model: keras.Model,
    images: Any,
    method: str,
    layer: str,
    class_index: Any = None,
    *,
    batch_size: int = 16,
    occlusion_patch: int = 16,
    occlusion_stride: int = 8,
    gate_width: float = 0.0,
) -> np.ndarray:
    """Maps (N, H, W) float32 in [0, 1] of ``method`` (one of ``METHODS``) at ``layer``
    (a top-level layer name; ``INPUT_LAYER`` for occlusion), explaining ``class_index``
    (None: the predicted class; an int; one per image). ``gate_width``: the gradient
    methods' soft ReLU gates (``explain.softgates``; 0: the exact gradient)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == OCCLUSION:
        if layer != INPUT_LAYER:
            raise ValueError(f"occlusion works on the input: layer must be {INPUT_LAYER!r}")
        return occlusion_sensitivity(
            model,
            images,
            class_index,
            patch_size=occlusion_patch,
            stride=occlusion_stride,
            batch_size=max(batch_size, 64),
        )
    instance = GradCam.for_model(model, layer, "centred", method, gate_width)  # type: ignore[arg-type]
    return instance(images, class_index, batch_size=batch_size)


def gradient_maps(
    model: keras.Model,
    images: Any,
    methods: Sequence[str],
    layer: str,
    class_index: Any = None,
    *,
    batch_size: int = 16,
    gate_width: float = 0.0,
) -> dict[str, np.ndarray]:
    """Maps (N, H, W) float32 in [0, 1] of each gradient method in ``methods`` (distinct
    names among ``WEIGHTINGS``) at ``layer``, by method, from one forward and backward pass
    per batch instead of one per method; ``gate_width`` as ``explanation_maps``'s."""
    for method in methods:
        if method not in WEIGHTINGS:
            raise ValueError(f"gradient method must be one of {WEIGHTINGS}, got {method!r}")
    instance = GradCam.for_model(
        model,
        layer,
        "centred",
        tuple(methods),  # type: ignore[arg-type]
        gate_width,
    )
    result = instance.compute(images, class_index, batch_size=batch_size)
    return dict(result.each)
