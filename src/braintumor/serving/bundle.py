"""The model bundle: a trained model plus everything needed to use it on a raw image.

A bundle is a folder with ``model.keras``, ``bundle.json`` (class names, input size, the
exact preprocessing parameters, the calibration temperature, the Grad-CAM layer, the
intensity statistics of the training images, and where the model came from), when the
evaluate stage fitted one, ``ood.npz`` (the out-of-distribution detector, ``ood.py``), and
when it exported one, ``model.tflite`` with ``head.npz`` (``export.py``: the same model
for LiteRT, probabilities, pooled features and the Grad-CAM map in one invoke, and the
head's parameters for Grad-CAM in NumPy; and ``tail.npz``, the backbone's layers after
the explanation layer, when the served map is HiResCAM at an earlier block,
``explain.tailcam``). A bundle with an exported model is served from
it by default (``Bundle.load(runtime="auto")``): no Keras or TensorFlow is imported;
``runtime="keras"`` loads ``model.keras`` instead (evaluation, benchmarks).
The evaluate stage writes it, the registered MLflow model carries it as an artifact, and
the app and the ``predict`` command load it, so preprocessing and class names are never
re-typed and a served image goes through exactly the transform the model was trained on.

This module owns every file of a bundle: ``write_bundle`` is the one writer and
``Bundle.load`` the one reader. ``bundle.json`` lists every other file with its sha256
(``files``), and ``Bundle.load`` refuses a bundle whose folder holds anything else, lacks
a listed file, or has a file whose bytes changed: a detector threshold raised to 1e30, a
deleted detector (which would silently fall back to the weaker input-statistics check)
or a swapped model are refused with one line naming the file. The exported model is checked
twice more on loading: its sha256 must be the one its export recorded (``exported``), and
on a fixed probe image it must give the probabilities recorded at export, with the NumPy
head agreeing with the graph: an exported file or head from another model is refused.
The only way around it is ``BRAINTUMOR_UNVERIFIED_BUNDLE=1``, for development, which logs a
loud warning.

Serving layer: imports the config, imaging, calibration, OOD and exported-model modules,
and Keras only to load ``model.keras``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.files import atomic_path, file_sha256
from braintumor.core.redaction import one_line
from braintumor.core.schema import MAX_GATE_WIDTH, ClaheParams, PreprocessParams, UnsharpParams
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.evaluation.calibration import apply_temperature
from braintumor.evaluation.ood import OodDetector, OodError
from braintumor.explain.headcam import HeadCamError, HeadParams, softmax
from braintumor.explain.tailcam import TailParams
from braintumor.serving.exported import (
    EXPLANATION_METHODS,
    EXPORT_FILE,
    HEAD_FILE,
    TAIL_FILE,
    Explanation,
    ExportedModel,
    ExportedModelError,
    probe_image,
)

MODEL_FILE = "model.keras"
META_FILE = "bundle.json"
OOD_FILE = "ood.npz"
CARD_FILE = "MODEL_CARD.md"  # the model card (reports/model_card.py), hashed like the rest
# The files a bundle may hold besides bundle.json (the model is required).
BUNDLE_FILES = (MODEL_FILE, OOD_FILE, EXPORT_FILE, HEAD_FILE, TAIL_FILE, CARD_FILE)
RUNTIME_CHOICES = ("auto", "exported", "keras")
PROBE_TOLERANCE = 1e-3  # the probe's probabilities: same file, another CPU's rounding
FORMAT_VERSION = 2  # 2: bundle.json lists every file with its sha256 (``files``)
UNVERIFIED_ENV = "BRAINTUMOR_UNVERIFIED_BUNDLE"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
LOGGER = logging.getLogger("braintumor.serving.bundle")


class BundleError(ValueError):
    """A bundle folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class InputStats:
    """Mean and standard deviation of the preprocessed training pixels (0-255), per image:
    what a typical input looks like, for a cheap out-of-distribution warning."""

    image_mean_mean: float
    image_mean_std: float
    image_std_mean: float
    image_std_std: float

    @classmethod
    def from_images(cls, images: np.ndarray, limit: int = 2000) -> InputStats:
        """Statistics of up to ``limit`` images of an (N, H, W, 1) uint8 array."""
        sample = np.asarray(images[: min(len(images), limit)], dtype=np.float32)
        if sample.size == 0:
            raise BundleError("no images to compute input statistics from")
        means = sample.reshape(len(sample), -1).mean(axis=1)
        stds = sample.reshape(len(sample), -1).std(axis=1)
        return cls(
            float(means.mean()),
            float(means.std() + 1e-6),
            float(stds.mean()),
            float(stds.std() + 1e-6),
        )

    def z_scores(self, image: np.ndarray) -> tuple[float, float]:
        """How many training standard deviations this image's mean and spread are off."""
        values = np.asarray(image, dtype=np.float32)
        return (
            float(abs(values.mean() - self.image_mean_mean) / self.image_mean_std),
            float(abs(values.std() - self.image_std_mean) / self.image_std_std),
        )


