"""Soft ReLU gates for the GradientTape: the Keras side of ``tailcam.relu_gate``.

A ReLU's exact gradient is a step: 1 inside (0, max), 0 outside. Two runtimes' forward
passes of the same model differ by float rounding (about 1e-4 in Lite0's tail between
LiteRT and Keras), so a unit within that rounding of a kink is gated one way by one and
the other way by the other, and the explanation map of that slice moves (up to 2e-2 on
[0, 1] maps, on about 4 % of real slices). With a gate width ``w > 0`` the gradient
through each ReLU is ``clip(min(y, max - y) / w, 0, 1)`` of its output ``y`` instead: the
exact gate's expectation under a uniform shift of the unit's input by up to ``w`` toward
the kink (a per-unit SmoothGrad), continuous in the forward values, so the served map
(LiteRT values, NumPy backward) and the GradientTape's agree to the values' rounding.

``soft_gate_clone`` is a structural copy of a model whose ReLU layers compute exactly the
same forward values and pass that gradient backward (``stop_gradient`` only, so every
backend differentiates it); ``copy_weights`` gives it the model's current weights. The
model itself is never changed. A ReLU built into a convolution (``activation="relu"``) is
refused in one line: the clone cannot split it from the convolution.
"""

from __future__ import annotations

from typing import Any

import keras

from braintumor.explain.maps import activation_name

# ReLU activations by their serialised name -> the cap (None: plain ReLU)
_CAPS: dict[str, float | None] = {"relu": None, "relu6": 6.0}


class SoftGateError(ValueError):
    """A model whose ReLUs cannot take soft gates (one line)."""


class SoftGateReLU(keras.layers.Layer):
    """``relu(x, max_value)`` forward, exactly; backward, the upstream gradient times
    ``clip(min(y, max - y) / width, 0, 1)`` of the output ``y`` (see the module)."""

    def __init__(self, max_value: float | None, width: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_value = None if max_value is None else float(max_value)
        self.width = float(width)

    def call(self, inputs: Any) -> Any:
        ops = keras.ops
        output = keras.activations.relu(inputs, max_value=self.max_value)
        edge = output if self.max_value is None else ops.minimum(output, self.max_value - output)
        gate = ops.clip(edge / self.width, 0.0, 1.0)
        # forward: output + 0 (x - x is exactly 0); backward: d/dx = gate
        difference = inputs - ops.stop_gradient(inputs)
        return ops.stop_gradient(output) + difference * ops.stop_gradient(gate)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_value": self.max_value, "width": self.width}


def _soft(layer: Any, width: float) -> Any:
    """The clone of one layer: a ReLU as ``SoftGateReLU``, anything else as itself."""
    layers = keras.layers
    if isinstance(layer, layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            raise SoftGateError(
                f"layer {layer.name!r} (ReLU): soft gates need negative_slope and threshold 0"
            )
        return SoftGateReLU(layer.max_value, width, name=layer.name)
    if isinstance(layer, layers.Activation):
        name = activation_name(layer.activation)
        if name in _CAPS:
            return SoftGateReLU(_CAPS[name], width, name=layer.name)
    elif isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D):
        name = activation_name(layer.activation)
        if name in _CAPS:
            raise SoftGateError(
                f"layer {layer.name!r} ({type(layer).__name__}) has activation {name!r} "
                "built in: soft ReLU gates need each ReLU as a layer of its own"
            )
    return layer.__class__.from_config(layer.get_config())


def soft_gate_clone(model: keras.Model, width: float) -> keras.Model:
    """A structural copy of ``model`` (fresh weights: ``copy_weights``) whose ReLU layers
    pass soft gates of ``width`` backward; ``SoftGateError`` (one line) for a ReLU it
    cannot swap."""
    if not width > 0.0:
        raise SoftGateError(f"gate width must be positive, got {width}")
    return keras.models.clone_model(model, clone_function=lambda layer: _soft(layer, width))


def copy_weights(clone_variables: list[Any], originals: list[Any]) -> None:
    """Give the clone's variables the model's current values (``originals``: the model's
    ``variables``, same structure, same order)."""
    if len(clone_variables) != len(originals):
        raise SoftGateError("the soft-gate clone's variables do not match the model's")
    for copy, original in zip(clone_variables, originals, strict=True):
        if tuple(copy.shape) != tuple(original.shape):
            raise SoftGateError(f"cannot match the clone's variable {copy.path!r}")
        copy.assign(original.value)
