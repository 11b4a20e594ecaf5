"""Figures, made and saved one way.

Every figure is a matplotlib ``Figure`` with its own Agg canvas (``new_figure``): no
pyplot state, nothing left open in a loop, safe from the app's worker threads, and no
display needed. Every figure is written by ``save_figure``: a PNG under a temporary name
beside its destination, renamed into place once complete, so a failed stage leaves the
last good figure. matplotlib is imported on first use, so the modules that can draw
(calibration, robustness) cost serving nothing at import.

The functions below draw what the stages show: the data stages' composition and duplicate
pairs, image grids, and evaluate's confusion matrices and ROC curves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from braintumor.core.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def new_figure(**options: Any) -> Figure:
    """A matplotlib ``Figure`` (``options``: figsize, layout...) on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (tight bounding box); returns it."""
    destination = Path(path)
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    return destination


def composition_chart(table: pd.DataFrame, path: Path) -> None:
    """Stacked bars: images per class, one bar group per split/source."""
    figure = new_figure(figsize=(8, 4))
    axis = figure.subplots()
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
    save_figure(figure, path)


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
    figure = new_figure(figsize=(5, 2.4 * rows))
    axes = figure.subplots(rows, 2, squeeze=False)
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
    save_figure(figure, path)


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], path: Path, title: str, columns: int = 3
) -> None:
    """A grid of grayscale images with a title each (3 x 3 by default)."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure = new_figure(figsize=(2.6 * columns, 2.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, text in zip(axes.ravel(), images, titles, strict=False):
        axis.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255)
        axis.set_title(text, fontsize=8)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> None:
    """Counts and row-normalised confusion matrices side by side (rows true, columns
    predicted)."""
    matrix = np.asarray(matrix)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = new_figure(figsize=(10, 4.2))
    axes = figure.subplots(1, 2)
    for axis, values, fmt in ((axes[0], matrix, "d"), (axes[1], normalised, ".2f")):
        axis.imshow(values, cmap="Blues")
        axis.set_xticks(range(len(classes)), classes, rotation=30, fontsize=8)
        axis.set_yticks(range(len(classes)), classes, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        for i in range(len(classes)):
            for j in range(len(classes)):
                axis.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path, dpi=100)


def roc_figure(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """One-vs-rest ROC curves, one per class (``rows``: class, fpr, tpr)."""
    figure = new_figure(figsize=(5, 4.5))
    axis = figure.subplots()
    for name in sorted({r["class"] for r in rows}):
        points = [r for r in rows if r["class"] == name]
        axis.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=name)
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(fontsize=8)
    save_figure(figure, path, dpi=100)


def history_figure(history: Sequence[dict[str, float]], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    figure = new_figure(figsize=(9, 3.4))
    epochs = [row["epoch"] for row in history]
    for axis, key in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        axis.plot(epochs, [row[key] for row in history], marker="o", label="train")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    save_figure(figure, path)
