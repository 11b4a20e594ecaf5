"""The ``preprocess`` stage: split, transform and cache images as memory-mappable arrays.

Reads the kept rows of the clean stage's index, splits the training images into train and
validation (stratified, seeded), applies the recipe's transform (``imaging.preprocess_gray``)
in parallel and streams the results into ``<split>_images.npy`` (uint8, N x H x W x 1), so
peak memory stays at a few chunks whatever the data size. Labels and ids are written beside
them, aligned row by row. Row order is fixed by the image path, and the transform is
deterministic, so the output is byte-identical across runs and worker counts.

Test images are the sources' Testing folders; the ``leakage_free`` column marks those with
no training twin or same-patient neighbour.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from braintumor import figures
from braintumor.config import ConfigError, Params, PreprocessParams, load_params
from braintumor.imaging import decode_image
from braintumor.io_utils import atomic_path, worker_count, write_json
from braintumor.workers import init_worker, transform_file

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ["id", "path", "source", "label", "label_index", "leakage_free", "dup_group"]


class PreprocessError(ValueError):
    """The index cannot be turned into arrays (missing file, unknown label, empty split)."""


def assign_splits(index: pd.DataFrame, params: Params) -> dict[str, pd.DataFrame]:
    """Kept rows per split: train/val from the training images, test from the test images.

    The validation split is stratified by label and seeded; rows are sorted by path first
    so the split does not depend on the index's row order.
    """
    kept = index[index["status"] == "kept"].sort_values("path").reset_index(drop=True)
    unknown = sorted(set(kept["label"]) - set(params.common.classes))
    if unknown:
        raise PreprocessError(f"index has labels not in common.classes: {unknown}")
    kept = kept.assign(label_index=kept["label"].map(params.common.classes.index).astype("int64"))
    training = kept[kept["split"] == "train"]
    test = kept[kept["split"] == "test"]
    if training.empty:
        raise PreprocessError("no kept training images in the index")
    counts = training["label"].value_counts()
    if (counts < 2).any():
        raise PreprocessError(
            f"class {counts.idxmin()!r} has {counts.min()} training image(s); "
            "a stratified validation split needs at least 2 per class"
        )
    try:
        train, val = train_test_split(
            training,
            test_size=params.preprocess.val_fraction,
            stratify=training["label"],
            random_state=params.common.seed,
        )
    except ValueError as error:  # sklearn: a split too small to hold every class
        raise PreprocessError(
            f"preprocess.val_fraction={params.preprocess.val_fraction} cannot split "
            f"{len(training)} training images by class: {error}"
        ) from None
    for name, rows in (("train", train), ("val", val)):
        missing = sorted(set(training["label"]) - set(rows["label"]))
        if missing:
            raise PreprocessError(
                f"preprocess.val_fraction={params.preprocess.val_fraction} leaves no {name} "
                f"image of class(es) {missing}"
            )
    result = {}
    for name, rows in (("train", train), ("val", val), ("test", test)):
        rows = rows.sort_values("path").reset_index(drop=True)
        rows = rows.assign(
            id=np.arange(len(rows)),
            leakage_free=rows["leakage_free"].astype(bool) if name == "test" else False,
        )
        result[name] = rows
    return result


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


def preprocess(
    raw_dir: Path,
    index: pd.DataFrame,
    params: Params,
    out_dir: Path,
    figures_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage into ``out_dir`` (replaced atomically); returns the metrics."""
    started = time.perf_counter()
    frames = assign_splits(index, params)
    size = params.common.image_size
    workers = worker_count(params.preprocess.workers)
    total = sum(len(f) for f in frames.values())
    with atomic_path(out_dir, directory=True) as folder:
        pool = (
            multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)
            if workers > 1 and total > params.preprocess.chunk_size
            else None
        )
        try:
            for name in SPLITS:
                paths = [str(raw_dir / p) for p in frames[name]["path"]]
                write_split_arrays(
                    paths, folder / f"{name}_images.npy", size, params.preprocess, pool,
                    progress, f"preprocess {name}",
                )  # fmt: skip
                np.save(folder / f"{name}_labels.npy", frames[name]["label_index"].to_numpy())
                frames[name][INDEX_COLUMNS].to_csv(folder / f"{name}_index.csv", index=False)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        seconds = time.perf_counter() - started
        counts = {
            name: {
                label: int((frames[name]["label"] == label).sum())
                for label in params.common.classes
            }
            for name in SPLITS
        }
        meta = {
            "classes": list(params.common.classes),
            "image_size": size,
            "preprocess": dataclasses.asdict(params.preprocess),
            "digest": index_digest(frames),
            "counts": counts,
        }
        write_json(folder / "meta.json", meta)
        if figures_dir is not None:
            examples = figure_examples(frames["train"], params.common.seed)
            train_images = np.load(folder / "train_images.npy", mmap_mode="r")
            titles = [frames["train"].loc[i, "label"] for i in examples]
            raw = [decode_image((raw_dir / frames["train"].loc[i, "path"]).read_bytes()).gray
                   for i in examples]  # fmt: skip
            with atomic_path(figures_dir, directory=True) as figure_folder:
                figures.image_grid(
                    [train_images[i] for i in examples], titles,
                    figure_folder / "preprocessed.png", "Preprocessed (CLAHE + unsharp mask)",
                )  # fmt: skip
                figures.image_grid(raw, titles, figure_folder / "raw.png", "Before preprocessing")
            del train_images
    return {
        "images": total,
        "counts": {name: sum(c.values()) for name, c in counts.items()},
        "test_leakage_free": int(frames["test"]["leakage_free"].sum()),
        "seconds": round(seconds, 2),
        "images_per_second": round(total / seconds, 1) if seconds > 0 else 0.0,
        "workers": workers,
        "digest": meta["digest"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="data/raw from acquire")
    parser.add_argument("--index", required=True, type=Path, help="index from clean")
    parser.add_argument("--out", required=True, type=Path, help="folder for the arrays")
    parser.add_argument("--figures", type=Path, help="folder for the example figures")
    parser.add_argument("--metrics", type=Path, help="metrics JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if not args.index.is_file():
            raise PreprocessError(f"{args.index}: index not found; run the clean stage")
        index = pd.read_parquet(args.index)
        metrics = preprocess(
            args.raw, index, params, args.out, args.figures, progress=not args.no_progress
        )
    except (PreprocessError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.metrics is not None:
        write_json(args.metrics, metrics)
    print(
        f"preprocess: {metrics['counts']} at {params.common.image_size} px, "
        f"{metrics['images_per_second']} img/s with {metrics['workers']} workers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
