"""Serving logic shared by the web app and the ``predict`` command.

One place turns an uploaded file into what the model sees and the model's answer into
calibrated probabilities and a Grad-CAM map, so the app and batch prediction cannot drift
apart:

- ``load_bundle`` opens a model bundle from a local folder, or from the MLflow registry
  (``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the registered pyfunc model
  carries the bundle folder as its artifact ``bundle``).
- ``Predictor.prepare`` checks an upload (size in bytes and pixels, decodable, grayscale,
  not blank, not far from the training images' intensity statistics) and applies exactly
  the bundle's preprocessing. DICOM slices are windowed (VOI LUT, or window centre and
  width, else min-max) to 8 bits first; every other format goes through
  ``imaging.decode_image`` like the training images did.
- ``Predictor.predict`` gives calibrated probabilities in batches; ``Predictor.explain``
  gives them together with Grad-CAM maps from the same forward pass (the cached, compiled
  ``explain.GradCam``).

Every refusal is an ``InputError`` with a machine-readable ``reason`` and a one-line
message meant for the person who uploaded the file.

Serving layer: imports the core (bundle, imaging, explain, calibration, config) and, only
for a registry URI, MLflow; never a stage module.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import shutil
import tempfile
import threading
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from braintumor import imaging
from braintumor.bundle import Bundle, BundleError
from braintumor.calibration import apply_temperature
from braintumor.config import (
    CleanParams,
    ConfigError,
    Params,
    TrackingParams,
    params_from_mapping,
)
from braintumor.paths import resolve_tracking_uri

REGISTRY_SCHEME = "models:/"
BUNDLE_ARTIFACT = "bundle"
DEFAULT_ALIAS = "champion"

# Extensions the ``predict`` command picks up in a folder (single files are always tried).
SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm")

# Reasons beyond imaging's (empty, not_an_image, corrupt, truncated, too_small, colour).
TOO_LARGE = "too_large"
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
class ServingSettings:
    """Limits and thresholds of the app and the ``predict`` command (``serving`` section of
    ``params.yaml``; every key optional).

    ``grayscale_tolerance`` and ``min_side``: None takes the clean stage's values, so the
    app refuses what cleaning would have excluded from training. ``ood_warn_z`` and
    ``ood_refuse_z``: how many training standard deviations an image's mean or spread may
    be off before a warning, and before a refusal. ``examples``: test images the app offers
    to click. ``batch_size``: images per model call.
    """

    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    grayscale_tolerance: float | None = None
    min_side: int | None = None
    ood_warn_z: float = 4.0
    ood_refuse_z: float = 8.0
    examples: int = 4
    overlay_alpha: float = 0.4
    batch_size: int = 16

    def __post_init__(self) -> None:
        checks = (
            (self.max_upload_bytes >= 1024, "max_upload_bytes", "must be >= 1024"),
            (self.max_pixels >= 64 * 64, "max_pixels", "must be >= 4096"),
            (
                self.grayscale_tolerance is None or self.grayscale_tolerance >= 0,
                "grayscale_tolerance",
                "must be >= 0 or null",
            ),
            (self.min_side is None or self.min_side >= 1, "min_side", "must be >= 1 or null"),
            (self.ood_warn_z > 0, "ood_warn_z", "must be > 0"),
            (self.ood_refuse_z >= self.ood_warn_z, "ood_refuse_z", "must be >= ood_warn_z"),
            (self.examples >= 0, "examples", "must be >= 0"),
            (0 <= self.overlay_alpha <= 1, "overlay_alpha", "must be in [0, 1]"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
        )
        for passed, key, problem in checks:
            if not passed:
                raise ConfigError(f"serving.{key}: {problem}")

    @classmethod
    def from_mapping(cls, data: Any, params: Params | None = None) -> ServingSettings:
        """Build from the ``serving`` mapping; unknown keys and wrong types are refused."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"serving: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"serving.{key}: unknown key (known: {', '.join(sorted(known))})")
            values[key] = _convert_number(hints[key], value, f"serving.{key}")
        if params is not None:
            values.setdefault("grayscale_tolerance", params.clean.grayscale_tolerance)
            values.setdefault("min_side", params.clean.min_side)
        return cls(**values)


