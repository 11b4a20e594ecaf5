"""The clean stage on small trees of real images with every kind of bad input planted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import load_params
from braintumor.core.schema import CleanParams
from braintumor.data.cleaning import CleanError, clean
from braintumor.data.hashing import content_box
from braintumor.stages.clean import main

from conftest import QUICKSTART_SOURCES, copy_sample, write_params


def _raw_tree(mirror: Path, root: Path) -> Path:
    """data/raw with 4 real msoud images per class and split, plus planted problems."""
    raw = root / "raw"
    copy_sample(mirror, raw / "msoud", "msoud", 4, ("Training", "Testing"), offset=40)
    # From the fourth file on: sartaj's Training/no_tumor/1.jpg is the original of msoud's
    # Tr-noTr_0000.jpg, which alpha.png below is made of (a cross-source twin).
    copy_sample(mirror, raw / "sartaj", "sartaj", 1, ("Training",), offset=3)
    # colour photographs of food filed as MRI
    for name in ("food_001.jpg", "food_002.jpg"):
        shutil.copy(mirror / "not-mri" / name, raw / "sartaj" / "Training" / "glioma_tumor")
    train = raw / "msoud" / "Training"
    test = raw / "msoud" / "Testing"
    real = sorted((train / "glioma").iterdir())[0]
    data = real.read_bytes()
    gray = cv2.imread(str(real), cv2.IMREAD_GRAYSCALE)
    # bad files
    (train / "glioma" / "corrupt.jpg").write_bytes(data[:200] + b"\x00\x13" * 3000)
    (train / "glioma" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (train / "glioma" / "empty.jpg").write_bytes(b"")
    (train / "glioma" / "notes.jpg").write_text("this is not an image\n")
    cv2.imwrite(str(train / "meningioma" / "tiny.png"), np.full((1, 1), 128, np.uint8))

    # normalisable files, made from images not otherwise in the tree
    def unused(class_name: str) -> np.ndarray:
        first = sorted((mirror / "msoud" / "Training" / class_name).iterdir())[0]
        return cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)

    gray = unused("notumor")
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[:10, :10, 3] = 0
    cv2.imwrite(str(train / "notumor" / "alpha.png"), rgba)
    deep = (cv2.resize(unused("pituitary"), (200, 180)).astype(np.uint16) * 200).astype(np.uint16)
    cv2.imwrite(str(train / "pituitary" / "deep16.png"), deep)
    # skipped files
    (train / "glioma" / "readme.txt").write_text("notes")
    hidden = test / "meningioma" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(real, hidden / "copy-checkpoint.jpg")
    # duplicates: a test image re-encoded and resized into training (a leak), and an
    # exact copy inside the test split
    test_image = sorted((test / "pituitary").iterdir())[0]
    test_gray = cv2.imread(str(test_image), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(
        str(train / "pituitary" / "leak.jpg"),
        cv2.resize(test_gray, (300, 260)),
        [cv2.IMWRITE_JPEG_QUALITY, 80],
    )
    shutil.copy(test_image, test / "pituitary" / "copy.jpg")
    # a label conflict: the same image filed under two classes in training
    conflict = sorted((train / "meningioma").iterdir())[0]
    shutil.copy(conflict, train / "notumor" / "conflict.jpg")
    return raw


@pytest.fixture(scope="module")
def cleaned(mirror: Path, tmp_path_factory) -> tuple[pd.DataFrame, dict, Path]:
    tmp_path = tmp_path_factory.mktemp("cleaned")
    raw = _raw_tree(mirror, tmp_path)
    params = load_params(write_params(tmp_path, {"acquire": {"sources": QUICKSTART_SOURCES}}))
    result = clean(raw, params, progress=False)
    frame, metrics = result.frame, result.metrics
    return frame.set_index("path"), metrics, raw


def _row(frame: pd.DataFrame, name: str) -> pd.Series:
    matches = frame[frame.index.str.endswith("/" + name)]
    assert len(matches) == 1, name
    return matches.iloc[0]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("corrupt.jpg", "corrupt"),
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty"),
        ("notes.jpg", "not_an_image"),
        ("tiny.png", "too_small"),
    ],
)
def test_bad_files_are_dropped_with_their_reason(cleaned, name: str, reason: str) -> None:
    frame, metrics, _ = cleaned
    row = _row(frame, name)
    assert (row["status"], row["reason"]) == ("dropped", reason)
    assert name in row["notes"] and "\n" not in row["notes"]
    assert metrics["dropped"][reason] >= 1


def test_alpha_and_16_bit_images_are_normalised_and_kept(cleaned) -> None:
    frame, metrics, _ = cleaned
    alpha = _row(frame, "alpha.png")
    deep = _row(frame, "deep16.png")
    assert alpha["status"] == "kept" and "alpha composited on black" in alpha["notes"]
    assert deep["status"] == "kept" and "16-bit rescaled to 8-bit" in deep["notes"]
    assert deep["bit_depth"] == 16 and alpha["channels"] == 4
    assert metrics["normalised"]["16-bit rescaled to 8-bit"] == 1


def test_colour_photographs_are_excluded(cleaned) -> None:
    frame, metrics, _ = cleaned
    photos = frame[frame.index.str.contains("/food_")]
    assert len(photos) == 2 and set(photos["reason"]) == {"colour"}
    assert metrics["dropped"]["colour"] == 2
    # SARTAJ's real slices are 3-channel JPEGs of gray: converted and kept, not "colour"
    sartaj = frame[(frame["source"] == "sartaj") & ~frame.index.str.contains("/food_")]
    assert len(sartaj) == 4 and set(sartaj["status"]) == {"kept"}
    assert set(sartaj["notes"]) == {"3-channel gray converted to 1 channel"}


def test_hidden_and_non_image_files_are_skipped_and_counted(cleaned) -> None:
    frame, metrics, _ = cleaned
    assert _row(frame, "copy-checkpoint.jpg")["reason"] == "hidden"
    assert _row(frame, "readme.txt")["reason"] == "not_image_extension"
    assert metrics["skipped"] == {"hidden": 1, "not_image_extension": 1}


def test_a_resized_reencoded_test_image_never_trains(cleaned) -> None:
    frame, metrics, _ = cleaned
    leak = _row(frame, "leak.jpg")
    assert (leak["status"], leak["reason"]) == ("dropped", "twin_of_test")
    group = frame[frame["dup_group"] == leak["dup_group"]]
    assert set(group["split"]) == {"train", "test"}
    assert group.loc[group["split"] == "test", "has_train_twin"].all()
    assert not group.loc[group["split"] == "test", "leakage_free"].any()
    assert metrics["leakage"]["test_with_train_twin"] >= 2  # the original and its copy


def test_one_copy_per_split_is_kept(cleaned) -> None:
    frame, _, _ = cleaned
    copy = _row(frame, "copy.jpg")
    group = frame[(frame["dup_group"] == copy["dup_group"]) & (frame["split"] == "test")]
    assert sorted(group["status"]) == ["dropped", "kept"]
    dropped = group[group["status"] == "dropped"].iloc[0]
    assert dropped["reason"] == "duplicate" and dropped["duplicate_of"] in group.index


def test_groups_that_disagree_on_the_label_are_dropped(cleaned) -> None:
    frame, metrics, _ = cleaned
    conflict = _row(frame, "conflict.jpg")
    group = frame[frame["dup_group"] == conflict["dup_group"]]
    assert set(group["label"]) == {"meningioma", "notumor"}
    assert set(group["reason"]) == {"label_conflict"}
    assert metrics["duplicates"]["label_conflict_groups"] == 1


def test_counts_add_up(cleaned) -> None:
    frame, metrics, _ = cleaned
    assert metrics["files_in"] == len(frame)
    skipped = sum(metrics["skipped"].values())
    assert metrics["images_in"] == metrics["files_in"] - skipped
    assert metrics["kept"] + sum(metrics["dropped"].values()) == metrics["images_in"]
    by_label = sum(sum(v.values()) for v in metrics["kept_by_split_label"].values())
    assert by_label == metrics["kept"]


def test_keep_policies_can_be_turned_off(mirror: Path, tmp_path: Path) -> None:
    raw = _raw_tree(mirror, tmp_path)
    overrides = {
        "acquire": {"sources": QUICKSTART_SOURCES},
        "clean": {"within_split": "keep_all", "test_twins": "keep", "label_conflicts": "keep"},
    }
    result = clean(raw, load_params(write_params(tmp_path, overrides)), progress=False)
    frame, metrics = result.frame, result.metrics
    assert not {"duplicate", "twin_of_test", "label_conflict"} & set(metrics["dropped"])
    leak = frame[frame["path"].str.endswith("/leak.jpg")].iloc[0]
    assert leak["status"] == "kept" and leak["dup_group_size"] >= 2


# Real SARTAJ images and msoud's copies of them (224 x 224, re-encoded; found by running
# clean on both sources in full). The content signatures of the first three pairs correlated
# only 0.91, 0.94 and 0.93 before signatures were taken at one working scale.
SARTAJ_TEST_MSOUD_TRAIN = (
    "Testing/meningioma_tumor/image(121).jpg",
    "Training/meningioma/Tr-me_0179.jpg",
)
MSOUD_TEST_SARTAJ_TRAIN = (
    "Training/pituitary_tumor/p (609).jpg",
    "Testing/pituitary/Te-pi_0012.jpg",
)
TEST_TEST = ("Testing/meningioma_tumor/image(26).jpg", "Testing/meningioma/Te-me_0033.jpg")
# SARTAJ files this slice as glioma, msoud as meningioma.
LABEL_CONFLICT = ("Testing/glioma_tumor/image(2).jpg", "Testing/meningioma/Te-me_0019.jpg")
# Images with no twin in either source; the first SARTAJ one gets a synthetic msoud copy.
SARTAJ_SINGLES = (
    "Testing/glioma_tumor/image(100).jpg",
    "Testing/pituitary_tumor/image(18).jpg",
    "Training/glioma_tumor/gg (100).jpg",
)
MSOUD_SINGLES = ("Testing/glioma/Te-gl_0074.jpg", "Training/pituitary/Tr-pi_0760.jpg")
PLANTED = "msoud/Training/glioma/planted.jpg"


def _cross_source_tree(mirror: Path, root: Path) -> Path:
    """data/raw with the real twins above, and a synthetic msoud-style copy (cropped to the
    content with a small margin, squashed to 224 x 224, JPEG quality 80) of a SARTAJ test
    image planted in msoud's training data."""
    raw = root / "raw"
    pairs = (SARTAJ_TEST_MSOUD_TRAIN, MSOUD_TEST_SARTAJ_TRAIN, TEST_TEST, LABEL_CONFLICT)
    wanted = [("sartaj", s) for s, _ in pairs] + [("msoud", m) for _, m in pairs]
    wanted += [("sartaj", s) for s in SARTAJ_SINGLES] + [("msoud", m) for m in MSOUD_SINGLES]
    for source, relative in wanted:
        target = raw / source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / source / relative, target)
    gray = cv2.imread(str(mirror / "sartaj" / SARTAJ_SINGLES[0]), cv2.IMREAD_GRAYSCALE)
    top, bottom, left, right = content_box(gray, CleanParams().content_threshold)
    margin = 6
    crop = gray[max(top - margin, 0) : bottom + margin, max(left - margin, 0) : right + margin]
    assert crop.shape != gray.shape
    copy = cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA)
    (raw / PLANTED).parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(raw / PLANTED), copy, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return raw


