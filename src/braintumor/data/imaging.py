"""Decoding and preprocessing of MRI slices: the one place where pixels are made.

``decode_image`` turns file bytes into an 8-bit grayscale array, normalising what can be
normalised (alpha, 16-bit depth, palette, 3-channel gray) and refusing what cannot (empty,
truncated, not an image, too small, a colour photograph) with an ``ImageDecodeError`` that
carries a machine-readable reason. ``preprocess_gray`` is the recipe's transform (resize,
CLAHE, unsharp mask). Cleaning, caching, training, evaluation, the app and the registered
model all call these two functions, so what the model sees at serving time is exactly what
it saw in training.

Core layer: pure functions on bytes and arrays; imports only the config dataclasses.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from braintumor.core.schema import ClaheParams, PreprocessParams, UnsharpParams

# Reasons an image is refused; the clean stage counts these.
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
COLOUR = "colour"
TOO_LARGE = "too_large"
_BLOCK = 1 << 20  # values per block when rescaling (8 MB of float64)

# Bytes per pixel of each PIL mode once decoded (what ``Image.load`` allocates).
_MODE_BYTES = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "PA": 2,
    "La": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 4,
    "CMYK": 4,
    "I": 4,
    "F": 4,
}

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"GIF8", 0, "gif"),
    (b"RIFF", 0, "webp"),
    (b"DICM", 128, "dicom"),
)
_EXTENSION_FORMATS = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".gif": "gif",
    ".webp": "webp",
    ".dcm": "dicom",
}
_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


class ImageDecodeError(ValueError):
    """A file cannot become a grayscale MRI slice; ``reason`` is one of the constants."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit grayscale image plus what was found in (and done to) the file."""

    gray: np.ndarray
    file_format: str
    width: int
    height: int
    channels: int
    bit_depth: int
    colourfulness: float
    notes: tuple[str, ...]


