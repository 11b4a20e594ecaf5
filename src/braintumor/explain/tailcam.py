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
into plain arrays (``tail.npz``); at serving time the graph also returns the tail's
forward values (``TailParams.value_layers``, the ReLU masks among them; a graph exported
before that: the tail runs forward here from the map it returned) and the tail's
vector-Jacobian product carries the head's pooled gradient back to the map. Every layer
here is linear or piecewise linear at inference, so that product is exact, and the maps
equal the GradientTape ones
(``gradcam.GradCam`` with ``weighting="hirescam"``) to float rounding: the export checks it.
The ReLUs' gates may be soft (``TailParams.gate_width``, ``relu_gate``; the GradientTape's
side: ``explain.softgates``), which keeps the served map within that rounding of the tape's
even where the two runtimes' forward values straddle a gate's kink.

Supported layers (what EfficientNet-Lite0, ResNet50 and the test backbone have there):
Conv2D (any kernel and stride, ``same`` / ``valid`` padding, with or without bias, linear
or ReLU activation), DepthwiseConv2D, BatchNormalization (inference: an affine map), ReLU
(with ``max_value``) and Activation (relu, relu6, linear), Add, ZeroPadding2D, Dropout
(the identity). Anything else is refused with one line naming the layer. Serving runs the
steps fused (``_fused``: BatchNormalization folded into the convolution before it, ReLU in
place, depthwise convolutions as one ``einsum``): the same maps to float rounding.

The reading from Keras (``tail_from_model``) imports Keras on call; everything else is
NumPy, for the serving install.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from braintumor.core.files import read_arrays, write_arrays
from braintumor.core.schema import MAX_GATE_WIDTH
from braintumor.explain.headcam import HeadCamError, HeadCamResult, HeadParams
from braintumor.explain.maps import activation_name, normalize_maps, resize_maps

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
    """The layers from the chosen map to the pooling, as arrays, in a topological order.
    ``gate_width``: how the backward passes a ReLU (``relu_gate``): 0 is the exact
    gradient; a width ``w > 0`` ramps each gate linearly over the last ``w`` before each
    of its kinks, which makes the map a continuous function of the forward values."""

    layer: str  # the chosen map's layer name
    steps: tuple[TailStep, ...]
    gate_width: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.gate_width <= MAX_GATE_WIDTH:
            raise TailError(f"gate_width {self.gate_width} is not in [0, {MAX_GATE_WIDTH}]")

    # ---- forward and backward

    @cached_property
    def _plan(self) -> _Plan:
        """The steps as ``_fused`` runs them: built once per tail, on first use."""
        return _fused(self.steps, self.gate_width)

    def forward(self, feature_maps: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled features (N, D) from the chosen map (N, h, w, C), in float32, and every
        value (for ``backward``; the fused plan's values, not one per step)."""
        first = np.ascontiguousarray(feature_maps, DTYPE)
        if first.ndim != 4:
            raise TailError(f"tail at {self.layer!r}: expected (N, h, w, C), got {first.shape}")
        plan = self._plan
        values = [first]
        for op in plan.ops:
            args = [values[i] for i in op.inputs]
            try:
                values.append(op.forward(*args))
            except ValueError as error:
                raise TailError(f"tail step {op.name!r}: {error}") from None
        return self.pooled(values), values

    def pooled(self, values: list[np.ndarray]) -> np.ndarray:
        """What the global average pooling makes of the tail's values (N, D)."""
        return values[self._plan.output].mean(axis=(1, 2))

    @property
    def value_layers(self) -> tuple[str, ...]:
        """The Keras layer whose output each of ``forward``'s values is (the chosen map's
        first): tapping these from the model gives ``backward`` the model's own values,
        so its ReLU gates are the model's (a gate within float rounding of 0 or 6 can
        flip between two forward computations, and a flipped gate moves the map)."""
        return (self.layer, *self._plan.names)

    def backward(self, values: list[np.ndarray], pooled_gradient: np.ndarray) -> np.ndarray:
        """The gradient with respect to the chosen map (N, h, w, C) of a score whose
        gradient with respect to the pooled features is ``pooled_gradient`` (N, D): the
        tail's vector-Jacobian product, ``values`` from ``forward``."""
        plan = self._plan
        last = values[plan.output]
        area = last.shape[1] * last.shape[2]
        gradients: list[np.ndarray | None] = [None] * len(values)
        gradients[plan.output] = np.broadcast_to(
            np.asarray(pooled_gradient, DTYPE)[:, None, None, :] / DTYPE(area), last.shape
        )
        for index in range(len(plan.ops) - 1, -1, -1):
            op, upstream = plan.ops[index], gradients[index + 1]
            if upstream is None:
                continue
            gradients[index + 1] = None  # not needed again: its memory can go
            inputs = [values[i] for i in op.inputs]
            for target, gradient in zip(
                op.inputs, op.backward(upstream, values[index + 1], *inputs), strict=True
            ):
                previous = gradients[target]
                gradients[target] = gradient if previous is None else previous + gradient
        result = gradients[0]
        return np.zeros_like(values[0]) if result is None else result

    # ---- files

    def save(self, path: Path) -> None:
        """Plain arrays and a JSON description in an ``.npz`` (no pickle), atomically."""
        spec = [
            {"kind": s.kind, "inputs": list(s.inputs), "name": s.name, "config": s.config}
            for s in self.steps
        ]
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "layer": np.array(self.layer),
            "spec": np.array(json.dumps(spec)),
            "gate_width": np.array(float(self.gate_width)),
        }
        for index, step in enumerate(self.steps):
            for key, value in step.arrays.items():
                arrays[f"step{index}_{key}"] = value
        write_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path) -> TailParams:
        """Read ``save``'s file; ``TailError`` (one line) for anything else."""
        try:
            arrays = read_arrays(path)
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
            # absent in files written before soft gates: those were exact
            width = float(arrays["gate_width"]) if "gate_width" in arrays else 0.0
        except TailError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TailError(f"{path}: not a tail-parameters file ({error})") from None
        try:
            return cls(layer, tuple(steps), width)
        except TailError as error:  # the width's range, checked by the class itself
            raise TailError(f"{path}: {error}") from None


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