@pytest.fixture(scope="module")
def cross_cleaned(mirror: Path, tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    tmp_path = tmp_path_factory.mktemp("cross")
    raw = _cross_source_tree(mirror, tmp_path)
    overrides = {"acquire": {"sources": QUICKSTART_SOURCES}, "clean": {"workers": 1}}
    result = clean(raw, load_params(write_params(tmp_path, overrides)), progress=False)
    return result.frame.set_index("path"), result.metrics


def test_real_cross_source_twins_are_grouped_and_nothing_else(cross_cleaned) -> None:
    frame, _ = cross_cleaned
    expected = [
        {f"sartaj/{s}", f"msoud/{m}"}
        for s, m in (SARTAJ_TEST_MSOUD_TRAIN, MSOUD_TEST_SARTAJ_TRAIN, TEST_TEST, LABEL_CONFLICT)
    ]
    expected.append({f"sartaj/{SARTAJ_SINGLES[0]}", PLANTED})
    groups = frame[frame["dup_group_size"] > 1].groupby("dup_group")
    assert sorted(map(sorted, expected)) == sorted(sorted(m.index) for _, m in groups)


def test_cross_source_policy_on_real_twins(cross_cleaned) -> None:
    frame, _ = cross_cleaned

    def state(source: str, relative: str) -> tuple[str, str]:
        row = frame.loc[f"{source}/{relative}"]
        return row["status"], row["reason"]

    # a test image's twin never trains, whichever source either comes from
    assert state("msoud", SARTAJ_TEST_MSOUD_TRAIN[1]) == ("dropped", "twin_of_test")
    assert state("sartaj", MSOUD_TEST_SARTAJ_TRAIN[0]) == ("dropped", "twin_of_test")
    assert frame.loc[PLANTED, "reason"] == "twin_of_test"
    # one copy per split: the larger SARTAJ original stays, msoud's 224 x 224 copy goes
    assert state("sartaj", TEST_TEST[0]) == ("kept", "")
    assert state("msoud", TEST_TEST[1]) == ("dropped", "duplicate")
    # the two sources disagree on the label: both copies go
    assert state("sartaj", LABEL_CONFLICT[0]) == ("dropped", "label_conflict")
    assert state("msoud", LABEL_CONFLICT[1]) == ("dropped", "label_conflict")
    leakage_free = set(frame.index[frame["leakage_free"] & (frame["status"] == "kept")])
    assert leakage_free == {
        f"sartaj/{TEST_TEST[0]}",
        f"sartaj/{SARTAJ_SINGLES[1]}",
        f"msoud/{MSOUD_SINGLES[0]}",
    }


def test_cross_source_counts(cross_cleaned) -> None:
    _, metrics = cross_cleaned
    assert metrics["cross_source"] == {
        "msoud_vs_sartaj": {
            "groups": 5,
            "images": {"msoud": 5, "sartaj": 5},
            "test_with_train_twin": {"msoud": 1, "sartaj": 2},
            "test_test_groups": 2,
            "label_conflict_groups": 1,
        }
    }
    assert metrics["leakage"]["by_source"] == {
        "msoud": {"in": 4, "kept": 2, "kept_leakage_free": 1, "with_train_twin": 1},
        "sartaj": {"in": 5, "kept": 4, "kept_leakage_free": 2, "with_train_twin": 2},
    }
    assert metrics["dropped"] == {"twin_of_test": 3, "label_conflict": 2, "duplicate": 1}


def _cross_counts_by_hand(frame: pd.DataFrame, first: str, second: str) -> dict:
    """The cross-source counts recomputed member by member, for comparison."""
    result = {
        "groups": 0,
        "images": {first: 0, second: 0},
        "test_with_train_twin": {first: 0, second: 0},
        "test_test_groups": 0,
        "label_conflict_groups": 0,
    }
    for _, members in frame[frame["dup_group_size"] > 1].groupby("dup_group"):
        pairs = set(zip(members["source"], members["split"], strict=True))
        if not {first, second} <= set(members["source"]):
            continue
        result["groups"] += 1
        result["test_test_groups"] += {(first, "test"), (second, "test")} <= pairs
        result["label_conflict_groups"] += members["label"].nunique() > 1
        for this, other in ((first, second), (second, first)):
            result["images"][this] += int((members["source"] == this).sum())
            if (other, "train") in pairs:
                tests = (members["source"] == this) & (members["split"] == "test")
                result["test_with_train_twin"][this] += int(tests.sum())
    return result


@pytest.mark.parametrize("tree", ["cross", "planted"])
def test_cross_source_counts_add_up(cross_cleaned, cleaned, tree: str) -> None:
    frame, metrics = cross_cleaned if tree == "cross" else cleaned[:2]
    cross = metrics["cross_source"]["msoud_vs_sartaj"]
    assert cross == _cross_counts_by_hand(frame, "msoud", "sartaj")
    assert cross["groups"] == metrics["duplicates"]["cross_source_groups"]
    assert cross["label_conflict_groups"] <= metrics["duplicates"]["label_conflict_groups"]
    by_source = metrics["leakage"]["by_source"]
    test = frame[(frame["split"] == "test") & (frame["status"] != "skipped")]
    assert sum(s["in"] for s in by_source.values()) == metrics["leakage"]["test_images"]
    assert sum(s["kept"] for s in by_source.values()) == sum(
        metrics["kept_by_split_label"].get("test", {}).values()
    )
    assert (
        sum(s["kept_leakage_free"] for s in by_source.values())
        == (metrics["leakage"]["kept_test_leakage_free"])
    )
    assert (
        sum(s["with_train_twin"] for s in by_source.values())
        == (metrics["leakage"]["test_with_train_twin"])
    )
    for source, counts in by_source.items():
        assert counts["in"] == int((test["source"] == source).sum())
        assert cross["test_with_train_twin"].get(source, 0) <= counts["with_train_twin"]


def test_an_unmapped_class_folder_is_an_error(mirror: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    copy_sample(mirror, raw / "msoud", "msoud", 1, ("Training",))
    (raw / "msoud" / "Training" / "astrocytoma").mkdir()
    shutil.copy(
        next((raw / "msoud" / "Training" / "glioma").iterdir()),
        raw / "msoud" / "Training" / "astrocytoma" / "a.jpg",
    )
    params = load_params(write_params(tmp_path, {"acquire": {"sources": QUICKSTART_SOURCES[:1]}}))
    with pytest.raises(CleanError, match=r"astrocytoma.*not mapped for source 'msoud'"):
        clean(raw, params, progress=False)


def test_a_missing_source_is_an_error(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path, {"acquire": {"sources": QUICKSTART_SOURCES}}))
    (tmp_path / "raw").mkdir()
    with pytest.raises(CleanError, match=r"source 'msoud' is missing; run the acquire stage"):
        clean(tmp_path / "raw", params, progress=False)


def _cli_args(tmp_path: Path, raw: Path, params: Path) -> list[str]:
    out = tmp_path / "out"
    return [
        "--params",
        str(params),
        "--raw",
        str(raw),
        "--index",
        str(out / "index.parquet"),
        "--metrics",
        str(out / "data.json"),
        "--composition",
        str(out / "composition.csv"),
        "--figures",
        str(out / "figures"),
        "--no-progress",
    ]


def test_cli_writes_outputs_and_a_failed_rerun_leaves_them(mirror: Path, tmp_path: Path) -> None:
    raw = _raw_tree(mirror, tmp_path)
    params = write_params(tmp_path, {"acquire": {"sources": QUICKSTART_SOURCES}})
    assert main(_cli_args(tmp_path, raw, params)) == 0
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in before} >= {
        "index.parquet",
        "data.json",
        "composition.csv",
        "composition.png",
        "duplicates.png",
    }
    index = pd.read_parquet(out / "index.parquet")
    assert "signature" not in index and index["path"].is_unique
    assert json.loads((out / "data.json").read_text())["kept"] == int(
        (index["status"] == "kept").sum()
    )
    # break the input: an unmapped folder; the stage must fail and change nothing
    (raw / "msoud" / "Testing" / "unknown_class").mkdir()
    (raw / "msoud" / "Testing" / "unknown_class" / "x.jpg").write_bytes(b"x")
    result = subprocess.run(
        [sys.executable, "-m", "braintumor.stages.clean", *_cli_args(tmp_path, raw, params)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "unknown_class" in result.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.parent.rglob(".*tmp-*")]
