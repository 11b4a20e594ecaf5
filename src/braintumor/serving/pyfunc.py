"""The registered MLflow model: a pyfunc over a model bundle, on the one serving path.

``BundleModel`` takes raw images (file bytes, base64 text, or gray / RGB arrays) and sends
every one through ``serving.Predictor.prepare``, the same decode-check-preprocess function
the app and the ``predict`` command use, with the same ``serving`` settings (stored in the
model's ``model_config`` when it is logged). So ``models:/<name>@champion`` loaded with
``mlflow.pyfunc.load_model`` or served by ``mlflow models serve`` refuses the same files
for the same reasons (blank, colour photograph, truncated, too large, not an image, bad
DICOM ...) and answers like the app for the rest. Loading it verifies the bundle's files
against their sha256 in ``bundle.json`` (``bundle.verify_files``), as the app does.

Output: one row per input with ``predicted``, one probability column per class,
``status`` (``ok`` or ``error``), ``reason`` (machine-readable, empty when ok), ``error``
(a one-line message) and ``warning``. A refused input gets an empty ``predicted`` and
NaN probabilities; it never fails the whole request.

Serving layer: imports ``serving``, the config and MLflow; never a stage.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from braintumor.core.config import section_from_mapping
from braintumor.core.schema import CleanParams, ServingParams

BUNDLE_ARTIFACT = "bundle"
MODEL_CONFIG_KEY = "serving"
# Beyond the backend: what the served code imports (``serving`` reads DICOM and YAML).
SERVED_REQUIREMENTS = ["opencv-python-headless", "pillow", "pandas", "scipy", "pydicom", "pyyaml"]
# A bundle with an exported model is served by LiteRT: no training framework to install.
EXPORTED_REQUIREMENTS = [
    "mlflow",
    "numpy",
    "ai-edge-litert",
    "opencv-python-headless",
    "pillow",
    "pandas",
    "pydicom",
    "pyyaml",
    "tqdm",
]
STATUS_COLUMNS = ("status", "reason", "error", "warning")


def served_requirements(exported: bool, training: list[str]) -> list[str]:
    """The registered model's pip requirements: for an exported bundle (served by LiteRT,
    ``requirements-serving.lock``) its runtime pinned as installed here, without Keras or
    TensorFlow; otherwise ``training`` (the backend's) and ``SERVED_REQUIREMENTS``."""
    if not exported:
        return training + SERVED_REQUIREMENTS
    from importlib import metadata

    pinned = []
    for package in EXPORTED_REQUIREMENTS:
        try:
            pinned.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pinned.append(package)
    return pinned


def model_config(settings: ServingParams, clean: CleanParams) -> dict[str, Any]:
    """What ``log_model(model_config=...)`` stores: the resolved serving settings."""
    return {MODEL_CONFIG_KEY: dataclasses.asdict(settings.resolved(clean))}


def settings_from_config(config: dict[str, Any] | None) -> ServingParams:
    """The serving settings a logged model carries (defaults for older models)."""
    section = (config or {}).get(MODEL_CONFIG_KEY)
    serving = section_from_mapping(ServingParams, section or {}, "serving")
    return serving.resolved(CleanParams())


def signature(classes: tuple[str, ...] | list[str]) -> Any:
    """The model signature: one binary ``image`` column in; the prediction, one double
    per class and the status columns out."""
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "predicted")]
    outputs += [ColSpec("double", name) for name in classes]
    outputs += [ColSpec("string", name) for name in STATUS_COLUMNS]
    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs)
    )


def to_bytes(value: Any) -> bytes:
    """One input value as file bytes: bytes as they are, base64 text decoded, an array
    encoded losslessly as PNG (RGB kept as colour, so the colour check still sees it)."""
    import cv2

    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value.encode("utf-8")  # refused downstream as not an image
    array = np.squeeze(np.asarray(value))
    if array.dtype not in (np.uint8, np.uint16):
        array = np.clip(np.nan_to_num(array.astype(np.float32)), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        code = cv2.COLOR_RGBA2BGRA if array.shape[-1] == 4 else cv2.COLOR_RGB2BGR
        array = cv2.cvtColor(array, code)
    ok, encoded = cv2.imencode(".png", array) if array.ndim in (2, 3) else (False, None)
    return encoded.tobytes() if ok else b""


def _values(model_input: Any) -> list[Any]:
    """The images of a pyfunc input: a DataFrame's first column, a stack of arrays, one
    array, or a list."""
    if isinstance(model_input, pd.DataFrame):
        return list(model_input.iloc[:, 0])
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        is_stack = model_input.ndim == 4 or (
            model_input.ndim == 3 and model_input.shape[-1] not in (1, 3, 4)
        )
        return list(model_input) if is_stack else [model_input]
    return list(model_input)


class BundleModel(mlflow.pyfunc.PythonModel):
    """pyfunc over a model bundle: raw images in, checked, calibrated answers out."""

    def load_context(self, context: Any) -> None:
        """Load the bundle artifact through ``Bundle.load``, which verifies every file
        against bundle.json's sha256 manifest: ``mlflow.pyfunc.load_model`` of a
        tampered model fails with the ``BundleError`` line naming the file."""
        from braintumor.serving.bundle import Bundle
        from braintumor.serving.predictor import Predictor

        settings = settings_from_config(getattr(context, "model_config", None))
        bundle = Bundle.load(context.artifacts[BUNDLE_ARTIFACT])
        self.predictor = Predictor(bundle, settings)

    # No type hints here: MLflow 3 would try (and fail) to derive a schema from them.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from braintumor.serving.predictor import InputError, PreparedImage

        classes = list(self.predictor.classes)
        outcomes: list[PreparedImage | InputError] = []
        for index, value in enumerate(_values(model_input)):
            try:
                outcomes.append(self.predictor.prepare(to_bytes(value), f"image[{index}]"))
            except InputError as error:
                outcomes.append(error)
        good = [item for item in outcomes if isinstance(item, PreparedImage)]
        probabilities = self.predictor.classify(good)
        rows, position = [], 0
        for item in outcomes:
            if isinstance(item, InputError):
                row = {"predicted": "", **dict.fromkeys(classes, float("nan"))}
                rows.append(
                    {
                        **row,
                        "status": "error",
                        "reason": item.reason,
                        "error": str(item),
                        "warning": "",
                    }
                )
                continue
            values = probabilities[position]
            position += 1
            row = {"predicted": classes[int(np.argmax(values))]}
            row.update({name: float(p) for name, p in zip(classes, values, strict=True)})
            rows.append(
                {**row, "status": "ok", "reason": "", "error": "", "warning": item.warning or ""}
            )
        return pd.DataFrame(rows, columns=["predicted", *classes, *STATUS_COLUMNS])