def relu_gate(output: np.ndarray, maximum: float | None, width: float) -> np.ndarray:
    """What the backward multiplies the upstream gradient by at a ReLU (``maximum``: its
    cap, 6 for ReLU6) whose output is ``output`` (the clipped value: ``output > 0`` is
    ``input > 0`` and ``output < max`` is ``input < max``, so the output holds the gate).

    ``width`` 0: the exact gradient, 1 where the input is strictly inside (0, max), else 0.
    It jumps at the kinks, and a unit within float rounding of one (two runtimes' forward
    passes differ by ~1e-4 in Lite0's tail) is gated one way by one runtime and the other
    way by the other: the served map then moves by up to ~2e-2 against Keras's on about 4 %
    of real slices (``docs/benchmarks-lite0.md``). ``width`` w > 0: ``clip(min(y, max - y) / w,
    0, 1)``, a linear ramp over the last w before each kink, which is the exact gate's
    expectation when the unit's input is shifted by a uniform draw from [-w, 0] near 0
    (and from [0, w] near max): a per-unit SmoothGrad. It is continuous in the forward
    values, so the two runtimes' maps differ by their values' rounding only."""
    if width <= 0.0:
        mask = output > 0.0
        if maximum is not None:
            mask &= output < maximum
        return mask
    edge = output if maximum is None else np.minimum(output, DTYPE(maximum) - output)
    return np.clip(edge / DTYPE(width), 0.0, 1.0).astype(DTYPE, copy=False)


def _relu_backward(
    step: TailStep, upstream: np.ndarray, x: np.ndarray, width: float
) -> list[np.ndarray]:
    maximum = step.config.get("max_value")
    cap = None if maximum is None else float(maximum)
    gate = relu_gate(_relu_forward(step, x), cap, width)
    return [np.multiply(upstream, gate, dtype=DTYPE)]


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
    ADD: lambda step, g, *xs: [g for _ in xs],
    PAD: _pad_backward,
    IDENTITY: lambda step, g, x: [g],
}


# --------------------------------------------------------------------------- the fused plan
#
# What serving runs per upload (the steps above stay the file's format and the reference):
# a BatchNormalization right after a convolution is folded into its kernel and bias, and a
# ReLU right after it clips the convolution's output in place (its mask is read back from
# that output), so EfficientNet-Lite0's 49 steps from ``block10_add`` run as 19; a
# depthwise convolution is one ``einsum`` over a windows view, forward and backward. On 2
# busy cores, one BLAS thread, Lite0 at 128 px, one real slice: ``tail_cam`` 9.9 -> 7.1 ms
# p50 (the steps' forward and backward alone: 7.9 ms as 49 steps, 6.1 ms as 19). What is
# left is mostly the 1 x 1 convolutions' matrix products (about 4 ms, reading 7.8 MB of
# weights twice), the floor in float32 NumPy; the maps differ from the unfused steps'
# by float rounding (5e-7 on [0, 1] maps, 16 real slices).


