"""Grad-CAM in one forward pass, from the classifier head's own parameters, in NumPy.

Our classifier ends in global average pooling over the last convolutional map ``A``
(h x w x C), then a short head: BatchNormalization, ReLU ``Dense`` layers with dropout,
BatchNormalization and a softmax ``Dense`` (``model.classifier.build_model``). At inference
each of these is affine or a ReLU, so the gradient of the class score with respect to the
pooled vector ``p`` can be written down by hand; and because ``p = mean_{i,j} A_ij``, the
gradient with respect to every cell of ``A`` is that vector divided by the map's area.
Grad-CAM's channel weight is the spatial mean of that gradient, i.e. exactly
``d score / d p / (h * w)``. So an exported graph that returns the probabilities, ``p``
and ``A`` in one invoke, plus these few arrays, gives the same maps as the GradientTape
path (``gradcam.GradCam``) without a second pass and without Keras or TensorFlow.

The class score matches ``gradcam``'s default, the centred logit ``z_c - mean_j z_j``
(``score="centred"``): its gradient uses the output kernel's column ``c`` minus the mean
column. ``score="logit"`` uses the raw column.

Only this head shape is supported (a chain of BatchNormalization / Dense with ReLU or no
activation / Dropout, ending in a Dense); ``serving.export`` reads it from a Keras model
and refuses anything else in one line. A layer that does not feed the pooling directly
(an earlier block) needs gradients through the backbone too: ``explain.tailcam`` chains
``HeadParams.pooled_gradient`` through those layers.

Explain layer, NumPy and OpenCV only (through ``maps``): it runs in the serving install,
which holds no Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from braintumor.core.files import read_arrays, write_arrays
from braintumor.explain.maps import normalize_maps, resize_maps

FORMAT_VERSION = 1
# One step of the head: ("affine", scale, shift) for an inference BatchNormalization,
# ("dense", kernel, bias, relu) for a Dense layer; Dropout is the identity at inference.
AFFINE = "affine"
DENSE = "dense"


class HeadCamError(ValueError):
    """Head parameters that cannot be used (bad shapes, a bad file)."""


@dataclass(frozen=True)
class HeadStep:
    kind: str  # AFFINE or DENSE
    first: np.ndarray  # scale (AFFINE) or kernel (DENSE)
    second: np.ndarray  # shift (AFFINE) or bias (DENSE)
    relu: bool = False


class _Float32(NamedTuple):
    """The head's arrays in float32, made once per head (``HeadParams._float32``)."""

    steps: tuple[tuple[np.ndarray, np.ndarray], ...]
    kernel: np.ndarray
    bias: np.ndarray
    centred: np.ndarray  # the output kernel's columns less their mean (the centred score)


