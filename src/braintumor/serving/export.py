"""Export a bundle's Keras model for serving without TensorFlow: the LiteRT graph and the
head's parameters, checked against the Keras model before anything is written.

``export_model`` builds one inference graph from the trained model (0-255 gray in;
``probabilities``, ``pooled`` features and the Grad-CAM layer's ``maps`` out,
``serving.exported``), converts it with TensorFlow's LiteRT converter (builtin ops only,
so the ``ai-edge-litert`` interpreter runs it without TensorFlow), reads the head after
global average pooling into ``explain.headcam.HeadParams``, and runs the parity check on
real images: probabilities and Grad-CAM maps from the exported graph plus the NumPy head
against the Keras model's own probabilities and the GradientTape Grad-CAM
(``explain.gradcam``). Beyond ``PARITY_TOLERANCE`` the export fails with one line, so a
bundle never carries an exported model that answers differently from the evaluated one.

``quantize="int8"`` is post-training full-integer quantisation (weights and activations
int8, float input and outputs) calibrated on a representative set of validation images;
its parity with the float model is reported, not required (the evaluate stage decides by
the evaluation views whether to adopt it).

The Grad-CAM layer must be the map global average pooling reads (``top_activation`` in
our models): that is what makes the head's gradient the channel weight. The map serving
shows (``explanation``, ``serving.explanation``) may be another (method, layer): HiResCAM
at an earlier block, as the localisation stage chose. That layer becomes an extra output
of the same graph, and so does every layer after it whose output the tail's gradient reads
(``TailParams.value_layers``: serving runs only the tail's backward, on the runtime's own
forward values); the backbone's layers after it are written to ``tail.npz``
(``explain.tailcam``: their gradient by hand in NumPy, since gradient ops are not LiteRT
builtins), and the parity check compares those maps with the GradientTape's: within
``PARITY_TOLERANCE`` when computed on the values of the GradientTape's own forward pass
at every tail layer (the NumPy gradient is exact on the same ReLU gates), with the NumPy
forward held to the same bound against those values; served from the LiteRT graph's
values, within ``PARITY_TOLERANCE`` at the max when the tail's ReLUs are soft-gated
(``gate_width`` > 0, ``explain.softgates``: continuous, so the two runtimes' rounding
cannot flip a gate; 3.5e-5 measured), else each image's mean difference within
``SERVED_MAP_TOLERANCE`` (an exact ReLU6 gate flips where its input is within float
rounding of 0 or 6, which moves a few pixels by ~1e-2).

Serving layer; imports Keras and TensorFlow (the training install), never at import time.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.explain.headcam import AFFINE, DENSE, HeadParams, HeadStep, softmax
from braintumor.explain.tailcam import TailError, TailParams, tail_cam, tail_from_model
from braintumor.serving.exported import (
    EXPLANATION_METHODS,
    EXPORT_FILE,
    EXTRA_PREFIX,
    HEAD_FILE,
    INPUT_NAME,
    TAIL_FILE,
    Explanation,
    ExportedModel,
    probe_image,
)

POOL_LAYER = "head_pool"  # model.classifier: HEAD_PREFIX + "pool"
PARITY_TOLERANCE = 1e-4  # max |difference| of probabilities and of [0, 1] Grad-CAM maps
# The served map through the backbone's tail runs the NumPy backward on LiteRT's forward
# values (every tail layer's output is a graph output; a graph exported before that ran
# the tail forward in NumPy from the layer's map): they round differently from Keras (3e-4
# at block10_add of the quickstart's Lite0, scale 44). A ReLU6 whose input is
# within that rounding of 0 or 6 then gates the gradient the other way, and the map moves
# where that unit reaches: by 1.4e-3 to 3.2e-3 at the worst pixel on most seeds, by 1.15e-2
# (mean 7.9e-4) on one validation slice of one seed, with the same hottest cell. So the
# served maps are held to SERVED_MAP_TOLERANCE on each image's mean |difference| (a wrong
# tail or layer moves it by more than 5e-2), while what must be exact is held to
# PARITY_TOLERANCE: the NumPy gradient on the values of the GradientTape's own forward pass
# at every tail layer (the same gates: 8e-7 on that slice, ``Parity.numpy_maps``; two
# Keras passes round differently, and against another pass's tape a seed of the resolution
# round-trip sweep was off by 4.1e-3) and the NumPy forward against
# those values (``Parity.tail_forward``). Soft gates (``gate_width`` > 0, the default since
# session 11) remove the flips, and their served maps are held to PARITY_TOLERANCE instead.
SERVED_MAP_TOLERANCE = 1e-2
QUANTIZE = ("none", "int8")


class ExportError(ValueError):
    """The model cannot be exported, or its export disagrees with it (one line)."""


@dataclass(frozen=True)
class Parity:
    """Differences, exported vs Keras, over ``images`` real images."""

    images: int
    probabilities: float  # max |difference|
    maps: float  # the served maps from the exported graph's outputs: max |difference|
    same_class: float  # share of images whose predicted class agrees
    # The same NumPy maps (head and tail) on the values of the GradientTape's own Keras
    # pass at every layer they read, against that tape: the hand-written gradient alone.
    numpy_maps: float = 0.0
    # The served maps' mean |difference| on the image where it is largest.
    maps_mean: float = 0.0
    # The NumPy tail's forward from Keras's map against Keras's values at each tail layer,
    # relative to that layer's largest magnitude (0 without a tail).
    tail_forward: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "images": self.images,
            "probabilities": float(self.probabilities),
            "maps": float(self.maps),
            "maps_mean": float(self.maps_mean),
            "numpy_maps": float(self.numpy_maps),
            "tail_forward": float(self.tail_forward),
            "same_class": float(self.same_class),
        }


@dataclass(frozen=True)
class ExportResult:
    """Files written into ``folder`` and what the bundle records about them."""

    model_file: Path
    head_file: Path
    info: dict[str, Any] = field(default_factory=dict)
    tail_file: Path | None = None  # ``tail.npz`` when the explanation needs the tail


def _layer_input(layer: Any) -> Any:
    node = layer._inbound_nodes[0]
    inputs = node.input_tensors
    return inputs[0] if len(inputs) == 1 else None


def head_params(model: Any) -> HeadParams:
    """The head after ``head_pool`` as NumPy arrays: every layer from the pooling to the
    output must be a chain of BatchNormalization, Dropout and Dense (ReLU or linear
    hidden, softmax out); anything else is refused in one line."""
    import keras

    try:
        pool = model.get_layer(POOL_LAYER)
    except ValueError:
        raise ExportError(f"model {model.name!r} has no {POOL_LAYER!r} layer") from None
    output_layer = model.outputs[0]._keras_history.operation
    chain = []
    layer = output_layer
    while layer is not pool:
        chain.append(layer)
        tensor = _layer_input(layer)
        if tensor is None:
            raise ExportError(f"head layer {layer.name!r} has several inputs (not a chain)")
        layer = tensor._keras_history.operation
    chain.reverse()
    steps: list[HeadStep] = []
    for layer in chain[:-1]:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = np.asarray(layer.gamma, np.float64) if layer.scale else 1.0
            beta = np.asarray(layer.beta, np.float64) if layer.center else 0.0
            mean = np.asarray(layer.moving_mean, np.float64)
            variance = np.asarray(layer.moving_variance, np.float64)
            scale = gamma / np.sqrt(variance + layer.epsilon) * np.ones_like(mean)
            steps.append(HeadStep(AFFINE, scale, beta - mean * scale))
        elif isinstance(layer, keras.layers.Dropout):
            continue
        elif isinstance(layer, keras.layers.Dense):
            activation = keras.activations.serialize(layer.activation)
            name = activation if isinstance(activation, str) else activation.get("config", "")
            if name not in ("relu", "linear"):
                raise ExportError(f"head layer {layer.name!r}: activation {name!r} not supported")
            kernel = np.asarray(layer.kernel, np.float64)
            bias = (
                np.asarray(layer.bias, np.float64) if layer.use_bias else np.zeros(kernel.shape[1])
            )
            steps.append(HeadStep(DENSE, kernel, bias, name == "relu"))
        else:
            raise ExportError(
                f"head layer {layer.name!r} ({type(layer).__name__}) is not supported by the "
                "one-pass Grad-CAM (BatchNormalization, Dense, Dropout only)"
            )
    last = chain[-1]
    if not isinstance(last, keras.layers.Dense) or last.activation is not keras.activations.softmax:
        raise ExportError(f"output layer {last.name!r} is not a softmax Dense")
    kernel = np.asarray(last.kernel, np.float64)
    bias = np.asarray(last.bias, np.float64) if last.use_bias else np.zeros(kernel.shape[1])
    return HeadParams(tuple(steps), kernel, bias)


def check_map_layer(model: Any, layer_name: str) -> None:
    """The Grad-CAM layer must be the one ``head_pool`` averages (see the module doc)."""
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise ExportError(f"gradcam_layer: the model has no layer {layer_name!r}") from None
    pooled_from = _layer_input(model.get_layer(POOL_LAYER))
    if pooled_from is None or pooled_from._keras_history.operation is not layer:
        raise ExportError(
            f"gradcam_layer: {layer_name!r} is not the map {POOL_LAYER} averages; the one-pass "
            "Grad-CAM needs that layer"
        )


def inference_graph(model: Any, layer_name: str, extra_layers: tuple[str, ...] = ()) -> Any:
    """A Keras model with the three named outputs (and ``map:<layer>`` for extras)."""
    import keras

    outputs = {
        "probabilities": model.output,
        "pooled": model.get_layer(POOL_LAYER).output,
        "maps": model.get_layer(layer_name).output,
    }
    for name in extra_layers:
        try:
            outputs[f"{EXTRA_PREFIX}{name}"] = model.get_layer(name).output
        except ValueError:
            raise ExportError(f"extra_layers: the model has no layer {name!r}") from None
    return keras.Model(model.inputs, outputs, name="served_graph")


def _saved_model(graph: Any, size: int, folder: Path) -> None:
    import tensorflow as tf
    from keras.export import ExportArchive

    archive = ExportArchive()
    archive.track(graph)

    def serve(image: Any) -> Any:
        return graph(image, training=False)

    archive.add_endpoint(
        "serve",
        serve,
        input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(folder), verbose=False)


def to_tflite(
    graph: Any, size: int, quantize: str = "none", representative: np.ndarray | None = None
) -> bytes:
    """The graph as a LiteRT flatbuffer (builtin ops only); ``int8``: full-integer
    post-training quantisation calibrated on ``representative`` (N, S, S) images."""
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise ExportError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE)}")
    with tempfile.TemporaryDirectory(prefix="braintumor-export-") as folder:
        _saved_model(graph, size, Path(folder))
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "int8":
            if representative is None or len(representative) == 0:
                raise ExportError("quantize int8: needs representative validation images")
            samples = np.asarray(representative, np.float32).reshape(-1, size, size, 1)

            def dataset() -> Any:
                for sample in samples:
                    yield {INPUT_NAME: sample[None]}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            return bytes(converter.convert())
        except Exception as error:  # noqa: BLE001 - the converter raises many kinds
            from braintumor.core.redaction import one_line

            raise ExportError(f"LiteRT conversion failed ({one_line(error)[:200]})") from None


def to_onnx(graph: Any, size: int, path: Path) -> None:
    """The same graph as ONNX (tf2onnx), for the runtime comparison (``bench/serve.py``)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image: Any) -> Any:
        return graph(image, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    path.write_bytes(proto.SerializeToString())


def keras_reference(
    model: Any,
    layer_name: str,
    images: np.ndarray,
    method: str = "gradcam",
    gate_width: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The Keras model's probabilities and GradientTape maps (``method``: Grad-CAM or
    HiResCAM at ``layer_name``, ``gate_width``: its ReLU gates) of its predicted classes:
    what the exported model must reproduce."""
    from braintumor.explain.gradcam import GradCam

    batch = np.asarray(images, np.float32).reshape(len(images), *model.input_shape[1:])
    result = GradCam.for_model(
        model,
        layer_name,
        "centred",
        method,  # type: ignore[arg-type]
        gate_width,
    ).compute(batch)
    probabilities = np.asarray(model.predict_on_batch(batch), np.float32)
    return probabilities, result.heatmaps


def exported_answers(
    exported: ExportedModel, head: HeadParams, images: np.ndarray, explanation: Explanation
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities from the graph, the NumPy head's probabilities and the served maps
    (``explanation``, of the head's predicted class), image by image (the serving batch)."""
    graph_p, head_p, maps = [], [], []
    for image in np.asarray(images):
        outputs = exported(image[None])
        logits, _ = head.forward(outputs.pooled)
        layer_maps = explanation.layer_maps(outputs)
        graph_p.append(outputs.probabilities[0])
        head_p.append(softmax(logits)[0])
        values = explanation.tail_values(outputs)
        maps.append(explanation.maps(head, outputs.pooled, layer_maps, image.shape[0], values)[0])
    return np.stack(graph_p), np.stack(head_p), np.stack(maps)


def measure_parity(
    model: Any,
    layer_name: str,
    exported: ExportedModel,
    head: HeadParams,
    images: np.ndarray,
    explanation: Explanation | None = None,
) -> Parity:
    """Exported (graph, NumPy head and the served maps) against Keras (its probabilities
    and the GradientTape maps of the same method and layer) on ``images`` (N, S, S)
    uint8. ``explanation``: None is Grad-CAM at ``layer_name``."""
    if explanation is None:
        explanation = Explanation("gradcam", layer_name, layer_name)
    images = np.asarray(images).reshape(len(images), *model.input_shape[1:3])
    reference_p, reference_maps = keras_reference(
        model, explanation.layer, images, explanation.method, explanation.gate_width
    )
    graph_p, head_p, maps = exported_answers(exported, head, images, explanation)
    probabilities = max(
        float(np.abs(graph_p - reference_p).max()), float(np.abs(head_p - reference_p).max())
    )
    numpy_maps, tail_forward = numpy_parity(model, head, images, explanation)
    served = np.abs(maps - reference_maps)
    return Parity(
        images=len(images),
        probabilities=probabilities,
        maps=float(served.max()),
        same_class=float((graph_p.argmax(1) == reference_p.argmax(1)).mean()),
        numpy_maps=numpy_maps,
        maps_mean=float(served.reshape(len(served), -1).mean(axis=1).max()),
        tail_forward=tail_forward,
    )


def numpy_parity(
    model: Any, head: HeadParams, images: np.ndarray, explanation: Explanation
) -> tuple[float, float]:
    """The NumPy maps (``explanation``: the head, and the tail if any) computed on the
    values of one Keras forward pass, against the GradientTape maps of that same pass
    (``gradcam.tape_with_values``): the pooled features, the layer's maps and every value
    the tail's backward reads, so every ReLU gate is the tape's. Max |difference|: what the
    hand-written gradient alone contributes, exact up to float rounding whatever the seed.
    And the NumPy tail's own forward from that map against those values (relative; 0.0
    without a tail)."""
    from braintumor.explain.gradcam import tape_with_values

    tail = explanation.tail
    names = (explanation.layer,) if tail is None else tail.value_layers
    batch = np.asarray(images, np.float32).reshape(len(images), *model.input_shape[1:])
    reference, _, found = tape_with_values(
        model,
        explanation.layer,
        batch,
        [*names, POOL_LAYER],
        explanation.method,  # type: ignore[arg-type]
        gate_width=explanation.gate_width,
    )
    *values, pooled = found
    size = int(batch.shape[1])
    if tail is None:
        maps = explanation.maps(head, pooled, values[0], size)
        return float(np.abs(maps - reference).max()), 0.0
    maps = tail_cam(
        head, tail, pooled, values[0], (size, size), explanation.method, values=values
    ).heatmaps
    _, own = tail.forward(values[0])
    forward = max(
        float(np.abs(mine - theirs).max()) / max(float(np.abs(theirs).max()), 1e-12)
        for mine, theirs in zip(own[1:], values[1:], strict=True)
    )
    return float(np.abs(maps - reference).max()), forward


def check_parity(
    parity: Parity,
    tolerance: float,
    what: str = "Grad-CAM at the last map",
    served_mean_bound: float | None = None,
) -> None:
    """``ExportError`` (one line) when the exported probabilities, the NumPy maps on
    Keras's forward values or the NumPy tail's forward differ from Keras's beyond
    ``tolerance``, or the served maps do: their max |difference| against ``tolerance``,
    or (a tail, whose forward rounding may flip a ReLU gate) each image's mean
    |difference| against ``served_mean_bound``. The export gate."""
    exact = max(parity.probabilities, parity.numpy_maps, parity.tail_forward)
    if served_mean_bound is None:
        served, bound, statistic = parity.maps, tolerance, "max"
    else:
        served, bound, statistic = parity.maps_mean, served_mean_bound, "mean"
    if exact > tolerance or served > bound:
        raise ExportError(
            f"export: the exported model disagrees with the Keras model beyond {tolerance:g} "
            f"(probabilities {parity.probabilities:.2e}, {what} maps {parity.numpy_maps:.2e} "
            f"in NumPy on Keras's values, tail forward {parity.tail_forward:.2e}, served "
            f"maps {statistic} {served:.2e} against {bound:g}, on {parity.images} images)"
        )


def served_explanation(
    model: Any, layer_name: str, method: str, layer: str, gate_width: float = 0.0
) -> Explanation:
    """The explanation to serve: ``method`` at ``layer`` (``auto``: the map the pooling
    reads), with the backbone's tail read from the model when the layer is an earlier one
    (``explain.tailcam``, its ReLUs passed with ``gate_width``: ``tailcam.relu_gate``);
    ``ExportError`` (one line) for what one pass cannot serve. Without a tail there is no
    ReLU between the map and the pooling, and the width is 0."""
    if method not in EXPLANATION_METHODS:
        raise ExportError(
            f"serving.explanation.method: {method!r} is not one of {', '.join(EXPLANATION_METHODS)}"
        )
    layer = layer_name if layer == "auto" else layer
    if layer == layer_name:
        return Explanation(method, layer, layer_name)
    try:
        tail = tail_from_model(model, layer, POOL_LAYER, gate_width)
    except TailError as error:
        raise ExportError(f"serving.explanation.layer: {error}") from None
    return Explanation(method, layer, layer_name, tail, tail.gate_width)


def tail_outputs(served: Explanation, extra_layers: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The layers the graph must also return for ``served`` (beyond ``extra_layers`` and
    the map the pooling reads): the explanation's layer and every tail value layer, so
    serving runs the tail's backward on the runtime's own forward values."""
    names = (served.layer,) if served.tail is None else served.tail.value_layers
    wanted: list[str] = []
    for name in names:
        if name != served.map_layer and name not in extra_layers and name not in wanted:
            wanted.append(name)
    return tuple(wanted)


def export_model(  # noqa: PLR0913 - the export's knobs, all keyword-only
    model: Any,
    layer_name: str,
    folder: Path,
    check_images: np.ndarray,
    *,
    quantize: str = "none",
    representative: np.ndarray | None = None,
    tolerance: float = PARITY_TOLERANCE,
    extra_layers: tuple[str, ...] = (),
    explanation: tuple[str, str] = ("gradcam", "auto"),
    gate_width: float = 0.0,
) -> ExportResult:
    """Write ``model.tflite`` and ``head.npz`` into ``folder`` after the parity check on
    ``check_images`` (N, S, S) real images; ``ExportError`` (one line) if the float
    export disagrees with Keras beyond ``tolerance`` (probabilities or maps). For
    ``int8`` the parity is recorded, not enforced. ``extra_layers``: other layers whose
    maps the same invoke also returns (``GraphOutputs.extra``, named in bundle.json's
    ``exported.outputs``), for a map the app may show instead once measured."""
    check_images = np.asarray(check_images)
    if check_images.ndim == 4:
        check_images = check_images[..., 0]
    if len(check_images) == 0:
        raise ExportError("export: no images for the parity check")
    size = int(model.input_shape[1])
    check_map_layer(model, layer_name)
    head = head_params(model)
    if head.num_classes != int(model.output_shape[-1]):
        raise ExportError("head parameters do not match the model's outputs")
    served = served_explanation(model, layer_name, *explanation, gate_width)
    extra_layers = (*extra_layers, *tail_outputs(served, extra_layers))
    graph = inference_graph(model, layer_name, extra_layers)
    blob = to_tflite(graph, size, quantize, representative)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_file, head_file = folder / EXPORT_FILE, folder / HEAD_FILE
    tail_file = folder / TAIL_FILE if served.tail is not None else None
    model_file.write_bytes(blob)
    head.save(head_file)
    if served.tail is not None and tail_file is not None:
        served.tail.save(tail_file)
        tail = TailParams.load(tail_file)
        served = Explanation(served.method, served.layer, layer_name, tail, tail.gate_width)
    exported = ExportedModel(model_file)
    parity = measure_parity(model, layer_name, exported, head, check_images, served)
    # exact gates through a tail can flip between runtimes (see SERVED_MAP_TOLERANCE);
    # soft gates cannot, and are held to the max like every other map
    exact_tail = served.tail is not None and served.gate_width == 0.0
    served_bound = SERVED_MAP_TOLERANCE if exact_tail else None
    if quantize == "none":
        try:
            check_parity(parity, tolerance, served.label, served_bound)
        except ExportError:
            for path in (model_file, head_file, tail_file):
                if path is not None:
                    path.unlink()
            raise
    probe = exported(probe_image(size)).probabilities[0]
    info = {
        "runtime": "litert",
        "file": EXPORT_FILE,
        "head": HEAD_FILE,
        "quantize": quantize,
        "map_layer": layer_name,
        "outputs": ["probabilities", "pooled", "maps", *(EXTRA_PREFIX + n for n in extra_layers)],
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "explanation": {
            "method": served.method,
            "layer": served.layer,
            "tail": TAIL_FILE if tail_file is not None else None,
            "gate_width": served.gate_width,
        },
        "parity": parity.as_dict(),
        "parity_tolerance": tolerance,
        "parity_served_mean_bound": served_bound,
        "probe_probabilities": [float(value) for value in probe],
    }
    return ExportResult(model_file, head_file, info, tail_file)
