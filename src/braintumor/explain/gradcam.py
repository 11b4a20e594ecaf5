"""Grad-CAM: where in the slice the class score comes from.

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
- **Compiled once per (model, layer, score, weightings)**: ``GradCam.for_model`` caches the
  auxiliary model and its compiled step in a ``WeakKeyDictionary`` keyed by the model, so
  repeated calls (the app, a figure loop) skip graph building and tracing, and the cache
  entry goes away with the model. Images are processed in batches.
- **Several weightings, one pass**: Grad-CAM, HiResCAM and Grad-CAM++ are all functions of
  the same (feature maps, gradients) pair at a layer, so ``GradCam(model, layer,
  weighting=("gradcam", "hirescam"))`` weighs that pair each way after one forward and
  backward pass (``GradCamResult.each``), instead of one pass per method; each map is the
  one a single-weighting instance gives (same ops on the same tensors, same resizing and
  scaling). The localisation stage compares the methods this way.
- **Backends**: TensorFlow (``tf.GradientTape`` in a ``tf.function`` over
  ``Model(inputs, [features, logit source])``), JAX (``jax.grad`` of a jitted, stateless
  call; JAX cannot differentiate with respect to an intermediate tensor, so a structural
  clone of the model is split at the layer into a feature part and a head part, run with
  the original model's variable values) and torch (autograd over the same auxiliary model
  as TensorFlow). The choice follows ``keras.backend.backend()``.
- **A flat map is all zeros, never NaN**: a map is scaled to [0, 1] by its own range; a
  map with no spatial variation (e.g. a constant image through a network without padding)
  carries no location information and is returned as zeros.

Occlusion sensitivity (:mod:`braintumor.explain.occlusion`) is the gradient-free
cross-check; :mod:`braintumor.explain.overlay` draws either map over the slice.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np

from braintumor.core.schema import MAX_GATE_WIDTH
from braintumor.explain.maps import (
    check_batch_size,
    check_images,
    class_indices,
    normalize_maps,
    resize_maps,
    single_input,
    single_output,
)
from braintumor.explain.softgates import SoftGateError, copy_weights, soft_gate_clone

# Default number of images per forward/backward pass: bounds memory at 224 px ResNet50
# (about 0.5 GB of activations at 16) while amortising the per-call overhead.
DEFAULT_BATCH_SIZE = 16

ScoreMode = Literal["dense_logits", "softmax_input", "output"]
Score = Literal["centred", "logit"]
SCORES: tuple[str, ...] = ("centred", "logit")
# How the gradient weighs the feature maps (see ``_weighted_maps``): Grad-CAM's channel
# means, HiResCAM's element-wise product, or Grad-CAM++'s positive-gradient weights.
Weighting = Literal["gradcam", "hirescam", "gradcampp"]
WEIGHTINGS: tuple[str, ...] = ("gradcam", "hirescam", "gradcampp")


def check_gate_width(width: float) -> float:
    """A soft ReLU gate width (``explain.softgates``) in [0, ``MAX_GATE_WIDTH``], as a
    float; anything else is refused in one line."""
    value = float(width)
    if not 0.0 <= value <= MAX_GATE_WIDTH:
        raise ValueError(f"gate_width must be in [0, {MAX_GATE_WIDTH}], got {width}")
    return value


def check_weightings(weighting: Weighting | Sequence[Weighting]) -> tuple[Weighting, ...]:
    """One weighting name, or several (distinct, at least one), as a tuple; anything else
    is refused in one line naming the allowed values."""
    names = (weighting,) if isinstance(weighting, str) else tuple(weighting)
    if not names:
        raise ValueError(f"weighting must name at least one of {WEIGHTINGS}")
    for name in names:
        if name not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"weighting names a method twice: {names}")
    return names


@dataclass(frozen=True)
class GradCamResult:
    """Grad-CAM maps with the class each one explains and the model's probabilities (the
    same forward pass, so a caller need not run the model twice). ``heatmaps`` are the
    instance's first (for most instances, only) weighting's maps; ``each`` holds every
    weighting's maps from that one pass, by name."""

    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1]
    class_indices: np.ndarray  # (N,) int64, the explained class per image
    probabilities: np.ndarray  # (N, K) float32, the model's output
    each: Mapping[str, np.ndarray] = field(default_factory=dict)  # weighting -> (N, H, W)


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
    output = single_output(model)
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


