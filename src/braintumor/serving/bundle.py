"""The model bundle: a trained model plus everything needed to use it on a raw image.

A bundle is a folder with ``model.keras`` and ``bundle.json`` (class names, input size,
the exact preprocessing parameters, the calibration temperature, the Grad-CAM layer, the
intensity statistics of the training images, and where the model came from). The evaluate
stage writes it, the registered MLflow model carries it as an artifact, and the app and
the ``predict`` command load it, so preprocessing and class names are never re-typed and
a served image goes through exactly the transform the model was trained on.

Core layer: imports the config, imaging and calibration modules and Keras, nothing above.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.config import ClaheParams, PreprocessParams, UnsharpParams
from braintumor.core.files import atomic_path, file_sha256
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.evaluation.calibration import apply_temperature

MODEL_FILE = "model.keras"
META_FILE = "bundle.json"
FORMAT_VERSION = 1


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
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"{META_FILE}: malformed ({error})") from None


def write_bundle(folder: Path, model_path: Path, meta: BundleMeta) -> BundleMeta:
    """Write (atomically) a bundle folder from a saved ``.keras`` model and its metadata."""
    meta = dataclasses.replace(meta, model_sha256=file_sha256(model_path))
    with atomic_path(folder, directory=True) as temporary:
        (temporary / MODEL_FILE).write_bytes(Path(model_path).read_bytes())
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


class Bundle:
    """A loaded bundle: preprocess raw image bytes, predict calibrated probabilities."""

    def __init__(self, folder: Path, model: Any, meta: BundleMeta) -> None:
        self.folder = Path(folder)
        self.model = model
        self.meta = meta

    @classmethod
    def load(cls, folder: str | Path) -> Bundle:
        """Load and check a bundle: the model file's hash and its output size must match."""
        import keras

        folder = Path(folder)
        meta = read_meta(folder)
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise BundleError(f"{folder}: bundle has no {MODEL_FILE}")
        if meta.model_sha256 and file_sha256(model_path) != meta.model_sha256:
            raise BundleError(f"{model_path}: sha256 differs from {META_FILE}")
        try:
            model = keras.saving.load_model(model_path, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds here
            raise BundleError(f"{model_path}: not a Keras model ({error})") from None
        outputs = int(model.output_shape[-1])
        if outputs != len(meta.classes):
            raise BundleError(
                f"{model_path}: model has {outputs} outputs but the bundle names "
                f"{len(meta.classes)} classes"
            )
        return cls(folder, model, meta)

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
        raw = np.asarray(self.model.predict(batch, batch_size=batch_size, verbose=0))
        return apply_temperature(raw, self.meta.temperature)

    def describe(self) -> str:
        """Which model answers: registered name and version, or file and hash."""
        source = self.meta.source
        if source.get("registered_model"):
            return f"{source['registered_model']} v{source.get('version', '?')}"
        return f"{self.folder / MODEL_FILE} (sha256 {self.meta.model_sha256[:12]})"
