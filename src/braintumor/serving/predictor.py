"""Serving logic shared by every entry point: the web app, the ``predict`` command, the
registered pyfunc (``served_model.BundleModel``) and so ``mlflow models serve``.

One place turns an uploaded file into what the model sees, so the entry points cannot
drift apart: the same bad file gets the same ``InputError`` reason from all of them.

- ``load_serving_config`` reads the ``serving`` section that ``config`` parses (one schema,
  ``config.ServingParams``).
- ``load_bundle`` opens a model bundle from a local folder or the MLflow registry.
- ``Predictor.prepare_file`` (the app and ``predict``: a path) reads a file safely (regular
  files only, size checked with ``fstat`` before reading, never more than the limit read)
  and calls ``Predictor.prepare`` (the pyfunc: bytes), which decodes within the budgets
  (``max_pixels`` and ``max_decode_bytes`` checked from the header before decoding; a
  Deflated DICOM inflated under a cap; one DICOM frame), refuses what cleaning would
  have refused (colour, too small, corrupt, truncated, not an image), blank images and
  images far from the training statistics, and applies the bundle's preprocessing.
  Decoding itself is ``imaging`` (PNG, JPEG, ...) and ``dicom`` (DICOM, windowed to 8
  bits), in the science layer below.
- ``Predictor.predict`` gives calibrated probabilities in batches; ``Predictor.explain``
  gives them with Grad-CAM maps from the same forward pass.
- On a bundle with an exported model (the default, ``exported.py``) every forward pass is
  one invoke of the exported graph: probabilities, pooled features and the maps. The
  OOD check's pass in ``prepare`` keeps them, so ``classify`` and ``explain_prepared``
  (the app's map: the bundle's ``explanation``, e.g. HiResCAM at ``block10_add`` as the
  localisation stage chose, from the head's and the backbone tail's parameters in NumPy,
  ``explain.headcam`` / ``explain.tailcam``) need no second pass, and nothing imports
  Keras or TensorFlow. A bundle without one runs Keras (its compiled predict function and
  the GradientTape map of the same method and layer).

Patient data: only allow-listed DICOM attributes (``dicom.DICOM_INFO_TAGS``) are returned,
DICOM refusals never quote the file's values, and pydicom's log messages (which can) are
withheld.

Serving layer: imports the core (bundle, imaging, explain, calibration, config) and, only
for a registry URI, MLflow; never a stage module.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from braintumor.core.blas import single_thread_blas
from braintumor.core.config import load_params
from braintumor.core.paths import resolve_tracking_uri
from braintumor.core.redaction import redact_text
from braintumor.core.schema import CleanParams, ConfigError, Params, ServingParams, TrackingParams
from braintumor.data import imaging
from braintumor.data.dicom import decode_dicom, sniff_dicom
from braintumor.evaluation.calibration import apply_temperature
from braintumor.evaluation.ood import FeatureExtractor
from braintumor.serving.bundle import Bundle, BundleError

REGISTRY_SCHEME = "models:/"
BUNDLE_ARTIFACT = "bundle"
DEFAULT_ALIAS = "champion"

# Extensions the ``predict`` command picks up in a folder (single files are always tried).
SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm")

# Reasons beyond imaging's (empty, not_an_image, corrupt, truncated, too_small, colour).
TOO_LARGE = imaging.TOO_LARGE
NOT_A_FILE = "not_a_file"
DECODE_FAILED = "decode_failed"
OUT_OF_DISTRIBUTION = "out_of_distribution"
UNREADABLE = "unreadable"

# A decoded image whose gray levels vary less than this (standard deviation, 0-255) is
# blank: no slice at all, whatever its brightness.
BLANK_STD = 1.0


class InputError(ValueError):
    """An upload cannot be (or should not be) classified; ``reason`` names why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ServingConfig:
    """What serving reads from ``params.yaml``: its settings, the default model and the
    tracking URI the registry lives at."""

    settings: ServingParams
    default_model: str
    tracking_uri: str
    params: Params | None = None  # None when there is no parameter file


