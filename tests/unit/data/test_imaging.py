"""Decoding and the recipe's transform (``braintumor.data.imaging``) on real image files.

Every fixture is a real file: either a JPEG from the team's mirror of the data sets, or an
image written into ``tmp_path`` with PIL or OpenCV. Bad files must be refused with the
right machine-readable reason and a one-line message that names the file and the problem;
files that can be normalised (alpha, 16-bit depth, 3-channel gray, a wrong extension) must
be accepted with a note saying what was done.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from braintumor.core.schema import ClaheParams, CleanParams, PreprocessParams, UnsharpParams
from braintumor.data.imaging import (
    COLOUR,
    CORRUPT,
    EMPTY,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TOO_SMALL,
    TRUNCATED,
    DecodedImage,
    ImageDecodeError,
    colourfulness,
    decode_image,
    preprocess_gray,
    rescale_to_uint8,
)

# Real msoud slices: a 1-channel JPEG and a 3-channel (gray) JPEG, both 224 x 224.
ONE_CHANNEL_MRI = ("msoud", "Testing", "pituitary", "Te-pi_0088.jpg")
THREE_CHANNEL_MRI = ("msoud", "Testing", "glioma", "Te-gl_0010.jpg")
# A colour photograph of food (the mirror's not-mri/ folder), 463 x 318.
COLOUR_PHOTO = ("not-mri", "food_001.jpg")
# A real SARTAJ slice stored as a 3-channel JPEG of 495 x 619 (not square).
NON_SQUARE_MRI = ("sartaj", "Testing", "glioma_tumor", "image(1).jpg")

CLEAN = CleanParams()


def _mirror_file(mirror: Path, parts: tuple[str, ...]) -> Path:
    path = mirror.joinpath(*parts)
    if not path.is_file():
        pytest.fail(f"{path}: expected file missing from the data mirror")
    return path


def _decode_file(path: Path, **options) -> DecodedImage:
    return decode_image(path.read_bytes(), name=str(path), **options)


def _refusal(path: Path, **options) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        _decode_file(path, **options)
    return caught.value


def _assert_one_line_naming(error: ImageDecodeError, path: Path, *problem_words: str) -> None:
    message = str(error)
    assert "\n" not in message, f"message spans several lines: {message!r}"
    assert str(path) in message, f"message does not name the file: {message!r}"
    for word in problem_words:
        assert word in message.lower(), f"message does not say {word!r}: {message!r}"


@pytest.fixture
def real_jpeg(mirror: Path) -> bytes:
    return _mirror_file(mirror, ONE_CHANNEL_MRI).read_bytes()


@pytest.fixture
def real_gray(mirror: Path) -> np.ndarray:
    """A real MRI slice as decoded 8-bit gray (224 x 224)."""
    return _decode_file(_mirror_file(mirror, THREE_CHANNEL_MRI)).gray


# --------------------------------------------------------------------------- bad input


def test_corrupt_jpeg_with_valid_header_is_refused_as_corrupt(
    real_jpeg: bytes, tmp_path: Path
) -> None:
    # Keep the real headers up to the start-of-scan segment (so the file sniffs and opens
    # as a 224 x 224 JPEG), replace the entropy-coded body with noise, keep the end marker.
    start_of_scan = real_jpeg.index(b"\xff\xda")
    header_end = (
        start_of_scan + 2 + int.from_bytes(real_jpeg[start_of_scan + 2 : start_of_scan + 4])
    )
    body_length = len(real_jpeg) - header_end - 2
    noise = np.random.default_rng(7).integers(0, 256, body_length, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(real_jpeg[:header_end] + noise + b"\xff\xd9")
    assert Image.open(path).size == (224, 224)  # the header really is valid

    error = _refusal(path)

    assert error.reason == CORRUPT
    _assert_one_line_naming(error, path, "corrupt", "jpeg")


def test_jpeg_with_garbage_after_its_first_marker_is_corrupt_not_truncated(
    tmp_path: Path,
) -> None:
    noise = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + noise + b"\xff\xd9")  # complete: it has an end marker

    error = _refusal(path)

    assert error.reason == CORRUPT


def test_truncated_real_jpeg_is_refused_as_truncated(real_jpeg: bytes, tmp_path: Path) -> None:
    path = tmp_path / "half.jpg"
    path.write_bytes(real_jpeg[: len(real_jpeg) // 2])

    error = _refusal(path)

    assert error.reason == TRUNCATED
    _assert_one_line_naming(error, path, "truncated")


def test_zero_byte_file_is_refused_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    error = _refusal(path)

    assert error.reason == EMPTY
    _assert_one_line_naming(error, path, "empty")


def test_text_file_named_jpg_is_refused_as_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("scan notes: patient 12, axial T1, see report\n", encoding="utf-8")

    error = _refusal(path)

    assert error.reason == NOT_AN_IMAGE
    _assert_one_line_naming(error, path, "not an image")


def test_one_pixel_image_is_refused_as_too_small(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    assert cv2.imwrite(str(path), np.full((1, 1), 128, np.uint8))

    error = _refusal(path, min_side=32)

    assert error.reason == TOO_SMALL
    _assert_one_line_naming(error, path, "too small", "1x1", "32")


def test_image_at_the_minimum_side_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "edge.png"
    assert cv2.imwrite(str(path), np.full((32, 40), 90, np.uint8))

    assert _decode_file(path, min_side=32).gray.shape == (32, 40)


# --------------------------------------------------------------------------- normalised input


def test_rgba_png_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[:24, :, :3] = 140  # opaque gray upper half
    rgba[:24, :, 3] = 255
    rgba[24:, :, :3] = (250, 30, 200)  # fully transparent lower half hides a vivid colour
    rgba[24:, :, 3] = 0
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    decoded = _decode_file(path, grayscale_tolerance=CLEAN.grayscale_tolerance)

    assert decoded.gray.shape == (48, 48)
    assert decoded.gray.dtype == np.uint8
    assert (decoded.gray[:24] == 140).all()  # opaque gray keeps its value
    assert (decoded.gray[24:] == 0).all()  # transparent becomes black, its colour ignored
    assert decoded.colourfulness == 0.0
    assert "alpha composited on black" in decoded.notes


def test_16_bit_png_is_rescaled_to_8_bit_min_max(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    values = rng.integers(300, 52_000, size=(40, 56), dtype=np.uint16)
    values[0, 0], values[-1, -1] = 300, 52_000  # pin the extremes
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), values)
    assert Image.open(path).mode == "I;16"  # really a 16-bit grayscale file

    decoded = _decode_file(path)

    gray = decoded.gray
    assert gray.dtype == np.uint8
    assert gray.shape == values.shape
    assert int(gray.min()) == 0
    assert int(gray.max()) == 255
    order = np.argsort(values.ravel(), kind="stable")
    assert (np.diff(gray.ravel()[order].astype(int)) >= 0).all(), "intensity order not kept"
    expected = np.rint((values.astype(float) - 300) * 255 / (52_000 - 300)).astype(np.uint8)
    assert np.array_equal(gray, expected)
    assert decoded.bit_depth == 16
    assert "16-bit rescaled to 8-bit" in decoded.notes


def test_three_channel_gray_jpeg_is_accepted_as_gray(real_gray: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "gray3.jpg"
    assert cv2.imwrite(str(path), np.dstack([real_gray] * 3), [cv2.IMWRITE_JPEG_QUALITY, 95])

    decoded = _decode_file(path, grayscale_tolerance=CLEAN.grayscale_tolerance)

    assert decoded.channels == 3
    assert decoded.gray.shape == real_gray.shape
    assert decoded.colourfulness <= 1.0
    assert np.abs(decoded.gray.astype(int) - real_gray).mean() < 2.0  # JPEG q95 noise only
    assert "3-channel gray converted to 1 channel" in decoded.notes


def test_png_named_jpg_is_accepted_with_a_note(real_gray: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "scan.jpg"
    encoded, png = cv2.imencode(".png", real_gray)
    assert encoded
    path.write_bytes(png.tobytes())

    decoded = _decode_file(path)

    assert decoded.file_format == "png"
    assert np.array_equal(decoded.gray, real_gray)  # lossless: same pixels
    assert "extension .jpg but content is png" in decoded.notes


def test_real_colour_photograph_is_refused_as_colour(mirror: Path) -> None:
    path = _mirror_file(mirror, COLOUR_PHOTO)

    error = _refusal(path, grayscale_tolerance=CLEAN.grayscale_tolerance)

    assert error.reason == COLOUR
    _assert_one_line_naming(error, path, "colour")
    # Without a tolerance (what serving and the preprocess stage ask for) it decodes.
    assert _decode_file(path).colourfulness > 10 * CLEAN.grayscale_tolerance


@pytest.mark.parametrize("parts", [ONE_CHANNEL_MRI, THREE_CHANNEL_MRI], ids=["1ch", "3ch"])
def test_real_mri_is_accepted_with_the_clean_defaults(mirror: Path, parts: tuple[str, ...]) -> None:
    path = _mirror_file(mirror, parts)

    decoded = _decode_file(
        path, min_side=CLEAN.min_side, grayscale_tolerance=CLEAN.grayscale_tolerance
    )

    assert decoded.file_format == "jpeg"
    assert decoded.gray.shape == (224, 224)
    assert decoded.gray.dtype == np.uint8
    assert decoded.colourfulness <= CLEAN.grayscale_tolerance
    assert decoded.gray.std() > 10  # a real slice, not a flat fill


# --------------------------------------------------------------------------- preprocess_gray


def _recipe_by_hand(gray: np.ndarray, size: int) -> np.ndarray:
    """The recipe (RECIPE.md, Preprocessing) written with OpenCV directly."""
    resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    equalised = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(resized)
    blurred = cv2.GaussianBlur(equalised, (0, 0), sigmaX=1.5)
    return cv2.addWeighted(equalised, 1.5, blurred, -0.5, 0.0)


@pytest.mark.parametrize("size", [224, 160, 300])
def test_preprocess_gray_is_the_recipe(real_gray: np.ndarray, size: int) -> None:
    result = preprocess_gray(real_gray, size, PreprocessParams())

    assert result.shape == (size, size)
    assert result.dtype == np.uint8
    assert np.array_equal(result, _recipe_by_hand(real_gray, size))


def test_preprocess_gray_of_a_non_square_source_is_the_recipe(mirror: Path) -> None:
    gray = _decode_file(_mirror_file(mirror, NON_SQUARE_MRI)).gray
    assert gray.shape == (619, 495)

    assert np.array_equal(
        preprocess_gray(gray, 224, PreprocessParams()), _recipe_by_hand(gray, 224)
    )


def test_preprocess_gray_without_clahe_and_unsharp_is_the_plain_resize(
    real_gray: np.ndarray,
) -> None:
    params = PreprocessParams(
        clahe=ClaheParams(enabled=False), unsharp=UnsharpParams(enabled=False)
    )

    result = preprocess_gray(real_gray, 128, params)

    assert np.array_equal(result, cv2.resize(real_gray, (128, 128), interpolation=cv2.INTER_AREA))


def test_preprocess_gray_steps_each_change_the_image(real_gray: np.ndarray) -> None:
    """Each enabled step has an effect, so a switch that is ignored would be caught."""
    plain = PreprocessParams(clahe=ClaheParams(enabled=False), unsharp=UnsharpParams(enabled=False))
    clahe_only = PreprocessParams(unsharp=UnsharpParams(enabled=False))

    resized = preprocess_gray(real_gray, 224, plain)
    equalised = preprocess_gray(real_gray, 224, clahe_only)
    full = preprocess_gray(real_gray, 224, PreprocessParams())

    assert np.array_equal(
        equalised, cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(resized)
    )
    assert not np.array_equal(resized, equalised)
    assert not np.array_equal(equalised, full)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((32, 32, 1), np.uint8),
        np.zeros(32 * 32, np.uint8),
        np.zeros((32, 32), np.float32),
        np.zeros((32, 32), np.uint16),
    ],
    ids=["rgb", "trailing-channel", "flat-vector", "float32", "uint16"],
)
def test_preprocess_gray_rejects_what_is_not_2d_uint8(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        preprocess_gray(bad, 64, PreprocessParams())


def test_preprocess_gray_is_deterministic_and_leaves_its_input_alone(
    real_gray: np.ndarray,
) -> None:
    before = real_gray.copy()

    first = preprocess_gray(real_gray, 224, PreprocessParams())
    second = preprocess_gray(real_gray, 224, PreprocessParams())

    assert np.array_equal(first, second)
    assert np.array_equal(real_gray, before)
    assert first.flags["C_CONTIGUOUS"]


# --------------------------------------------------------------------------- budgets (issue 10)


def _png16(side: int) -> bytes:
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
    return cv2.imencode(".png", np.ascontiguousarray(np.broadcast_to(ramp[:, None], (side,) * 2)))[
        1
    ].tobytes()


def test_16_bit_png_over_the_byte_budget_is_too_large_before_decoding() -> None:
    data = _png16(600)  # decoded: 600 * 600 * 2 bytes
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, name="deep.png", max_decode_bytes=600 * 600 * 2 - 1)
    assert caught.value.reason == TOO_LARGE
    assert str(caught.value).startswith("deep.png: image too large to decode (600x600")
    assert decode_image(data, max_decode_bytes=600 * 600 * 2).gray.shape == (600, 600)


def test_png_header_of_60000_squared_is_too_large_not_corrupt() -> None:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data + chunk(b"IEND", b""), name="huge.png")
    assert caught.value.reason == TOO_LARGE


def test_pixel_budget_is_checked_from_the_header(real_gray: np.ndarray) -> None:
    data = cv2.imencode(".png", real_gray)[1].tobytes()
    height, width = real_gray.shape
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, name="slice.png", max_pixels=width * height - 1)
    assert caught.value.reason == TOO_LARGE
    assert decode_image(data, max_pixels=width * height).width == width


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_rescale_to_uint8_equals_the_float64_formula(dtype) -> None:
    rng = np.random.default_rng(3)
    values = (rng.integers(0, 30_000, size=(70, 90)) - 200).astype(dtype)
    if dtype == np.uint8:
        values = rng.integers(3, 250, size=(70, 90)).astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    expected = np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)
    np.testing.assert_array_equal(rescale_to_uint8(values), expected)
    assert rescale_to_uint8(np.full((5, 5), 7, dtype)).max() == 0  # constant: no division


def test_colourfulness_equals_the_int16_formula(mirror: Path) -> None:
    rgb = cv2.cvtColor(cv2.imread(str(mirror.joinpath(*COLOUR_PHOTO))), cv2.COLOR_BGR2RGB)
    channels = rgb.astype(np.int16)
    expected = max(
        np.abs(channels[..., 0] - channels[..., 1]).mean(),
        np.abs(channels[..., 1] - channels[..., 2]).mean(),
        np.abs(channels[..., 0] - channels[..., 2]).mean(),
    )
    assert colourfulness(rgb) == pytest.approx(expected, abs=1e-9)
