"""Real-image helpers shared by the serving tests (predict, app, browser): MRI slices
from the mirror, a small real bundle built once per session (tinycnn at 64 px, a few
training steps on real images, input statistics from those images, temperature 1.3),
DICOM files and bad uploads.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from braintumor.bundle import BundleMeta, InputStats, write_bundle
from braintumor.config import ModelParams, PreprocessParams
from braintumor.imaging import decode_image, preprocess_gray

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
BUNDLE_SIZE = 64
_BUNDLES: dict[str, Path] = {}


# --------------------------------------------------------------------------- shared helpers


def real_images(
    mirror: Path, per_class: int, split: str = "Testing", offset: int = 0
) -> list[Path]:
    """``per_class`` real msoud slices of each class (sorted names from ``offset``)."""
    paths = []
    for name in CLASSES:
        files = sorted(p for p in (mirror / "msoud" / split / name).iterdir() if p.is_file())
        paths.extend(files[offset : offset + per_class])
    return paths


def tiny_bundle_folder(mirror: Path, root: Path) -> Path:
    """Build (once per session) a small trained bundle under ``root``; returns its folder."""
    if "tiny" in _BUNDLES:
        return _BUNDLES["tiny"]
    import keras

    from braintumor.model import build_model, feature_layer_name

    params = PreprocessParams()
    paths = real_images(mirror, 8, "Training", offset=100)
    images = np.stack(
        [preprocess_gray(decode_image(p.read_bytes()).gray, BUNDLE_SIZE, params) for p in paths]
    )[..., None]
    labels = np.repeat(np.arange(len(CLASSES)), 8)
    keras.utils.set_random_seed(7)
    model = build_model(
        ModelParams(backbone="tinycnn", weights="none", dense_units=(16,)),
        BUNDLE_SIZE,
        len(CLASSES),
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(images.astype("float32"), labels, batch_size=16, epochs=3, verbose=0)
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "trained.keras")
    meta = BundleMeta(
        classes=CLASSES,
        image_size=BUNDLE_SIZE,
        preprocess=params,
        gradcam_layer=feature_layer_name("tinycnn"),
        temperature=1.3,
        input_stats=InputStats.from_images(images),
    )
    write_bundle(root / "bundle", root / "trained.keras", meta)
    _BUNDLES["tiny"] = root / "bundle"
    return root / "bundle"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    with_pixels: bool = True,
) -> Path:
    """A minimal, valid MR DICOM file (16-bit unsigned, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope = 1
    dataset.RescaleIntercept = 0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if with_pixels:
        dataset.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def dicom_of(gray: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """16-bit pixels ``4 * gray + 1000`` and the window that maps them back to ``gray``
    exactly under DICOM's LINEAR function: centre 1510.5, width 1021."""
    return gray.astype(np.uint16) * 4 + 1000, (1510.5, 1021.0)


def bad_files(folder: Path, mirror: Path) -> dict[str, tuple[Path, str]]:
    """Files the app and ``predict`` must refuse, each with its expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    real = real_images(mirror, 1)[0]
    data = real.read_bytes()
    gray = decode_image(data).gray
    tinted = np.stack([gray, gray // 2, np.zeros_like(gray)], axis=-1)
    files = {
        "text.png": (b"this is a text file, not an image\n" * 10, "not_an_image"),
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (data[: len(data) // 2], "truncated"),
        "colour.png": (cv2.imencode(".png", tinted)[1].tobytes(), "colour"),
        "blank.png": (
            cv2.imencode(".png", np.full((128, 128), 90, np.uint8))[1].tobytes(),
            "out_of_distribution",
        ),
    }
    out = {}
    for name, (content, reason) in files.items():
        (folder / name).write_bytes(content)
        out[name] = (folder / name, reason)
    return out