def _convert_number(hint: Any, value: Any, key: str) -> Any:
    allows_none = "None" in str(hint)
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{key}: must not be null")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if "int" in str(hint):
        if not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    return float(value)


@dataclass(frozen=True)
class ServingConfig:
    """What serving reads from ``params.yaml``: its settings, the default model and the
    tracking URI the registry lives at."""

    settings: ServingSettings
    default_model: str
    tracking_uri: str
    params: Params | None = None  # None when there is no parameter file


def load_serving_config(params_path: str | Path | None = "params.yaml") -> ServingConfig:
    """Read ``params.yaml`` (and its profile) for serving; defaults when there is none.

    The ``serving`` section is read here rather than by ``config.load_params`` until the
    config module knows it; once it does, its typed section is used instead.
    """
    path = Path(params_path) if params_path is not None else None
    if path is None or not path.is_file():
        clean, tracking = CleanParams(), TrackingParams()
        settings = ServingSettings(
            grayscale_tolerance=clean.grayscale_tolerance, min_side=clean.min_side
        )
        uri = resolve_tracking_uri(tracking.tracking_uri, Path.cwd())
        default_model = f"{REGISTRY_SCHEME}{tracking.registered_model}@{DEFAULT_ALIAS}"
        return ServingConfig(settings, default_model, uri)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    serving_raw = raw.get("serving")
    try:
        params = params_from_mapping(raw, path.parent / "profiles")
        typed = getattr(params, "serving", None)
        if typed is not None and dataclasses.is_dataclass(typed):
            # The config module knows the section (and applied the profile): use it.
            serving_raw = dataclasses.asdict(typed)
    except ConfigError as error:
        if not str(error).startswith("serving"):
            raise
        # A serving key the config module does not know yet: read the section here.
        params = params_from_mapping(
            {k: v for k, v in raw.items() if k != "serving"}, path.parent / "profiles"
        )
    settings = ServingSettings.from_mapping(serving_raw, params)
    default_model = f"{REGISTRY_SCHEME}{params.tracking.registered_model}@{DEFAULT_ALIAS}"
    uri = resolve_tracking_uri(params.tracking.tracking_uri, path.parent.resolve())
    return ServingConfig(settings, default_model, uri, params)


# --------------------------------------------------------------------------- bundles


def is_registry_uri(model: str | Path) -> bool:
    return str(model).startswith(REGISTRY_SCHEME)


def load_bundle(model: str | Path, *, tracking_uri: str | None = None) -> Bundle:
    """A bundle from a local folder or a registry URI; raises ``BundleError`` when it cannot.

    For a registry URI the alias is resolved to a version first (so a concurrent promotion
    cannot mix two versions), the version's artifacts are downloaded to a private temporary
    folder (removed at exit), and the bundle's description names the registered version.
    """
    if not is_registry_uri(model):
        folder = Path(model)
        if not folder.exists():
            raise BundleError(f"{folder}: no such model bundle folder")
        return Bundle.load(folder)
    return _load_registered(str(model), tracking_uri)


class SetupError(RuntimeError):
    """The command-line tools cannot start: bad parameters or a model that will not load."""


def open_model(
    params_path: str | Path | None, model: str | Path | None
) -> tuple[ServingConfig, Bundle]:
    """The serving parameters and the bundle of ``model`` (default: the parameters' model),
    for ``predict`` and the app; raises ``SetupError`` with the one-line reason."""
    try:
        config = load_serving_config(params_path)
    except ConfigError as error:
        raise SetupError(str(error)) from None
    try:
        bundle = load_bundle(model or config.default_model, tracking_uri=config.tracking_uri)
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


def _load_registered(uri: str, tracking_uri: str | None) -> Bundle:
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
        raise BundleError(f"{uri}: {message} (tracking URI {tracking_uri})") from None
    except OSError as error:
        raise BundleError(f"{uri}: cannot download the model ({error})") from None
    bundle = Bundle.load(_bundle_folder(local, uri))
    source = dict(bundle.meta.source)
    source.update(registered_model=name, version=version, model_uri=uri)
    if alias is not None:
        source["alias"] = alias
    meta = dataclasses.replace(bundle.meta, source=source)
    return Bundle(bundle.folder, bundle.model, meta)


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


