"""Explanations of single predictions: Grad-CAM, occlusion sensitivity and an overlay.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional layer's output
by the spatial mean of the class score's gradient with respect to it, sums the channels,
keeps the positive part and upsamples the map to the input. It is what the study shows
(on ``conv5_block3_out``) and what the app overlays on the uploaded image.

Design choices, each for a reason:

- **The class score is a pre-softmax logit**, as in the paper: a softmax probability
  saturates (a confident model gives p = 1.0 in float32 and an all-zero map). By default
  (``score="centred"``) it is the centred logit ``z_c - mean_j z_j``, which removes the
  part of the logits shared by all classes. The softmax ignores that part, so the model's
  predictions do not depend on it, and under cross-entropy it is not trained either: the
  loss gradients of the K logits sum to zero, so the sum of the output layer's class
  weight vectors stays near its random initial value (exactly, for two classes). An
  explanation of the prediction should not depend on it. ``score="logit"`` is the paper's
  raw ``z_c``, for comparison with other implementations. When the output layer is a
  softmax ``Dense`` (or a softmax ``Activation`` / ``Softmax`` layer) the logits are
  recomputed from that layer's input and weights, without touching the layer; otherwise
  the model's output itself is the score.
- **The model is never mutated**: no activation swapped, no ``trainable`` flag or weight
  changed, no layer called on new inputs (which would add nodes to the served model's
  layers). The auxiliary models read the live weights, so a model trained further after
  the first call is explained with its current weights.
- **Compiled once per (model, layer, score)**: ``GradCam.for_model`` caches the auxiliary model
  and its compiled step in a ``WeakKeyDictionary`` keyed by the model, so repeated calls
  (the app, a figure loop) skip graph building and tracing, and the cache entry goes away
  with the model. Images are processed in batches.
- **Backends**: TensorFlow (``tf.GradientTape`` in a ``tf.function`` over
  ``Model(inputs, [features, logit source])``), JAX (``jax.grad`` of a jitted, stateless
  call; JAX cannot differentiate with respect to an intermediate tensor, so a structural
  clone of the model is split at the layer into a feature part and a head part, run with
  the original model's variable values) and torch (autograd over the same auxiliary model
  as TensorFlow). The choice follows ``keras.backend.backend()``.
- **A flat map is all zeros, never NaN**: a map is scaled to [0, 1] by its own range; a
  map with no spatial variation (e.g. a constant image through a network without padding)
  carries no location information and is returned as zeros.

Occlusion sensitivity is the gradient-free cross-check: slide a patch of the image's mean
over a grid and record how much the class probability drops. It needs only forward
passes, so it is immune to gradient saturation and to any error in the gradient code.

Core layer: keras, numpy and OpenCV; no tracking, stage or app imports.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import keras
import numpy as np

# Default number of images per forward/backward pass: bounds memory at 224 px ResNet50
# (about 0.5 GB of activations at 16) while amortising the per-call overhead.
DEFAULT_BATCH_SIZE = 16

ScoreMode = Literal["dense_logits", "softmax_input", "output"]
Score = Literal["centred", "logit"]
SCORES: tuple[str, ...] = ("centred", "logit")


@dataclass(frozen=True)
class GradCamResult:
    """Grad-CAM maps with the class each one explains and the model's probabilities (the
    same forward pass, so a caller need not run the model twice)."""

    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1]
    class_indices: np.ndarray  # (N,) int64, the explained class per image
    probabilities: np.ndarray  # (N, K) float32, the model's output


# --------------------------------------------------------------------------- helpers


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


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    if maps.shape[1:] == (height, width):
        return maps.astype(np.float32, copy=False)
    resized = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for index, heatmap in enumerate(maps):
        resized[index] = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized


def _single_input(model: keras.Model) -> tuple[Any, tuple[int | None, ...]]:
    inputs = model.inputs
    if inputs is None or len(inputs) != 1:
        raise ValueError("Grad-CAM needs a functional model with exactly one input")
    return inputs[0], tuple(inputs[0].shape)


def _single_output(model: keras.Model) -> Any:
    outputs = model.outputs
    if outputs is None or len(outputs) != 1:
        raise ValueError("Grad-CAM needs a functional model with exactly one output")
    output = outputs[0]
    if len(output.shape) != 2:
        raise ValueError(
            f"the model's output must be (N, classes), got shape {tuple(output.shape)}"
        )
    return output


def _check_images(images: Any, input_shape: tuple[int | None, ...]) -> np.ndarray:
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


def _class_indices(class_index: Any, count: int, num_classes: int) -> np.ndarray:
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


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _producer(tensor: Any) -> tuple[Any, Any]:
    """The layer that produced a symbolic tensor, and that call's input tensor."""
    operation, node_index, _ = tensor._keras_history
    node = operation._inbound_nodes[node_index]
    inputs = node.input_tensors
    return operation, inputs[0] if len(inputs) == 1 else None


