"""The exported inference model: what serving runs instead of Keras, in one invoke.

``serving.export`` converts the bundle's Keras model into a LiteRT flatbuffer
(``model.tflite``) whose single signature returns three tensors for a batch of 0-255 gray
images: ``probabilities`` (N, K, before calibration), ``pooled`` (N, D, the global average
of the last convolutional map: the out-of-distribution detector's features) and ``maps``
(N, h, w, D, that map: Grad-CAM's), plus ``map_<layer>`` for the served explanation's
layer when it is an earlier one and for every layer of the backbone's tail after it whose
output the tail's gradient reads (``TailParams.value_layers``). With the head's parameters
(``head.npz``, ``explain.headcam``) and, for that layer, the backbone tail's (``tail.npz``,
``explain.tailcam``) those feed classification, the OOD check and the served map
(``Explanation``) from one pass: the tail runs only backward in NumPy, on the runtime's
own forward values (a graph exported before those outputs existed: the tail also runs
forward in NumPy from the layer's map).

Why LiteRT: measured side by side with ONNX Runtime on the quickstart's trained
EfficientNet-Lite0 (``bench/serve.py --model models/bundle``, 2 busy cores; docs/
benchmarks-lite0.md): per upload with Grad-CAM the two are close (p50 12.5 vs 11.0 ms, p95
14.2 vs 17.0 ms; with ONNX Runtime's default busy-waiting its p50 was 38.8 ms), but a batch
of 32 runs at 286 against 60 images/s, and its package is smaller (59 vs 68 MB installed);
EfficientNet-Lite was designed for it. ``onnxruntime`` is kept here as the second runtime
of that comparison (an ``.onnx`` file of the same graph, ``export.to_onnx``); bundles carry
the LiteRT file.

Serving layer, NumPy plus the runtime's own package (``ai-edge-litert`` or
``onnxruntime``), imported on first use: no TensorFlow, Keras, JAX or torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.redaction import one_line
from braintumor.explain.headcam import HeadParams, head_gradcam
from braintumor.explain.tailcam import TailParams, tail_cam

EXPORT_FILE = "model.tflite"
HEAD_FILE = "head.npz"
TAIL_FILE = "tail.npz"  # the backbone's layers after an earlier explanation layer
EXPLANATION_METHODS = ("gradcam", "hirescam")  # what one pass can serve (``explain.tailcam``)
RUNTIMES = ("litert", "onnxruntime")
OUTPUT_NAMES = ("probabilities", "pooled", "maps")
EXTRA_PREFIX = "map_"  # extra outputs: ``map_<layer>``, another layer's map (export.py)
INPUT_NAME = "image"


class ExportedModelError(ValueError):
    """An exported file that cannot be loaded or run (one line, naming the file)."""


@dataclass(frozen=True)
class GraphOutputs:
    """One invoke of the exported graph."""

    probabilities: np.ndarray  # (N, K) float32, uncalibrated
    pooled: np.ndarray  # (N, D) float32
    maps: np.ndarray  # (N, h, w, D) float32
    # Maps of other layers the export was asked for (``map_<layer>`` -> (N, h', w', C')).
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def default_threads() -> int:
    """The CPUs this process may use (the interpreter's thread count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class ExportedModel:
    """An exported graph loaded in its runtime. Not thread-safe (one interpreter): callers
    serialise calls (``Predictor`` holds a lock)."""

    def __init__(self, path: str | Path, runtime: str = "litert", threads: int | None = None):
        self.path = Path(path)
        if runtime not in RUNTIMES:
            raise ExportedModelError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
        if not self.path.is_file():
            raise ExportedModelError(f"{self.path}: missing")
        self.runtime = runtime
        self.threads = threads or default_threads()
        try:
            if runtime == "litert":
                self._run = self._litert()
            else:
                self._run = self._onnxruntime()
        except ExportedModelError:
            raise
        except Exception as error:  # noqa: BLE001 - runtimes raise many kinds for a bad file
            raise ExportedModelError(
                f"{self.path}: not a {runtime} model ({one_line(error)[:200]})"
            ) from None

    def _litert(self) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            raise ExportedModelError(f"{self.path}: expected one signature, has {len(signatures)}")
        (key, spec), *_ = signatures.items()
        if list(spec["inputs"]) != [INPUT_NAME] or not _expected_outputs(spec["outputs"]):
            raise ExportedModelError(
                f"{self.path}: signature {spec} is not image -> {', '.join(OUTPUT_NAMES)}"
            )
        runner = interpreter.get_signature_runner(key)
        self._interpreter = interpreter

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(runner(**{INPUT_NAME: batch}))

        return run

    def _onnxruntime(self) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: on a few shared cores it steals the NumPy work's CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        names = [output.name for output in session.get_outputs()]
        if not _expected_outputs(names):
            raise ExportedModelError(f"{self.path}: outputs {names}, expected {OUTPUT_NAMES}")
        input_name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {input_name: batch}), strict=True))

        return run

    def __call__(self, images: np.ndarray) -> GraphOutputs:
        """One invoke for a batch of gray images (N, S, S) or (N, S, S, 1), 0-255."""
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[..., None]
        outputs = self._run(np.ascontiguousarray(batch))
        probabilities, pooled, maps = (
            np.asarray(outputs[name], dtype=np.float32) for name in OUTPUT_NAMES
        )
        # An int8 graph's softmax output is quantised (rows sum to 1 +- 1/256): renormalised
        # so calibration accepts it; a float graph's rows change by float rounding only.
        total = probabilities.sum(axis=1, keepdims=True)
        extra = {
            name: np.asarray(value, dtype=np.float32)
            for name, value in outputs.items()
            if name.startswith(EXTRA_PREFIX)
        }
        return GraphOutputs(probabilities / np.maximum(total, 1e-12), pooled, maps, extra)


