"""Serving logic shared by every entry point: the web app, the ``predict`` command, the
registered pyfunc (``served_model.BundleModel``) and so ``mlflow models serve``.

One place turns an uploaded file into what the model sees, so the entry points cannot
drift apart: the same bad file gets the same ``InputError`` reason from all of them.

- ``load_serving_config`` reads the ``serving`` section that ``config`` parses (one schema,
  ``config.ServingParams``; ``ServingSettings`` is the same class under its old name).
- ``load_bundle`` opens a model bundle from a local folder or the MLflow registry.
- ``Predictor.prepare_file`` (the app and ``predict``: a path) reads a file safely (regular
  files only, size checked with ``fstat`` before reading, never more than the limit read)
  and calls ``Predictor.prepare`` (the pyfunc: bytes), which decodes within the budgets
  (``max_pixels`` and ``max_decode_bytes`` checked from the header before decoding; a
  Deflated DICOM inflated under a cap; one DICOM frame), refuses what cleaning would
  have refused (colour, too small, corrupt, truncated, not an image), blank images and
  images far from the training statistics, and applies the bundle's preprocessing.
  DICOM slices are windowed (VOI LUT, or window centre and width, else min-max) to 8 bits.
- ``Predictor.predict`` gives calibrated probabilities in batches; ``Predictor.explain``
  gives them with Grad-CAM maps from the same forward pass.

Patient data: only allow-listed DICOM attributes (``DICOM_INFO_TAGS``) are returned, DICOM
refusals never quote the file's values, and pydicom's log messages (which can) are
withheld.

Serving layer: imports the core (bundle, imaging, explain, calibration, config) and, only
for a registry URI, MLflow; never a stage module.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import logging
import os
import shutil
import stat
import tempfile
import threading
import warnings
import zlib
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
    ServingParams,
    TrackingParams,
    load_params,
)
from braintumor.ood import FeatureExtractor, load_detector
from braintumor.paths import resolve_tracking_uri
from braintumor.redaction import redact_text

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


# The one serving schema is ``config.ServingParams`` (the ``serving`` section of
# ``params.yaml``); this name stays for callers written before it held every key.
ServingSettings = ServingParams


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
        raise BundleError(redact_text(f"{uri}: {message} (tracking URI {tracking_uri})")) from None
    except OSError as error:
        raise BundleError(redact_text(f"{uri}: cannot download the model ({error})")) from None
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

# DICOM attributes that may be returned to callers, logged or written out: an allow-list,
# so patient tags (name, ID, birth date, ...) and every other identifying attribute never
# leave the decoder.
DICOM_INFO_TAGS = (
    "Modality",
    "PhotometricInterpretation",
    "BitsStored",
    "SamplesPerPixel",
    "NumberOfFrames",
)


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


def sniff_dicom(data: bytes, name: str) -> bool:
    """DICOM by its preamble magic, or by extension (files written without a preamble)."""
    return imaging.sniff_format(data) == "dicom" or (
        Path(name).suffix.lower() == ".dcm" and imaging.sniff_format(data) is None
    )


def _window_linear(values: np.ndarray, center: float, width: float, exact: bool) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3.2 (LINEAR_EXACT), to 0-1 (float32,
    computed in place on one copy)."""
    work = np.array(values, dtype=np.float32)
    if exact:
        work -= center - width / 2
        work /= width
    elif width <= 1.0:
        return (work > center - 0.5).astype(np.float32)
    else:
        work -= center - 0.5
        work /= width - 1
        work += 0.5
    return np.clip(work, 0.0, 1.0, out=work)


def _first_number(value: Any) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


class _WithheldValues(logging.Filter):
    """pydicom logs malformed elements with their values ("Invalid value for VR PN:
    'Doe^Jane'"): keep the record and its level, drop the text that may be patient data."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom: a malformed DICOM element (details withheld: may be patient data)"
        record.args = ()
        return True


def _withhold_pydicom_values() -> None:
    """Install the filter on pydicom's logger once (at first use, not at import)."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(item, _WithheldValues) for item in logger.filters):
        logger.addFilter(_WithheldValues())


def _corrupt_dicom(name: str, what: str) -> InputError:
    """A refusal that names the problem without quoting the file (which may hold patient
    data): pydicom's own messages can echo element values."""
    return InputError(imaging.CORRUPT, f"{name}: corrupt DICOM ({what})")