@dataclass(frozen=True)
class BundleMeta:
    """What ``bundle.json`` holds."""

    classes: tuple[str, ...]
    image_size: int
    preprocess: PreprocessParams
    gradcam_layer: str
    temperature: float = 1.0
    input_stats: InputStats | None = None
    model_sha256: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # The manifest: every file of the bundle but bundle.json, with its sha256.
    files: dict[str, str] = field(default_factory=dict)
    # The exported model (``export.ExportResult.info``): runtime, file, sha256, parity,
    # the probe's probabilities; empty when the bundle has none.
    exported: dict[str, Any] = field(default_factory=dict)
    # The map serving shows (``serving.explanation``: method, layer, gate width), for a bundle
    # served by Keras too (no export on JAX); an export's own record wins.
    explanation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BundleMeta:
        try:
            preprocess = dict(data["preprocess"])
            preprocess["clahe"] = ClaheParams(**preprocess["clahe"])
            preprocess["unsharp"] = UnsharpParams(**preprocess["unsharp"])
            stats = data.get("input_stats")
            return cls(
                classes=tuple(data["classes"]),
                image_size=int(data["image_size"]),
                preprocess=PreprocessParams(**preprocess),
                gradcam_layer=str(data["gradcam_layer"]),
                temperature=float(data.get("temperature", 1.0)),
                input_stats=InputStats(**stats) if stats else None,
                model_sha256=str(data.get("model_sha256", "")),
                source=dict(data.get("source", {})),
                files=_manifest(data.get("files", {})),
                exported=dict(data.get("exported") or {}),
                explanation={
                    str(k): v if isinstance(v, int | float) else str(v)
                    for k, v in (data.get("explanation") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"{META_FILE}: malformed ({one_line(error)})") from None


def _manifest(value: Any) -> dict[str, str]:
    """``bundle.json``'s ``files``: a mapping of file names to sha256 text (not checked
    against the folder here: ``verify_files`` does that)."""
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) for name, digest in value.items()
    ):
        raise ValueError("'files' must map file names to sha256 hex digests")
    return dict(value)


def write_bundle(
    folder: Path,
    model_path: Path,
    meta: BundleMeta,
    ood_detector: OodDetector | None = None,
    exported: Any = None,
    card: str | None = None,
) -> BundleMeta:
    """Write (atomically) a bundle folder: the saved ``.keras`` model, the detector when
    there is one, the exported model and head when ``exported`` (an
    ``export.ExportResult``) is given, the model card (``MODEL_CARD.md``) when ``card`` is,
    and ``bundle.json`` listing every other file with its sha256.

    The one writer of bundles (the evaluate stage, tests and benchmarks call it), so the
    manifest always matches what was written. Returns the metadata as written.
    """
    with atomic_path(folder, directory=True) as temporary:
        shutil.copyfile(model_path, temporary / MODEL_FILE)
        if ood_detector is not None:
            ood_detector.save(temporary / OOD_FILE)
        if exported is not None:
            shutil.copyfile(exported.model_file, temporary / EXPORT_FILE)
            shutil.copyfile(exported.head_file, temporary / HEAD_FILE)
            if getattr(exported, "tail_file", None) is not None:
                shutil.copyfile(exported.tail_file, temporary / TAIL_FILE)
            meta = dataclasses.replace(meta, exported=dict(exported.info))
        if card is not None:
            (temporary / CARD_FILE).write_text(card, encoding="utf-8")
        files = {path.name: file_sha256(path) for path in sorted(temporary.iterdir())}
        if exported is not None and files[EXPORT_FILE] != meta.exported.get("sha256"):
            raise BundleError(f"{exported.model_file}: changed after its export was checked")
        meta = dataclasses.replace(meta, model_sha256=files[MODEL_FILE], files=files)
        (temporary / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))
    return meta


def read_meta(folder: Path) -> BundleMeta:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: not a model bundle (no {META_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error.msg})") from None
    return BundleMeta.from_json(data)


