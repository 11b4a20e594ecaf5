"""reports.figures: every figure is a real PNG written atomically, without pyplot state."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braintumor.reports import figures

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_save_figure_writes_a_png_and_no_pyplot_figure_stays_open(tmp_path: Path) -> None:
    figure = figures.new_figure(figsize=(2, 1))
    figure.subplots().plot([0, 1], [0, 1])
    path = figures.save_figure(figure, tmp_path / "sub" / "line.png", dpi=50)
    width, height = _png_size(path)
    assert 0 < width <= 120 and 0 < height <= 80  # 2 x 1 inches at 50 dpi, bbox tightened
    if "matplotlib.pyplot" in sys.modules:  # pandas' plotting may have imported it
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_a_failed_save_keeps_the_last_good_figure(tmp_path: Path) -> None:
    path = tmp_path / "history.png"
    path.write_bytes(b"last good")
    from matplotlib.artist import Artist

    class Broken(Artist):
        def draw(self, renderer: object) -> None:
            raise ValueError("cannot draw")

    figure = figures.new_figure()
    figure.add_artist(Broken())  # fails while the PNG is being written
    with pytest.raises(ValueError, match="cannot draw"):
        figures.save_figure(figure, path)
    assert path.read_bytes() == b"last good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.png"]


def test_every_stage_figure_draws(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {"group": ["train/msoud", "test/msoud"], "label": ["glioma", "glioma"], "count": [3, 1]}
    )
    figures.composition_chart(table, tmp_path / "composition.png")
    figures.composition_chart(table.iloc[:0], tmp_path / "empty.png")
    frame = pd.DataFrame(
        {
            "source": ["a", "b"],
            "split": ["train", "test"],
            "label": ["glioma", "glioma"],
            "path": ["x/1.jpg", "y/2.jpg"],
        }
    )
    asked: list[str] = []

    def thumbnail(relative: str) -> np.ndarray:
        asked.append(relative)
        return np.full((8, 10), 128, np.uint8)

    figures.duplicate_sheet(frame, np.array([[0, 1]]), 3, tmp_path / "dup.png", thumbnail)
    assert asked == ["x/1.jpg", "y/2.jpg"]
    figures.duplicate_sheet(frame, np.zeros((0, 2), int), 3, tmp_path / "none.png", thumbnail)
    images = [np.full((16, 16, 1), value, np.uint8) for value in (0, 128, 255)]
    figures.image_grid(images, ["a", "b", "c"], tmp_path / "grid.png", "grid")
    figures.confusion_figure(np.array([[3, 1], [0, 4]]), ["a", "b"], "c", tmp_path / "cm.png")
    rows = [
        {"class": name, "fpr": fpr, "tpr": tpr}
        for name in ("a", "b")
        for fpr, tpr in ((0.0, 0.0), (0.5, 0.9), (1.0, 1.0))
    ]
    figures.roc_figure(rows, "roc", tmp_path / "roc.png")
    history = [
        {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "accuracy": e / 4, "val_accuracy": e / 5}
        for e in (1, 2, 3)
    ]
    figures.history_figure(history, tmp_path / "history.png", "frozen phase")
    for path in sorted(tmp_path.iterdir()):
        assert min(_png_size(path)) > 50, path.name
