"""Real-image helpers shared by the serving tests (predict, app, browser): MRI slices
from the mirror, a small real bundle built once per session (tinycnn at 64 px, a few
training steps on real images, input statistics from those images, temperature 1.3),
DICOM files and bad uploads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braintumor.core.schema import ModelParams, PreprocessParams
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.serving.bundle import MODEL_FILE, BundleMeta, InputStats, read_meta, write_bundle

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

    from braintumor.model.classifier import build_model, feature_layer_name

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


def tiny_bundle_with_detector(mirror: Path, root: Path) -> Path:
    """The tiny bundle plus a Mahalanobis OOD detector, as the evaluate stage ships one:
    fitted on the slices the model was trained on, thresholded on 40 other training
    slices at a 10 % false-alarm rate, written through ``write_bundle`` (once per
    session); returns its folder."""
    if "tiny+ood" in _BUNDLES:
        return _BUNDLES["tiny+ood"]
    from braintumor.evaluation.ood import FeatureExtractor, ModelOutputs, fit_detector
    from braintumor.serving.bundle import Bundle

    source = tiny_bundle_folder(mirror, root / "plain")
    bundle = Bundle.load(source)
    extractor = FeatureExtractor(bundle.model)

    def outputs(paths: list[Path]) -> ModelOutputs:
        size, params = bundle.meta.image_size, bundle.meta.preprocess
        gray = [preprocess_gray(decode_image(p.read_bytes()).gray, size, params) for p in paths]
        return extractor(np.stack(gray))

    train = outputs(real_images(mirror, 8, "Training", offset=100))  # what the bundle learnt
    validation = outputs(real_images(mirror, 10, "Training", offset=300))
    labels = np.repeat(np.arange(len(CLASSES)), 8)
    detector = fit_detector("mahalanobis", train, labels, validation, 0.1)
    write_bundle(root / "bundle", source / MODEL_FILE, read_meta(source), detector)
    _BUNDLES["tiny+ood"] = root / "bundle"
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


# --------------------------------------------------------------------------- hostile files

PATIENT_TAGS = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PID-7731-XQ",
    "PatientBirthDate": "19610314",
    "PatientSex": "F",
    "PatientAddress": "12 Hidden Lane, Nowhere",
    "OtherPatientIDs": "ALT-99812",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "Who^Doctor",
    "AccessionNumber": "ACC55521",
}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header promises ``width`` x ``height`` 8-bit gray pixels, with a tiny
    IDAT: what a decompression bomb looks like before anyone decodes it."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def png16(side: int) -> bytes:
    """A 16-bit gray PNG ``side`` x ``side``: a vertical ramp, constant along each row, so
    6000 x 6000 compresses to about 90 kB (the attacker's file)."""
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // max(side - 1, 1)).astype(np.uint16)
    image = np.ascontiguousarray(np.broadcast_to(ramp[:, None], (side, side)))
    return cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


def dicom_with_patient(path: Path, pixels: np.ndarray, **extra) -> Path:
    """``write_dicom`` plus the patient tags in ``PATIENT_TAGS`` (and ``extra``)."""
    from pydicom import dcmread

    write_dicom(path, pixels)
    dataset = dcmread(path)
    for keyword, value in {**PATIENT_TAGS, **extra}.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)
    return path


def dicom_rows_two_values(path: Path, pixels: np.ndarray) -> Path:
    """A DICOM whose ``Rows`` holds two values (attacker's TypeError)."""
    from pydicom import dcmread

    dataset = dcmread(dicom_with_patient(path, pixels))
    dataset.Rows = [pixels.shape[0], pixels.shape[0]]
    dataset.save_as(path)
    return path


def dicom_frames_not_a_number(path: Path, pixels: np.ndarray) -> Path:
    """A DICOM with ``NumberOfFrames = "ab"`` (patched into the bytes: pydicom will not
    write it)."""
    dicom_with_patient(path, pixels, NumberOfFrames=99)
    data = path.read_bytes()
    marker = b"\x28\x00\x08\x00IS\x02\x0099"
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, marker[:-2] + b"ab"))
    return path


def _rle_frame(rows: int, columns: int, value: int) -> bytes:
    """One RLE Lossless frame of constant 16-bit ``value`` (PS3.5 G: two byte segments)."""
    import struct

    count = rows * columns
    segments = []
    for byte in ((value >> 8) & 0xFF, value & 0xFF):
        runs = b"".join(
            bytes([257 - min(128, count - start), byte])
            if min(128, count - start) > 1
            else bytes([0, byte])
            for start in range(0, count, 128)
        )
        segments.append(runs + (b"\x00" if len(runs) % 2 else b""))
    offsets = [64, 64 + len(segments[0])]
    header = struct.pack("<16I", 2, *offsets, *([0] * 13))
    return header + b"".join(segments)


