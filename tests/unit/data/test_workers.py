"""data.workers, called as the worker processes call them: facts or a reason, never an
exception, and nothing a spawned worker would not need to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from braintumor.data.workers import inspect_file, transform_file

from conftest import params_file


def _params():  # noqa: ANN202 - the loaded Params
    from braintumor.core.config import load_params

    return load_params(params_file())


def _slice(path: Path, size: int = 96) -> Path:
    """A synthetic gray 'slice': a bright ellipse on black, written as a real PNG."""
    image = np.zeros((size, size), np.uint8)
    cv2.ellipse(image, (size // 2, size // 2), (size // 3, size // 4), 0, 0, 360, 200, -1)
    cv2.imwrite(str(path), image)
    return path


def test_inspect_file_returns_facts_and_hashes(tmp_path: Path) -> None:
    path = _slice(tmp_path / "a.png")
    record = inspect_file((str(path), "msoud/Training/glioma/a.png", _params().clean))
    assert record["status"] == "kept" and record["reason"] == ""
    assert (record["width"], record["height"], record["file_format"]) == (96, 96, "png")
    assert record["bytes"] == path.stat().st_size
    assert isinstance(record["pixel_hash"], str) and record["signature"].ndim == 1
    again = inspect_file((str(path), "x.png", _params().clean))
    assert again["pixel_hash"] == record["pixel_hash"]


def test_inspect_file_gives_a_reason_not_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    record = inspect_file((str(path), "broken.jpg", _params().clean))
    assert record["status"] == "dropped" and record["reason"]
    assert "\n" not in record["notes"]


def test_transform_file_returns_the_array_or_one_line(tmp_path: Path) -> None:
    params = _params().preprocess
    array = transform_file((str(_slice(tmp_path / "a.png")), 32, params))
    assert isinstance(array, np.ndarray) and array.shape[:2] == (32, 32)
    assert array.dtype == np.uint8
    missing = transform_file((str(tmp_path / "gone.png"), 32, params))
    assert isinstance(missing, str) and missing.startswith(str(tmp_path / "gone.png"))
    assert "cannot read" in missing and "\n" not in missing


def test_a_worker_imports_no_pandas_sklearn_or_matplotlib() -> None:
    """What the module promises spawned workers: only the decoding core."""
    code = (
        "import sys, braintumor.data.workers\n"
        "heavy = [m for m in ('pandas', 'sklearn', 'matplotlib', 'keras') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
