"""Figures of the data stages, written as PNG files (logged to MLflow by later stages).

Matplotlib runs headless (Agg); every function writes one file and closes its figure, so
stages can call them in a loop without leaking memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def composition_chart(table: pd.DataFrame, path: Path) -> None:
    """Stacked bars: images per class, one bar group per split/source."""
    figure, axis = plt.subplots(figsize=(8, 4))
    if table.empty:
        axis.text(0.5, 0.5, "no images kept", ha="center", va="center")
    else:
        pivot = table.pivot_table(index="group", columns="label", values="count", fill_value=0)
        pivot.plot.bar(stacked=True, ax=axis, rot=0)
        for container in axis.containers:
            axis.bar_label(container, label_type="center", fontsize=7)
        axis.set_xlabel("split / source")
        axis.set_ylabel("images kept")
    axis.set_title("Class composition by split and source")
    _save(figure, path)


def duplicate_sheet(
    frame: pd.DataFrame,
    pairs: np.ndarray,
    count: int,
    path: Path,
    thumbnail: Callable[[str], np.ndarray],
) -> None:
    """Example duplicate pairs side by side, preferring cross-source and cross-split ones.

    ``thumbnail`` turns a row's ``path`` into pixels: the caller decodes, so that this
    layer draws arrays and never reads data files."""
    if len(pairs):
        source = frame["source"].to_numpy()
        split = frame["split"].to_numpy()
        interest = (source[pairs[:, 0]] != source[pairs[:, 1]]) * 2 + (
            split[pairs[:, 0]] != split[pairs[:, 1]]
        )
        order = np.lexsort((np.arange(len(pairs)), -interest))
        chosen = pairs[order[:count]]
    else:
        chosen = np.zeros((0, 2), dtype=np.int64)
    rows = max(1, len(chosen))
    figure, axes = plt.subplots(rows, 2, figsize=(5, 2.4 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    if len(chosen) == 0:
        axes[0, 0].text(0.5, 0.5, "no duplicates found", ha="center", va="center")
    for row, (i, j) in enumerate(chosen):
        for column, index in enumerate((i, j)):
            record = frame.iloc[index]
            image = thumbnail(record["path"])
            axes[row, column].imshow(image, cmap="gray")
            axes[row, column].set_title(
                f"{record['source']}/{record['split']}/{record['label']}\n"
                f"{Path(record['path']).name} {image.shape[1]}x{image.shape[0]}",
                fontsize=7,
            )
    figure.suptitle("Example duplicate pairs", fontsize=9)
    _save(figure, path)


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], path: Path, title: str, columns: int = 3
) -> None:
    """A grid of grayscale images with a title each (3 x 3 by default)."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, text in zip(axes.ravel(), images, titles, strict=False):
        axis.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255)
        axis.set_title(text, fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)
