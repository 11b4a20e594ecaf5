"""Robustness of a classifier to realistic changes of its input slices.

Test accuracy says how a model does on images made like its training images. A slice
from another scanner, exported with another window, re-compressed by a viewer or a chat
tool, acquired at a lower resolution or positioned a little differently is still the same
diagnosis, and a model that changes its answer for it has learnt the acquisition instead of
the anatomy. This module perturbs the RAW gray uint8 slices (as ``imaging.decode_image``
returns them) and only then applies the project's preprocessing
(``imaging.preprocess_gray``), so the perturbed input goes through exactly what serving
does to an upload, CLAHE included (which undoes part of a global intensity change: that
is part of the pipeline's robustness, and is measured with it).

The catalogue (``PERTURBATIONS``), each a kind at a level, in this order; why each level:

- ``clean``: the slice as it is, the reference; always first.
- ``gamma_0.7``, ``gamma_1.4``: ``255 * (x / 255) ** g``, another window or display curve.
  About +-0.35 in log, a symmetric pair of clearly visible but plausible changes of the
  mid-tones (black and white stay).
- ``contrast_0.7``, ``contrast_1.3``: ``(x - mean) * c + mean`` about the slice's mean (as
  the training augmentation), a window 30% wider or narrower.
- ``brightness_minus25``, ``brightness_plus25``: ``x + d`` with d = 25 gray levels (about 10% of
  the range), another window level; the black background is lifted too.
- ``noise_5``, ``noise_10``: additive Gaussian noise of standard deviation 5 and 10 gray
  levels, a lower signal-to-noise acquisition. MRI magnitude noise is Rician, close to
  Gaussian in tissue; clipping at 0 gives the background its positive bias. 5 matches the
  fine-scale variation already in tissue (median 4.6 gray levels, a robust high-pass
  estimate over 88 msoud test slices, texture included), so it doubles the noise variance;
  10 is plainly grainy.
- ``jpeg_60``, ``jpeg_30``: re-encoded as JPEG at quality 60 and 30 (libjpeg). The msoud
  files are JPEGs of quality 75 already (their quantisation tables); 60 is a typical web or
  messaging re-compression, 30 shows 8 x 8 blocking.
- ``downscale_0.5``, ``downscale_0.25``: down-sampled by 0.5 and 0.25 (area averaging) and
  up-sampled back (bilinear), a coarser acquisition matrix. The effect depends on the raw
  size against the model's input size: the mirror's slices are 224 px, so 0.5 (112 px)
  blurs what a 224 px model sees but hardly what a 96 px one does; 0.25 (56 px) blurs both.
- ``rotate_5``, ``rotate_10``: rotation by 5 and 10 degrees about the centre (bilinear,
  black fill), clockwise or anticlockwise at random per slice: head tilt. The study's
  augmentation has no rotation, so this tests an invariance training did not teach.
- ``shift_0.05``, ``shift_0.1``: translation by 5% and 10% of the side in a random
  direction per slice (whole pixels, black fill): positioning. Training shifts by up to
  5%, so 0.05 is inside what training showed and 0.1 beyond it.

Which perturbations run, and the seed of the random ones (noise, the rotation's sign, the
shift's direction), come from ``evaluate.robustness`` in ``params.yaml``. Each slice draws
from its own generator seeded by (seed, perturbation name, position), so the result does
not depend on batching or on which other perturbations run.

Core layer: pure functions on arrays (numpy, OpenCV); imports the config dataclasses,
``imaging`` and ``io_utils`` only, and matplotlib inside the figure functions.
"""

from __future__ import annotations

import math
import types
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braintumor.core.schema import PreprocessParams, RobustnessParams
from braintumor.data.imaging import preprocess_gray
from braintumor.reports.figures import new_figure, save_figure

CLEAN = "clean"


class RobustnessError(ValueError):
    """An unknown perturbation, a bad image or inconsistent predictions."""


