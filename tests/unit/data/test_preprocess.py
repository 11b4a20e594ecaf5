"""The preprocess stage: aligned, stratified, byte-identical arrays from real images, and a
validation split that never separates neighbouring slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import deep_merge, load_params, params_from_mapping
from braintumor.data.cleaning import clean
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.data.preprocessing import (
    SPLITS,
    PreprocessError,
    assign_splits,
    grouped_stratified_split,
    preprocess,
)
from braintumor.stages.preprocess import main

from conftest import QUICKSTART_SOURCES, copy_sample, write_params

SIZE = 64
BASE = {
    "acquire": {"sources": QUICKSTART_SOURCES[:1]},
    "common": {"image_size": SIZE},
    "preprocess": {"val_fraction": 0.25, "chunk_size": 4, "workers": 1},
}


@pytest.fixture(scope="module")
def cleaned(mirror: Path, tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A raw tree of real images (8 train / 3 test per class) and the clean stage's frame,
    signatures included."""
    root = tmp_path_factory.mktemp("prep")
    raw = root / "raw"
    copy_sample(mirror, raw / "msoud", "msoud", 8, ("Training",), offset=100)
    copy_sample(mirror, raw / "msoud", "msoud", 3, ("Testing",), offset=100)
    params_path = write_params(root, BASE)
    frame = clean(raw, load_params(params_path), progress=False).frame
    return raw, params_path, frame


@pytest.fixture(scope="module")
def prepared(cleaned) -> tuple[Path, Path, pd.DataFrame]:
    """... with the index as the clean stage writes it: without signatures."""
    raw, params_path, frame = cleaned
    return raw, params_path, frame.drop(columns=["signature"])


def _run(prepared, out: Path, **overrides) -> dict:
    raw, params_path, frame = prepared
    params = load_params(params_path)
    if overrides:
        params_path = write_params(out.parent / f"p-{out.name}", deep_merge(BASE, overrides))
        params = load_params(params_path)
    return preprocess(raw, frame, params, out, out.parent / f"fig-{out.name}", progress=False)


def test_arrays_labels_and_ids_are_aligned(prepared, tmp_path: Path) -> None:
    raw, params_path, frame = prepared
    metrics = _run(prepared, tmp_path / "out")
    classes = load_params(params_path).common.classes
    kept = frame[frame["status"] == "kept"]
    total = 0
    for split in SPLITS:
        images = np.load(tmp_path / "out" / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(tmp_path / "out" / f"{split}_labels.npy")
        index = pd.read_csv(tmp_path / "out" / f"{split}_index.csv")
        assert images.dtype == np.uint8 and images.shape == (len(index), SIZE, SIZE, 1)
        assert labels.dtype == np.int64 and list(labels) == list(index["label_index"])
        assert list(index["label"]) == [classes[i] for i in labels]
        assert list(index["id"]) == list(range(len(index)))
        # every row is the transform of the file it names
        for row in (0, len(index) - 1):
            gray = decode_image((raw / index.loc[row, "path"]).read_bytes()).gray
            expected = preprocess_gray(gray, SIZE, load_params(params_path).preprocess)
            assert np.array_equal(images[row, :, :, 0], expected)
        total += len(index)
    assert total == len(kept) == metrics["images"]


def test_validation_split_is_stratified_and_disjoint(prepared, tmp_path: Path) -> None:
    _run(prepared, tmp_path / "out")
    train = pd.read_csv(tmp_path / "out" / "train_index.csv")
    val = pd.read_csv(tmp_path / "out" / "val_index.csv")
    test = pd.read_csv(tmp_path / "out" / "test_index.csv")
    assert not set(train["path"]) & set(val["path"])
    assert all("/Testing/" in p for p in test["path"])
    assert not any("/Testing/" in p for p in pd.concat([train, val])["path"])
    assert set(val["label"]) == set(train["label"])  # every class in validation
    fraction = len(val) / (len(val) + len(train))
    assert 0.15 < fraction < 0.35


def test_test_index_carries_the_leakage_flag(prepared, tmp_path: Path) -> None:
    _, _, frame = prepared
    _run(prepared, tmp_path / "out")
    test = pd.read_csv(tmp_path / "out" / "test_index.csv").set_index("path")
    expected = frame.set_index("path").loc[test.index, "leakage_free"]
    assert (test["leakage_free"] == expected).all()


def test_output_is_byte_identical_across_runs_and_worker_counts(prepared, tmp_path: Path) -> None:
    _run(prepared, tmp_path / "a", preprocess={"workers": 1})
    _run(prepared, tmp_path / "b", preprocess={"workers": 2, "chunk_size": 3})
    _, params_path, _ = prepared
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name == "meta.json":
            a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("a", "b"))
            assert a["digest"] == b["digest"]
            continue
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_clahe_and_sharpening_can_be_turned_off(prepared, tmp_path: Path) -> None:
    raw, _, _ = prepared
    off = {"clahe": {"enabled": False}, "unsharp": {"enabled": False}}
    _run(prepared, tmp_path / "off", preprocess=off)
    _run(prepared, tmp_path / "on")
    index = pd.read_csv(tmp_path / "off" / "test_index.csv")
    plain = np.load(tmp_path / "off" / "test_images.npy")
    sharp = np.load(tmp_path / "on" / "test_images.npy")
    gray = decode_image((raw / index.loc[0, "path"]).read_bytes()).gray
    import cv2

    resized = cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(plain[0, :, :, 0], resized)
    assert not np.array_equal(plain, sharp)