def verify_files(folder: Path, meta: BundleMeta) -> None:
    """Refuse (``BundleError``, one line naming the file) a bundle whose folder is not
    exactly what ``bundle.json`` lists: a manifest that cannot vouch for it
    (``_check_manifest``), an unlisted extra file, a missing file, or a file whose sha256
    differs. Catches a detector or model changed, removed or added after the evaluate
    stage wrote the bundle."""
    folder = Path(folder)
    _check_manifest(folder / META_FILE, meta)
    for entry in sorted(folder.iterdir()):
        if entry.name != META_FILE and entry.name not in meta.files:
            raise BundleError(f"{entry}: not listed in {META_FILE} (not part of this bundle)")
    for name, digest in sorted(meta.files.items()):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {META_FILE})")
        if file_sha256(path) != digest:
            raise BundleError(f"{path}: sha256 differs from {META_FILE} (changed since written)")


def _check_manifest(manifest: Path, meta: BundleMeta) -> None:
    """The manifest itself: present (a bundle from before manifests has none), only bundle
    file names, each with a well-formed sha256, the model among them, and the same model
    hash as ``model_sha256`` (which the registry and the app show)."""
    if not meta.files:
        raise BundleError(
            f"{manifest}: lists no files with their sha256 (a bundle written before integrity "
            f"checks): re-run `dvc repro evaluate` to rebuild it, or set {UNVERIFIED_ENV}=1 to "
            "load it unverified (development only)"
        )
    for name, digest in sorted(meta.files.items()):
        if name not in BUNDLE_FILES:
            raise BundleError(f"{manifest}: lists {name[:80]!r}, which is not a bundle file")
        if not SHA256_PATTERN.fullmatch(digest):
            problem = "an empty sha256" if not digest else "a malformed sha256"
            raise BundleError(f"{manifest}: {name} has {problem}")
    if MODEL_FILE not in meta.files:
        raise BundleError(f"{manifest}: does not list {MODEL_FILE}")
    if meta.model_sha256 != meta.files[MODEL_FILE]:
        problem = "is empty" if not meta.model_sha256 else f"differs from its {MODEL_FILE} entry"
        raise BundleError(f"{manifest}: model_sha256 {problem}")
    _check_exported_entry(manifest, meta)


def _check_exported_entry(manifest: Path, meta: BundleMeta) -> None:
    """An exported model comes as both files, and its sha256 is the one its export
    recorded (``exported.sha256``)."""
    if not meta.exported and not {EXPORT_FILE, HEAD_FILE, TAIL_FILE} & set(meta.files):
        return
    for name in (EXPORT_FILE, HEAD_FILE):
        if name not in meta.files:
            raise BundleError(f"{manifest}: has an exported model but does not list {name}")
    if meta.exported.get("sha256") != meta.files[EXPORT_FILE]:
        raise BundleError(
            f"{manifest}: {EXPORT_FILE}'s sha256 differs from the one its export recorded"
        )
    wants_tail = explanation_entry(meta).get("tail") == TAIL_FILE
    if wants_tail != (TAIL_FILE in meta.files):
        problem = "does not list" if wants_tail else "lists a tail its export did not write:"
        raise BundleError(f"{manifest}: {problem} {TAIL_FILE}")


def _gate_width(entry: dict[str, Any], where: Path) -> float:
    """The served map's soft ReLU gate width (``explain.softgates``) from its entry; 0 (the
    exact gradient) in bundles written before it existed."""
    try:
        width = float(entry.get("gate_width", 0.0))
    except (TypeError, ValueError):
        width = float("nan")
    if not 0.0 <= width <= MAX_GATE_WIDTH:
        raise BundleError(
            f"{where}: explanation gate_width {entry.get('gate_width')!r} is not in "
            f"[0, {MAX_GATE_WIDTH}]"
        )
    return width


def explanation_entry(meta: BundleMeta) -> dict[str, Any]:
    """What the export recorded about the served map (``exported.explanation``), else
    what the bundle names (``explanation``, a bundle without an export); a bundle written
    before either shows Grad-CAM at its ``gradcam_layer``."""
    entry = meta.exported.get("explanation") if meta.exported else None
    if isinstance(entry, dict):
        return entry
    if meta.explanation and not meta.exported:
        return {**meta.explanation, "tail": None}
    return {"method": "gradcam", "layer": meta.gradcam_layer, "tail": None}


def _check_integrity(folder: Path, meta: BundleMeta) -> None:
    """``verify_files``, or with ``BRAINTUMOR_UNVERIFIED_BUNDLE=1`` (development only) a
    loud warning instead of the refusal."""
    try:
        verify_files(folder, meta)
    except BundleError as error:
        if os.environ.get(UNVERIFIED_ENV) != "1":
            raise
        LOGGER.warning(
            "UNVERIFIED MODEL BUNDLE, loaded only because %s=1 (never in production): %s",
            UNVERIFIED_ENV,
            error,
        )


