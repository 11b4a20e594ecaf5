"""The preprocess stage: aligned, stratified, byte-identical arrays from real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braintumor.clean import clean
from braintumor.config import deep_merge, load_params
from braintumor.imaging import decode_image, preprocess_gray
from braintumor.preprocess import SPLITS, main, preprocess

from conftest import QUICKSTART_SOURCES, copy_sample, write_params

SIZE = 64
BASE = {
    "acquire": {"sources": QUICKSTART_SOURCES[:1]},
    "common": {"image_size": SIZE},
    "preprocess": {"val_fraction": 0.25, "chunk_size": 4, "workers": 1},
}


@pytest.fixture(scope="module")
def prepared(mirror: Path, tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A raw tree of real images (8 train / 3 test per class) and its clean index."""
    root = tmp_path_factory.mktemp("prep")
    raw = root / "raw"
    copy_sample(mirror, raw / "msoud", "msoud", 8, ("Training",), offset=100)
    copy_sample(mirror, raw / "msoud", "msoud", 3, ("Testing",), offset=100)
    params_path = write_params(root, BASE)
    frame = clean(raw, load_params(params_path), progress=False).frame
    index = root / "index.parquet"
    frame.drop(columns=["signature"]).to_parquet(index)
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
    args = ["--params", str(params_path), "--raw", str(raw), "--index", str(index),
            "--out", str(out), "--no-progress"]  # fmt: skip
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