def _inflate(body: bytes, name: str, max_bytes: int) -> bytes:
    """Inflate a Deflated DICOM's dataset, refusing it once the output passes ``max_bytes``
    (pydicom would inflate all of it first: 1 MB can become gigabytes)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        raise _corrupt_dicom(name, "bad deflate stream") from None
    if len(inflated) > max_bytes or inflater.unconsumed_tail:
        raise InputError(
            TOO_LARGE, f"{name}: Deflated DICOM inflates past the limit of {max_bytes:,} bytes"
        )
    return inflated


def _read_dicom(data: bytes, name: str, max_bytes: int) -> Any:
    """The dataset of DICOM bytes; a Deflated one is inflated here, capped."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    stream = DicomBytesIO(data)
    preamble = read_preamble(stream, True)
    file_meta = _read_file_meta_info(stream)
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        import pydicom

        return pydicom.dcmread(io.BytesIO(data), force=True)
    body = _inflate(data[stream.tell() :], name, max_bytes)
    dataset = read_dataset(DicomBytesIO(body), False, True)
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return FileDataset(io.BytesIO(), dataset, preamble, file_meta, False, True)


def _header_int(dataset: Any, keyword: str, default: int, name: str) -> int:
    """One integer attribute of the header, or a ``corrupt`` refusal naming it (two
    values for ``Rows``, ``NumberOfFrames="ab"`` ...)."""
    try:
        value = dataset.get(keyword, None)
    except Exception:  # noqa: BLE001 - pydicom converts raw values lazily, raising anything
        raise _corrupt_dicom(name, f"{keyword} cannot be read") from None
    if value is None or value == "":
        return default
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        raise _corrupt_dicom(name, f"{keyword} has {len(value)} values, expected one")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _corrupt_dicom(name, f"{keyword} is not an integer") from None
    if number < 0:
        raise _corrupt_dicom(name, f"{keyword} is negative")
    return number


