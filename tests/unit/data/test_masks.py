"""The figshare masks matched to Msoud's files on real slices: every mask counted by status.

Known pairs (figshare id -> Msoud file) were found by the full match of all 3,064 masks
against Msoud's 5,023 tumour images (619 in Testing, 2,445 in Training only, none
unmatched); here a small real folder of each must give the same answer, and each hostile
mask (a food photo, a re-framed copy, a wrong class, a missing file) its own status.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.core.schema import CleanParams, SourceParams
from braintumor.data import masks

pytestmark = pytest.mark.usefixtures("mirror")

TEST_PAIRS = {
    209: "Testing/glioma/Te-gl_0094.jpg",
    736: "Testing/glioma/Te-gl_0229.jpg",
    4: "Testing/meningioma/Te-me_0204.jpg",
    919: "Testing/pituitary/Te-pi_0118.jpg",
    923: "Testing/pituitary/Te-pi_0119.jpg",
}
TRAIN_PAIRS = {1: "Training/meningioma/Tr-me_0791.jpg", 2: "Training/meningioma/Tr-me_0801.jpg"}
REFRAMED = (741, "Testing/glioma/Te-gl_0230.jpg")  # its slice padded: same content, moved
WRONG_CLASS = (7, "Testing/meningioma/Te-me_0287.jpg")  # called pituitary in meta
FOOD, MISSING = 90001, 90002
SOURCE = SourceParams(
    name="msoud",
    uri="kaggle://masoudnickparvar/brain-tumor-mri-dataset",
    labels={c: c for c in ("glioma", "meningioma", "notumor", "pituitary")},
)


def _build(mirror: Path, root: Path) -> tuple[Path, Path]:
    """A masks folder and a raw tree of real files, with the hostile masks added."""
    figshare = mirror / "figshare-masks"
    meta = pd.read_csv(figshare / "meta.csv").set_index("id")
    folder, raw = root / "masks", root / "raw"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    ids = [*TEST_PAIRS, *TRAIN_PAIRS, REFRAMED[0], WRONG_CLASS[0]]
    rows = meta.loc[ids].reset_index()
    rows.loc[rows["id"] == WRONG_CLASS[0], "class"] = "pituitary"
    for name in ids:
        shutil.copy(figshare / "images" / f"{name}.jpg", folder / "images")
        shutil.copy(figshare / "masks" / f"{name}.png", folder / "masks")
    slice_ = cv2.imread(str(figshare / "images" / f"{REFRAMED[0]}.jpg"), cv2.IMREAD_GRAYSCALE)
    padded = cv2.copyMakeBorder(slice_, 32, 0, 32, 0, cv2.BORDER_CONSTANT, value=0)
    cv2.imwrite(str(folder / "images" / f"{REFRAMED[0]}.jpg"), cv2.resize(padded, (256, 256)))
    food = sorted((mirror / "not-mri").rglob("*.jpg"))[0]
    cv2.imwrite(
        str(folder / "images" / f"{FOOD}.jpg"),
        cv2.resize(cv2.imread(str(food), cv2.IMREAD_GRAYSCALE), (256, 256)),
    )
    blob = np.zeros((512, 512), np.uint8)
    blob[200:260, 200:260] = 255
    cv2.imwrite(str(folder / "masks" / f"{FOOD}.png"), blob)
    shutil.copy(figshare / "images" / "10.jpg", folder / "images" / f"{MISSING}.jpg")
    extra = pd.DataFrame(
        [
            {
                "id": FOOD,
                "class": "glioma",
                "patient_fold": 1,
                "original_size": 512,
                "mask_pixels": 3600,
            },
            {
                "id": MISSING,
                "class": "glioma",
                "patient_fold": 1,
                "original_size": 512,
                "mask_pixels": 1,
            },
        ]
    )
    pd.concat([rows, extra]).to_csv(folder / "meta.csv", index=False)
    files = [*TEST_PAIRS.values(), *TRAIN_PAIRS.values(), REFRAMED[1], WRONG_CLASS[1]]
    # Distractors: other real tumour slices of each class, test and training.
    for split in ("Testing", "Training"):
        for label in ("glioma", "meningioma", "pituitary"):
            found = sorted((mirror / "msoud" / split / label).glob("*.jpg"))[:3]
            files += [path.relative_to(mirror / "msoud").as_posix() for path in found]
    for relative in files:
        target = raw / "msoud" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / "msoud" / relative, target)
    return folder, raw


def _match(folder: Path, raw: Path) -> pd.DataFrame:
    meta = masks.read_meta(folder)
    grays = [masks.read_gray(folder / "images" / f"{name}.jpg") for name in meta["id"]]
    readable = np.array(
        [
            gray is not None and masks.read_mask(folder / "masks" / f"{name}.png") is not None
            for gray, name in zip(grays, meta["id"], strict=True)
        ]
    )
    images = masks.source_images(raw, SOURCE, ["glioma", "meningioma", "pituitary"])
    clean = CleanParams()
    image_grays = [masks.read_gray(raw / entry.path) for entry in images]
    return masks.match_masks(
        meta,
        readable,
        masks.signatures(grays, clean),
        images,
        masks.signatures(image_grays, clean),
        clean.near_similarity,
        0.99,
    )


def test_real_slices_find_their_msoud_files_and_every_mask_is_counted(
    mirror: Path, tmp_path: Path
) -> None:
    folder, raw = _build(mirror, tmp_path)
    matches = _match(folder, raw).set_index("id")
    for name, relative in TEST_PAIRS.items():
        row = matches.loc[name]
        assert (row["status"], row["path"]) == (masks.TEST, f"msoud/{relative}"), name
        assert row["similarity"] > 0.99 and row["alignment"] > 0.999
    for name, relative in TRAIN_PAIRS.items():
        assert (matches.loc[name, "status"], matches.loc[name, "path"]) == (
            masks.TRAIN_ONLY,
            f"msoud/{relative}",
        )
    # The padded slice still matches by content (the signature crops) but not in place.
    assert matches.loc[REFRAMED[0], "status"] == masks.MISALIGNED
    assert matches.loc[REFRAMED[0], "similarity"] >= 0.95
    assert matches.loc[REFRAMED[0], "alignment"] < 0.9
    assert matches.loc[WRONG_CLASS[0], "status"] == masks.LABEL_CONFLICT
    # Hostile: a mask that matches no image is counted, not dropped.
    assert matches.loc[FOOD, "status"] == masks.UNMATCHED
    assert matches.loc[FOOD, "similarity"] < 0.95
    assert matches.loc[MISSING, "status"] == masks.UNREADABLE
    counts = masks.match_counts(matches.reset_index())
    assert counts == {
        "test": 5, "train": 2, "unmatched": 1, "label_conflict": 1, "misaligned": 1,
        "unreadable": 1, "masks": 11,
    }  # fmt: skip
    assert sum(counts[status] for status in masks.MATCH_STATUSES) == counts["masks"]


def test_an_image_belongs_to_one_mask_only(mirror: Path, tmp_path: Path) -> None:
    """Two masks whose slices are the same image (a copy under another id): the image goes
    to one of them, the other is unmatched, so no test slice is scored twice."""
    folder, raw = _build(mirror, tmp_path)
    meta = pd.read_csv(folder / "meta.csv")
    twin = meta[meta["id"] == 209].assign(id=90003)
    pd.concat([meta, twin]).to_csv(folder / "meta.csv", index=False)
    for kind, suffix in (("images", "jpg"), ("masks", "png")):
        shutil.copy(folder / kind / f"209.{suffix}", folder / kind / f"90003.{suffix}")
    matches = _match(folder, raw).set_index("id")
    statuses = sorted(matches.loc[[209, 90003], "status"])
    assert statuses == [masks.TEST, masks.UNMATCHED]


def test_no_images_leaves_every_mask_unmatched(mirror: Path) -> None:
    figshare = mirror / "figshare-masks"
    meta = masks.read_meta(figshare).head(3)
    grays = [masks.read_gray(figshare / "images" / f"{name}.jpg") for name in meta["id"]]
    signatures = masks.signatures(grays, CleanParams())
    empty = (np.zeros((0, 1024), np.float32), np.zeros((0, 4096), np.float32))
    matches = masks.match_masks(meta, np.ones(3, bool), signatures, [], empty, 0.95, 0.99)
    assert masks.match_counts(matches)["unmatched"] == 3


def test_a_mask_at_the_model_size_keeps_its_area_and_place(mirror: Path) -> None:
    mask = masks.read_mask(mirror / "figshare-masks" / "masks" / "4.png")
    assert mask is not None and mask.shape == (512, 512)
    small = masks.mask_at(mask, 128, 128)
    assert small.shape == (128, 128) and small.dtype == bool
    assert abs(small.mean() - mask.mean()) < 0.25 * mask.mean()
    rows, columns = np.nonzero(mask)
    small_rows, small_columns = np.nonzero(small)
    assert abs(small_rows.mean() * 4 - rows.mean()) < 4
    assert abs(small_columns.mean() * 4 - columns.mean()) < 4


def test_bad_meta_is_refused_in_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(masks.MaskError, match="meta.csv: not found"):
        masks.read_meta(tmp_path)
    (tmp_path / "meta.csv").write_text("id,class\n1,glioma\n")
    with pytest.raises(masks.MaskError, match=r"meta.csv: missing columns") as error:
        masks.read_meta(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "meta.csv").write_text(
        "id,class,patient_fold,original_size,mask_pixels\n1,glioma,1,512,9\n1,glioma,1,512,9\n"
    )
    with pytest.raises(masks.MaskError, match="repeated ids"):
        masks.read_meta(tmp_path)


def test_an_empty_or_missing_mask_reads_as_none(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert masks.read_mask(tmp_path / "empty.png") is None
    assert masks.read_mask(tmp_path / "junk.png") is None
    assert masks.read_mask(tmp_path / "absent.png") is None
