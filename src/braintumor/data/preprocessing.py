"""Split, transform and cache images as memory-mappable arrays.

Reads the kept rows of the clean stage's index, splits the training images into train and
validation (stratified, seeded, by groups of neighbouring slices), applies the recipe's
transform (``imaging.preprocess_gray``) in parallel and streams the results into
``<split>_images.npy`` (uint8, N x H x W x 1), so peak memory stays at a few chunks
whatever the data size. Labels and ids are written beside
them, aligned row by row. Row order is fixed by the image path, and the transform is
deterministic, so the output is byte-identical across runs and worker counts.

Test images are the sources' Testing folders; the ``leakage_free`` column marks those with
no training twin or same-patient neighbour.

Validation must be as honest as the leakage-free test subset, or everything fitted on it
(early stopping, the calibration temperature) is fitted on data that looks like training.
Duplicates are gone after the clean stage, but neighbouring slices of one patient
(signature correlation between ``clean.leakage_similarity`` and ``clean.near_similarity``)
remain in the training folders; a split drawn image by image puts one slice in validation
and its neighbour in train. With ``preprocess.val_grouping: neighbours`` the split is
drawn by connected components of the neighbour graph instead, so no validation image has
a neighbour in train; ``val_index.csv``'s ``leakage_free`` column says, per row, that it
has none (all true when grouped), and the metrics count those that do. On msoud + sartaj
(4,821 kept training images) the graph at 0.90 has 1,076 edges and no giant component
(3,821 components, the largest of 37 images by the signatures; 47 by clean's groups,
which also join through dropped and test images; at 0.85 one of 440 would form), and an
image by image split left 173-215 of 724 validation images (24-30 %, three seeds) with a
neighbour in train, on which a small model was right 94-98 % of the time against 84-90 %
on the other validation images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from braintumor.core.files import atomic_path, worker_count, write_json
from braintumor.core.schema import Params, PreprocessParams
from braintumor.data.imaging import decode_image
from braintumor.data.workers import init_worker, transform_file
from braintumor.reports import figures

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ["id", "path", "source", "label", "label_index", "leakage_free", "dup_group"]


class PreprocessError(ValueError):
    """The index cannot be turned into arrays (missing file, unknown label, empty split)."""


@dataclass(frozen=True)
class SplitResult:
    """The rows of each split, and how the validation split relates to train.

    ``neighbour_groups`` counts the clean stage's neighbour groups among kept training
    images; ``largest_group`` is the
    size of the largest (a giant component would leave no room for a grouped split);
    ``val_with_train_neighbour`` counts validation images with a neighbour in train
    (0 when the split is grouped)."""

    frames: dict[str, pd.DataFrame]
    neighbour_groups: int
    largest_group: int
    val_with_train_neighbour: int


def grouped_stratified_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of validation rows: whole groups, about ``val_fraction`` of each class.

    Groups are visited in a seeded random order; each goes to validation when that brings
    the per-class validation counts closer (in summed absolute deviation) to their targets
    ``val_fraction x class count``, else to train. The first groups visited all fit, so
    validation is a random sample of groups; later ones fill the remaining gaps, so each
    class lands within half a group of its target. A group larger than twice the room
    left never goes to validation (a giant component stays in train).
    (scikit-learn's ``StratifiedGroupKFold`` gives only fractions of the form 1 / k.)
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be equal 1-D")
    classes, label_codes = np.unique(labels, return_inverse=True)
    group_ids, group_codes = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(group_ids), len(classes)), dtype=np.int64)
    np.add.at(per_group, (group_codes, label_codes), 1)
    target = val_fraction * per_group.sum(axis=0)
    in_val = np.zeros(len(group_ids), dtype=bool)
    counts = np.zeros(len(classes))
    for group in np.random.default_rng(seed).permutation(len(group_ids)):
        added = counts + per_group[group]
        if np.abs(added - target).sum() < np.abs(counts - target).sum():
            in_val[group] = True
            counts = added
    return in_val[group_codes]


def neighbour_groups(training: pd.DataFrame) -> np.ndarray:
    """Group id per training row from the clean stage's ``neighbour_group`` column: the
    connected components of images whose signatures correlate at least
    ``clean.leakage_similarity``. Clean finds them over all images (duplicates and test
    included), so a group can join two training images through a dropped one: the split
    is then only more cautious. One definition, computed once, in clean."""
    if "neighbour_group" not in training or training["neighbour_group"].isna().any():
        raise PreprocessError(
            "the index has no neighbour_group for every kept training image; "
            "rerun the clean stage (it writes the column)"
        )
    return pd.factorize(training["neighbour_group"])[0]


def _kept_rows(index: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kept training and test rows, sorted by path, with ``label_index``; refuses labels
    outside ``common.classes`` and classes too small to split."""
    kept = index[index["status"] == "kept"].sort_values("path").reset_index(drop=True)
    unknown = sorted(set(kept["label"]) - set(params.common.classes))
    if unknown:
        raise PreprocessError(f"index has labels not in common.classes: {unknown}")
    kept = kept.assign(label_index=kept["label"].map(params.common.classes.index).astype("int64"))
    training = kept[kept["split"] == "train"].reset_index(drop=True)
    if training.empty:
        raise PreprocessError("no kept training images in the index")
    counts = training["label"].value_counts()
    if (counts < 2).any():
        raise PreprocessError(
            f"class {counts.idxmin()!r} has {counts.min()} training image(s); "
            "a stratified validation split needs at least 2 per class"
        )
    return training, kept[kept["split"] == "test"]