def rle_multiframe(path: Path, side: int, frames: int) -> Path:
    """An RLE Lossless DICOM of ``frames`` frames of ``side`` x ``side`` 16-bit pixels
    (small on disk, ``frames * side**2 * 2`` bytes if every frame were decoded)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    write_dicom(path, np.zeros((8, 8), np.uint16))
    dataset = dcmread(path)
    dataset.Rows = dataset.Columns = side
    dataset.NumberOfFrames = frames
    dataset.PixelData = encapsulate(
        [_rle_frame(side, side, 1000 + 40 * index) for index in range(frames)]
    )
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = RLELossless
    dataset.save_as(path, enforce_file_format=True)
    return path


def deflated_bomb(path: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to about
    ``inflated_bytes`` (a pixel data element of zeros): small on disk."""
    import struct
    import zlib

    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_dicom(path, np.zeros((8, 8), np.uint16), with_pixels=False)
    dataset = dcmread(path)
    side = int((inflated_bytes // 2) ** 0.5)
    dataset.Rows = dataset.Columns = side
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    pixel_bytes = side * side * 2
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [squeezer.compress(body.getvalue() + element)]
    zeros = bytes(1 << 20)
    for start in range(0, pixel_bytes, len(zeros)):
        parts.append(squeezer.compress(zeros[: min(len(zeros), pixel_bytes - start)]))
    parts.append(squeezer.flush())
    meta = dataset.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    path.write_bytes(head.getvalue() + b"".join(parts))
    return path


def deflated_copy(source: Path, target: Path) -> Path:
    """The same DICOM saved with the Deflated Explicit VR Little Endian syntax."""
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = dcmread(source)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(target, enforce_file_format=True)
    return target


def tiny_exported_bundle(mirror: Path, root: Path) -> Path:
    """The tiny bundle with its detector and the exported model (LiteRT graph and head
    parameters, parity-checked on 8 real slices), as the evaluate stage now ships it
    (once per session); returns its folder."""
    if "tiny+export" in _BUNDLES:
        return _BUNDLES["tiny+export"]
    import keras

    from braintumor.evaluation.ood import OodDetector
    from braintumor.serving.bundle import OOD_FILE
    from braintumor.serving.export import export_model

    source = tiny_bundle_with_detector(mirror, root / "ood")
    meta = read_meta(source)
    model = keras.saving.load_model(source / MODEL_FILE, compile=False)
    check = real_slices(mirror, meta, 2, offset=20)
    exported = export_model(model, meta.gradcam_layer, root / "export", check)
    detector = OodDetector.load(source / OOD_FILE)
    write_bundle(root / "bundle", source / MODEL_FILE, meta, detector, exported)
    _BUNDLES["tiny+export"] = root / "bundle"
    return root / "bundle"


def real_slices(mirror: Path, meta: BundleMeta, per_class: int, offset: int = 0) -> np.ndarray:
    """Preprocessed msoud Testing slices (N, S, S) uint8 as a bundle's model sees them."""
    paths = real_images(mirror, per_class, "Testing", offset=offset)
    return np.stack(
        [
            preprocess_gray(decode_image(p.read_bytes()).gray, meta.image_size, meta.preprocess)
            for p in paths
        ]
    )


# The soft ReLU gate width the tiny HiResCAM bundle serves with (params.yaml's)
GATE_WIDTH = 0.25


def tiny_hirescam_bundle(mirror: Path, root: Path) -> Path:
    """The tiny bundle exported to serve HiResCAM at ``tiny_relu2`` (an earlier block: its
    map is an extra output and ``tail.npz`` carries ``tiny_conv3``, ``tiny_bn3`` and the
    last ReLU) with soft gates of ``GATE_WIDTH``, as ``serving.explanation`` asks for (once
    per session); returns its folder."""
    if "tiny+hirescam" in _BUNDLES:
        return _BUNDLES["tiny+hirescam"]
    import keras

    from braintumor.evaluation.ood import OodDetector
    from braintumor.serving.bundle import OOD_FILE
    from braintumor.serving.export import export_model

    source = tiny_bundle_with_detector(mirror, root / "ood")
    meta = read_meta(source)
    model = keras.saving.load_model(source / MODEL_FILE, compile=False)
    check = real_slices(mirror, meta, 2, offset=20)
    exported = export_model(
        model,
        meta.gradcam_layer,
        root / "export",
        check,
        explanation=("hirescam", "tiny_relu2"),
        gate_width=GATE_WIDTH,
    )
    detector = OodDetector.load(source / OOD_FILE)
    write_bundle(root / "bundle", source / MODEL_FILE, meta, detector, exported)
    _BUNDLES["tiny+hirescam"] = root / "bundle"
    return root / "bundle"


def random_batchnorm_statistics(model: Any, seed: int = 5) -> Any:
    """``model`` with every BatchNormalization's statistics, scale and shift drawn from a
    seeded generator: an untrained backbone whose every affine step (and so every layer's
    gradient) is non-trivial, for explanation tests that need no training."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, shape).astype("float32"))
    return model