def _read_detector(folder: Path) -> OodDetector | None:
    """The bundle's out-of-distribution detector; None when the bundle has none (the
    evaluate stage ran with ``ood_method: none``; serving then refuses by input
    statistics)."""
    path = Path(folder) / OOD_FILE
    if not path.is_file():
        return None
    try:
        return OodDetector.load(path)
    except OodError as error:
        raise BundleError(one_line(error)) from None


class Bundle:
    """A loaded bundle: preprocess raw image bytes, predict calibrated probabilities."""

    def __init__(
        self,
        folder: Path,
        model: Any,
        meta: BundleMeta,
        ood_detector: OodDetector | None = None,
        exported: ExportedModel | None = None,
        head: HeadParams | None = None,
        explanation: Explanation | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.model = model  # the Keras model; None when served from the exported one
        self.meta = meta
        self.ood_detector = ood_detector  # None: serving falls back to input statistics
        self.exported = exported
        self.head = head
        entry = explanation_entry(meta)
        # The map serving shows (method, layer), with the tail on an exported bundle; a
        # Keras bundle computes the same method and layer with the GradientTape.
        self.explanation = explanation or Explanation(
            str(entry.get("method", "gradcam")),
            str(entry.get("layer", meta.gradcam_layer)),
            meta.gradcam_layer,
            gate_width=_gate_width(entry, folder / META_FILE),
        )

    @property
    def runtime(self) -> str:
        """``litert`` (the exported model) or ``keras``."""
        return self.exported.runtime if self.exported is not None else "keras"

    @classmethod
    def load(cls, folder: str | Path, runtime: str = "auto") -> Bundle:
        """Load a bundle after ``verify_files``: every file is the one the evaluate stage
        wrote (or ``BRAINTUMOR_UNVERIFIED_BUNDLE=1`` warns instead); the model's output
        size must match the class names.

        ``runtime``: ``auto`` serves the exported model when the bundle has one, else
        ``model.keras``; ``exported`` requires it; ``keras`` loads ``model.keras``.
        """
        if runtime not in RUNTIME_CHOICES:
            raise BundleError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIME_CHOICES)}")
        folder = Path(folder)
        meta = read_meta(folder)
        _check_integrity(folder, meta)
        if runtime == "exported" and not meta.exported:
            raise BundleError(f"{folder / META_FILE}: the bundle has no exported model")
        if runtime != "keras" and meta.exported:
            exported, head, explanation = _load_exported(folder, meta)
            return cls(folder, None, meta, _read_detector(folder), exported, head, explanation)
        import keras

        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise BundleError(f"{folder}: bundle has no {MODEL_FILE}")
        try:
            model = keras.saving.load_model(model_path, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds here
            raise BundleError(f"{model_path}: not a Keras model ({one_line(error)})") from None
        outputs = int(model.output_shape[-1])
        if outputs != len(meta.classes):
            raise BundleError(
                f"{model_path}: model has {outputs} outputs but the bundle names "
                f"{len(meta.classes)} classes"
            )
        return cls(folder, model, meta, _read_detector(folder))

    def with_source(self, source: dict[str, Any]) -> Bundle:
        """The same loaded bundle described by another ``source`` (a registry version)."""
        meta = dataclasses.replace(self.meta, source=source)
        return Bundle(
            self.folder,
            self.model,
            meta,
            self.ood_detector,
            self.exported,
            self.head,
            self.explanation,
        )

    def preprocess_bytes(self, data: bytes, name: str = "<upload>") -> np.ndarray:
        """Raw file bytes to the (H, W) uint8 image the model sees (raises ImageDecodeError).

        The bare transform, for evaluation and tests on trusted files: it has none of the
        serving checks (budgets, DICOM, blank, out-of-distribution). Serving goes through
        ``serving.Predictor.prepare`` instead.
        """
        gray = decode_image(data, name=name).gray
        return preprocess_gray(gray, self.meta.image_size, self.meta.preprocess)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Calibrated probabilities for preprocessed images, (N, H, W) or (N, H, W, 1)."""
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[..., None]
        if self.exported is not None:
            parts = [
                self.exported(batch[start : start + batch_size]).probabilities
                for start in range(0, len(batch), batch_size)
            ]
            raw = np.concatenate(parts)
        else:
            raw = np.asarray(self.model.predict(batch, batch_size=batch_size, verbose=0))
        return apply_temperature(raw, self.meta.temperature)

    def describe(self) -> str:
        """Which model answers: registered name and version, or file and hash."""
        source = self.meta.source
        if source.get("registered_model"):
            return f"{source['registered_model']} v{source.get('version', '?')}"
        if self.exported is not None:
            return (
                f"{self.folder / EXPORT_FILE} ({self.runtime}, exported from sha256 "
                f"{self.meta.model_sha256[:12]})"
            )
        return f"{self.folder / MODEL_FILE} (sha256 {self.meta.model_sha256[:12]})"


def _load_exported(folder: Path, meta: BundleMeta) -> tuple[ExportedModel, HeadParams, Explanation]:
    """The exported model, head and served explanation (with its tail), refused (one
    line) when they are not this bundle's: a head for other classes, a graph whose answer
    on the probe image differs from the one recorded at export, or from the NumPy head's,
    or a tail whose pooled features differ from the graph's (a file from another model)."""
    path = folder / EXPORT_FILE
    entry = explanation_entry(meta)
    try:
        exported = ExportedModel(path, str(meta.exported.get("runtime", "litert")))
        head = HeadParams.load(folder / HEAD_FILE)
        tail = TailParams.load(folder / TAIL_FILE) if entry.get("tail") == TAIL_FILE else None
    except (ExportedModelError, HeadCamError) as error:
        raise BundleError(one_line(error)) from None
    method, layer = str(entry.get("method")), str(entry.get("layer"))
    if method not in EXPLANATION_METHODS or (tail is None) != (layer == meta.gradcam_layer):
        raise BundleError(f"{folder / META_FILE}: exported.explanation {entry} is not servable")
    if tail is not None and tail.layer != layer:
        raise BundleError(f"{folder / TAIL_FILE}: is the tail of {tail.layer!r}, not {layer!r}")
    width = _gate_width(entry, folder / META_FILE)
    if tail is not None and tail.gate_width != width:
        raise BundleError(
            f"{folder / TAIL_FILE}: gate width {tail.gate_width}, bundle.json records {width}"
        )
    explanation = Explanation(method, layer, meta.gradcam_layer, tail, width)
    if head.num_classes != len(meta.classes):
        raise BundleError(
            f"{folder / HEAD_FILE}: {head.num_classes} classes but the bundle names "
            f"{len(meta.classes)}"
        )
    try:
        outputs = exported(probe_image(meta.image_size))
        logits, _ = head.forward(outputs.pooled)
    except (HeadCamError, ValueError, RuntimeError) as error:
        raise BundleError(f"{path}: does not fit this bundle ({one_line(error)[:200]})") from None
    recorded = np.asarray(meta.exported.get("probe_probabilities", []), np.float64)
    answer = outputs.probabilities[0].astype(np.float64)
    if recorded.shape != answer.shape or np.abs(recorded - answer).max() > PROBE_TOLERANCE:
        raise BundleError(f"{path}: answers differently from the model this bundle recorded")
    # int8: the graph's softmax runs on quantised logits; the float head only roughly agrees
    head_tolerance = 0.05 if meta.exported.get("quantize") == "int8" else PROBE_TOLERANCE
    if np.abs(softmax(logits)[0] - answer).max() > head_tolerance:
        raise BundleError(f"{folder / HEAD_FILE}: disagrees with {EXPORT_FILE} (another model's)")
    if tail is not None:
        _check_tail(folder, tail, explanation, outputs, head_tolerance)
    return exported, head, explanation


def _check_tail(
    folder: Path, tail: TailParams, explanation: Explanation, outputs: Any, tolerance: float
) -> None:
    """The tail run forward from the graph's map of its layer must give the graph's own
    pooled features on the probe image (relative to their size): another model's tail,
    or one whose numbers were changed, does not. Where the graph also returns the tail's
    forward values (serving's gradient reads them), each must match the NumPy forward's
    the same way."""
    try:
        pooled, own = tail.forward(explanation.layer_maps(outputs))
    except (ExportedModelError, HeadCamError, ValueError) as error:
        raise BundleError(
            f"{folder / TAIL_FILE}: does not fit {EXPORT_FILE} ({one_line(error)[:200]})"
        ) from None
    pairs = [(pooled, outputs.pooled)]
    graph_values = explanation.tail_values(outputs)
    if graph_values is not None:
        pairs += list(zip(own[1:], graph_values[1:], strict=True))
    for mine, theirs in pairs:
        expected = np.asarray(theirs, np.float64)
        scale = max(1.0, float(np.abs(expected).max()))
        if mine.shape != expected.shape or np.abs(mine - expected).max() > tolerance * scale:
            raise BundleError(
                f"{folder / TAIL_FILE}: disagrees with {EXPORT_FILE} (another model's)"
            )