class _Op(NamedTuple):
    """One fused step: ``forward(*inputs) -> output``, ``backward(upstream, output,
    *inputs) -> one gradient per input``. ``inputs`` index the plan's values."""

    name: str
    inputs: tuple[int, ...]
    forward: Any
    backward: Any


class _Plan(NamedTuple):
    ops: tuple[_Op, ...]
    output: int  # the value the pooling reads
    # The Keras layer whose output each op's value equals (the last step of its group)
    names: tuple[str, ...] = ()


def _clip(out: np.ndarray, maximum: float | None) -> np.ndarray:
    """ReLU (or ReLU6, ``maximum``) in place."""
    np.maximum(out, 0.0, out=out)
    if maximum is not None:
        np.minimum(out, maximum, out=out)
    return out


def _masked(
    upstream: np.ndarray, output: np.ndarray, maximum: float | None, width: float
) -> np.ndarray:
    """The upstream gradient through a ReLU whose output is ``output`` (``relu_gate``)."""
    return np.multiply(upstream, relu_gate(output, maximum, width), dtype=DTYPE)


def _depthwise_padded(
    x: np.ndarray, size: tuple[int, int], stride: int, padding: str
) -> np.ndarray:
    """``x`` in a zeroed array with SAME padding's border (``x`` itself for ``valid``)."""
    if padding == "valid":
        return x
    top, bottom = _same_padding(x.shape[1], size[0], stride)
    left, right = _same_padding(x.shape[2], size[1], stride)
    n, h, w, c = x.shape
    padded = np.zeros((n, h + top + bottom, w + left + right, c), DTYPE)
    padded[:, top : top + h, left : left + w] = x
    return padded


def _windowed(padded: np.ndarray, size: tuple[int, int], stride: int) -> np.ndarray:
    """Every output position's ``kh x kw`` window of ``padded`` (N, h', w', C), as a view
    (N, rows, cols, C, kh, kw): no copy."""
    view = sliding_window_view(padded, size, axis=(1, 2))
    return view if stride == 1 else view[:, ::stride, ::stride]