def sniff_dicom(data: bytes, name: str) -> bool:
    """DICOM by its preamble magic, or by extension (files written without a preamble)."""
    return imaging.sniff_format(data) == "dicom" or (
        Path(name).suffix.lower() == ".dcm" and imaging.sniff_format(data) is None
    )


def _window_linear(values: np.ndarray, center: float, width: float, exact: bool) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3.2 (LINEAR_EXACT), to 0-1."""
    if exact:
        return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    width = max(width, 1.0)
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first_number(value: Any) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def decode_dicom(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, float]:
    """An 8-bit gray slice from DICOM bytes and its colourfulness (0 for monochrome).

    Modality LUT (rescale slope and intercept) first, then the VOI transform the file
    asks for: a VOI LUT sequence, else its first window (centre and width, with the
    LINEAR, LINEAR_EXACT or SIGMOID function), else min-max; MONOCHROME1 is inverted so
    that tissue is bright, as in the training images. A multi-frame file gives its middle
    frame.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise InputError(
            imaging.NOT_AN_IMAGE, f"{name}: DICOM support needs pydicom (not installed)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as error:
        raise InputError(imaging.CORRUPT, f"{name}: corrupt DICOM ({error})") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise InputError(imaging.NOT_AN_IMAGE, f"{name}: DICOM file without image data")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows * columns > max_pixels or rows * columns * frames > 16 * max_pixels:
        raise InputError(
            TOO_LARGE, f"{name}: image too large ({columns}x{rows} pixels, {frames} frames)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = dataset.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            imaging.CORRUPT, f"{name}: cannot read the DICOM pixels ({message})"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if samples == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = _min_max_uint8(pixels.astype(np.float64))
        colour = imaging.colourfulness(rgb)
        import cv2

        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), colour
    if pixels.ndim != 2:
        raise InputError(imaging.CORRUPT, f"{name}: unexpected DICOM pixel shape {pixels.shape}")
    try:
        values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
        if "VOILUTSequence" in dataset:
            unit = _min_max_unit(np.asarray(apply_voi_lut(values, dataset), dtype=np.float64))
        elif "WindowCenter" in dataset and "WindowWidth" in dataset:
            center = _first_number(dataset.WindowCenter)
            width = _first_number(dataset.WindowWidth)
            function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
            if width <= 0:
                unit = _min_max_unit(values)
            elif function == "SIGMOID":
                unit = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
            else:
                unit = _window_linear(values, center, width, function == "LINEAR_EXACT")
        else:
            unit = _min_max_unit(values)
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise InputError(imaging.CORRUPT, f"{name}: bad DICOM pixel transform ({error})") from None
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8), 0.0


def _min_max_unit(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(_min_max_unit(values) * 255.0), 0, 255).astype(np.uint8)


def format_bytes(count: int) -> str:
    """A size for people: ``20.0 MB``, ``340 kB``, ``12 bytes`` (decimal units)."""
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} MB"
    if count >= 1_000:
        return f"{count / 1e3:.0f} kB"
    return f"{count} bytes"


def raster_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image header without decoding the pixels, if readable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image explains it
        return None