def validation_mask(training: pd.DataFrame, groups: np.ndarray, params: Params) -> np.ndarray:
    """Which training rows go to validation: whole neighbour groups, or image by image
    (scikit-learn's stratified split) when ``preprocess.val_grouping`` is ``none``."""
    fraction = params.preprocess.val_fraction
    labels = training["label"].to_numpy()
    if params.preprocess.val_grouping == "neighbours":
        return grouped_stratified_split(labels, groups, fraction, params.common.seed)
    try:
        _, val_rows = train_test_split(
            np.arange(len(training)),
            test_size=fraction,
            stratify=labels,
            random_state=params.common.seed,
        )
    except ValueError as error:  # sklearn: a split too small to hold every class
        raise PreprocessError(
            f"preprocess.val_fraction={fraction} cannot split "
            f"{len(training)} training images by class: {error}"
        ) from None
    is_val = np.zeros(len(training), dtype=bool)
    is_val[val_rows] = True
    return is_val


def _split_frames(
    training: pd.DataFrame,
    test: pd.DataFrame,
    is_val: np.ndarray,
    has_neighbour: np.ndarray,
    fraction: float,
) -> dict[str, pd.DataFrame]:
    """The three frames with ids and ``leakage_free``; every class on both sides."""
    train, val = training[~is_val], training[is_val]
    for name, rows in (("train", train), ("val", val)):
        missing = sorted(set(training["label"]) - set(rows["label"]))
        if missing:
            raise PreprocessError(
                f"preprocess.val_fraction={fraction} leaves no {name} image of class(es) {missing}"
            )
    flags = {
        "train": lambda rows: False,
        "val": lambda rows: ~rows.index.isin(np.flatnonzero(has_neighbour)),
        "test": lambda rows: rows["leakage_free"].astype(bool),
    }
    frames = {}
    for name, rows in (("train", train), ("val", val), ("test", test)):
        leakage_free = flags[name](rows)
        rows = rows.assign(leakage_free=leakage_free).sort_values("path").reset_index(drop=True)
        frames[name] = rows.assign(id=np.arange(len(rows)))
    return frames


def assign_splits(index: pd.DataFrame, params: Params) -> SplitResult:
    """Kept rows per split: train/val from the training images, test from the test images.

    The validation split is stratified by label and seeded; with
    ``preprocess.val_grouping: neighbours`` it is drawn by groups of neighbouring slices
    (the clean stage's ``neighbour_group``: connected components of the pairs whose
    signatures correlate at least ``clean.leakage_similarity``), so that no validation
    image has a neighbour in train. Rows are sorted by path first, so the split does not
    depend on the index's row order. Validation rows are ``leakage_free`` when no training
    image shares their group; training rows never are; test rows keep the clean stage's
    flag.
    """
    training, test = _kept_rows(index, params)
    groups = neighbour_groups(training)
    is_val = validation_mask(training, groups, params)
    has_neighbour = is_val & np.isin(groups, np.unique(groups[~is_val]))
    frames = _split_frames(training, test, is_val, has_neighbour, params.preprocess.val_fraction)
    sizes = np.bincount(groups) if len(groups) else np.zeros(1, dtype=np.int64)
    return SplitResult(
        frames=frames,
        neighbour_groups=int(len(sizes)),
        largest_group=int(sizes.max()),
        val_with_train_neighbour=int(has_neighbour.sum()),
    )


def write_split_arrays(
    paths: list[str],
    destination: Path,
    size: int,
    params: PreprocessParams,
    pool: Any,
    progress: bool,
    description: str,
) -> None:
    """Stream the transformed images into an (N, size, size, 1) uint8 ``.npy`` file."""
    array = np.lib.format.open_memmap(
        destination, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 1)
    )
    tasks = [(path, size, params) for path in paths]
    results = (
        pool.imap(transform_file, tasks, chunksize=params.chunk_size)
        if pool is not None
        else map(transform_file, tasks)
    )
    bar = tqdm(
        total=len(paths), desc=description, unit="img", disable=not progress, file=sys.stderr
    )
    for row, image in enumerate(results):
        if isinstance(image, str):
            raise PreprocessError(image)
        array[row, :, :, 0] = image
        bar.update()
    bar.close()
    array.flush()
    del array