def _weighted_maps(features: Any, gradients: Any, weighting: Weighting = "gradcam") -> Any:
    """ReLU of the gradient-weighted channel sum (channels last).

    ``gradcam``: each channel weighted by its gradient's spatial mean (Selvaraju et al.).
    ``hirescam``: each position by its own gradient, summed over channels (Draelos and
    Carin, 2020): the map is then exactly the score's first-order decomposition over
    positions, where Grad-CAM's averaging can move mass to where the gradient is not.
    ``gradcampp``: channel weights summing the positive gradients with Chattopadhay et
    al.'s (2018) pixel coefficients (their closed form for an exponential score).
    """
    ops = keras.ops
    features = ops.cast(features, "float32")
    gradients = ops.cast(gradients, "float32")
    if weighting == "hirescam":
        return ops.relu(ops.sum(features * gradients, axis=-1))
    if weighting == "gradcampp":
        squared = gradients * gradients
        denominator = 2.0 * squared + ops.sum(features, axis=(1, 2), keepdims=True) * (
            squared * gradients
        )
        safe = ops.where(ops.abs(denominator) > 1e-12, denominator, ops.ones_like(denominator))
        alphas = ops.where(ops.abs(denominator) > 1e-12, squared / safe, ops.zeros_like(squared))
        weights = ops.sum(alphas * ops.relu(gradients), axis=(1, 2))
    else:
        weights = ops.mean(gradients, axis=(1, 2))
    return ops.relu(ops.einsum("nhwc,nc->nhw", features, weights))


# --------------------------------------------------------------------------- JAX helpers


def _split_clone_at(
    model: keras.Model, layer_name: str, gate_width: float = 0.0
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """A structural clone of ``model`` and its two halves split at ``layer_name``: the
    feature part (input -> the layer's output) and the head part (that output -> the
    score source).

    JAX differentiates functions, not intermediate tensors, so the gradient with respect to
    the layer's output needs the head as a function of its own. The clone is split rather
    than the model itself, because splitting the model would add nodes to its layers.
    ``gate_width`` > 0: the clone's ReLUs pass soft gates (``explain.softgates``).
    """
    if gate_width > 0:
        clone = soft_gate_clone(model, gate_width)
    else:
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
    weightings: tuple[Weighting, ...] = ("gradcam",),
) -> Callable[..., tuple[Any, Any, Any]]:
    """The stateless Grad-CAM step for ``jax.jit``: variable values in, (maps per
    weighting, chosen class, probabilities) out, with the gradient of the class score taken
    with respect to the feature maps through ``jax.grad`` of the head part."""
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
        maps = tuple(_weighted_maps(feature_maps, gradients, name) for name in weightings)
        return maps, chosen, probabilities

    return step


# --------------------------------------------------------------------------- Grad-CAM


