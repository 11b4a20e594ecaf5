"""Entry points of the worker processes of the parallel stages (clean, preprocess).

They live apart from the stage modules so that a spawned worker imports only the core
(OpenCV, NumPy, Pillow): importing a stage module would also load pandas, scikit-learn and
matplotlib, about 2 s and 130 MB per worker for nothing. Errors come back as values, not
exceptions, so that nothing needs to survive pickling between processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from braintumor.core.schema import CleanParams, PreprocessParams
from braintumor.data.hashing import average_hash, content_thumbnail, pixel_hash
from braintumor.data.imaging import ImageDecodeError, decode_image, preprocess_gray


def init_worker() -> None:
    """One process per core: OpenCV's own threads would oversubscribe the cores."""
    cv2.setNumThreads(1)


def inspect_file(task: tuple[str, str, CleanParams]) -> dict[str, Any]:
    """Decode one file and return its facts, hashes and signature, or why it is refused."""
    absolute, relative, params = task
    data = Path(absolute).read_bytes()
    record: dict[str, Any] = {"path": relative, "bytes": len(data)}
    try:
        image = decode_image(
            data,
            name=relative,
            min_side=params.min_side,
            grayscale_tolerance=params.grayscale_tolerance,
        )
    except ImageDecodeError as error:
        record.update(status="dropped", reason=error.reason, notes=str(error))
        return record
    record.update(
        status="kept",
        reason="",
        notes="; ".join(image.notes),
        file_format=image.file_format,
        width=image.width,
        height=image.height,
        channels=image.channels,
        bit_depth=image.bit_depth,
        pixel_hash=pixel_hash(image.gray),
        average_hash=average_hash(image.gray, params.average_hash_size),
        signature=content_thumbnail(
            image.gray, params.thumbnail_size, params.content_threshold, params.content_trim
        ),
    )
    return record


def transform_file(task: tuple[str, int, PreprocessParams]) -> np.ndarray | str:
    """Decode and transform one file; a one-line error message instead if it cannot be."""
    path, size, params = task
    try:
        gray = decode_image(Path(path).read_bytes(), name=path).gray
    except OSError as error:
        return f"{path}: cannot read ({error.strerror or error})"
    except ImageDecodeError as error:
        return str(error)
    return preprocess_gray(gray, size, params)