def test_meta_and_figures(prepared, tmp_path: Path) -> None:
    _, params_path, _ = prepared
    metrics = _run(prepared, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["classes"] == list(load_params(params_path).common.classes)
    assert meta["image_size"] == SIZE and meta["digest"] == metrics["digest"]
    assert sum(sum(c.values()) for c in meta["counts"].values()) == metrics["images"]
    figures = tmp_path / "fig-out"
    assert {p.name for p in figures.iterdir()} == {"preprocessed.png", "raw.png"}


def test_cli_failure_keeps_the_last_good_outputs(prepared, tmp_path: Path) -> None:
    raw, params_path, frame = prepared
    index = tmp_path / "index.parquet"
    frame.to_parquet(index)
    out = tmp_path / "processed"
    args = [
        "--params",
        str(params_path),
        "--raw",
        str(raw),
        "--index",
        str(index),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = frame.copy()
    victim = broken.index[(broken["status"] == "kept") & (broken["split"] == "test")][0]
    broken.loc[victim, "path"] = "msoud/Testing/glioma/missing.jpg"
    broken.to_parquet(index)
    assert main(args) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".*tmp-*"))


def test_a_class_with_too_few_training_images_is_a_clear_error(prepared, tmp_path: Path) -> None:
    raw, params_path, frame = prepared
    few = frame[~((frame["label"] == "notumor") & (frame["split"] == "train"))].copy()
    first = frame[(frame["label"] == "notumor") & (frame["split"] == "train")].head(1)
    with pytest.raises(ValueError, match="class 'notumor' has 1 training image"):
        preprocess(raw, pd.concat([few, first]), load_params(params_path), tmp_path / "x")


# --------------------------------------------------------------------------- grouped split