@dataclass(frozen=True)
class DicomHeader:
    """The few header numbers decoding needs, read and checked before any pixel."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int


def _dicom_header(dataset: Any, name: str, max_pixels: int, max_bytes: int) -> DicomHeader:
    """Read and check the header: shape, and the bytes one decoded frame will take (as
    float32, what the transforms work in) against the budget."""
    if "PixelData" not in dataset:
        raise InputError(imaging.NOT_AN_IMAGE, f"{name}: DICOM file without image data")
    header = DicomHeader(
        rows=_header_int(dataset, "Rows", 0, name),
        columns=_header_int(dataset, "Columns", 0, name),
        frames=max(_header_int(dataset, "NumberOfFrames", 1, name), 1),
        samples=_header_int(dataset, "SamplesPerPixel", 1, name),
        bits_allocated=_header_int(dataset, "BitsAllocated", 16, name),
    )
    if header.rows == 0 or header.columns == 0 or header.samples not in (1, 3):
        raise _corrupt_dicom(name, "bad Rows, Columns or SamplesPerPixel")
    frame_bytes = header.rows * header.columns * header.samples * 4
    imaging.check_budget(name, header.columns, header.rows, frame_bytes, max_pixels, max_bytes)
    return header


def _dicom_frame(dataset: Any, header: DicomHeader, name: str) -> np.ndarray:
    """The middle frame only (pydicom decodes just that frame of an RLE or JPEG file)."""
    from pydicom.pixels import pixel_array

    try:
        index = header.frames // 2 if header.frames > 1 else None
        return pixel_array(dataset, index=index)
    except Exception as error:  # noqa: BLE001 - pydicom's decoders raise many kinds
        raise _corrupt_dicom(name, f"pixels cannot be decoded: {type(error).__name__}") from None


def _modality(pixels: np.ndarray, dataset: Any) -> np.ndarray:
    """The modality LUT in float32 (pydicom's ``apply_modality_lut`` returns float64: a
    2048^2 frame would cost 32 MB more); the pixels themselves when it is the identity."""
    if "ModalityLUTSequence" in dataset:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept == 0.0:
        return pixels
    values = pixels.astype(np.float32)
    values *= slope
    values += intercept
    return values


def _voi_uint8(values: np.ndarray, dataset: Any) -> np.ndarray:
    """The VOI transform the file asks for, to uint8: a VOI LUT sequence, else its first
    window (LINEAR, LINEAR_EXACT or SIGMOID), else min-max."""
    if "VOILUTSequence" in dataset:
        from pydicom.pixels import apply_voi_lut

        return imaging.rescale_to_uint8(apply_voi_lut(values, dataset))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center = _first_number(dataset.WindowCenter)
        width = _first_number(dataset.WindowWidth)
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        if width > 0 and function == "SIGMOID":
            work = np.array(values, dtype=np.float32)
            work -= center
            work *= -4.0 / width
            np.exp(work, out=work)
            work += 1.0
            return imaging.rescale_unit_to_uint8(np.reciprocal(work, out=work))
        if width > 0:
            unit = _window_linear(values, center, width, function == "LINEAR_EXACT")
            return imaging.rescale_unit_to_uint8(unit)
    return imaging.rescale_to_uint8(values)


def _dicom_gray(pixels: np.ndarray, dataset: Any, name: str) -> tuple[np.ndarray, float]:
    """8-bit gray and colourfulness of one decoded frame (no float64 anywhere)."""
    import cv2
    from pydicom.pixels import convert_color_space

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = imaging.rescale_to_uint8(pixels)
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), imaging.colourfulness(rgb)
    if pixels.ndim != 2:
        raise _corrupt_dicom(name, f"unexpected pixel shape {pixels.shape}")
    try:
        gray = _voi_uint8(_modality(pixels, dataset), dataset)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError):
        raise _corrupt_dicom(name, "bad pixel transform attributes") from None
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray, 0.0


def dicom_info(dataset: Any, header: DicomHeader) -> dict[str, str]:
    """What may be shown about a DICOM file: the allow-listed, non-identifying tags."""
    info = {"format": "dicom", "frames": str(header.frames)}
    for keyword in DICOM_INFO_TAGS:
        try:
            value = dataset.get(keyword, None)
        except Exception:  # noqa: BLE001 - a bad optional tag is just not shown
            value = None
        if value is not None and keyword != "NumberOfFrames":
            info[keyword] = str(value)[:64]
    return info


def decode_dicom(
    data: bytes, name: str, max_pixels: int, max_decode_bytes: int = 2**33
) -> tuple[np.ndarray, float, dict[str, str]]:
    """An 8-bit gray slice from DICOM bytes, its colourfulness and its shown metadata.

    Budget first: a Deflated dataset is inflated at most ``max_decode_bytes``; the header
    (Rows, Columns, NumberOfFrames ...) is checked before a pixel is decoded, and only
    the middle frame is decoded. Then the modality LUT (rescale slope and intercept), the
    VOI transform the file asks for, and MONOCHROME1 inverted so tissue is bright, as in
    the training images. Messages never quote the file's values, and the returned
    metadata is an allow-list (``DICOM_INFO_TAGS``): no patient data leaves here.
    """
    try:
        import pydicom  # noqa: F401 - only to say so when it is missing
    except ImportError:
        raise InputError(
            imaging.NOT_AN_IMAGE, f"{name}: DICOM support needs pydicom (not installed)"
        ) from None
    _withhold_pydicom_values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings can quote element values
        try:
            dataset = _read_dicom(data, name, max_decode_bytes)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - pydicom's parser raises many kinds
            raise _corrupt_dicom(name, f"unreadable header: {type(error).__name__}") from None
        header = _dicom_header(dataset, name, max_pixels, max_decode_bytes)
        pixels = _dicom_frame(dataset, header, name)
        gray, colour = _dicom_gray(pixels, dataset, name)
    return gray, colour, dicom_info(dataset, header)


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
        self._ood = load_detector(bundle.folder)  # None: a bundle from before evaluate shipped one
        self._extractor: Any = None

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
        warning = self._feature_check(image, name) or warning
        return PreparedImage(name, image, z_scores, warning, info)

    def _feature_check(self, image: np.ndarray, name: str) -> str | None:
        """The learned out-of-distribution check (``ood.py``): the model's own pooled
        features against the training slices', thresholded on validation. Refuses what
        lies beyond the threshold, warns on the top 1 % of what validation scored."""
        if self._ood is None:
            return None
        with self._lock:
            if self._extractor is None:
                self._extractor = FeatureExtractor(self.bundle.model)
            outputs = self._extractor(image[None], batch_size=1)
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
                "unusual image for this model (its features are at the edge of what it was "
                "validated on); treat the prediction with caution"
            )
        return None

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
