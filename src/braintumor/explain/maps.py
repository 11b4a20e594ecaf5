"""What every explanation method shares: input checks against the model, class choice and
map scaling, so that Grad-CAM and occlusion refuse the same bad input with the same words
and return maps on the same [0, 1] scale (all zeros, never NaN, where nothing stands out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # annotations only: the serving install (``headcam``) has no Keras
    import keras


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each map of a stack (N, h, w) to [0, 1] by its own minimum and range.

    A map whose range is zero, or negligible next to its magnitude (float noise on a
    constant), becomes all zeros rather than 0 / 0 = NaN: it marks no location. NaN or
    infinite entries, which only a broken model produces, are treated as zero.
    """
    values = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if values.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {values.shape}")
    low = values.min(axis=(1, 2), keepdims=True)
    high = values.max(axis=(1, 2), keepdims=True)
    spread = high - low
    scale = np.maximum(np.abs(high), np.abs(low))
    informative = spread > 1e-6 * scale
    scaled = np.divide(
        values - low, spread, out=np.zeros_like(values), where=informative & (spread > 0)
    )
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    if maps.shape[1:] == (height, width):
        return maps.astype(np.float32, copy=False)
    resized = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for index, heatmap in enumerate(maps):
        resized[index] = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized


def single_input(model: keras.Model) -> tuple[Any, tuple[int | None, ...]]:
    inputs = model.inputs
    if inputs is None or len(inputs) != 1:
        raise ValueError("Grad-CAM needs a functional model with exactly one input")
    return inputs[0], tuple(inputs[0].shape)


def single_output(model: keras.Model) -> Any:
    outputs = model.outputs
    if outputs is None or len(outputs) != 1:
        raise ValueError("Grad-CAM needs a functional model with exactly one output")
    output = outputs[0]
    if len(output.shape) != 2:
        raise ValueError(
            f"the model's output must be (N, classes), got shape {tuple(output.shape)}"
        )
    return output


def check_images(images: Any, input_shape: tuple[int | None, ...]) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != len(input_shape):
        raise ValueError(
            f"images must have shape (N, {', '.join(map(str, input_shape[1:]))}) like the "
            f"model input, got {array.shape}"
        )
    for axis, (expected, actual) in enumerate(
        zip(input_shape[1:], array.shape[1:], strict=True), start=1
    ):
        if expected is not None and expected != actual:
            raise ValueError(
                f"images axis {axis} is {actual} but the model expects {expected} "
                f"(input shape {input_shape})"
            )
    if array.shape[0] == 0:
        raise ValueError("images is empty")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("images hold NaN or infinite values")
    return array


def class_indices(class_index: Any, count: int, num_classes: int) -> np.ndarray:
    """-1 marks "the predicted class"; anything else is checked against the class count."""
    if class_index is None:
        return np.full(count, -1, dtype=np.int32)
    indices = np.asarray(class_index)
    if indices.dtype.kind not in "iu":
        raise ValueError(f"class_index must be an integer or integers, got {class_index!r}")
    if indices.ndim == 0:
        indices = np.full(count, int(indices))
    if indices.shape != (count,):
        raise ValueError(
            f"class_index must be one integer or {count} integers, got {indices.shape}"
        )
    if indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(f"class_index must be in [0, {num_classes - 1}], got {class_index!r}")
    return indices.astype(np.int32)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def activation_name(activation: Any) -> str:
    """An activation function's serialised name (``relu``, ``relu6``, ``linear``...): how
    the NumPy tail and the soft-gate clone tell a ReLU layer (imports Keras on call)."""
    import keras

    serialised = keras.activations.serialize(activation)
    return serialised if isinstance(serialised, str) else str(serialised.get("config", ""))