def _score_source(model: keras.Model) -> tuple[Any, ScoreMode, keras.layers.Layer | None]:
    """Where the class score comes from: see the module docstring.

    Returns the symbolic tensor to compute, how to turn it into scores, and the output
    ``Dense`` layer whose kernel and bias give the logits (``dense_logits`` only).
    """
    output = _single_output(model)
    layer, layer_input = _producer(output)
    softmax = keras.activations.softmax
    if layer_input is not None:
        if (
            isinstance(layer, keras.layers.Dense)
            and getattr(layer, "activation", None) is softmax
            and getattr(layer, "lora_enabled", False) is False
            and not getattr(layer, "quantization_mode", None)
        ):
            return layer_input, "dense_logits", layer
        if isinstance(layer, keras.layers.Softmax) or (
            isinstance(layer, keras.layers.Activation) and layer.activation is softmax
        ):
            return layer_input, "softmax_input", None
    return output, "output", None


def _scores(
    source: Any,
    class_index: Any,
    mode: ScoreMode,
    centre: bool,
    kernel: Any = None,
    bias: Any = None,
) -> tuple[Any, Any, Any]:
    """Backend-neutral (keras.ops): the summed class scores to differentiate, the chosen
    class per image and the probabilities. Images are independent in inference mode, so the
    gradient of the sum gives each image's own gradient in one backward pass."""
    ops = keras.ops
    values = ops.cast(source, "float32")
    if mode == "dense_logits":
        values = ops.matmul(values, ops.cast(kernel, "float32"))
        if bias is not None:
            values = values + ops.cast(bias, "float32")
    if mode == "output":
        probabilities = scores = values
    else:
        probabilities = ops.softmax(values, axis=-1)
        # The softmax ignores a shift shared by all classes (see the module docstring).
        scores = values - ops.mean(values, axis=-1, keepdims=True) if centre else values
    predicted = ops.cast(ops.argmax(values, axis=-1), "int32")
    chosen = ops.where(class_index < 0, predicted, class_index)
    picked = ops.take_along_axis(scores, ops.expand_dims(chosen, -1), axis=-1)
    return ops.sum(picked), chosen, probabilities


def _weighted_maps(features: Any, gradients: Any) -> Any:
    """ReLU of the gradient-weighted channel sum (channels last)."""
    ops = keras.ops
    features = ops.cast(features, "float32")
    weights = ops.mean(ops.cast(gradients, "float32"), axis=(1, 2))
    return ops.relu(ops.einsum("nhwc,nc->nhw", features, weights))


# --------------------------------------------------------------------------- JAX helpers


