"""The training input pipeline: the preprocess stage's cached arrays, memory-mapped.

``load_processed`` opens ``data/processed`` (``<split>_images.npy`` uint8 N x H x W x 1,
``<split>_labels.npy``, ``meta.json``) without reading the images, and checks it against
the parameters with one-line errors. ``ArrayBatches`` is a ``keras.utils.PyDataset`` that
gathers each batch straight from the memory map (only that batch is copied, never the
dataset), in a seeded order that is a pure function of (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would. It works on every Keras backend; with
``workers > 1`` threads read batches ahead of the accelerator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The processed data is missing, malformed or disagrees with the parameters."""


@dataclass(frozen=True)
class Split:
    """One split: images (a read-only memory map) and integer labels, row-aligned."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ProcessedData:
    """The splits of ``data/processed`` plus its ``meta.json``."""

    folder: Path
    meta: dict[str, Any]
    splits: dict[str, Split]

    @property
    def digest(self) -> str:
        return str(self.meta.get("digest", ""))


def load_processed(
    folder: str | Path,
    classes: tuple[str, ...],
    image_size: int,
    splits: tuple[str, ...] = ("train", "val"),
) -> ProcessedData:
    """Open ``splits`` of the processed folder, memory-mapped, after checking them.

    Raises ``DataError`` (one line, naming the file) when a file is missing, the classes or
    the image size differ from the parameters, or arrays have the wrong shape, dtype or
    label range.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; run the preprocess stage first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{meta_path}: not valid JSON ({error.msg})") from None
    found_classes = list(meta.get("classes", []))
    if found_classes != list(classes):
        raise DataError(
            f"{meta_path}: classes {found_classes} differ from common.classes {list(classes)}; "
            "rerun the preprocess stage"
        )
    if meta.get("image_size") != image_size:
        raise DataError(
            f"{meta_path}: image_size {meta.get('image_size')} differs from "
            f"common.image_size {image_size}; rerun the preprocess stage"
        )
    opened = {name: _open_split(folder, name, len(classes), image_size) for name in splits}
    return ProcessedData(folder=folder, meta=meta, splits=opened)