@dataclass(frozen=True)
class HeadParams:
    """The head after pooling as arrays: hidden steps, then the output ``Dense``."""

    steps: tuple[HeadStep, ...]
    kernel: np.ndarray  # (D, K) output Dense
    bias: np.ndarray  # (K,)

    @property
    def num_classes(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def feature_size(self) -> int:
        first = self.steps[0] if self.steps else None
        if first is None:
            return int(self.kernel.shape[0])
        return int(first.first.shape[0])

    @cached_property
    def _float32(self) -> _Float32:
        """The arrays ``forward`` and ``pooled_gradient`` compute with, in float32 like the
        graph: per upload they read the 1280 x 512 kernel twice, and float32 halves that
        (head forward plus gradient 0.55 -> 0.3 ms on a busy core; the quickstart's logits
        move by 1.8e-6, no ReLU mask flips, on 33 real test slices)."""

        def cast(array: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(array, np.float32)

        centred = self.kernel - self.kernel.mean(axis=1, keepdims=True)
        return _Float32(
            tuple((cast(step.first), cast(step.second)) for step in self.steps),
            cast(self.kernel),
            cast(self.bias),
            cast(centred),
        )

    def forward(self, pooled: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (N, K) of pooled features (N, D), computed in float32 and returned as
        float64, and each ReLU's mask (for ``pooled_gradient``)."""
        x = np.asarray(pooled, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.feature_size:
            raise HeadCamError(f"pooled features: expected (N, {self.feature_size}), got {x.shape}")
        arrays = self._float32
        masks = []
        for step, (first, second) in zip(self.steps, arrays.steps, strict=True):
            if step.kind == AFFINE:
                x = x * first + second
            else:
                x = x @ first
                x += second
                if step.relu:
                    masks.append(x > 0)
                    np.maximum(x, 0.0, out=x)
        logits = x @ arrays.kernel
        logits += arrays.bias
        return logits.astype(np.float64), masks

    def pooled_gradient(
        self, masks: list[np.ndarray], chosen: np.ndarray, centred: bool = True
    ) -> np.ndarray:
        """d score / d pooled (N, D), float32, for class ``chosen[n]`` of each row: the
        head's backward pass, by hand (``masks`` from ``forward`` of the same rows)."""
        arrays = self._float32
        columns = arrays.centred if centred else arrays.kernel
        gradient = columns[:, np.asarray(chosen)].T  # (N, D_last)
        relu_masks = list(masks)
        for step, (first, _) in zip(reversed(self.steps), reversed(arrays.steps), strict=True):
            if step.kind == AFFINE:
                gradient = gradient * first
            else:
                if step.relu:
                    gradient = gradient * relu_masks.pop()
                gradient = gradient @ first.T
        return gradient

    def save(self, path: Path) -> None:
        """Plain arrays in an ``.npz`` (no pickle), written atomically."""
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "kinds": np.array([s.kind + ("_relu" if s.relu else "") for s in self.steps]),
            "kernel": self.kernel,
            "bias": self.bias,
        }
        for index, step in enumerate(self.steps):
            arrays[f"step{index}_first"] = step.first
            arrays[f"step{index}_second"] = step.second
        write_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path) -> HeadParams:
        """Read ``save``'s file; ``HeadCamError`` (one line) for anything else."""
        try:
            arrays = read_arrays(path)
            if int(arrays["format_version"]) != FORMAT_VERSION:
                raise HeadCamError(f"{path}: head format {int(arrays['format_version'])}")
            steps = []
            for index, kind in enumerate(str(k) for k in arrays["kinds"]):
                base, relu = kind.removesuffix("_relu"), kind.endswith("_relu")
                if base not in (AFFINE, DENSE):
                    raise HeadCamError(f"{path}: unknown head step {kind!r}")
                steps.append(
                    HeadStep(
                        base,
                        np.asarray(arrays[f"step{index}_first"], np.float64),
                        np.asarray(arrays[f"step{index}_second"], np.float64),
                        relu,
                    )
                )
            kernel = np.asarray(arrays["kernel"], np.float64)
            bias = np.asarray(arrays["bias"], np.float64)
        except HeadCamError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise HeadCamError(f"{path}: not a head-parameters file ({error})") from None
        return cls(tuple(steps), kernel, bias)


@dataclass(frozen=True)
class HeadCamResult:
    """What one pass gives: calibrated-free probabilities, logits, classes and maps."""

    logits: np.ndarray  # (N, K) float64, from the head in NumPy
    class_indices: np.ndarray  # (N,) int64: the explained class
    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1]


def head_gradcam(
    head: HeadParams,
    pooled: np.ndarray,
    feature_maps: np.ndarray,
    output_size: tuple[int, int],
    class_index: np.ndarray | None = None,
    centred: bool = True,
) -> HeadCamResult:
    """Grad-CAM maps (N, H, W) from one forward pass's pooled features (N, D) and last
    convolutional maps (N, h, w, D): the channel weights are the head's gradient divided
    by the map's area, then ReLU of the weighted channel sum, upsampled to ``output_size``
    and scaled to [0, 1] exactly as ``gradcam.GradCam.compute`` does. ``class_index``:
    None explains each row's predicted class (the argmax of the logits)."""
    maps = np.asarray(feature_maps, dtype=np.float32)
    if maps.ndim != 4 or maps.shape[-1] != head.feature_size or len(maps) != len(pooled):
        raise HeadCamError(
            f"feature maps: expected (N, h, w, {head.feature_size}) for {len(pooled)} rows, "
            f"got {maps.shape}"
        )
    logits, masks = head.forward(pooled)
    chosen = (
        logits.argmax(axis=1) if class_index is None else np.asarray(class_index, dtype=np.int64)
    )
    area = maps.shape[1] * maps.shape[2]
    weights = (head.pooled_gradient(masks, chosen, centred) / area).astype(np.float32)
    raw = np.maximum(np.einsum("nhwc,nc->nhw", maps, weights), 0.0)
    raw = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0)
    heatmaps = normalize_maps(resize_maps(raw, *output_size))
    return HeadCamResult(logits, chosen.astype(np.int64), heatmaps)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64), stable."""
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
