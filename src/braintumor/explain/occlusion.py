"""Occlusion sensitivity: the gradient-free cross-check of Grad-CAM.

Slide a patch of the image's mean over a grid and record how much the class probability
drops. It needs only forward passes, so it is immune to gradient saturation and to any
error in the gradient code.
"""

from __future__ import annotations

from typing import Any, Literal

import keras
import numpy as np

from braintumor.explain.maps import (
    check_batch_size,
    check_images,
    class_indices,
    normalize_maps,
    single_input,
    single_output,
)


def _patch_starts(size: int, patch_size: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch_size + 1, stride))
    if starts[-1] != size - patch_size:
        starts.append(size - patch_size)  # cover the last rows/columns too
    return starts


def _check_patch(patch_size: int, stride: int, height: int, width: int) -> None:
    """Patch size and stride must be positive integers, and the patch must fit the image."""
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if patch_size > min(height, width):
        raise ValueError(f"patch_size {patch_size} exceeds the image size {height} x {width}")


def _fill_values(array: np.ndarray, fill: Literal["mean", "zero"] | float) -> np.ndarray:
    """The value painted over the patch, per image and channel (N, C): the image's own
    mean (the least conspicuous patch), zero, or one given number."""
    count, channels = array.shape[0], array.shape[3]
    if isinstance(fill, str):
        if fill not in ("mean", "zero"):
            raise ValueError(f"fill must be 'mean', 'zero' or a number, got {fill!r}")
        return array.mean(axis=(1, 2)) if fill == "mean" else np.zeros((count, channels))
    return np.full((count, channels), float(fill))


def _predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """The model's output on one batch, as a numpy array whatever the backend."""
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(batch)))


def _occluded_batch(
    array: np.ndarray,
    chunk: list[tuple[int, int, int]],
    fills: np.ndarray,
    patch_size: int,
) -> np.ndarray:
    """Copies of the images named in ``chunk`` (image, top, left), each with its patch
    painted over by that image's fill value; ``array`` itself is left untouched."""
    batch = array[[image for image, _, _ in chunk]].copy()
    for row, (image, top, left) in enumerate(chunk):
        batch[row, top : top + patch_size, left : left + patch_size] = fills[image]
    return batch


def _coverage(
    positions: list[tuple[int, int]], patch_size: int, height: int, width: int
) -> np.ndarray:
    """How many patch positions cover each pixel (H, W): the divisor that turns summed
    drops into each pixel's mean drop. Every pixel is covered at least once, since the
    last position of each axis is flush with the border."""
    coverage = np.zeros((height, width), dtype=np.float64)
    for top, left in positions:
        coverage[top : top + patch_size, left : left + patch_size] += 1.0
    return coverage


def occlusion_sensitivity(
    model: keras.Model,
    images: Any,
    class_index: Any = None,
    *,
    patch_size: int = 16,
    stride: int = 8,
    fill: Literal["mean", "zero"] | float = "mean",
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity maps (N, H, W), float32 in [0, 1] (Zeiler and Fergus, 2014).

    For every position of a ``patch_size`` square slid with ``stride`` (the last position
    flush with the border, so every pixel is covered), the patch is replaced by ``fill``
    (the image's mean, zero, or a number) and the drop of the class probability from the
    unoccluded image is recorded; each pixel gets the mean drop of the patches covering it.
    Negative drops (occlusion that helps the class) count as zero, and each map is scaled
    to [0, 1] like Grad-CAM's (all zeros where nothing matters). All occluded copies of all
    images stream through the model in batches of ``batch_size``.

    ``class_index`` as in ``gradcam`` (None: the predicted class). Cost: N x positions
    forward passes, e.g. 7 x 7 = 49 per 64-px image at patch 16, stride 8.
    """
    check_batch_size(batch_size)
    _, input_shape = single_input(model)
    num_classes = int(single_output(model).shape[-1])
    array = check_images(images, input_shape)
    count, height, width = array.shape[:3]
    _check_patch(patch_size, stride, height, width)
    fills = _fill_values(array, fill)

    base = np.concatenate(
        [
            _predict(model, array[start : start + batch_size])
            for start in range(0, count, batch_size)
        ]
    )
    indices = class_indices(class_index, count, num_classes).astype(np.int64)
    indices = np.where(indices < 0, base.argmax(axis=1), indices)
    base_score = base[np.arange(count), indices]

    positions = [
        (top, left)
        for top in _patch_starts(height, patch_size, stride)
        for left in _patch_starts(width, patch_size, stride)
    ]
    jobs = [(image, top, left) for image in range(count) for top, left in positions]
    drops = np.zeros((count, height, width), dtype=np.float64)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        scores = _predict(model, _occluded_batch(array, chunk, fills, patch_size))
        for row, (image, top, left) in enumerate(chunk):
            drop = base_score[image] - scores[row, indices[image]]
            drops[image, top : top + patch_size, left : left + patch_size] += max(0.0, drop)
    return normalize_maps(drops / _coverage(positions, patch_size, height, width))