def _open_split(folder: Path, name: str, num_classes: int, image_size: int) -> Split:
    images_path = folder / f"{name}_images.npy"
    labels_path = folder / f"{name}_labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise DataError(f"{path}: not found; run the preprocess stage first")
    try:
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path)
    except ValueError as error:
        raise DataError(f"{images_path.parent}: cannot read {name} arrays ({error})") from None
    expected = (image_size, image_size, 1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise DataError(
            f"{images_path}: expected uint8 (N, {image_size}, {image_size}, 1), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: expected 1-D integer labels, got {labels.dtype}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    if len(labels) == 0:
        raise DataError(f"{labels_path}: the {name} split is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{labels_path}: labels must be in [0, {num_classes}), "
            f"found [{labels.min()}, {labels.max()}]"
        )
    return Split(name=name, images=images, labels=labels.astype(np.int64))


def suspected_paths(table: Path, split: str) -> set[str]:
    """The paths of ``split``'s images that the label audit suspects of a wrong label
    (``metrics/label_issues.csv``): what training may leave out and calibration does."""
    import pandas as pd

    if not table.is_file():
        raise DataError(f"{table}: not found; run the audit stage")
    suspects = pd.read_csv(table)
    if not {"split", "path"} <= set(suspects.columns):
        raise DataError(f"{table}: expected the audit's columns split and path")
    return set(suspects.loc[suspects["split"] == split, "path"].astype(str))


def without_training_rows(data: ProcessedData, paths: set[str]) -> tuple[ProcessedData, int]:
    """``data`` with the train rows whose ``train_index.csv`` path is in ``paths`` left out
    (the label audit's suspects under ``train.label_issues: drop``), and how many went.

    Labels are never changed, only rows left out; val and test keep every row. The kept
    images are copied out of the memory map, and the digest changes with the rows left out,
    so a checkpoint of the full split is not resumed on the reduced one."""
    import hashlib

    import pandas as pd

    index_path = data.folder / "train_index.csv"
    if not index_path.is_file():
        raise DataError(f"{index_path}: not found; run the preprocess stage first")
    train = data.splits["train"]
    rows = pd.read_csv(index_path)["path"].astype(str).to_numpy()
    if len(rows) != len(train):
        raise DataError(f"{index_path}: {len(rows)} rows for {len(train)} train images")
    dropped = np.isin(rows, sorted(paths))
    if not dropped.any():
        return data, 0
    keep = np.flatnonzero(~dropped)
    split = Split("train", np.asarray(train.images[keep]), train.labels[keep])
    digest = hashlib.sha256((data.digest + "\n".join(sorted(rows[dropped]))).encode())
    meta = {**data.meta, "digest": digest.hexdigest(), "dropped_label_issues": int(dropped.sum())}
    splits = {**data.splits, "train": split}
    return ProcessedData(folder=data.folder, meta=meta, splits=splits), int(dropped.sum())


def subset_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Row indices keeping at most ``cap`` seeded-random rows per class (all when None),
    sorted so reads from the memory map stay in file order."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:cap] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """``balanced`` weights (scikit-learn's ``n / (k * count)``) per class, or None."""
    if mode == "none":
        return None
    present = np.unique(labels)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise DataError(f"class_weight balanced: no training images of class index {missing}")
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return {index: float(weight) for index, weight in enumerate(weights)}


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The rows of one epoch: ``indices`` permuted by a generator seeded with (seed, epoch)."""
    return indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]


class ArrayBatches(keras.utils.PyDataset):
    """Batches of (uint8 images, int32 labels) gathered from (memory-mapped) arrays.

    ``shuffle``: a new seeded order each epoch (``epoch_order``), starting at ``epoch`` (set
    it to the epoch a resumed run starts from). ``steps``: at most this many batches per
    epoch (each epoch still draws from a fresh order of every row). The last batch of an
    epoch may be smaller than ``batch_size`` unless ``drop_remainder``: then every batch is
    full, which gives a compiling backend (JAX, TensorFlow with XLA) one batch shape and so
    one compiled training step instead of two. With ``shuffle`` the rows left out differ
    from epoch to epoch, so no image is left out of training for good.

    ``workers``: 2 or more runs Keras's ordered reader threads (the same batches in the
    same order). With 1 the backend reads: on TensorFlow a ``tf.data`` pipeline with an
    autotuned prefetch, and destroying its iterator at each epoch's start waited for the
    autotuning thread, ~30 s with the whole machine idle in 7 of 9 fine-tuning epochs.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        indices: np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        steps: int | None = None,
        workers: int = 2,
        drop_remainder: bool = False,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * workers)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        if len(self.indices) == 0:
            raise ValueError("no rows to batch")
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        if drop_remainder and len(self.indices) < batch_size:
            raise ValueError(
                f"drop_remainder: {len(self.indices)} rows make no full batch of {batch_size}"
            )
        rounding = math.floor if drop_remainder else math.ceil
        full = rounding(len(self.indices) / batch_size)
        self.steps = full if steps is None else min(steps, full)
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        if self.shuffle:
            return epoch_order(self.indices, self.seed, self.epoch)
        return self.indices

    @property
    def num_batches(self) -> int:
        return self.steps

    def __len__(self) -> int:
        return self.steps

    def rows(self, index: int) -> np.ndarray:
        """The dataset rows of batch ``index`` in the current epoch, in file order."""
        if not 0 <= index < self.steps:
            raise IndexError(f"batch {index} out of range [0, {self.steps})")
        start = index * self.batch_size
        return np.sort(self._order[start : start + self.batch_size])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(index)
        # Fancy indexing a memory map reads just these rows into a fresh array.
        return np.asarray(self.images[rows]), self.labels[rows].astype(np.int32)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._make_order()

    @property
    def images_per_epoch(self) -> int:
        return min(self.steps * self.batch_size, len(self.indices))