def index_digest(frames: dict[str, pd.DataFrame]) -> str:
    """SHA-256 of the split index tables: identifies the dataset in MLflow and the model."""
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(name.encode())
        digest.update(frames[name][INDEX_COLUMNS].to_csv(index=False).encode())
    return digest.hexdigest()


def figure_examples(train: pd.DataFrame, seed: int, count: int = 9) -> list[int]:
    """Rows for the 3 x 3 figure: seeded, cycling through the classes."""
    rng = np.random.default_rng(seed)
    per_class = [
        list(rng.permutation(rows.index.to_numpy()))
        for _, rows in train.groupby("label_index", sort=True)
    ]
    chosen: list[int] = []
    while len(chosen) < min(count, len(train)):
        for rows in per_class:
            if rows and len(chosen) < count:
                chosen.append(int(rows.pop()))
    return chosen


def _worker_pool(workers: int, total: int, chunk_size: int) -> Any:
    """A spawn pool of ``workers`` processes, or None where one process is enough."""
    if workers > 1 and total > chunk_size:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)
    return None


def _write_split_files(
    raw_dir: Path,
    frames: dict[str, pd.DataFrame],
    params: Params,
    folder: Path,
    pool: Any,
    progress: bool,
) -> dict[str, Any]:
    """Images, labels and index of every split, then ``meta.json``; returns the meta."""
    for name in SPLITS:
        paths = [str(raw_dir / p) for p in frames[name]["path"]]
        write_split_arrays(
            paths,
            folder / f"{name}_images.npy",
            params.common.image_size,
            params.preprocess,
            pool,
            progress,
            f"preprocess {name}",
        )
        np.save(folder / f"{name}_labels.npy", frames[name]["label_index"].to_numpy())
        frames[name][INDEX_COLUMNS].to_csv(folder / f"{name}_index.csv", index=False)
    counts = {
        name: {
            label: int((frames[name]["label"] == label).sum()) for label in params.common.classes
        }
        for name in SPLITS
    }
    meta = {
        "classes": list(params.common.classes),
        "image_size": params.common.image_size,
        "preprocess": dataclasses.asdict(params.preprocess),
        "digest": index_digest(frames),
        "counts": counts,
    }
    write_json(folder / "meta.json", meta)
    return meta


def preprocess(
    raw_dir: Path,
    index: pd.DataFrame,
    params: Params,
    out_dir: Path,
    figures_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir`` (replaced atomically); returns the metrics.

    ``index`` is the clean stage's index; its ``neighbour_group`` column decides the
    grouped split."""
    started = time.perf_counter()
    workers = worker_count(params.preprocess.workers)
    total = int((index["status"] == "kept").sum())
    pool = _worker_pool(workers, total, params.preprocess.chunk_size)
    try:
        split = assign_splits(index, params)
        with atomic_path(out_dir, directory=True) as folder:
            meta = _write_split_files(raw_dir, split.frames, params, folder, pool, progress)
            seconds = time.perf_counter() - started
            if figures_dir is not None:
                train = split.frames["train"]
                write_figures(raw_dir, folder, train, figures_dir, params.common.seed)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {
        "images": total,
        "counts": {name: sum(c.values()) for name, c in meta["counts"].items()},
        "test_leakage_free": int(split.frames["test"]["leakage_free"].sum()),
        "val_with_train_neighbour": split.val_with_train_neighbour,
        "neighbour_groups": split.neighbour_groups,
        "largest_neighbour_group": split.largest_group,
        "seconds": round(seconds, 2),
        "images_per_second": round(total / seconds, 1) if seconds > 0 else 0.0,
        "workers": workers,
        "digest": meta["digest"],
    }


def write_figures(
    raw_dir: Path, folder: Path, train: pd.DataFrame, figures_dir: Path, seed: int
) -> None:
    """Nine training images before and after preprocessing, side by side in two grids."""
    examples = figure_examples(train, seed)
    train_images = np.load(folder / "train_images.npy", mmap_mode="r")
    titles = [train.loc[i, "label"] for i in examples]
    raw = [decode_image((raw_dir / train.loc[i, "path"]).read_bytes()).gray for i in examples]
    with atomic_path(figures_dir, directory=True) as figure_folder:
        figures.image_grid(
            [train_images[i] for i in examples],
            titles,
            figure_folder / "preprocessed.png",
            "Preprocessed (CLAHE + unsharp mask)",
        )
        figures.image_grid(raw, titles, figure_folder / "raw.png", "Before preprocessing")
    del train_images
