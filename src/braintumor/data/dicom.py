"""DICOM slices to 8-bit gray, beside the other decoders (``imaging.decode_image``).

Uploads and batch inputs may be DICOM (``.dcm`` or a file with the DICM preamble). This
module turns one into the gray slice the model reads, the way ``imaging`` does for PNG,
JPEG and the rest: budgets checked before pixels are decoded (a Deflated dataset
inflated under a cap, the header's frame size against the pixel and byte budgets, only
the middle frame decoded), then the modality LUT, the VOI transform the file asks for
and MONOCHROME1 inverted. Refusals are ``imaging.ImageDecodeError`` with the same reason
codes, one line each, and never quote the file's values: pydicom's messages and log
records can echo element values (patient data), so they are withheld; what may be shown
about a file is an allow-list (``DICOM_INFO_TAGS``).
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from braintumor.data import imaging
from braintumor.data.imaging import TOO_LARGE, ImageDecodeError

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


def _corrupt_dicom(name: str, what: str) -> ImageDecodeError:
    """A refusal that names the problem without quoting the file (which may hold patient
    data): pydicom's own messages can echo element values."""
    return ImageDecodeError(imaging.CORRUPT, f"{name}: corrupt DICOM ({what})")


def _inflate(body: bytes, name: str, max_bytes: int) -> bytes:
    """Inflate a Deflated DICOM's dataset, refusing it once the output passes ``max_bytes``
    (pydicom would inflate all of it first: 1 MB can become gigabytes)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        raise _corrupt_dicom(name, "bad deflate stream") from None
    if len(inflated) > max_bytes or inflater.unconsumed_tail:
        raise ImageDecodeError(
            TOO_LARGE, f"{name}: Deflated DICOM inflates past the limit of {max_bytes:,} bytes"
        )
    return inflated


def _read_dicom(data: bytes, name: str, max_bytes: int) -> Any:
    """The dataset of DICOM bytes; a Deflated one is inflated here, capped."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    # DicomBytesIO is a binary file object; pydicom's annotations say BinaryIO.
    stream = cast(BinaryIO, DicomBytesIO(data))
    preamble = read_preamble(stream, True)
    file_meta = _read_file_meta_info(stream)
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        import pydicom

        return pydicom.dcmread(io.BytesIO(data), force=True)
    body = _inflate(data[stream.tell() :], name, max_bytes)
    dataset = read_dataset(cast(BinaryIO, DicomBytesIO(body)), False, True)
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
        raise ImageDecodeError(imaging.NOT_AN_IMAGE, f"{name}: DICOM file without image data")
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
        raise ImageDecodeError(
            imaging.NOT_AN_IMAGE, f"{name}: DICOM support needs pydicom (not installed)"
        ) from None
    _withhold_pydicom_values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings can quote element values
        try:
            dataset = _read_dicom(data, name, max_decode_bytes)
        except ImageDecodeError:
            raise
        except Exception as error:  # noqa: BLE001 - pydicom's parser raises many kinds
            raise _corrupt_dicom(name, f"unreadable header: {type(error).__name__}") from None
        header = _dicom_header(dataset, name, max_pixels, max_decode_bytes)
        pixels = _dicom_frame(dataset, header, name)
        gray, colour = _dicom_gray(pixels, dataset, name)
    return gray, colour, dicom_info(dataset, header)
