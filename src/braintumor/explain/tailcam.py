"""HiResCAM (or Grad-CAM) at an earlier block, from one forward pass, in NumPy.

``headcam`` gives the gradient of the class score with respect to the pooled features
from the head's parameters; that is enough for Grad-CAM at the map the pooling reads
(``top_activation``). The localisation stage measured that map (4 x 4 at 128 px) points at
the tumour in 19 % of matched test slices, and HiResCAM at a block of output stride 16
(``block10_add`` of EfficientNet-Lite0, ``conv4_block6_out`` of ResNet50) in 41 %, with
twice the energy inside the mask (``metrics/localisation.json``). Its gradient has to go
back through the backbone's last blocks, which the exported LiteRT graph cannot do
(gradient ops are not LiteRT builtins). This module does it by hand: the layers between
the chosen map and the pooling (the "tail") are read from the Keras model once, at export,
into plain arrays (``tail.npz``); at serving time the tail runs forward from the map the
graph returned (for the ReLU masks) and then its vector-Jacobian product carries the
head's pooled gradient back to the map. Every layer here is linear or piecewise linear at
inference, so that product is exact, and the maps equal the GradientTape ones
(``gradcam.GradCam`` with ``weighting="hirescam"``) to float rounding: the export checks it.

Supported layers (what EfficientNet-Lite0, ResNet50 and the test backbone have there):
Conv2D (any kernel and stride, ``same`` / ``valid`` padding, with or without bias, linear
or ReLU activation), DepthwiseConv2D, BatchNormalization (inference: an affine map), ReLU
(with ``max_value``) and Activation (relu, relu6, linear), Add, ZeroPadding2D, Dropout
(the identity). Anything else is refused with one line naming the layer.

The reading from Keras (``tail_from_model``) imports Keras on call; everything else is
NumPy, for the serving install.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.explain.headcam import HeadCamError, HeadCamResult, HeadParams
from braintumor.explain.maps import normalize_maps, resize_maps

FORMAT_VERSION = 1
TAIL_METHODS = ("gradcam", "hirescam")  # what a tail can serve (gradient weightings)
# Kinds of tail step (``TailStep.kind``).
CONV = "conv"
DEPTHWISE = "depthwise"
AFFINE = "affine"
RELU = "relu"
ADD = "add"
PAD = "pad"
IDENTITY = "identity"
KINDS = (CONV, DEPTHWISE, AFFINE, RELU, ADD, PAD, IDENTITY)
# float32 like the graph and the GradientTape: parity holds to ~1e-6 on [0, 1] maps, and
# the tail of Lite0 at 128 px costs about half of float64's time per upload.
DTYPE = np.float32


class TailError(HeadCamError):
    """A tail that cannot be read from the model, loaded or run (one line)."""


@dataclass(frozen=True)
class TailStep:
    """One layer of the tail. ``inputs`` index the values: 0 is the chosen map, ``i + 1``
    the output of step ``i``. ``arrays``: the layer's parameters; ``config``: its plain
    settings (strides, padding, max_value)."""

    kind: str
    inputs: tuple[int, ...]
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (the extra pixel after): what Keras uses."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padded(x: np.ndarray, kernel: tuple[int, int], stride: int, padding: str) -> np.ndarray:
    if padding == "valid":
        return x
    (top, bottom), (left, right) = (
        _same_padding(x.shape[1], kernel[0], stride),
        _same_padding(x.shape[2], kernel[1], stride),
    )
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _windows(padded: np.ndarray, kernel: tuple[int, int], stride: int) -> tuple[int, int]:
    return (
        (padded.shape[1] - kernel[0]) // stride + 1,
        (padded.shape[2] - kernel[1]) // stride + 1,
    )


@dataclass(frozen=True)
class TailParams:
    """The layers from the chosen map to the pooling, as arrays, in a topological order."""

    layer: str  # the chosen map's layer name
    steps: tuple[TailStep, ...]

    # ---- forward and backward

    def forward(self, feature_maps: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled features (N, D) from the chosen map (N, h, w, C), in float32, and every
        value (for ``backward``)."""
        values = [np.asarray(feature_maps, DTYPE)]
        if values[0].ndim != 4:
            raise TailError(f"tail at {self.layer!r}: expected (N, h, w, C), got {values[0].shape}")
        for step in self.steps:
            args = [values[i] for i in step.inputs]
            try:
                values.append(_FORWARD[step.kind](step, *args))
            except ValueError as error:
                raise TailError(f"tail step {step.name!r}: {error}") from None
        return values[-1].mean(axis=(1, 2)), values

    def backward(self, values: list[np.ndarray], pooled_gradient: np.ndarray) -> np.ndarray:
        """The gradient with respect to the chosen map (N, h, w, C) of a score whose
        gradient with respect to the pooled features is ``pooled_gradient`` (N, D): the
        tail's vector-Jacobian product, ``values`` from ``forward``."""
        last = values[-1]
        area = last.shape[1] * last.shape[2]
        gradients: list[np.ndarray | None] = [None] * len(values)
        gradients[-1] = np.broadcast_to(
            np.asarray(pooled_gradient, DTYPE)[:, None, None, :] / DTYPE(area), last.shape
        )
        for index in range(len(self.steps) - 1, -1, -1):
            step, upstream = self.steps[index], gradients[index + 1]
            if upstream is None:
                continue
            inputs = [values[i] for i in step.inputs]
            for target, gradient in zip(
                step.inputs, _BACKWARD[step.kind](step, upstream, *inputs), strict=True
            ):
                previous = gradients[target]
                gradients[target] = gradient if previous is None else previous + gradient
        result = gradients[0]
        return np.zeros_like(values[0]) if result is None else result

    # ---- files

    def save(self, path: Path) -> None:
        """Plain arrays and a JSON description in an ``.npz`` (no pickle), atomically."""
        from braintumor.core.files import atomic_path

        spec = [
            {"kind": s.kind, "inputs": list(s.inputs), "name": s.name, "config": s.config}
            for s in self.steps
        ]
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "layer": np.array(self.layer),
            "spec": np.array(json.dumps(spec)),
        }
        for index, step in enumerate(self.steps):
            for key, value in step.arrays.items():
                arrays[f"step{index}_{key}"] = value
        with atomic_path(Path(path)) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> TailParams:
        """Read ``save``'s file; ``TailError`` (one line) for anything else."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if int(arrays["format_version"]) != FORMAT_VERSION:
                raise TailError(f"{path}: tail format {int(arrays['format_version'])}")
            spec = json.loads(str(arrays["spec"]))
            steps = []
            for index, entry in enumerate(spec):
                if entry["kind"] not in KINDS:
                    raise TailError(f"{path}: unknown tail step {entry['kind']!r}")
                inputs = tuple(int(i) for i in entry["inputs"])
                if not inputs or min(inputs) < 0 or max(inputs) > index:
                    raise TailError(f"{path}: step {index} reads a value not yet computed")
                prefix = f"step{index}_"
                own = {
                    key[len(prefix) :]: np.asarray(value, DTYPE)
                    for key, value in arrays.items()
                    if key.startswith(prefix)
                }
                steps.append(
                    TailStep(entry["kind"], inputs, str(entry["name"]), dict(entry["config"]), own)
                )
            layer = str(arrays["layer"])
        except TailError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TailError(f"{path}: not a tail-parameters file ({error})") from None
        return cls(layer, tuple(steps))


# --------------------------------------------------------------------------- the layers


def _pointwise(step: TailStep) -> bool:
    """A 1 x 1, stride-1 convolution: one matrix product, no padding or windows."""
    kernel = step.arrays["kernel"]
    return step.kind == CONV and kernel.shape[:2] == (1, 1) and int(step.config["stride"]) == 1


def _conv_forward(step: TailStep, x: np.ndarray) -> np.ndarray:
    kernel = step.arrays["kernel"]
    if _pointwise(step):
        out = (x.reshape(-1, kernel.shape[2]) @ kernel[0, 0]).reshape(*x.shape[:3], -1)
        return out + step.arrays["bias"] if "bias" in step.arrays else out
    stride, padding = int(step.config["stride"]), str(step.config["padding"])
    size = kernel.shape[:2]
    padded = _padded(x, size, stride, padding)
    rows, cols = _windows(padded, size, stride)
    depthwise = step.kind == DEPTHWISE
    channels = kernel.shape[2] * kernel.shape[3] if depthwise else kernel.shape[3]
    out = np.zeros((x.shape[0], rows, cols, channels), x.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            patch = padded[
                :,
                i : i + stride * (rows - 1) + 1 : stride,
                j : j + stride * (cols - 1) + 1 : stride,
            ]
            if depthwise and kernel.shape[3] == 1:
                out += patch * kernel[i, j, :, 0]
            elif depthwise:
                out += (patch[..., None] * kernel[i, j]).reshape(out.shape)
            else:  # as one 2-D product: a strided 4-D matmul skips BLAS
                flat = np.ascontiguousarray(patch).reshape(-1, kernel.shape[2])
                out += (flat @ kernel[i, j]).reshape(out.shape)
    if "bias" in step.arrays:
        out += step.arrays["bias"]
    return out


def _conv_backward(step: TailStep, upstream: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
    kernel = step.arrays["kernel"]
    if _pointwise(step):
        flat = np.ascontiguousarray(upstream).reshape(-1, kernel.shape[3])
        return [(flat @ kernel[0, 0].T).reshape(x.shape)]
    stride, padding = int(step.config["stride"]), str(step.config["padding"])
    size = kernel.shape[:2]
    padded_shape = _padded(x[:1], size, stride, padding).shape
    gradient = np.zeros((x.shape[0], *padded_shape[1:]), upstream.dtype)
    rows, cols = upstream.shape[1:3]
    depthwise = step.kind == DEPTHWISE
    single = depthwise and kernel.shape[3] == 1  # multiplier 1: channel by channel
    if depthwise and not single:
        upstream = upstream.reshape(*upstream.shape[:3], kernel.shape[2], kernel.shape[3])
    elif not depthwise:
        flat = np.ascontiguousarray(upstream).reshape(-1, kernel.shape[3])
    for i in range(size[0]):
        for j in range(size[1]):
            window = (
                slice(None),
                slice(i, i + stride * (rows - 1) + 1, stride),
                slice(j, j + stride * (cols - 1) + 1, stride),
            )
            if single:
                gradient[window] += upstream * kernel[i, j, :, 0]
            elif depthwise:
                gradient[window] += (upstream * kernel[i, j]).sum(axis=-1)
            else:
                part = flat @ kernel[i, j].T
                gradient[window] += part.reshape(*upstream.shape[:3], kernel.shape[2])
    if padding == "same":
        top = _same_padding(x.shape[1], size[0], stride)[0]
        left = _same_padding(x.shape[2], size[1], stride)[0]
        gradient = gradient[:, top : top + x.shape[1], left : left + x.shape[2]]
    return [gradient]


def _relu_mask(step: TailStep, x: np.ndarray) -> np.ndarray:
    maximum = step.config.get("max_value")
    mask = x > 0
    if maximum is not None:
        mask &= x < float(maximum)
    return mask


def _relu_forward(step: TailStep, x: np.ndarray) -> np.ndarray:
    maximum = step.config.get("max_value")
    y = np.maximum(x, 0.0)
    return y if maximum is None else np.minimum(y, float(maximum))


def _pad_forward(step: TailStep, x: np.ndarray) -> np.ndarray:
    (top, bottom), (left, right) = step.config["padding"]
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _pad_backward(step: TailStep, upstream: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
    (top, _), (left, _) = step.config["padding"]
    return [upstream[:, top : top + x.shape[1], left : left + x.shape[2]]]


_FORWARD: dict[str, Any] = {
    CONV: _conv_forward,
    DEPTHWISE: _conv_forward,
    AFFINE: lambda step, x: x * step.arrays["scale"] + step.arrays["shift"],
    RELU: _relu_forward,
    ADD: lambda step, *xs: sum(xs[1:], xs[0]),
    PAD: _pad_forward,
    IDENTITY: lambda step, x: x,
}
_BACKWARD: dict[str, Any] = {
    CONV: _conv_backward,
    DEPTHWISE: _conv_backward,
    AFFINE: lambda step, g, x: [g * step.arrays["scale"]],
    RELU: lambda step, g, x: [g * _relu_mask(step, x)],
    ADD: lambda step, g, *xs: [g for _ in xs],
    PAD: _pad_backward,
    IDENTITY: lambda step, g, x: [g],
}


# --------------------------------------------------------------------------- the maps


def tail_cam(
    head: HeadParams,
    tail: TailParams,
    pooled: np.ndarray,
    layer_maps: np.ndarray,
    output_size: tuple[int, int],
    method: str = "hirescam",
    class_index: np.ndarray | None = None,
    centred: bool = True,
) -> HeadCamResult:
    """HiResCAM (``ReLU(sum_c grad * A)``) or Grad-CAM (channel weights: the gradient's
    spatial mean) at the tail's layer, from one forward pass's pooled features (N, D) and
    that layer's maps ``A`` (N, h, w, C), upsampled to ``output_size`` and scaled to
    [0, 1] exactly as ``gradcam.GradCam.compute`` does. The class (None: each row's
    predicted one) comes from the head on ``pooled``, as in ``head_gradcam``."""
    if method not in TAIL_METHODS:
        raise TailError(f"explanation method {method!r} is not one of {', '.join(TAIL_METHODS)}")
    maps = np.asarray(layer_maps, dtype=np.float32)
    if maps.ndim != 4 or len(maps) != len(pooled):
        raise TailError(
            f"maps of {tail.layer!r}: expected (N, h, w, C) for {len(pooled)} rows, "
            f"got {maps.shape}"
        )
    logits, masks = head.forward(pooled)
    chosen = (
        logits.argmax(axis=1) if class_index is None else np.asarray(class_index, dtype=np.int64)
    )
    tail_pooled, values = tail.forward(maps)
    if tail_pooled.shape[1] != head.feature_size:
        raise TailError(
            f"tail at {tail.layer!r} ends in {tail_pooled.shape[1]} features, the head reads "
            f"{head.feature_size}"
        )
    gradient = tail.backward(values, head.pooled_gradient(masks, chosen, centred))
    gradient = gradient.astype(np.float32)
    if method == "hirescam":
        raw = np.maximum((maps * gradient).sum(axis=-1), 0.0)
    else:
        raw = np.maximum(np.einsum("nhwc,nc->nhw", maps, gradient.mean(axis=(1, 2))), 0.0)
    raw = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0)
    heatmaps = normalize_maps(resize_maps(raw, *output_size))
    return HeadCamResult(logits, chosen.astype(np.int64), heatmaps)


# --------------------------------------------------------------------------- from Keras


def _history(tensor: Any) -> tuple[Any, int]:
    operation, node_index, _ = tensor._keras_history
    return operation, node_index


def _activation_name(activation: Any) -> str:
    import keras

    serialised = keras.activations.serialize(activation)
    return serialised if isinstance(serialised, str) else str(serialised.get("config", ""))


Steps = list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]


def _refusal(layer: Any, problem: str) -> TailError:
    return TailError(f"tail layer {layer.name!r} ({type(layer).__name__}): {problem}")


def _activation_steps(layer: Any, name: str) -> Steps:
    if name == "linear":
        return []
    if name == "relu":
        return [(RELU, {"max_value": None}, {})]
    if name == "relu6":
        return [(RELU, {"max_value": 6.0}, {})]
    raise _refusal(layer, f"activation {name!r} is not supported (relu, relu6, linear)")


def _conv_steps(layer: Any, depthwise: bool) -> Steps:
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    if strides[0] != strides[1] or dilation != (1, 1) or getattr(layer, "groups", 1) != 1:
        raise _refusal(layer, "unequal strides, dilation or groups are not supported")
    if layer.data_format != "channels_last" or layer.padding not in ("same", "valid"):
        raise _refusal(layer, "only channels_last with same or valid padding is supported")
    # (kh, kw, C_in, C_out), or (kh, kw, C, multiplier) for a depthwise layer
    arrays = {"kernel": np.asarray(layer.kernel, DTYPE)}
    if layer.use_bias:
        arrays["bias"] = np.asarray(layer.bias, DTYPE)
    config = {"stride": int(strides[0]), "padding": str(layer.padding)}
    steps: Steps = [(DEPTHWISE if depthwise else CONV, config, arrays)]
    return steps + _activation_steps(layer, _activation_name(layer.activation))


def _batch_norm_steps(layer: Any) -> Steps:
    """Inference BatchNormalization as a per-channel affine map (computed in float64)."""
    if layer.axis not in (-1, 3, [-1], [3]):
        raise _refusal(layer, f"axis {layer.axis} is not the channel axis")
    mean = np.asarray(layer.moving_mean, np.float64)
    gamma = np.asarray(layer.gamma, np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta, np.float64) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)
    shift = beta - mean * scale
    return [(AFFINE, {}, {"scale": scale.astype(DTYPE), "shift": shift.astype(DTYPE)})]


def _layer_steps(layer: Any) -> Steps:
    """One Keras layer as tail steps (kind, config, arrays); a conv with a ReLU activation
    is two. ``TailError`` (one line) for a layer this cannot differentiate by hand."""
    import keras

    layers = keras.layers
    if isinstance(layer, layers.DepthwiseConv2D | layers.Conv2D):
        return _conv_steps(layer, isinstance(layer, layers.DepthwiseConv2D))
    if isinstance(layer, layers.BatchNormalization):
        return _batch_norm_steps(layer)
    if isinstance(layer, layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            raise _refusal(layer, "negative_slope and threshold must be 0")
        maximum = None if layer.max_value is None else float(layer.max_value)
        return [(RELU, {"max_value": maximum}, {})]
    if isinstance(layer, layers.Activation):
        steps = _activation_steps(layer, _activation_name(layer.activation))
        return steps or [(IDENTITY, {}, {})]
    if isinstance(layer, layers.ZeroPadding2D) and layer.data_format == "channels_last":
        return [(PAD, {"padding": [[int(v) for v in pair] for pair in layer.padding]}, {})]
    simple = {layers.Add: ADD, layers.Dropout: IDENTITY}
    for kind, name in simple.items():
        if isinstance(layer, kind):
            return [(name, {}, {})]
    raise _refusal(
        layer,
        "not supported by the NumPy tail (Conv2D, DepthwiseConv2D, BatchNormalization, "
        "ReLU, Activation, Add, ZeroPadding2D channels_last, Dropout)",
    )


def tail_from_model(model: Any, layer_name: str, pool_layer: str) -> TailParams:
    """The layers between ``layer_name``'s output and the input of ``pool_layer`` (a global
    average pooling), read from the functional graph. ``TailError`` (one line) when the
    layer does not separate the model there (something after it reads an earlier tensor)
    or a layer in between is not supported."""
    names = {layer.name for layer in model.layers}
    for name in (layer_name, pool_layer):
        if name not in names:
            raise TailError(f"model {model.name!r} has no layer named {name!r}")
    chosen, pool = model.get_layer(layer_name), model.get_layer(pool_layer)
    if len(chosen._inbound_nodes) != 1:
        raise TailError(f"explanation layer {layer_name!r} is called more than once")
    target = chosen.output
    if len(target.shape) != 4:
        raise TailError(
            f"explanation layer {layer_name!r} outputs {tuple(target.shape)}, not a map"
        )
    operation, node_index = _history(pool.output)
    pool_inputs = pool._inbound_nodes[node_index].input_tensors
    if len(pool_inputs) != 1:
        raise TailError(f"{pool_layer!r} has several inputs")
    index_of: dict[int, int] = {id(target): 0}
    steps: list[TailStep] = []

    def visit(tensor: Any) -> int:
        key = id(tensor)
        if key in index_of:
            return index_of[key]
        operation, node_index = _history(tensor)
        node = operation._inbound_nodes[node_index]
        if not node.input_tensors:
            raise TailError(
                f"explanation layer {layer_name!r} does not separate the model: "
                f"{operation.name!r} reaches the input without passing through it"
            )
        sources = [visit(source) for source in node.input_tensors]
        parts = _layer_steps(operation)
        for position, (kind, config, arrays) in enumerate(parts):
            inputs = tuple(sources) if position == 0 else (len(steps),)
            steps.append(TailStep(kind, inputs, operation.name, config, arrays))
        index_of[key] = len(steps)
        return len(steps)

    visit(pool_inputs[0])
    return TailParams(layer_name, tuple(steps))