def decode_upload(data: bytes, name: str, settings: ServingSettings) -> np.ndarray:
    """An uploaded file's bytes to the 8-bit gray slice (before the model's transform).

    Refuses (``InputError``) an empty or oversized file, too many pixels (checked from the
    header, before decoding), what ``imaging.decode_image`` refuses (not an image, corrupt,
    truncated, too small, a colour photograph) and a blank image.
    """
    if len(data) > settings.max_upload_bytes:
        raise InputError(
            TOO_LARGE,
            f"{name}: file too large ({format_bytes(len(data))}; the limit is "
            f"{format_bytes(settings.max_upload_bytes)})",
        )
    if len(data) == 0:
        raise InputError(imaging.EMPTY, f"{name}: empty file (0 bytes)")
    min_side = settings.min_side or 1
    if sniff_dicom(data, name):
        gray, colour = decode_dicom(data, name, settings.max_pixels)
        height, width = gray.shape
        tolerance = settings.grayscale_tolerance
        if tolerance is not None and colour > tolerance:
            raise InputError(
                imaging.COLOUR, f"{name}: colour image (channel difference {colour:.1f})"
            )
        if min(width, height) < min_side:
            raise InputError(
                imaging.TOO_SMALL, f"{name}: too small ({width}x{height}, minimum side {min_side})"
            )
    else:
        size = raster_size(data)
        if size is not None and size[0] * size[1] > settings.max_pixels:
            raise InputError(
                TOO_LARGE,
                f"{name}: image too large ({size[0]}x{size[1]} pixels; the limit is "
                f"{settings.max_pixels:,} pixels)",
            )
        try:
            gray = imaging.decode_image(
                data,
                name=name,
                min_side=min_side,
                grayscale_tolerance=settings.grayscale_tolerance,
            ).gray
        except imaging.ImageDecodeError as error:
            raise InputError(error.reason, str(error)) from None
    if float(gray.std()) < BLANK_STD:
        raise InputError(
            OUT_OF_DISTRIBUTION, f"{name}: blank image (a single gray level, no MRI slice)"
        )
    return gray


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class PreparedImage:
    """An upload ready for the model: the preprocessed slice and what was noticed."""

    name: str
    image: np.ndarray  # (S, S) uint8: exactly what the model is fed
    z_scores: tuple[float, float] | None  # mean, spread vs the training images
    warning: str | None


class Predictor:
    """A loaded bundle behind the checks, batching and Grad-CAM that serving needs.

    Thread-safe: the model is called under a lock (Keras's compiled predict function and
    the Grad-CAM step are shared), preparation runs outside it.
    """

    def __init__(self, bundle: Bundle, settings: ServingSettings | None = None) -> None:
        self.bundle = bundle
        self.settings = settings or ServingSettings()
        self.classes = tuple(bundle.meta.classes)
        self.image_size = int(bundle.meta.image_size)
        self._lock = threading.Lock()
        self._gradcam: Any = None

    def describe(self) -> str:
        return self.bundle.describe()

    def prepare(self, data: bytes, name: str = "<upload>") -> PreparedImage:
        """Check and preprocess one file's bytes (raises ``InputError``)."""
        gray = decode_upload(data, name, self.settings)
        image = imaging.preprocess_gray(gray, self.image_size, self.bundle.meta.preprocess)
        stats = self.bundle.meta.input_stats
        if stats is None:
            return PreparedImage(name, image, None, None)
        z_mean, z_spread = stats.z_scores(image)
        worst = max(z_mean, z_spread)
        what = "brightness" if z_mean >= z_spread else "contrast"
        if worst > self.settings.ood_refuse_z:
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
        return PreparedImage(name, image, (z_mean, z_spread), warning)

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
        with self._lock:
            for start in range(0, len(batch), size):
                raw = self.bundle.model.predict_on_batch(batch[start : start + size])
                outputs.append(np.asarray(raw, dtype=np.float32))
        return apply_temperature(np.concatenate(outputs), self.bundle.meta.temperature)

    def gradcam(self) -> Any:
        """The compiled Grad-CAM of the bundle's layer (built on first use)."""
        if self._gradcam is None:
            from braintumor.explain import GradCam

            self._gradcam = GradCam.for_model(self.bundle.model, self.bundle.meta.gradcam_layer)
        return self._gradcam

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, K) and Grad-CAM maps (N, S, S) in [0, 1] of the
        predicted class, both from one forward pass."""
        batch = self._batch(images)
        gradcam = self.gradcam()
        with self._lock:
            result = gradcam.compute(batch, batch_size=self.settings.batch_size)
        probabilities = apply_temperature(result.probabilities, self.bundle.meta.temperature)
        return probabilities, result.heatmaps

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
    from braintumor.explain import overlay

    return overlay(image, heatmap, float(min(max(alpha, 0.0), 1.0)))