def load_serving_config(params_path: str | Path | None = "params.yaml") -> ServingConfig:
    """Read ``params.yaml`` (and its profile) for serving; defaults when there is none.

    The ``serving`` section is parsed by ``config`` like every other section (one schema:
    a key serving accepts, every stage accepts), then ``resolved`` against ``clean``.
    """
    path = Path(params_path) if params_path is not None else None
    if path is None or not path.is_file():
        tracking = TrackingParams()
        settings = ServingParams().resolved(CleanParams())
        uri = resolve_tracking_uri(tracking.tracking_uri, Path.cwd())
        default_model = f"{REGISTRY_SCHEME}{tracking.registered_model}@{DEFAULT_ALIAS}"
        return ServingConfig(settings, default_model, uri)
    params = load_params(path)
    settings = params.serving.resolved(params.clean)
    default_model = f"{REGISTRY_SCHEME}{params.tracking.registered_model}@{DEFAULT_ALIAS}"
    uri = resolve_tracking_uri(params.tracking.tracking_uri, path.parent.resolve())
    return ServingConfig(settings, default_model, uri, params)


# --------------------------------------------------------------------------- bundles


def is_registry_uri(model: str | Path) -> bool:
    return str(model).startswith(REGISTRY_SCHEME)


def load_bundle(
    model: str | Path, *, tracking_uri: str | None = None, runtime: str = "auto"
) -> Bundle:
    """A bundle from a local folder or a registry URI; raises ``BundleError`` when it cannot.
    ``runtime``: ``auto`` (the exported model when the bundle has one), ``exported`` or
    ``keras`` (``Bundle.load``).

    For a registry URI the alias is resolved to a version first (so a concurrent promotion
    cannot mix two versions), the version's artifacts are downloaded to a private temporary
    folder (removed at exit), and the bundle's description names the registered version.
    """
    if not is_registry_uri(model):
        folder = Path(model)
        if not folder.exists():
            raise BundleError(f"{folder}: no such model bundle folder")
        return Bundle.load(folder, runtime)
    return _load_registered(str(model), tracking_uri, runtime)


class SetupError(RuntimeError):
    """The command-line tools cannot start: bad parameters or a model that will not load."""


def open_model(
    params_path: str | Path | None, model: str | Path | None, runtime: str = "auto"
) -> tuple[ServingConfig, Bundle]:
    """The serving parameters and the bundle of ``model`` (default: the parameters' model),
    for ``predict`` and the app; raises ``SetupError`` with the one-line reason."""
    try:
        config = load_serving_config(params_path)
    except ConfigError as error:
        raise SetupError(str(error)) from None
    try:
        bundle = load_bundle(
            model or config.default_model, tracking_uri=config.tracking_uri, runtime=runtime
        )
    except BundleError as error:
        raise SetupError(f"cannot load the model: {error}") from None
    return config, bundle


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = uri[len(REGISTRY_SCHEME) :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise BundleError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def _load_registered(uri: str, tracking_uri: str | None, runtime: str = "auto") -> Bundle:
    name, alias, version = parse_registry_uri(uri)
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])
        if not database.is_file():
            # MLflow would create an empty registry there; say what is missing instead.
            raise BundleError(
                f"{uri}: no MLflow registry at {database} (run the pipeline and promote a "
                "model, set MLFLOW_TRACKING_URI, or pass a bundle folder with --model)"
            )
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:  # pragma: no cover - mlflow is a dependency
        raise BundleError(f"{uri}: MLflow is not installed") from None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if alias is not None:
                found = client.get_model_version_by_alias(name, alias)
            else:
                found = client.get_model_version(name, str(version))
            version = str(found.version)
            download_uri = client.get_model_version_download_uri(name, version)
            folder = Path(tempfile.mkdtemp(prefix="braintumor-model-"))
            atexit.register(shutil.rmtree, folder, True)
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=download_uri, dst_path=str(folder), tracking_uri=tracking_uri
                )
            )
    except MlflowException as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BundleError(redact_text(f"{uri}: {message} (tracking URI {tracking_uri})")) from None
    except OSError as error:
        raise BundleError(redact_text(f"{uri}: cannot download the model ({error})")) from None
    bundle = Bundle.load(_bundle_folder(local, uri), runtime)
    source = dict(bundle.meta.source)
    source.update(registered_model=name, version=version, model_uri=uri)
    if alias is not None:
        source["alias"] = alias
    return bundle.with_source(source)