def _depthwise_op(
    name: str,
    inputs: tuple[int, ...],
    config: dict[str, Any],
    kernel: np.ndarray,
    bias: np.ndarray | None,
    maximum: float | None,
    relu: bool,
    width: float = 0.0,
) -> _Op:
    """Depthwise convolution of channel multiplier 1 as one ``einsum`` over the windows
    view (measured 0.15 ms against 0.5 ms for summing the 25 shifted slices of a 5 x 5
    kernel at 8 x 8 x 672). Its input gradient is the same correlation, with the kernel
    flipped, over the upstream gradient spread out by the stride and padded by the
    kernel's size less one on each side."""
    stride, padding = int(config["stride"]), str(config["padding"])
    size = (kernel.shape[0], kernel.shape[1])
    # (kh, kw, C): with C last, einsum's inner loop runs over the view's contiguous axis
    # (8x faster than (C, kh, kw) measured)
    weights = np.ascontiguousarray(kernel[:, :, :, 0])
    flipped = np.ascontiguousarray(weights[::-1, ::-1])

    def forward(x: np.ndarray) -> np.ndarray:
        padded = _depthwise_padded(x, size, stride, padding)
        out = np.einsum("nhwcij,ijc->nhwc", _windowed(padded, size, stride), weights)
        if bias is not None:
            out += bias
        return _clip(out, maximum) if relu else out

    def backward(upstream: np.ndarray, output: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        if relu:
            upstream = _masked(upstream, output, maximum, width)
        n, rows, cols, channels = upstream.shape
        top = left = 0
        if padding == "same":
            top = _same_padding(x.shape[1], size[0], stride)[0]
            left = _same_padding(x.shape[2], size[1], stride)[0]
        # The padded input's gradient at p is sum_i spread[p + i] * flipped[i], where
        # spread holds upstream[h] at kh - 1 + stride * h and zeros elsewhere: only the
        # rows p in [top, top + h) (the input's own) are computed.
        spread = np.zeros(
            (n, top + x.shape[1] + size[0] - 1, left + x.shape[2] + size[1] - 1, channels), DTYPE
        )
        spread[
            :,
            size[0] - 1 : size[0] - 1 + stride * (rows - 1) + 1 : stride,
            size[1] - 1 : size[1] - 1 + stride * (cols - 1) + 1 : stride,
        ] = upstream
        windows = _windowed(spread[:, top:, left:], size, 1)
        return [np.einsum("nhwcij,ijc->nhwc", windows, flipped)]

    return _Op(name, inputs, forward, backward)


def _pointwise_op(
    name: str,
    inputs: tuple[int, ...],
    kernel: np.ndarray,
    bias: np.ndarray | None,
    maximum: float | None,
    relu: bool,
    width: float = 0.0,
) -> _Op:
    """A 1 x 1, stride-1 convolution: one matrix product on (N * h * w, C) rows."""
    # One copy of the weights, laid out for the backward: BLAS reading a matrix transposed
    # took 0.15 against 0.09 ms for (16, 1152) x (1152, 192) on one thread, and serving runs
    # only this backward when the graph returns the tail's values; the forward (the load
    # check, bundles exported before the values) reads it transposed. Keeping a second,
    # forward-ordered copy cost 7.8 MB of RSS at block10_add and 11 MB at block4_add.
    transposed = np.ascontiguousarray(kernel[0, 0].T)
    matrix = transposed.T

    def forward(x: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(x).reshape(-1, matrix.shape[0])
        out = (flat @ matrix).reshape(*x.shape[:3], matrix.shape[1])
        if bias is not None:
            out += bias
        return _clip(out, maximum) if relu else out

    def backward(upstream: np.ndarray, output: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        if relu:
            upstream = _masked(upstream, output, maximum, width)
        flat = np.ascontiguousarray(upstream).reshape(-1, matrix.shape[1])
        return [(flat @ transposed).reshape(x.shape)]

    return _Op(name, inputs, forward, backward)


def _conv_op(
    step: TailStep,
    inputs: tuple[int, ...],
    kernel: np.ndarray,
    bias: np.ndarray | None,
    maximum: float | None,
    relu: bool,
    width: float = 0.0,
) -> _Op:
    """A convolution with its folded BatchNormalization and ReLU, if any."""
    config = step.config
    if step.kind == DEPTHWISE and kernel.shape[3] == 1:
        return _depthwise_op(step.name, inputs, config, kernel, bias, maximum, relu, width)
    if step.kind == CONV and kernel.shape[:2] == (1, 1) and int(config["stride"]) == 1:
        return _pointwise_op(step.name, inputs, kernel, bias, maximum, relu, width)
    arrays = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    plain = TailStep(step.kind, step.inputs, step.name, config, arrays)

    def forward(x: np.ndarray) -> np.ndarray:
        out = _conv_forward(plain, x)
        return _clip(out, maximum) if relu else out

    def backward(upstream: np.ndarray, output: np.ndarray, x: np.ndarray) -> list[np.ndarray]:
        if relu:
            upstream = _masked(upstream, output, maximum, width)
        result: list[np.ndarray] = _conv_backward(plain, upstream, x)
        return result

    return _Op(step.name, inputs, forward, backward)


def _plain_op(step: TailStep, inputs: tuple[int, ...], width: float = 0.0) -> _Op:
    """A step as it is (an add, a padding, an affine or ReLU not after a convolution; a
    ReLU's backward takes the gate width, so it is not in ``_BACKWARD``)."""
    forward = _FORWARD[step.kind]
    if step.kind == RELU:
        return _Op(
            step.name,
            inputs,
            lambda x: forward(step, x),
            lambda g, y, x: _relu_backward(step, g, x, width),
        )
    backward = _BACKWARD[step.kind]
    return _Op(
        step.name,
        inputs,
        lambda *xs: forward(step, *xs),
        lambda g, y, *xs: backward(step, g, *xs),
    )


def _conv_group(
    steps: tuple[TailStep, ...],
    index: int,
    readers: list[int],
    inputs: tuple[int, ...],
    width: float = 0.0,
) -> tuple[_Op, int]:
    """The convolution ``steps[index]`` with the BatchNormalization (folded into its kernel
    and bias, in float64, then float32), ReLU and identities right after it that alone
    read its output; and the value (a step's index + 1) the group ends at."""
    step = steps[index]
    kernel = step.arrays["kernel"].astype(np.float64)
    bias = step.arrays["bias"].astype(np.float64) if "bias" in step.arrays else None
    relu, maximum, end = False, None, index + 1
    while end < len(steps) and readers[end] == 1 and steps[end].inputs == (end,):
        following = steps[end]
        if following.kind == AFFINE and not relu:
            scale = following.arrays["scale"].astype(np.float64)
            shift = following.arrays["shift"].astype(np.float64)
            # a depthwise kernel's output channel is (C, multiplier) flattened
            kernel = kernel * scale.reshape(kernel.shape[2:] if step.kind == DEPTHWISE else -1)
            bias = shift if bias is None else bias * scale + shift
        elif following.kind == RELU and not relu:
            relu = True
            value = following.config.get("max_value")
            maximum = None if value is None else float(value)
        elif following.kind != IDENTITY:
            break
        end += 1
    folded_bias = None if bias is None else bias.astype(DTYPE)
    op = _conv_op(step, inputs, kernel.astype(DTYPE), folded_bias, maximum, relu, width)
    return op, end


def _fused(steps: tuple[TailStep, ...], width: float = 0.0) -> _Plan:
    """The steps as ``_conv_group`` folds them, Dropout and linear activations dropped. A
    step is folded only when it alone reads the convolution's output, so no other step
    sees the unfolded value."""
    readers = [0] * (len(steps) + 1)
    for step in steps:
        for index in step.inputs:
            readers[index] += 1
    readers[len(steps)] += 1  # the pooling reads the last value
    where = {0: 0}  # a step's value (its index + 1) -> the plan's value
    ops: list[_Op] = []
    names: list[str] = []
    index = 0
    while index < len(steps):
        step = steps[index]
        inputs = tuple(where[i] for i in step.inputs)
        if step.kind == IDENTITY:
            where[index + 1], end = inputs[0], index + 1
        elif step.kind in (CONV, DEPTHWISE):
            op, end = _conv_group(steps, index, readers, inputs, width)
            ops.append(op)
            names.append(steps[end - 1].name)
        else:
            ops.append(_plain_op(step, inputs, width))
            names.append(step.name)
            end = index + 1
        for value in range(index + 1, end + 1):
            where.setdefault(value, len(ops))
        index = end
    return _Plan(tuple(ops), where[len(steps)], tuple(names))


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
    values: list[np.ndarray] | None = None,
) -> HeadCamResult:
    """HiResCAM (``ReLU(sum_c grad * A)``) or Grad-CAM (channel weights: the gradient's
    spatial mean) at the tail's layer, from one forward pass's pooled features (N, D) and
    that layer's maps ``A`` (N, h, w, C), upsampled to ``output_size`` and scaled to
    [0, 1] exactly as ``gradcam.GradCam.compute`` does. The class (None: each row's
    predicted one) comes from the head on ``pooled``, as in ``head_gradcam``. ``values``:
    the tail's values from elsewhere, one per ``TailParams.value_layers`` (the parity
    check passes Keras's own, so the gradient is compared on the same ReLU gates); None
    runs the tail forward from ``layer_maps``."""
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
    if values is None:
        tail_pooled, values = tail.forward(maps)
    else:
        values = [np.ascontiguousarray(value, DTYPE) for value in values]
        if len(values) != len(tail.value_layers):
            raise TailError(
                f"tail at {tail.layer!r}: {len(values)} values given, it has "
                f"{len(tail.value_layers)}"
            )
        tail_pooled = tail.pooled(values)
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
    return steps + _activation_steps(layer, activation_name(layer.activation))


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
        steps = _activation_steps(layer, activation_name(layer.activation))
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


def tail_from_model(
    model: Any, layer_name: str, pool_layer: str, gate_width: float = 0.0
) -> TailParams:
    """The layers between ``layer_name``'s output and the input of ``pool_layer`` (a global
    average pooling), read from the functional graph, with ``gate_width`` for their ReLUs
    (``relu_gate``). ``TailError`` (one line) when the layer does not separate the model
    there (something after it reads an earlier tensor) or a layer in between is not
    supported."""
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
    return TailParams(layer_name, tuple(steps), float(gate_width))