def _expected_outputs(names: Any) -> bool:
    """The three outputs, and extras only as ``map_<layer>``."""
    names = set(names)
    extras = names - set(OUTPUT_NAMES)
    return set(OUTPUT_NAMES) <= names and all(n.startswith(EXTRA_PREFIX) for n in extras)


@dataclass(frozen=True)
class Explanation:
    """The map serving shows: ``method`` at ``layer``, from one invoke's outputs.

    The localisation stage chooses it (``metrics/localisation.json``: HiResCAM at a block
    of output stride 16 put twice the energy in the tumour mask that last-layer Grad-CAM
    did) and ``serving.explanation`` names it; the export records it in bundle.json
    (``exported.explanation``). Grad-CAM at the map the pooling reads needs only the head
    (``explain.headcam``); any other (method, layer) also runs the backbone's tail in
    NumPy (``explain.tailcam``, ``tail.npz``), on that layer's map which the graph returns
    as the extra output ``map_<layer>``, backward only on the tail's values the graph also
    returns (``tail_values``). ``gate_width``: how the gradient passes the tail's ReLUs
    (``tailcam.relu_gate``; the tail's own when there is one): the GradientTape that a
    Keras bundle computes the map with uses the same (``explain.softgates``).
    """

    method: str
    layer: str
    map_layer: str  # the map the pooling reads (the graph's ``maps`` output)
    tail: TailParams | None = None
    gate_width: float = 0.0

    def __post_init__(self) -> None:
        if self.tail is not None and self.tail.gate_width != self.gate_width:
            raise ExportedModelError(
                f"{self.label}: gate width {self.gate_width} differs from its tail's "
                f"{self.tail.gate_width}"
            )

    @property
    def label(self) -> str:
        """What the app writes under the map, e.g. ``HiResCAM at block10_add``."""
        name = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}.get(self.method, self.method)
        return f"{name} at {self.layer}"

    def layer_maps(self, outputs: GraphOutputs) -> np.ndarray:
        """This explanation's layer's maps from one invoke's outputs."""
        if self.layer == self.map_layer:
            return outputs.maps
        key = EXTRA_PREFIX + self.layer
        if key not in outputs.extra:
            raise ExportedModelError(f"the exported graph has no output {key!r}")
        return outputs.extra[key]

    def value_outputs(self) -> tuple[str, ...]:
        """The graph outputs holding the tail's forward values after the layer's own map,
        one per ``TailParams.value_layers[1:]``: ``maps`` for the map the pooling reads,
        ``map_<layer>`` for the others (empty without a tail)."""
        if self.tail is None:
            return ()
        return tuple(
            OUTPUT_NAMES[2] if name == self.map_layer else EXTRA_PREFIX + name
            for name in self.tail.value_layers[1:]
        )

    def tail_values(self, outputs: GraphOutputs) -> list[np.ndarray] | None:
        """The tail's forward values from one invoke (the layer's map first), so that the
        NumPy gradient runs on the runtime's own ReLU gates without a NumPy forward; None
        when the graph does not return all of them (one exported before it did: the tail
        then runs forward from the map) or there is no tail."""
        if self.tail is None:
            return None
        values = [self.layer_maps(outputs)]
        for name in self.value_outputs():
            value = outputs.maps if name == OUTPUT_NAMES[2] else outputs.extra.get(name)
            if value is None:
                return None
            values.append(value)
        return values

    def maps(
        self,
        head: HeadParams,
        pooled: np.ndarray,
        layer_maps: np.ndarray,
        size: int,
        values: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """(N, S, S) maps in [0, 1] of each row's predicted class, in NumPy. ``values``:
        the tail's forward values of the same pass (``tail_values``); None runs the tail
        forward from ``layer_maps``."""
        if self.method == "gradcam" and self.layer == self.map_layer:
            return head_gradcam(head, pooled, layer_maps, (size, size)).heatmaps
        tail = self.tail
        if tail is None:
            if self.layer != self.map_layer:
                raise ExportedModelError(f"{self.label} needs the tail parameters ({TAIL_FILE})")
            tail = TailParams(self.layer, ())  # HiResCAM at the pooled map: no layers between
            values = None
        return tail_cam(
            head, tail, pooled, layer_maps, (size, size), self.method, values=values
        ).heatmaps


def probe_image(size: int) -> np.ndarray:
    """A fixed, deterministic (1, S, S) uint8 image (a diagonal ramp with a bright disc):
    the export records the exported model's answer on it, and loading a bundle checks the
    file still gives it (a file exported from another model does not)."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    ramp = (rows + columns) * (255.0 / max(1, 2 * size - 2))
    disc = (rows - size * 0.4) ** 2 + (columns - size * 0.6) ** 2 < (size * 0.2) ** 2
    return np.where(disc, 255.0, ramp * 0.5).astype(np.uint8)[None]