def _bundle_folder(model_dir: Path, uri: str) -> Path:
    """The bundle inside a downloaded pyfunc model: its ``bundle`` artifact per MLmodel."""
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        try:
            spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
            relative = spec["flavors"]["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
            candidate = model_dir / relative
            if (candidate / "bundle.json").is_file():
                return candidate
        except (KeyError, TypeError, yaml.YAMLError):
            pass
    found = sorted(path.parent for path in model_dir.rglob("bundle.json"))
    if len(found) == 1:
        return found[0]
    raise BundleError(
        f"{uri}: the registered model has no '{BUNDLE_ARTIFACT}' artifact with a bundle.json"
    )


# --------------------------------------------------------------------------- decoding


def read_upload(path: Path, max_bytes: int, name: str | None = None) -> bytes:
    """A file's bytes, refused before reading when it is not a regular file or too large.

    Opened non-blocking (a FIFO named ``.png`` cannot hang the caller) and checked with
    ``fstat`` on the open descriptor (no race with a rename); at most ``max_bytes + 1``
    bytes are ever read, so a file that grows after the check is refused, not loaded.
    """
    label = name or Path(path).name
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(UNREADABLE, f"{label}: cannot read ({reason})") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
        os.close(descriptor)
        if status.st_size > max_bytes and stat.S_ISREG(status.st_mode):
            raise InputError(TOO_LARGE, _too_large_message(label, status.st_size, max_bytes))
        kind = "folder" if stat.S_ISDIR(status.st_mode) else "special file"
        raise InputError(NOT_A_FILE, f"{label}: not a regular file (a {kind})")
    with os.fdopen(descriptor, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise InputError(UNREADABLE, f"{label}: cannot read ({reason})") from None
    if len(data) > max_bytes:
        raise InputError(TOO_LARGE, _too_large_message(label, len(data), max_bytes))
    return data


def _too_large_message(name: str, size: int, limit: int) -> str:
    return f"{name}: file too large ({format_bytes(size)}; the limit is {format_bytes(limit)})"


def format_bytes(count: int) -> str:
    """A size for people: ``3.2 GB``, ``20.0 MB``, ``340 kB``, ``12 bytes`` (decimal)."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f} GB"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} MB"
    if count >= 1_000:
        return f"{count / 1e3:.0f} kB"
    return f"{count} bytes"


def _decode(data: bytes, name: str, settings: ServingParams) -> tuple[np.ndarray, dict[str, str]]:
    """Bytes to the 8-bit gray slice and its shown metadata, within the budgets."""
    min_side = settings.min_side or 1
    tolerance = settings.grayscale_tolerance
    if not sniff_dicom(data, name):
        try:
            decoded = imaging.decode_image(
                data,
                name=name,
                min_side=min_side,
                grayscale_tolerance=tolerance,
                max_pixels=settings.max_pixels,
                max_decode_bytes=settings.max_decode_bytes,
            )
        except imaging.ImageDecodeError as error:
            raise InputError(error.reason, str(error)) from None
        info = {"format": decoded.file_format, "width": str(decoded.width)}
        info["height"] = str(decoded.height)
        return decoded.gray, info
    try:
        gray, colour, info = decode_dicom(
            data, name, settings.max_pixels, settings.max_decode_bytes
        )
    except imaging.ImageDecodeError as error:
        raise InputError(error.reason, str(error)) from None
    height, width = gray.shape
    if tolerance is not None and colour > tolerance:
        raise InputError(imaging.COLOUR, f"{name}: colour image (channel difference {colour:.1f})")
    if min(width, height) < min_side:
        raise InputError(
            imaging.TOO_SMALL, f"{name}: too small ({width}x{height}, minimum side {min_side})"
        )
    return gray, {**info, "width": str(width), "height": str(height)}


def _spread(gray: np.ndarray) -> float:
    """Standard deviation of the gray levels without a float64 copy of the image
    (``ndarray.std`` of a 6000 x 6000 slice would allocate 288 MB)."""
    import cv2

    return float(cv2.meanStdDev(gray)[1][0, 0])


def decode_upload(data: bytes, name: str, settings: ServingParams) -> np.ndarray:
    """An uploaded file's bytes to the 8-bit gray slice (before the model's transform).

    Refuses (``InputError``) an empty or oversized file, an image whose header promises
    more pixels or decoded bytes than the budget (before decoding), what
    ``imaging.decode_image`` refuses (not an image, corrupt, truncated, too small, a colour
    photograph), a bad DICOM, and a blank image.
    """
    return _checked_gray(data, name, settings)[0]


def _checked_gray(
    data: bytes, name: str, settings: ServingParams
) -> tuple[np.ndarray, dict[str, str]]:
    if len(data) > settings.max_upload_bytes:
        raise InputError(TOO_LARGE, _too_large_message(name, len(data), settings.max_upload_bytes))
    if len(data) == 0:
        raise InputError(imaging.EMPTY, f"{name}: empty file (0 bytes)")
    gray, info = _decode(data, name, settings)
    if _spread(gray) < BLANK_STD:
        raise InputError(
            OUT_OF_DISTRIBUTION, f"{name}: blank image (a single gray level, no MRI slice)"
        )
    return gray, info


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class PreparedImage:
    """An upload ready for the model: the preprocessed slice and what was noticed.

    ``info`` is what may be shown about the file (format, size, and for DICOM only the
    allow-listed ``DICOM_INFO_TAGS``): never patient data.
    """

    name: str
    image: np.ndarray  # (S, S) uint8: exactly what the model is fed
    z_scores: tuple[float, float] | None  # mean, spread vs the training images
    warning: str | None
    info: dict[str, str] = dataclasses.field(default_factory=dict)
    # Calibrated probabilities (K,) from the learned OOD check's forward pass, when the
    # bundle has a detector: ``Predictor.classify`` uses them instead of a second pass.
    probabilities: np.ndarray | None = None
    # The exported graph's pooled features (D,) and the explanation layer's map (h, w, C)
    # of that same pass: ``Predictor.explain_prepared`` makes the served map from them
    # without running the model.
    pooled: np.ndarray | None = None
    maps: np.ndarray | None = None
    # The backbone tail's forward values of that pass (``Explanation.tail_values``, this
    # row's): the map's gradient runs backward on them, with no NumPy forward. None: no
    # tail, or a graph that does not return them.
    values: tuple[np.ndarray, ...] | None = None


class Predictor:
    """A loaded bundle behind the checks, batching and Grad-CAM that serving needs: the
    one decode-check-predict path of the app, ``predict`` and the registered pyfunc.

    ``prepare_file`` (a path: the app and ``predict``) and ``prepare`` (bytes: the pyfunc
    and ``mlflow models serve``) apply the same checks and give the same ``InputError``
    reason for the same bad file; ``predict`` and ``explain`` run the model.

    Thread-safe: the model is called under a lock (Keras's compiled predict function and
    the Grad-CAM step are shared), preparation runs outside it.
    """

    def __init__(self, bundle: Bundle, settings: ServingParams | None = None) -> None:
        self.bundle = bundle
        self.settings = settings or ServingParams().resolved(CleanParams())
        self.classes = tuple(bundle.meta.classes)
        self.image_size = int(bundle.meta.image_size)
        self._lock = threading.Lock()
        self._gradcam: Any = None
        self._ood = bundle.ood_detector  # None: the evaluate stage shipped no detector
        self._extractor: Any = None
        if bundle.exported is not None:  # NumPy beside LiteRT's spinning workers (core.blas)
            single_thread_blas()

    def describe(self) -> str:
        return self.bundle.describe()

    def prepare_file(self, path: str | Path, name: str | None = None) -> PreparedImage:
        """Read (safely: regular files only, size checked before reading) and prepare a
        file: what the app and ``predict`` call. Raises ``InputError``."""
        label = name or Path(path).name
        data = read_upload(Path(path), self.settings.max_upload_bytes, label)
        return self.prepare(data, label)

    def prepare(self, data: bytes, name: str = "<upload>") -> PreparedImage:
        """Check and preprocess one file's bytes (raises ``InputError``, whatever fails:
        a decoder's unforeseen exception becomes ``decode_failed``, never a traceback that
        stops a batch)."""
        try:
            gray, info = _checked_gray(data, name, self.settings)
            image = imaging.preprocess_gray(gray, self.image_size, self.bundle.meta.preprocess)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - last line of defence for one file
            raise InputError(
                DECODE_FAILED, f"{name}: cannot be decoded ({type(error).__name__})"
            ) from None
        z_scores, warning = self._distribution_check(image, name)
        feature_warning, probabilities, graph = self._feature_check(image, name)
        pooled = maps = values = None
        if graph is not None:
            explanation = self.bundle.explanation
            pooled, maps = graph.pooled[0], explanation.layer_maps(graph)[0]
            found = explanation.tail_values(graph)
            values = None if found is None else tuple(value[0] for value in found)
        return PreparedImage(
            name,
            image,
            z_scores,
            feature_warning or warning,
            info,
            probabilities,
            pooled,
            maps,
            values,
        )

    def _forward(self, batch: np.ndarray) -> tuple[Any, Any]:
        """One pass (under the lock): ``ModelOutputs`` (probabilities before calibration,
        features, logits) and, from an exported model, its ``GraphOutputs`` (else None)."""
        from braintumor.evaluation.ood import ModelOutputs

        exported, head = self.bundle.exported, self.bundle.head
        with self._lock:
            if exported is not None and head is not None:
                graph = exported(batch)
                # The head's logits only for a detector that reads them (energy); the
                # Mahalanobis score reads the features alone (one head pass saved).
                needs_logits = self._ood is None or self._ood.needs_logits
                logits = (
                    head.forward(graph.pooled)[0]
                    if needs_logits
                    else np.full((len(batch), head.num_classes), np.nan)
                )
                outputs = ModelOutputs(
                    graph.probabilities.astype(np.float64), graph.pooled.astype(np.float64), logits
                )
                return outputs, graph
            if self._extractor is None:
                self._extractor = FeatureExtractor(self.bundle.model)
            return self._extractor(batch, batch_size=len(batch)), None

    def _feature_check(self, image: np.ndarray, name: str) -> tuple[str | None, Any, Any]:
        """The learned out-of-distribution check (``ood.py``): the model's own pooled
        features against the training slices', thresholded on validation. Refuses what
        lies beyond the threshold, warns on the top 1 % of what validation scored.
        Returns the warning, the calibrated probabilities of the same forward pass and the
        exported graph's outputs (``None`` without a detector or without an export)."""
        if self._ood is None:
            return None, None, None
        outputs, graph = self._forward(image[None])
        probabilities = apply_temperature(
            outputs.probabilities.astype(np.float32), self.bundle.meta.temperature
        )[0]
        scores = self._ood.score(outputs.features, outputs.logits)
        percent = float(self._ood.percentile(scores)[0])
        if bool(self._ood.is_outlier(scores)[0]):
            raise InputError(
                OUT_OF_DISTRIBUTION,
                f"{name}: does not look like a brain MRI slice: its features are further from "
                f"the training slices than {percent:.1f}% of validation slices' "
                "(no prediction made)",
            )
        if percent >= 99.0:
            return (
                (
                    "unusual image for this model (its features are at the edge of what it was "
                    "validated on); treat the prediction with caution"
                ),
                probabilities,
                graph,
            )
        return None, probabilities, graph

    def _distribution_check(
        self, image: np.ndarray, name: str
    ) -> tuple[tuple[float, float] | None, str | None]:
        """z-scores against the training images; warns on odd ones, and refuses far-off
        ones where the bundle has no learned detector (it catches far less: ``ood.py``)."""
        stats = self.bundle.meta.input_stats
        if stats is None:
            return None, None
        z_mean, z_spread = stats.z_scores(image)
        worst = max(z_mean, z_spread)
        what = "brightness" if z_mean >= z_spread else "contrast"
        if worst > self.settings.ood_refuse_z and self._ood is None:
            raise InputError(
                OUT_OF_DISTRIBUTION,
                f"{name}: does not look like a brain MRI slice: its {what} is {worst:.1f} "
                "standard deviations away from the training images (no prediction made)",
            )
        warning = None
        if worst > self.settings.ood_warn_z:
            warning = (
                f"unusual image: its {what} is {worst:.1f} standard deviations away from the "
                "training images; treat the prediction with caution"
            )
        return (z_mean, z_spread), warning

    def _batch(self, images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim == 2:
            batch = batch[None]
        if batch.ndim == 3:
            batch = batch[..., None]
        expected = (self.image_size, self.image_size, 1)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(f"images must be (N, {self.image_size}, {self.image_size})")
        return batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) for preprocessed images (N, S, S) uint8."""
        batch = self._batch(images)
        size = self.settings.batch_size
        outputs = []
        exported = self.bundle.exported
        with self._lock:
            for start in range(0, len(batch), size):
                chunk = batch[start : start + size]
                if exported is not None:
                    raw = exported(chunk).probabilities
                else:
                    raw = self.bundle.model.predict_on_batch(chunk)
                outputs.append(np.asarray(raw, dtype=np.float32))
        return apply_temperature(np.concatenate(outputs), self.bundle.meta.temperature)

    def classify(self, prepared: list[PreparedImage]) -> np.ndarray:
        """Calibrated probabilities (N, K) of prepared images: those the OOD check already
        ran through the model are not run again; the rest in batches (``predict``)."""
        if not prepared:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        missing = [i for i, item in enumerate(prepared) if item.probabilities is None]
        rows: list[Any] = [item.probabilities for item in prepared]
        if missing:
            fresh = self.predict(np.stack([prepared[i].image for i in missing]))
            for index, row in zip(missing, fresh, strict=True):
                rows[index] = row
        return np.stack(rows).astype(np.float32)

    @property
    def explanation_label(self) -> str:
        """The served map's method and layer, e.g. ``HiResCAM at block10_add``."""
        return self.bundle.explanation.label

    def gradcam(self) -> Any:
        """The compiled GradientTape map of the bundle's explanation (method and layer;
        built on first use; Keras bundles: an exported one computes the same map in
        NumPy, ``explain.tailcam``)."""
        if self._gradcam is None:
            from braintumor.explain.gradcam import GradCam

            explanation = self.bundle.explanation
            self._gradcam = GradCam.for_model(
                self.bundle.model,
                explanation.layer,
                "centred",
                explanation.method,  # type: ignore[arg-type]
                explanation.gate_width,
            )
        return self._gradcam

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, K) and the served maps (N, S, S) in [0, 1] of the
        predicted class, both from one forward pass."""
        batch = self._batch(images)
        exported = self.bundle.exported
        if exported is not None:
            size = self.settings.batch_size
            rows: list[np.ndarray] = []
            maps: list[np.ndarray] = []
            for start in range(0, len(batch), size):
                with self._lock:
                    graph = exported(batch[start : start + size])
                rows.append(graph.probabilities)
                explanation = self.bundle.explanation
                layer_maps = explanation.layer_maps(graph)
                values = explanation.tail_values(graph)
                maps.append(self._head_cam(graph.pooled, layer_maps, values))
            calibrated = apply_temperature(np.concatenate(rows), self.bundle.meta.temperature)
            return calibrated, np.concatenate(maps)
        gradcam = self.gradcam()
        with self._lock:
            result = gradcam.compute(batch, batch_size=self.settings.batch_size)
        probabilities = apply_temperature(result.probabilities, self.bundle.meta.temperature)
        return probabilities, result.heatmaps

    def _head_cam(
        self, pooled: np.ndarray, maps: np.ndarray, values: list[np.ndarray] | None = None
    ) -> np.ndarray:
        """One-pass maps of the predicted classes (the bundle's explanation: the head's
        and the backbone tail's gradient in NumPy) from an exported graph's outputs:
        ``maps`` are the explanation layer's, ``values`` the tail's forward values (None:
        the tail runs forward in NumPy); no model call."""
        head = self.bundle.head
        if head is None:  # pragma: no cover - Bundle.load always pairs them
            raise ValueError("the bundle's exported model has no head parameters")
        return self.bundle.explanation.maps(head, pooled, maps, self.image_size, values)

    def explain_prepared(self, prepared: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
        """``explain`` of prepared images, reusing the OOD check's pass where it kept the
        exported graph's outputs (the app: one pass per upload); the rest go through
        ``explain``."""
        kept = [
            (item.probabilities, item.pooled, item.maps)
            for item in prepared
            if item.probabilities is not None and item.pooled is not None and item.maps is not None
        ]
        if prepared and len(kept) == len(prepared):
            pooled = np.stack([row[1] for row in kept])
            rows = [item.values for item in prepared]
            values = (
                None
                if any(row is None for row in rows)
                # one upload (the app): views, not 20 copies (0.2 ms)
                else [
                    column[0][None] if len(column) == 1 else np.stack(column)
                    for column in zip(*rows, strict=True)
                ]
            )
            heatmaps = self._head_cam(pooled, np.stack([row[2] for row in kept]), values)
            return np.stack([row[0] for row in kept]).astype(np.float32), heatmaps
        return self.explain(np.stack([item.image for item in prepared]))

    def warm_up(self, explain: bool = True) -> None:
        """Trace the compiled functions now, so the first request is not the slow one.

        Keras's predict function is traced per batch shape until a second shape makes it
        relax the batch axis; two sizes here leave one generic trace for every batch.
        """
        blank = np.zeros((2, self.image_size, self.image_size), dtype=np.uint8)
        self.predict(blank[:1])
        self.predict(blank)
        if explain:
            self.explain(blank[:1])


def overlay_image(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    """The Grad-CAM heatmap blended over the preprocessed slice (RGB uint8)."""
    from braintumor.explain.overlay import overlay

    return overlay(image, heatmap, float(min(max(alpha, 0.0), 1.0)))