def _split_clone_at(
    model: keras.Model, layer_name: str
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """A structural clone of ``model`` and its two halves split at ``layer_name``: the
    feature part (input -> the layer's output) and the head part (that output -> the
    score source).

    JAX differentiates functions, not intermediate tensors, so the gradient with respect to
    the layer's output needs the head as a function of its own. The clone is split rather
    than the model itself, because splitting the model would add nodes to its layers.
    """
    clone = keras.models.clone_model(model)
    clone_features = clone.get_layer(layer_name).output
    clone_source, _, _ = _score_source(clone)
    feature_part = keras.Model(clone.input, clone_features, name="gradcam_features")
    try:
        head_part = keras.Model(clone_features, clone_source, name="gradcam_head")
    except ValueError as error:
        raise ValueError(
            f"on the JAX backend the layer {layer_name!r} must separate the model: "
            f"everything after it may depend only on its output ({error})"
        ) from None
    return clone, feature_part, head_part


def _clone_to_original(clone: keras.Model, model: keras.Model) -> dict[int, Any]:
    """Map each of the clone's variables (by ``id``) to the model's own variable.

    The clone has the original's structure, so its variables come in the same order; a
    count or shape mismatch means that assumption broke, and is refused rather than
    silently explaining the model with the wrong weights.
    """
    originals: dict[int, Any] = {}
    if len(clone.variables) != len(model.variables):
        raise ValueError("the cloned model's variables do not match the model's")
    for copy, original in zip(clone.variables, model.variables, strict=True):
        if tuple(copy.shape) != tuple(original.shape):
            raise ValueError(f"cannot match the clone's variable {copy.path!r}")
        originals[id(copy)] = original
    return originals


def _live_variables(
    parts: tuple[keras.Model, ...], originals: dict[int, Any]
) -> tuple[list[list[Any]], list[int]]:
    """For each part: the model's variables standing in for the part's trainable then
    non-trainable ones (the order ``stateless_call`` takes them), and the number of
    trainable ones, where each part's value list is split.

    Reading the model's variables at every call, not the clone's, explains the model with
    its current weights even after it is trained further.
    """

    def counterparts(variables: list[Any]) -> list[Any]:
        return [originals[id(variable)] for variable in variables]

    live = [
        counterparts(list(part.trainable_variables))
        + counterparts(list(part.non_trainable_variables))
        for part in parts
    ]
    splits = [len(part.trainable_variables) for part in parts]
    return live, splits


def _jax_step(
    feature_part: keras.Model,
    head_part: keras.Model,
    splits: list[int],
    mode: ScoreMode,
    centre: bool,
) -> Callable[..., tuple[Any, Any, Any]]:
    """The stateless Grad-CAM step for ``jax.jit``: variable values in, (maps, chosen class,
    probabilities) out, with the gradient of the class score taken with respect to the
    feature maps through ``jax.grad`` of the head part."""
    import jax

    def step(
        feature_values: list[Any],
        head_values: list[Any],
        kernel: Any,
        bias: Any,
        images: Any,
        class_index: Any,
    ) -> tuple[Any, Any, Any]:
        feature_maps, _ = feature_part.stateless_call(
            feature_values[: splits[0]], feature_values[splits[0] :], images, training=False
        )

        def total_score(maps: Any) -> tuple[Any, tuple[Any, Any]]:
            source, _ = head_part.stateless_call(
                head_values[: splits[1]], head_values[splits[1] :], maps, training=False
            )
            total, chosen, probabilities = _scores(source, class_index, mode, centre, kernel, bias)
            return total, (chosen, probabilities)

        gradients, (chosen, probabilities) = jax.grad(total_score, has_aux=True)(feature_maps)
        return _weighted_maps(feature_maps, gradients), chosen, probabilities

    return step


# --------------------------------------------------------------------------- Grad-CAM


_CACHE: weakref.WeakKeyDictionary[keras.Model, dict[tuple[str, str], GradCam]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


class GradCam:
    """Grad-CAM for one (model, layer), with its auxiliary model and compiled step built
    once. Prefer ``GradCam.for_model`` (cached) or the ``gradcam`` function."""

    def __init__(self, model: keras.Model, layer_name: str, score: Score = "centred") -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if keras.config.image_data_format() != "channels_last":
            raise ValueError("Grad-CAM here supports image_data_format 'channels_last' only")
        _, self._input_shape = _single_input(model)
        self._num_classes = int(_single_output(model).shape[-1])
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise ValueError(
                f"layer {layer_name!r} is not a top-level layer of model {model.name!r}; a "
                "backbone nested as one layer hides its layers (build it with input_tensor=)"
            ) from None
        features = layer.output
        if len(features.shape) != 4:
            raise ValueError(
                f"layer {layer_name!r} outputs shape {tuple(features.shape)}; Grad-CAM needs a "
                "convolutional (N, h, w, channels) output"
            )
        self.layer_name = layer_name
        self.score = score
        self.backend = keras.backend.backend()
        self._lock = threading.Lock()
        self._source, self._mode, self._output_layer = _score_source(model)
        if self.backend == "tensorflow":
            self._step = self._build_tensorflow(model, features)
        elif self.backend == "jax":
            self._step = self._build_jax(model)
        elif self.backend == "torch":
            self._step = self._build_torch(model, features)
        else:
            raise ValueError(f"Grad-CAM supports tensorflow, jax and torch, not {self.backend!r}")

    @classmethod
    def for_model(cls, model: keras.Model, layer_name: str, score: Score = "centred") -> GradCam:
        """The cached instance for (model, layer, score), built on first use."""
        with _CACHE_LOCK:
            per_model = _CACHE.get(model)
            if per_model is None:
                per_model = _CACHE[model] = {}
            instance = per_model.get((layer_name, score))
            if instance is None or instance.backend != keras.backend.backend():
                instance = per_model[(layer_name, score)] = cls(model, layer_name, score)
            return instance

    # ---- backends: each returns step(images float32, class_index int32) -> (maps,
    # ---- chosen, probabilities) as numpy arrays.

    def _output_weights(self) -> tuple[Any, Any]:
        layer = self._output_layer
        if layer is None:
            return None, None
        return layer.kernel, (layer.bias if layer.use_bias else None)

    def _build_tensorflow(self, model: keras.Model, features: Any) -> Callable[..., Any]:
        import tensorflow as tf

        auxiliary = keras.Model(model.input, [features, self._source], name="gradcam_auxiliary")
        mode, centre = self._mode, self.score == "centred"

        @tf.function(
            input_signature=[
                tf.TensorSpec((None, *self._input_shape[1:]), tf.float32),
                tf.TensorSpec((None,), tf.int32),
            ],
            reduce_retracing=True,
        )
        def step(images: Any, class_index: Any) -> tuple[Any, Any, Any]:
            kernel, bias = self._output_weights()
            with tf.GradientTape() as tape:
                feature_maps, source = auxiliary(images, training=False)
                total, chosen, probabilities = _scores(
                    source, class_index, mode, centre, kernel, bias
                )
            gradients = tape.gradient(total, feature_maps)
            return _weighted_maps(feature_maps, gradients), chosen, probabilities

        def run(images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, ...]:
            outputs = step(tf.constant(images), tf.constant(class_index))
            return tuple(output.numpy() for output in outputs)

        self._auxiliary = auxiliary
        return run

    def _build_torch(self, model: keras.Model, features: Any) -> Callable[..., Any]:
        import torch

        auxiliary = keras.Model(model.input, [features, self._source], name="gradcam_auxiliary")
        mode, centre = self._mode, self.score == "centred"

        def run(images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, ...]:
            inputs = keras.ops.convert_to_tensor(images)
            inputs.requires_grad_(True)  # so the graph exists even if every weight is frozen
            index = keras.ops.convert_to_tensor(class_index)
            kernel, bias = self._output_weights()
            with torch.enable_grad():
                feature_maps, source = auxiliary(inputs, training=False)
                total, chosen, probabilities = _scores(source, index, mode, centre, kernel, bias)
                (gradients,) = torch.autograd.grad(total, feature_maps)
            with torch.no_grad():
                maps = _weighted_maps(feature_maps.detach(), gradients)
            return tuple(
                keras.ops.convert_to_numpy(value) for value in (maps, chosen, probabilities)
            )

        self._auxiliary = auxiliary
        return run

    def _build_jax(self, model: keras.Model) -> Callable[..., Any]:
        import jax

        clone, feature_part, head_part = _split_clone_at(model, self.layer_name)
        parts = (feature_part, head_part)
        live, splits = _live_variables(parts, _clone_to_original(clone, model))
        step = _jax_step(feature_part, head_part, splits, self._mode, self.score == "centred")
        compiled = jax.jit(step)

        def run(images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, ...]:
            kernel, bias = self._output_weights()
            outputs = compiled(
                [variable.value for variable in live[0]],
                [variable.value for variable in live[1]],
                None if kernel is None else kernel.value,
                None if bias is None else bias.value,
                images,
                class_index,
            )
            return tuple(np.asarray(output) for output in outputs)

        self._auxiliary = parts
        return run

    # ---- public

    def compute(
        self, images: Any, class_index: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> GradCamResult:
        """Grad-CAM maps at input size, the explained classes and the probabilities.

        ``images``: shaped like the model input (N, H, W, C), in the model's own input
        range (ours: 0-255 gray). ``class_index``: None for each image's predicted class,
        an int for one class for all, or one int per image.
        """
        _check_batch_size(batch_size)
        if keras.backend.backend() != self.backend:
            raise ValueError(
                f"this GradCam was built for {self.backend!r}, "
                f"keras now runs {keras.backend.backend()!r}"
            )
        array = _check_images(images, self._input_shape)
        indices = _class_indices(class_index, array.shape[0], self._num_classes)
        maps, chosen, probabilities = [], [], []
        with self._lock:  # the compiled step is shared; keep concurrent callers in order
            for start in range(0, array.shape[0], batch_size):
                stop = start + batch_size
                batch_maps, batch_chosen, batch_probabilities = self._step(
                    array[start:stop], indices[start:stop]
                )
                maps.append(batch_maps)
                chosen.append(batch_chosen)
                probabilities.append(batch_probabilities)
        # Upsample first, then scale: each map then spans [0, 1] at the input's size.
        raw = np.nan_to_num(np.concatenate(maps).astype(np.float32), nan=0.0, posinf=0.0)
        heatmaps = normalize_maps(_resize_maps(raw, *array.shape[1:3]))
        return GradCamResult(
            heatmaps=heatmaps,
            class_indices=np.concatenate(chosen).astype(np.int64),
            probabilities=np.concatenate(probabilities).astype(np.float32),
        )

    def __call__(
        self, images: Any, class_index: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """Grad-CAM maps only: (N, H, W) float32 in [0, 1]."""
        return self.compute(images, class_index, batch_size=batch_size).heatmaps


def gradcam(
    model: keras.Model,
    images: Any,
    layer_name: str,
    class_index: Any = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    score: Score = "centred",
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W), float32 in [0, 1], at the input's height and width.

    ``class_index``: None explains each image's predicted class; an int, that class for
    every image; an array, one class per image. The model is not modified; the auxiliary
    model and compiled step are cached per (model, layer), so only the first call pays for
    building and tracing. ``score``: ``centred`` (default) or ``logit``, see the module
    docstring.
    """
    instance = GradCam.for_model(model, layer_name, score)
    return instance(images, class_index, batch_size=batch_size)


def last_conv_layer_name(model: keras.Model) -> str:
    """The last top-level layer with a 4-D (N, h, w, channels) output: a default Grad-CAM
    layer for models that do not name one (ours name ``model.gradcam_layer``)."""
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            return layer.name
    raise ValueError(f"model {model.name!r} has no layer with a 4-D output")


# --------------------------------------------------------------------------- occlusion


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
    _check_batch_size(batch_size)
    _, input_shape = _single_input(model)
    num_classes = int(_single_output(model).shape[-1])
    array = _check_images(images, input_shape)
    count, height, width = array.shape[:3]
    _check_patch(patch_size, stride, height, width)
    fills = _fill_values(array, fill)

    base = np.concatenate(
        [
            _predict(model, array[start : start + batch_size])
            for start in range(0, count, batch_size)
        ]
    )
    indices = _class_indices(class_index, count, num_classes).astype(np.int64)
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


# --------------------------------------------------------------------------- overlay


def overlay(image_gray_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap (jet colour map) over a gray image; returns RGB uint8 (H, W, 3).

    ``image_gray_uint8``: (H, W) or (H, W, 1) uint8. ``heatmap``: 2-D in [0, 1], resized
    to the image if its size differs. ``alpha``: weight of the heatmap (0 = the image only).
    """
    image = np.asarray(image_gray_uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a 2-D uint8 gray image, got shape {image.shape} {image.dtype}"
        )
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    if not np.all(np.isfinite(heat)) or heat.min() < -1e-6 or heat.max() > 1 + 1e-6:
        raise ValueError("heatmap must hold values in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heat.shape != image.shape:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat_uint8 = np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat_uint8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gray_rgb = np.repeat(image[:, :, None], 3, axis=2).astype(np.float32)
    blended = (1.0 - alpha) * gray_rgb + alpha * colour.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