@dataclass(frozen=True)
class Perturbation:
    """One entry of the catalogue: ``kind`` (a function of ``KINDS``) at ``level``."""

    name: str
    kind: str
    level: float
    description: str


def _check_gray(gray: np.ndarray) -> None:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        shape = getattr(gray, "shape", None)
        raise RobustnessError(
            f"expected a 2-D uint8 image, got {getattr(gray, 'dtype', type(gray))} {shape}"
        )


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _identity(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    return gray.copy()


def _gamma(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    table = _to_uint8(255.0 * (np.arange(256) / 255.0) ** level)
    return cv2.LUT(gray, table)


def _contrast(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    mean = float(gray.mean())
    return _to_uint8((gray.astype(np.float32) - mean) * level + mean)


def _brightness(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(gray.astype(np.float32) + level)


def _noise(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(gray + rng.normal(0.0, level, gray.shape))


def _jpeg(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    encoded, data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(level)])
    if not encoded:
        raise RobustnessError(f"JPEG encoding at quality {level} failed")
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def _downscale(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    height, width = gray.shape
    small = (max(1, round(width * level)), max(1, round(height * level)))
    reduced = cv2.resize(gray, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(reduced, (width, height), interpolation=cv2.INTER_LINEAR)


def _warp(gray: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    height, width = gray.shape
    return cv2.warpAffine(
        gray,
        matrix,
        (width, height),
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def _rotate(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    height, width = gray.shape
    angle = level if rng.random() < 0.5 else -level
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    return _warp(gray, matrix, cv2.INTER_LINEAR)


def _shift(gray: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    height, width = gray.shape
    direction = rng.uniform(0.0, 2.0 * math.pi)
    shift_x = round(level * width * math.cos(direction))
    shift_y = round(level * height * math.sin(direction))
    matrix = np.array([[1.0, 0.0, shift_x], [0.0, 1.0, shift_y]])
    return _warp(gray, matrix, cv2.INTER_NEAREST)


PerturbationFunction = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# What each kind does to a 2-D uint8 slice at a level (units in the module docstring).
KINDS: Mapping[str, PerturbationFunction] = types.MappingProxyType(
    {
        "identity": _identity,
        "gamma": _gamma,
        "contrast": _contrast,
        "brightness": _brightness,
        "noise": _noise,
        "jpeg": _jpeg,
        "downscale": _downscale,
        "rotate": _rotate,
        "shift": _shift,
    }
)

_CATALOGUE = (
    Perturbation(CLEAN, "identity", 0.0, "unperturbed"),
    Perturbation("gamma_0.7", "gamma", 0.7, "gamma 0.7 (brighter mid-tones)"),
    Perturbation("gamma_1.4", "gamma", 1.4, "gamma 1.4 (darker mid-tones)"),
    Perturbation("contrast_0.7", "contrast", 0.7, "contrast x0.7 about the mean"),
    Perturbation("contrast_1.3", "contrast", 1.3, "contrast x1.3 about the mean"),
    Perturbation("brightness_minus25", "brightness", -25.0, "brightness -25 gray levels"),
    Perturbation("brightness_plus25", "brightness", 25.0, "brightness +25 gray levels"),
    Perturbation("noise_5", "noise", 5.0, "Gaussian noise, std 5 gray levels"),
    Perturbation("noise_10", "noise", 10.0, "Gaussian noise, std 10 gray levels"),
    Perturbation("jpeg_60", "jpeg", 60.0, "JPEG re-encoded at quality 60"),
    Perturbation("jpeg_30", "jpeg", 30.0, "JPEG re-encoded at quality 30"),
    Perturbation("downscale_0.5", "downscale", 0.5, "down-sampled x0.5 and back"),
    Perturbation("downscale_0.25", "downscale", 0.25, "down-sampled x0.25 and back"),
    Perturbation("rotate_5", "rotate", 5.0, "rotated +-5 degrees"),
    Perturbation("rotate_10", "rotate", 10.0, "rotated +-10 degrees"),
    Perturbation("shift_0.05", "shift", 0.05, "shifted 5% of the side"),
    Perturbation("shift_0.1", "shift", 0.1, "shifted 10% of the side"),
)

# Name -> perturbation, ``clean`` first; ``config.ROBUSTNESS_PERTURBATIONS`` lists the rest.
PERTURBATIONS: Mapping[str, Perturbation] = types.MappingProxyType(
    {perturbation.name: perturbation for perturbation in _CATALOGUE}
)


def _lookup(name: str) -> Perturbation:
    try:
        return PERTURBATIONS[name]
    except KeyError:
        known = ", ".join(PERTURBATIONS)
        raise RobustnessError(f"{name!r} is not a perturbation; known: {known}") from None


def apply_perturbation(
    gray: np.ndarray, kind: str, level: float, rng: np.random.Generator
) -> np.ndarray:
    """``gray`` (2-D uint8) changed by ``kind`` at ``level``; a new 2-D uint8 array of the
    same shape. ``rng`` is used by the random kinds only (noise, rotate, shift)."""
    _check_gray(gray)
    if kind not in KINDS:
        raise RobustnessError(f"{kind!r} is not a perturbation kind; known: {', '.join(KINDS)}")
    return np.ascontiguousarray(KINDS[kind](gray, level, rng))


def perturb(gray: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """The catalogue's perturbation ``name`` applied to a raw slice (2-D uint8); same shape
    and dtype. ``clean`` returns an unchanged copy."""
    perturbation = _lookup(name)
    return apply_perturbation(gray, perturbation.kind, perturbation.level, rng)


def perturbation_names(params: RobustnessParams) -> tuple[str, ...]:
    """The perturbations to run: ``clean`` first, then ``params.perturbations`` in their
    order; empty when ``params.enabled`` is false. Unknown names raise
    ``RobustnessError`` (the config already refuses them at load time)."""
    if not params.enabled:
        return ()
    names = [name for name in params.perturbations if name != CLEAN]
    for name in names:
        _lookup(name)
    return (CLEAN, *names)


def perturbation_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator of slice ``index`` under perturbation ``name``: independent of every
    other slice and perturbation, so results do not depend on batching or order."""
    key = zlib.crc32(name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, key, index]))


def perturbed_inputs(
    raw_grays: Iterable[np.ndarray],
    name: str,
    size: int,
    preprocess_params: PreprocessParams,
    seed: int,
    *,
    first_index: int = 0,
) -> np.ndarray:
    """Raw slices (2-D uint8, any sizes) perturbed by ``name``, then preprocessed as
    everywhere else (``imaging.preprocess_gray``): the model's input, (N, size, size, 1)
    uint8.

    Deterministic given ``seed``: the i-th slice draws from ``perturbation_rng(seed, name,
    first_index + i)``, so a test set perturbed in chunks (pass each chunk's position in
    the whole as ``first_index``) gives the same images as in one call.
    """
    _lookup(name)
    images = [
        preprocess_gray(
            perturb(gray, name, perturbation_rng(seed, name, first_index + offset)),
            size,
            preprocess_params,
        )
        for offset, gray in enumerate(raw_grays)
    ]
    if not images:
        return np.zeros((0, size, size, 1), dtype=np.uint8)
    return np.stack(images)[..., np.newaxis]


def _predicted_classes(predictions: Any, name: str) -> np.ndarray:
    values = np.asarray(predictions)
    if values.ndim == 2:
        return values.argmax(axis=1)
    if values.ndim != 1:
        raise RobustnessError(f"{name}: expected class indices (N,) or probabilities (N, K)")
    return values.astype(np.int64)


def robustness_table(
    labels: Sequence[int] | np.ndarray, predictions_by_perturbation: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Accuracy under each perturbation, ``clean`` first, then the mapping's order.

    ``predictions_by_perturbation`` maps a perturbation name to predicted class indices
    (N,) or probabilities (N, K) of the same N slices as ``labels``; it must hold
    ``clean``. Each row: ``perturbation``, ``count``, ``correct``, ``accuracy`` and
    ``accuracy_drop`` (clean accuracy minus this one: positive is worse).
    """
    truth = np.asarray(labels).astype(np.int64)
    if truth.ndim != 1 or truth.size == 0:
        raise RobustnessError("labels must be a non-empty 1-D sequence of class indices")
    if CLEAN not in predictions_by_perturbation:
        raise RobustnessError(f"predictions need the {CLEAN!r} reference")
    order = [CLEAN, *(name for name in predictions_by_perturbation if name != CLEAN)]
    rows = []
    for name in order:
        predicted = _predicted_classes(predictions_by_perturbation[name], name)
        if predicted.shape != truth.shape:
            raise RobustnessError(
                f"{name}: {predicted.shape[0]} predictions for {truth.shape[0]} labels"
            )
        correct = int((predicted == truth).sum())
        rows.append(
            {
                "perturbation": name,
                "count": int(truth.size),
                "correct": correct,
                "accuracy": correct / truth.size,
            }
        )
    clean_accuracy = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_drop"] = clean_accuracy - row["accuracy"]
    return rows


def robustness_rows_for_plot(
    tables_by_model: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """Long-format rows for a DVC plot CSV, ``perturbation, accuracy, model``, one per
    (model, perturbation), models in the mapping's order; accuracy rounded to 6 digits so
    the file diffs stably."""
    return [
        {"perturbation": row["perturbation"], "accuracy": round(row["accuracy"], 6), "model": model}
        for model, table in tables_by_model.items()
        for row in table
    ]


def _as_tables(
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
) -> dict[str, Sequence[Mapping[str, Any]]]:
    if isinstance(tables, Mapping):
        return dict(tables)
    return {"model": tables}


def robustness_figure(
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    path: str | Path,
) -> Path:
    """Horizontal bars of accuracy per perturbation (one colour per model, ``clean`` on
    top, its accuracy as a dashed line), written atomically as a PNG at ``path``.

    ``tables`` is one ``robustness_table`` or a mapping model name -> table. Uses
    a figure of its own (``reports.figures.new_figure``: no pyplot state).
    """
    by_model = _as_tables(tables)
    names: list[str] = []
    for table in by_model.values():
        for row in table:
            if row["perturbation"] not in names:
                names.append(row["perturbation"])
    models = list(by_model)
    height = 0.8 / max(1, len(models))
    figure_height = 1.4 + 0.2 * len(names) * max(1, len(models))
    figure = new_figure(figsize=(8, figure_height), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(names))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for number, model in enumerate(models):
        accuracy = {row["perturbation"]: row["accuracy"] for row in by_model[model]}
        offsets = positions + (number - (len(models) - 1) / 2) * height
        values = [accuracy.get(name, np.nan) for name in names]
        colour = colours[number % len(colours)]
        bars = axis.barh(offsets, values, height=height, color=colour, label=model)
        axis.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        if CLEAN in accuracy:
            axis.axvline(accuracy[CLEAN], color=colour, linestyle="--", linewidth=1)
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.08)
    axis.set_xlabel("test accuracy")
    axis.set_title("Accuracy under perturbations of the raw slices (dashed: clean)")
    if len(models) > 1:
        axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def perturbation_sheet(
    raw_gray: np.ndarray,
    names: Sequence[str],
    size: int,
    preprocess_params: PreprocessParams,
    seed: int,
    path: str | Path,
) -> Path:
    """One slice under each perturbation in ``names``, as the model sees it (perturbed,
    then preprocessed), in a grid written atomically as a PNG: what the levels look like."""
    columns = min(6, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure = new_figure(figsize=(1.9 * columns, 2.1 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, name in zip(axes, names, strict=False):
        image = perturbed_inputs([raw_gray], name, size, preprocess_params, seed)[0, ..., 0]
        axis.imshow(image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(name, fontsize=8)
    return save_figure(figure, path)