def sniff_format(data: bytes) -> str | None:
    """The container format from the file's magic bytes, or None if unrecognised."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def colourfulness(rgb: np.ndarray) -> float:
    """Largest mean absolute difference between two colour channels (0 for true gray).

    JPEG chroma noise on a gray scan stays around 1; a colour photograph is in the tens.
    Computed on uint8 planes with ``cv2.absdiff`` (exact), so a large image costs three
    one-byte planes, not int16 copies of the whole array.
    """
    red, green, blue = cv2.split(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8))
    diffs = (
        float(cv2.absdiff(red, green).mean()),
        float(cv2.absdiff(green, blue).mean()),
        float(cv2.absdiff(red, blue).mean()),
    )
    return max(diffs)


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """What decoding a ``width`` x ``height`` image of PIL ``mode`` allocates, in bytes."""
    per_pixel = 2 if mode.startswith("I;16") else _MODE_BYTES.get(mode, 4)
    return width * height * per_pixel


def check_budget(
    name: str, width: int, height: int, frame_bytes: int, max_pixels: int, max_bytes: int
) -> None:
    """Refuse (``TOO_LARGE``) an image whose header promises more pixels or decoded bytes
    than the budget: called before decoding, so a small file cannot make a huge array."""
    if width * height > max_pixels:
        raise ImageDecodeError(
            TOO_LARGE,
            f"{name}: image too large ({width}x{height} pixels; the limit is "
            f"{max_pixels:,} pixels)",
        )
    if frame_bytes > max_bytes:
        raise ImageDecodeError(
            TOO_LARGE,
            f"{name}: image too large to decode ({width}x{height} needs {frame_bytes:,} "
            f"bytes; the limit is {max_bytes:,})",
        )


def _to_gray(image: Image.Image, notes: list[str]) -> tuple[np.ndarray, int, int, float]:
    """Convert a decoded PIL image to uint8 gray; returns (gray, channels, bits, colour)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(f"{'16' if mode.startswith('I;16') else '32'}-bit rescaled to 8-bit")
        bits = 16 if mode.startswith("I;16") else 32
        return rescale_to_uint8(np.asarray(image)), 1, bits, 0.0
    if mode == "1":
        return np.asarray(image.convert("L")), 1, 1, 0.0
    if mode == "L":
        return np.asarray(image), 1, 8, 0.0
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info)
    channels = len(image.getbands())
    if has_alpha:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba).convert("RGB")
        notes.append("alpha composited on black")
    elif mode != "RGB":
        image = image.convert("RGB")
        if mode not in ("P",):
            notes.append(f"{mode} converted to RGB")
    else:
        notes.append("3-channel gray converted to 1 channel")
    rgb = np.asarray(image)
    colour = colourfulness(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return gray, channels, 8, colour


def rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max rescale any numeric array to uint8: ``rint((v - low) * 255 / (high - low))``.

    Computed in float64 blocks of a million values, so the result is exactly the float64
    formula's while the temporaries stay at 8 MB: a 16-bit 6000 x 6000 image no longer
    costs three 288 MB float64 arrays.
    """
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        flat = np.nan_to_num(flat, posinf=0.0, neginf=0.0)
    output = np.zeros(flat.shape, dtype=np.uint8)
    low, high = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
    if high > low:
        scale = 255.0 / (high - low)
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK].astype(np.float64)
            block -= low
            block *= scale
            np.rint(block, out=block)
            output[start : start + _BLOCK] = np.clip(block, 0, 255, out=block)
    return output.reshape(np.shape(values))


def rescale_unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (float32) to uint8 0-255, rounded, without float64 temporaries."""
    work = np.asarray(unit, dtype=np.float32) * np.float32(255)
    np.rint(work, out=work)
    np.clip(work, 0, 255, out=work)
    return work.astype(np.uint8)


def _open_checked(data: bytes, name: str, budget: tuple[int, int]) -> Any:
    """Open the image lazily (header only), check the budget, then decode the pixels."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(TOO_LARGE, f"{name}: image too large ({error})") from None
    width, height = image.size
    max_pixels, max_bytes = budget
    check_budget(
        name, width, height, decoded_bytes(width, height, image.mode), max_pixels, max_bytes
    )
    image.load()
    return ImageOps.exif_transpose(image)


def _open_image(data: bytes, name: str, file_format: str, budget: tuple[int, int]) -> Any:
    """The decoded PIL image, or ``ImageDecodeError`` sorting PIL's failures into reasons."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning etc.
            image = _open_checked(data, name, budget)
    except UnidentifiedImageError:
        raise ImageDecodeError(CORRUPT, f"{name}: corrupt {file_format} (cannot decode)") from None
    except OSError as error:
        complete = file_format != "jpeg" or data.rstrip(b"\x00").endswith(b"\xff\xd9")
        if "truncated" in str(error).lower() and not complete:
            raise ImageDecodeError(TRUNCATED, f"{name}: truncated {file_format} file") from None
        raise ImageDecodeError(CORRUPT, f"{name}: corrupt {file_format} ({error})") from None
    except ImageDecodeError:
        raise
    except (SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(CORRUPT, f"{name}: corrupt {file_format} ({error})") from None
    if file_format == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # libjpeg fills a cut-off scan with gray without complaint; the missing end-of-image
        # marker is the reliable sign.
        raise ImageDecodeError(TRUNCATED, f"{name}: truncated jpeg file (no end marker)")
    return image


def decode_image(
    data: bytes,
    *,
    name: str = "<bytes>",
    min_side: int = 1,
    grayscale_tolerance: float | None = None,
    max_pixels: int = 2**31,
    max_decode_bytes: int = 2**33,
) -> DecodedImage:
    """Decode file bytes into an 8-bit grayscale slice, or raise ``ImageDecodeError``.

    ``name`` only labels messages (its extension is compared with the content, and a
    mismatch is noted, not refused). ``grayscale_tolerance`` (None: accept colour) refuses
    3-channel images whose channels differ more than that on average. ``max_pixels`` and
    ``max_decode_bytes`` are checked against the header before decoding (``TOO_LARGE``).
    """
    if len(data) == 0:
        raise ImageDecodeError(EMPTY, f"{name}: empty file (0 bytes)")
    file_format = sniff_format(data)
    if file_format is None:
        raise ImageDecodeError(NOT_AN_IMAGE, f"{name}: not an image (unrecognised content)")
    if file_format == "dicom":
        raise ImageDecodeError(NOT_AN_IMAGE, f"{name}: DICOM is not supported here")
    notes: list[str] = []
    extension = Path(name).suffix.lower()
    expected = _EXTENSION_FORMATS.get(extension)
    if expected is not None and expected != file_format:
        notes.append(f"extension {extension} but content is {file_format}")
    image = _open_image(data, name, file_format, (max_pixels, max_decode_bytes))
    width, height = image.size
    gray, channels, bit_depth, colour = _to_gray(image, notes)
    if min(width, height) < min_side:
        raise ImageDecodeError(
            TOO_SMALL, f"{name}: too small ({width}x{height}, minimum side {min_side})"
        )
    if grayscale_tolerance is not None and colour > grayscale_tolerance:
        raise ImageDecodeError(
            COLOUR,
            f"{name}: colour image (channel difference {colour:.1f} > {grayscale_tolerance})",
        )
    return DecodedImage(
        gray=np.ascontiguousarray(gray),
        file_format=file_format,
        width=width,
        height=height,
        channels=channels,
        bit_depth=bit_depth,
        colourfulness=colour,
        notes=tuple(notes),
    )


def apply_clahe(gray: np.ndarray, params: ClaheParams) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (the recipe: clip 2.0, 8 x 8 tiles)."""
    clahe = cv2.createCLAHE(clipLimit=params.clip_limit, tileGridSize=(params.tile_grid,) * 2)
    return clahe.apply(gray)


def apply_unsharp(gray: np.ndarray, params: UnsharpParams) -> np.ndarray:
    """Unsharp mask ``image_weight * image + blur_weight * gaussian(image)``, saturated to uint8.

    The Gaussian kernel size is derived from sigma (``ksize=(0, 0)``), as in the recipe.
    """
    blurred = cv2.GaussianBlur(gray, (0, 0), params.sigma)
    return cv2.addWeighted(gray, params.image_weight, blurred, params.blur_weight, 0)


def preprocess_gray(gray: np.ndarray, size: int, params: PreprocessParams) -> np.ndarray:
    """The recipe's transform: resize to ``size`` x ``size``, CLAHE, unsharp mask.

    Input and output are 2-D uint8 arrays; the output is what the model is fed (replicated
    to three channels and normalised inside the model).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    image = cv2.resize(gray, (size, size), interpolation=_INTERPOLATION[params.interpolation])
    if params.clahe.enabled:
        image = apply_clahe(image, params.clahe)
    if params.unsharp.enabled:
        image = apply_unsharp(image, params.unsharp)
    return np.ascontiguousarray(image)


def load_and_preprocess(
    data: bytes, size: int, params: PreprocessParams, *, name: str = "<bytes>"
) -> np.ndarray:
    """Decode file bytes and apply the transform (no serving checks: serving calls
    ``serving.Predictor.prepare``)."""
    return preprocess_gray(decode_image(data, name=name).gray, size, params)