# A backend step's output: the raw maps (one array per weighting), chosen, probabilities.
_StepOutput = tuple[list[np.ndarray], np.ndarray, np.ndarray]
_CacheKey = tuple[str, str, tuple[Weighting, ...], float]
_CACHE: weakref.WeakKeyDictionary[keras.Model, dict[_CacheKey, GradCam]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


class GradCam:
    """Grad-CAM for one (model, layer), with its auxiliary model and compiled step built
    once. Prefer ``GradCam.for_model`` (cached) or the ``gradcam`` function.

    ``weighting``: one name, or several to get each one's maps from a single forward and
    backward pass (``compute(...).each``); ``heatmaps`` and ``__call__`` give the first's.
    ``gate_width``: 0, the exact gradient; > 0, the gradient through every ReLU layer is
    the soft gate of ``explain.softgates`` (what the served map computes in NumPy), taken
    on a clone of the model that is given the model's current weights at every call.
    """

    def __init__(
        self,
        model: keras.Model,
        layer_name: str,
        score: Score = "centred",
        weighting: Weighting | Sequence[Weighting] = "gradcam",
        gate_width: float = 0.0,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        weightings = check_weightings(weighting)
        self.gate_width = check_gate_width(gate_width)
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if keras.config.image_data_format() != "channels_last":
            raise ValueError("Grad-CAM here supports image_data_format 'channels_last' only")
        _, self._input_shape = single_input(model)
        self._num_classes = int(single_output(model).shape[-1])
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
        self.weightings = weightings
        self.weighting = weightings[0]
        self.backend = keras.backend.backend()
        self._lock = threading.Lock()
        self._sync: tuple[list[Any], list[Any]] | None = None
        explained, features = self._soft_gated(model, features)
        self._source, self._mode, self._output_layer = _score_source(explained)
        if self.backend == "tensorflow":
            self._step = self._build_tensorflow(explained, features)
        elif self.backend == "jax":
            self._step = self._build_jax(model)
        elif self.backend == "torch":
            self._step = self._build_torch(explained, features)
        else:
            raise ValueError(f"Grad-CAM supports tensorflow, jax and torch, not {self.backend!r}")

    @classmethod
    def for_model(
        cls,
        model: keras.Model,
        layer_name: str,
        score: Score = "centred",
        weighting: Weighting | Sequence[Weighting] = "gradcam",
        gate_width: float = 0.0,
    ) -> GradCam:
        """The cached instance for (model, layer, score, weighting or weightings, gate
        width), built on first use."""
        weightings = check_weightings(weighting)
        key = (layer_name, score, weightings, check_gate_width(gate_width))
        with _CACHE_LOCK:
            per_model = _CACHE.get(model)
            if per_model is None:
                per_model = _CACHE[model] = {}
            instance = per_model.get(key)
            if instance is None or instance.backend != keras.backend.backend():
                instance = per_model[key] = cls(model, layer_name, score, weightings, gate_width)
            return instance

    def _soft_gated(self, model: keras.Model, features: Any) -> tuple[keras.Model, Any]:
        """The model the TensorFlow and torch steps differentiate, and its explained
        layer's output: with soft gates, a clone whose variables take the model's values
        before each call (``_sync``); else the model. JAX runs a clone with the model's
        own variable values anyway (``_build_jax``)."""
        if self.gate_width == 0 or self.backend not in ("tensorflow", "torch"):
            return model, features
        try:
            explained = soft_gate_clone(model, self.gate_width)
        except SoftGateError as error:
            raise ValueError(str(error)) from None
        self._sync = (list(explained.variables), list(model.variables))
        copy_weights(*self._sync)
        return explained, explained.get_layer(self.layer_name).output

    # ---- backends: each returns step(images float32, class_index int32) -> (maps, one per
    # ---- weighting in order, chosen, probabilities) as numpy arrays.

    def _output_weights(self) -> tuple[Any, Any]:
        return _dense_weights(self._output_layer)

    def _build_tensorflow(self, model: keras.Model, features: Any) -> Callable[..., Any]:
        import tensorflow as tf

        auxiliary = keras.Model(model.input, [features, self._source], name="gradcam_auxiliary")
        mode, centre, weightings = self._mode, self.score == "centred", self.weightings

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
            maps = tuple(_weighted_maps(feature_maps, gradients, name) for name in weightings)
            return maps, chosen, probabilities

        def run(images: np.ndarray, class_index: np.ndarray) -> _StepOutput:
            maps, chosen, probabilities = step(tf.constant(images), tf.constant(class_index))
            return [m.numpy() for m in maps], chosen.numpy(), probabilities.numpy()

        self._auxiliary = auxiliary
        return run

    def _build_torch(self, model: keras.Model, features: Any) -> Callable[..., Any]:
        import torch

        auxiliary = keras.Model(model.input, [features, self._source], name="gradcam_auxiliary")
        mode, centre, weightings = self._mode, self.score == "centred", self.weightings

        def run(images: np.ndarray, class_index: np.ndarray) -> _StepOutput:
            inputs = keras.ops.convert_to_tensor(images)
            inputs.requires_grad_(True)  # so the graph exists even if every weight is frozen
            index = keras.ops.convert_to_tensor(class_index)
            kernel, bias = self._output_weights()
            with torch.enable_grad():
                feature_maps, source = auxiliary(inputs, training=False)
                total, chosen, probabilities = _scores(source, index, mode, centre, kernel, bias)
                (gradients,) = torch.autograd.grad(total, feature_maps)
            with torch.no_grad():
                features = feature_maps.detach()
                maps = [_weighted_maps(features, gradients, name) for name in weightings]
            numpy = keras.ops.convert_to_numpy
            return [numpy(m) for m in maps], numpy(chosen), numpy(probabilities)

        self._auxiliary = auxiliary
        return run

    def _build_jax(self, model: keras.Model) -> Callable[..., Any]:
        import jax

        try:
            clone, feature_part, head_part = _split_clone_at(
                model, self.layer_name, self.gate_width
            )
        except SoftGateError as error:
            raise ValueError(str(error)) from None
        parts = (feature_part, head_part)
        live, splits = _live_variables(parts, _clone_to_original(clone, model))
        step = _jax_step(
            feature_part, head_part, splits, self._mode, self.score == "centred", self.weightings
        )
        compiled = jax.jit(step)

        def run(images: np.ndarray, class_index: np.ndarray) -> _StepOutput:
            kernel, bias = self._output_weights()
            maps, chosen, probabilities = compiled(
                [variable.value for variable in live[0]],
                [variable.value for variable in live[1]],
                None if kernel is None else kernel.value,
                None if bias is None else bias.value,
                images,
                class_index,
            )
            return [np.asarray(m) for m in maps], np.asarray(chosen), np.asarray(probabilities)

        self._auxiliary = parts
        return run

    # ---- public

    def compute(
        self, images: Any, class_index: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> GradCamResult:
        """Grad-CAM maps at input size, the explained classes and the probabilities.

        ``images``: shaped like the model input (N, H, W, C), in the model's own input
        range (ours: 0-255 gray). ``class_index``: None for each image's predicted class,
        an int for one class for all, or one int per image. Every weighting's maps come
        from the same pass (``each``); ``heatmaps`` is the first weighting's.
        """
        check_batch_size(batch_size)
        if keras.backend.backend() != self.backend:
            raise ValueError(
                f"this GradCam was built for {self.backend!r}, "
                f"keras now runs {keras.backend.backend()!r}"
            )
        array = check_images(images, self._input_shape)
        indices = class_indices(class_index, array.shape[0], self._num_classes)
        maps: list[list[np.ndarray]] = [[] for _ in self.weightings]
        chosen, probabilities = [], []
        with self._lock:  # the compiled step is shared; keep concurrent callers in order
            if self._sync is not None:
                copy_weights(*self._sync)  # the model's current weights
            for start in range(0, array.shape[0], batch_size):
                stop = start + batch_size
                batch_maps, batch_chosen, batch_probabilities = self._step(
                    array[start:stop], indices[start:stop]
                )
                for collected, batch in zip(maps, batch_maps, strict=True):
                    collected.append(batch)
                chosen.append(batch_chosen)
                probabilities.append(batch_probabilities)
        each: dict[str, np.ndarray] = {
            name: _heatmaps(collected, array.shape[1:3])
            for name, collected in zip(self.weightings, maps, strict=True)
        }
        return GradCamResult(
            heatmaps=each[self.weighting],
            class_indices=np.concatenate(chosen).astype(np.int64),
            probabilities=np.concatenate(probabilities).astype(np.float32),
            each=each,
        )

    def __call__(
        self, images: Any, class_index: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """Grad-CAM maps only: (N, H, W) float32 in [0, 1] (the first weighting's)."""
        return self.compute(images, class_index, batch_size=batch_size).heatmaps


def _dense_weights(layer: keras.layers.Layer | None) -> tuple[Any, Any]:
    """The output ``Dense`` layer's kernel and bias (None for absent ones), read live."""
    if layer is None:
        return None, None
    return layer.kernel, (layer.bias if layer.use_bias else None)


def _heatmaps(batches: list[np.ndarray], size: tuple[int, ...]) -> np.ndarray:
    """Raw layer maps, batch by batch, as heatmaps at input size: upsampled first, then
    scaled, so each map spans [0, 1] at the input's size."""
    raw = np.nan_to_num(np.concatenate(batches).astype(np.float32), nan=0.0, posinf=0.0)
    return normalize_maps(resize_maps(raw, *size))


def tape_with_values(
    model: keras.Model,
    layer_name: str,
    images: np.ndarray,
    value_layers: Sequence[str],
    weighting: Weighting = "gradcam",
    score: Score = "centred",
    gate_width: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``weighting``'s maps at ``layer_name`` of each image's predicted class, computed as
    ``GradCam.compute`` does, with the outputs of ``value_layers`` from the same forward
    pass (TensorFlow only): the reference a hand-written gradient is checked against on
    the very values it reads. Two forward passes of one model round differently (another
    graph, another batch), and a ReLU input within that rounding of its gate flips the
    gradient there; from one pass, none can. ``gate_width``: as ``GradCam``'s. Returns
    (maps (N, H, W) in [0, 1], classes, the values)."""
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise ValueError("tape_with_values runs on the TensorFlow backend only")
    weighting = check_weightings(weighting)[0]
    array = check_images(images, single_input(model)[1])
    explained = model
    if check_gate_width(gate_width) > 0:
        try:
            explained = soft_gate_clone(model, float(gate_width))
        except SoftGateError as error:
            raise ValueError(str(error)) from None
        copy_weights(list(explained.variables), list(model.variables))
    source, mode, output_layer = _score_source(explained)
    auxiliary = keras.Model(
        explained.input,
        [explained.get_layer(layer_name).output, source]
        + [explained.get_layer(name).output for name in value_layers],
    )
    kernel, bias = _dense_weights(output_layer)
    batch = tf.constant(array)
    with tf.GradientTape() as tape:
        features, scores_from, *values = auxiliary(batch, training=False)
        total, chosen, _ = _scores(
            scores_from,
            tf.fill((array.shape[0],), -1),
            mode,
            score == "centred",
            kernel,
            bias,
        )
    gradients = tape.gradient(total, features)
    maps = _heatmaps([np.asarray(_weighted_maps(features, gradients, weighting))], array.shape[1:3])
    return maps, np.asarray(chosen, np.int64), [np.asarray(value) for value in values]


def gradcam(
    model: keras.Model,
    images: Any,
    layer_name: str,
    class_index: Any = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    score: Score = "centred",
    weighting: Weighting = "gradcam",
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W), float32 in [0, 1], at the input's height and width.

    ``class_index``: None explains each image's predicted class; an int, that class for
    every image; an array, one class per image. The model is not modified; the auxiliary
    model and compiled step are cached per (model, layer), so only the first call pays for
    building and tracing. ``score``: ``centred`` (default) or ``logit``, see the module
    docstring. ``weighting``: ``gradcam`` (default), ``hirescam`` or ``gradcampp`` (see
    ``_weighted_maps``).
    """
    instance = GradCam.for_model(model, layer_name, score, weighting)
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


# --------------------------------------------------------------------------- overlay