def clustered(seed: int, groups: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(labels, group ids): groups of 1-12 images, one label each, classes unbalanced."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 1, 2, 3, 5, 12], size=groups)
    group_labels = rng.choice(4, size=groups, p=[0.4, 0.3, 0.2, 0.1])
    return np.repeat(group_labels, sizes), np.repeat(rng.permutation(groups), sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_separates_a_group(seed: int) -> None:
    labels, groups = clustered(seed)
    in_val = grouped_stratified_split(labels, groups, 0.15, seed)
    for group in np.unique(groups):
        assert len(set(in_val[groups == group])) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_is_stratified(seed: int) -> None:
    labels, groups = clustered(seed)
    in_val = grouped_stratified_split(labels, groups, 0.15, seed)
    for label in range(4):
        members = labels == label
        target = 0.15 * members.sum()
        assert abs(in_val[members].sum() - target) <= 6  # half the largest group
    assert abs(in_val.mean() - 0.15) < 0.01


def test_grouped_split_is_seeded() -> None:
    labels, groups = clustered(0)
    first = grouped_stratified_split(labels, groups, 0.2, 42)
    assert np.array_equal(first, grouped_stratified_split(labels, groups, 0.2, 42))
    assert not np.array_equal(first, grouped_stratified_split(labels, groups, 0.2, 43))


def test_a_giant_group_stays_in_train() -> None:
    labels = np.zeros(100, dtype=int)
    groups = np.r_[np.zeros(60, dtype=int), np.arange(1, 41)]
    in_val = grouped_stratified_split(labels, groups, 0.2, 0)
    assert not in_val[:60].any() and in_val.sum() == 20


def test_grouped_split_rejects_misaligned_input() -> None:
    with pytest.raises(ValueError, match="equal 1-D"):
        grouped_stratified_split(np.zeros(3), np.zeros(4), 0.2, 0)


def synthetic_index(seed: int = 0) -> pd.DataFrame:
    """A clean-stage frame of 240 training images in 60 chains of 4 neighbouring slices
    and 8 test images; each chain is one ``neighbour_group``, as clean would find it."""
    rows = []
    for chain in range(60):
        label = ("glioma", "meningioma", "notumor", "pituitary")[chain % 4]
        for step in range(4):
            rows.append((f"src/Training/{label}/c{chain:02d}_{step}.jpg", "train", label, chain))
    for number in range(8):
        label = ("glioma", "meningioma", "notumor", "pituitary")[number % 4]
        rows.append((f"src/Testing/{label}/t{number}.jpg", "test", label, 100 + number))
    frame = pd.DataFrame(rows, columns=["path", "split", "label", "neighbour_group"])
    frame = frame.sample(frac=1.0, random_state=seed)  # row order must not matter
    return frame.assign(
        source="src",
        status="kept",
        leakage_free=frame["split"] == "test",
        dup_group=np.arange(len(frame)),
    )


def split_params(grouping: str):
    return params_from_mapping(
        {
            "acquire": {"sources": QUICKSTART_SOURCES[:1]},
            "preprocess": {"val_fraction": 0.2, "val_grouping": grouping},
        }
    )


def test_grouped_validation_has_no_neighbour_in_train() -> None:
    split = assign_splits(synthetic_index(), split_params("neighbours"))
    train, val = split.frames["train"], split.frames["val"]
    assert split.val_with_train_neighbour == 0 and split.largest_group == 4
    assert val["leakage_free"].all() and not train["leakage_free"].any()
    chains = {
        name: set(rows["path"].str.extract(r"/(c\d+)_")[0]) for name, rows in split.frames.items()
    }
    assert not chains["train"] & chains["val"]
    assert len(val) == 48 and set(val["label"].value_counts()) == {12}  # 3 chains per class


def test_image_by_image_validation_has_train_neighbours_and_says_so() -> None:
    index = synthetic_index()
    split = assign_splits(index, split_params("none"))
    val = split.frames["val"]
    train = split.frames["train"]
    assert split.val_with_train_neighbour > 20  # most chains are cut
    assert (~val["leakage_free"]).sum() == split.val_with_train_neighbour
    train_chains = set(train["path"].str.extract(r"/(c\d+)_")[0])
    cut = val["path"].str.extract(r"/(c\d+)_")[0].isin(train_chains)
    assert np.array_equal(cut.to_numpy(), ~val["leakage_free"].to_numpy())


def test_grouping_needs_the_clean_stage_groups() -> None:
    index = synthetic_index()
    index.loc[index.index[3], "neighbour_group"] = None
    with pytest.raises(PreprocessError, match="neighbour_group.*rerun the clean stage"):
        assign_splits(index, split_params("neighbours"))
    with pytest.raises(PreprocessError, match="neighbour_group"):
        assign_splits(index.drop(columns=["neighbour_group"]), split_params("none"))


def test_metrics_and_val_index_report_neighbours(prepared, tmp_path: Path) -> None:
    metrics = _run(prepared, tmp_path / "out")
    assert metrics["val_with_train_neighbour"] == 0
    assert metrics["largest_neighbour_group"] >= 1 and metrics["neighbour_groups"] >= 1
    val = pd.read_csv(tmp_path / "out" / "val_index.csv")
    assert val["leakage_free"].all()
    plain = _run(prepared, tmp_path / "plain", preprocess={"val_grouping": "none"})
    val = pd.read_csv(tmp_path / "plain" / "val_index.csv")
    assert (~val["leakage_free"]).sum() == plain["val_with_train_neighbour"]


def test_a_missing_training_file_is_a_clear_error(prepared, tmp_path: Path) -> None:
    raw, params_path, frame = prepared
    broken = frame.copy()
    victim = broken.index[(broken["status"] == "kept") & (broken["split"] == "train")][0]
    broken.loc[victim, "path"] = "msoud/Training/glioma/missing.jpg"
    with pytest.raises(PreprocessError, match="missing.jpg"):
        preprocess(raw, broken, load_params(params_path), tmp_path / "x", progress=False)
