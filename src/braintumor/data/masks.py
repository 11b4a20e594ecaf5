"""Tumour masks of the figshare slices, matched to the classification images they became.

The figshare set (Cheng et al.; ``figshare-masks/`` in the mirror: ``meta.csv``,
``masks/<id>.png``, ``images/<id>.jpg``) is where Msoud's glioma, meningioma and
pituitary images come from, resized. Which Msoud file is which slice is not listed, so it
is found the way ``clean`` finds twins across sources: the content signature
(``hashing.content_thumbnail`` with clean's parameters) and a correlation of at least
``clean.near_similarity``. Two more checks, because the signature is deliberately blind to
what matters for a mask:

- **geometry**: the signature crops to content and squashes, so a re-cropped or padded copy
  matches its original while a mask drawn on the original would then sit in the wrong
  place. A matched pair must also correlate on whole-image thumbnails
  (``alignment_thumbnail``, no crop) at ``alignment`` or above, or it is ``misaligned``;
- **one mask per image**: adjacent slices of one patient can both reach the threshold
  against one image, so an image belongs only to the slice that matches it best.

Every mask ends in exactly one status (``MATCH_STATUSES``) and is counted: a mask that
matches no image is reported as ``unmatched``, never dropped silently. Pure functions on
arrays and tables; the stage does the file reading through ``read_*`` here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from braintumor.core.redaction import one_line
from braintumor.core.schema import CleanParams, SourceParams
from braintumor.data.hashing import content_thumbnail

META_COLUMNS = ("id", "class", "patient_fold", "original_size", "mask_pixels")

# One status per mask, in the order a mask is checked.
UNREADABLE = "unreadable"  # its image or mask file is missing, undecodable or empty
UNMATCHED = "unmatched"  # no image reaches the similarity threshold
TRAIN_ONLY = "train"  # its images are all in training folders
LABEL_CONFLICT = "label_conflict"  # the image's folder names another class
MISALIGNED = "misaligned"  # same content, different framing: the mask would not fit
TEST = "test"  # a test image, same class, same framing: usable
MATCH_STATUSES = (TEST, TRAIN_ONLY, UNMATCHED, LABEL_CONFLICT, MISALIGNED, UNREADABLE)

ALIGNMENT_SIDE = 64


class MaskError(ValueError):
    """The masks folder or one of its files cannot be used (one line, naming the file)."""


@dataclass(frozen=True)
class ImageEntry:
    """One classification image that a mask may belong to."""

    path: str  # as the caller names it (relative to data/raw in the stage)
    split: str  # train | test
    label: str  # the merged class name


def read_meta(folder: Path) -> pd.DataFrame:
    """``meta.csv`` of a masks folder, checked: the columns, unique positive ids."""
    path = folder / "meta.csv"
    if not path.is_file():
        raise MaskError(f"{path}: not found (a masks folder holds meta.csv, masks/, images/)")
    try:
        meta = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise MaskError(f"{path}: unreadable ({one_line(error)})") from None
    missing = [column for column in META_COLUMNS if column not in meta.columns]
    if missing:
        raise MaskError(f"{path}: missing columns {missing}")
    if meta.empty:
        raise MaskError(f"{path}: no rows")
    if meta["id"].duplicated().any():
        raise MaskError(f"{path}: repeated ids {meta['id'][meta['id'].duplicated()].tolist()[:5]}")
    return meta.reset_index(drop=True)


def read_gray(path: Path) -> np.ndarray | None:
    """An 8-bit gray image, or None when the file is missing or not an image."""
    if not path.is_file():
        return None
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if gray is None or gray.size == 0 else gray


def read_mask(path: Path) -> np.ndarray | None:
    """A mask as bool (white = tumour), or None when missing, unreadable or empty."""
    gray = read_gray(path)
    if gray is None:
        return None
    mask = gray > 127
    return mask if mask.any() else None


def alignment_thumbnail(gray: np.ndarray, side: int = ALIGNMENT_SIDE) -> np.ndarray:
    """The whole image (no crop) squashed to ``side`` x ``side``, zero-mean and unit-norm:
    two images correlate high here only if the content sits at the same place in both."""
    small = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    vector = small.ravel() - small.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-6 else np.zeros_like(vector)


def signatures(
    grays: Sequence[np.ndarray | None], clean: CleanParams
) -> tuple[np.ndarray, np.ndarray]:
    """Content signatures (clean's) and alignment thumbnails of each image; a missing image
    (None) gets zero vectors, which correlate with nothing."""
    size = clean.thumbnail_size * clean.thumbnail_size
    content = np.zeros((len(grays), size), dtype=np.float32)
    whole = np.zeros((len(grays), ALIGNMENT_SIDE * ALIGNMENT_SIDE), dtype=np.float32)
    for index, gray in enumerate(grays):
        if gray is None:
            continue
        content[index] = content_thumbnail(
            gray, clean.thumbnail_size, clean.content_threshold, clean.content_trim
        )
        whole[index] = alignment_thumbnail(gray)
    return content, whole


def source_images(raw_dir: Path, source: SourceParams, labels: Sequence[str]) -> list[ImageEntry]:
    """The images of ``source`` under ``raw_dir`` whose class is one of ``labels``, as
    clean reads them (hidden folders skipped; split and class folders mapped by the
    source's parameters), sorted by path."""
    root = raw_dir / source.name
    if not root.is_dir():
        raise MaskError(f"{root}: source {source.name!r} is missing; run the acquire stage")
    entries = []
    for split_folder, split in source.splits.items():
        for class_folder, label in source.labels.items():
            folder = root / split_folder / class_folder
            if label not in labels or not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                parts = path.relative_to(folder).parts
                if path.is_file() and not any(part.startswith(".") for part in parts):
                    entries.append(ImageEntry(path.relative_to(raw_dir).as_posix(), split, label))
    return entries


def match_masks(
    meta: pd.DataFrame,
    mask_readable: np.ndarray,
    mask_signatures: tuple[np.ndarray, np.ndarray],
    images: Sequence[ImageEntry],
    image_signatures: tuple[np.ndarray, np.ndarray],
    near_similarity: float,
    alignment: float,
) -> pd.DataFrame:
    """One row per mask (``meta``'s order): its status, the image it matched and how well.

    ``mask_readable``: (M,) bool, the mask and its slice both read. Signatures are
    ``signatures()``'s pair for the masks' slices and for ``images``. Columns: ``id``,
    ``class``, ``patient_fold``, ``status``, ``path`` / ``split`` / ``label`` of the chosen
    image (empty when none), ``similarity`` (content; for an unmatched mask its best
    one), ``alignment`` (whole image) and ``copies`` (images matched to this mask).
    """
    content, whole = mask_signatures
    image_content, image_whole = image_signatures
    count = len(meta)
    rows = pd.DataFrame(
        {
            "id": meta["id"].to_numpy(),
            "class": meta["class"].astype(str).to_numpy(),
            "patient_fold": meta["patient_fold"].to_numpy(),
            "status": UNMATCHED,
            "path": "",
            "split": "",
            "label": "",
            "similarity": 0.0,
            "alignment": 0.0,
            "copies": 0,
        }
    )
    if len(images) == 0:
        rows.loc[~np.asarray(mask_readable, dtype=bool), "status"] = UNREADABLE
        return rows
    similarity = content @ image_content.T  # (M, I): 3,064 x 7,000 floats is ~86 MB
    best_mask = similarity.argmax(axis=0)  # each image belongs to its closest slice only
    owned = (similarity >= near_similarity) & (best_mask[None, :] == np.arange(count)[:, None])
    splits = np.array([entry.split for entry in images])
    for index in range(count):
        if not mask_readable[index]:
            rows.at[index, "status"] = UNREADABLE
            continue
        candidates = np.flatnonzero(owned[index])
        rows.at[index, "copies"] = len(candidates)
        if len(candidates) == 0:
            rows.at[index, "similarity"] = float(similarity[index].max())
            continue
        tests = candidates[splits[candidates] == "test"]
        pool = tests if len(tests) else candidates
        chosen = int(pool[np.argmax(similarity[index, pool])])
        entry = images[chosen]
        aligned = float(whole[index] @ image_whole[chosen])
        rows.loc[index, ["path", "split", "label"]] = [entry.path, entry.split, entry.label]
        rows.at[index, "similarity"] = float(similarity[index, chosen])
        rows.at[index, "alignment"] = aligned
        if not len(tests):
            rows.at[index, "status"] = TRAIN_ONLY
        elif entry.label != rows.at[index, "class"]:
            rows.at[index, "status"] = LABEL_CONFLICT
        elif aligned < alignment:
            rows.at[index, "status"] = MISALIGNED
        else:
            rows.at[index, "status"] = TEST
    return rows


def match_counts(matches: pd.DataFrame) -> dict[str, int]:
    """Masks per status (every status present, zeros included) and in all: the statuses
    add up to ``masks``, so nothing can go missing between them."""
    counts = {status: int((matches["status"] == status).sum()) for status in MATCH_STATUSES}
    counts["masks"] = len(matches)
    return counts


def mask_at(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A mask at another resolution by the images' own geometry (the whole slice squashed,
    as Msoud's copies and the model's input are): area-resampled coverage, then at least
    half covered counts as tumour, so a mask keeps its area within a pixel's rim."""
    coverage = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return np.asarray(coverage >= 0.5)


def masks_by_status(matches: pd.DataFrame, status: str) -> pd.DataFrame:
    """The rows with ``status``, in a stable order (class, then id)."""
    selected = matches[matches["status"] == status]
    return selected.sort_values(["class", "id"], kind="stable").reset_index(drop=True)


def class_counts(matches: pd.DataFrame) -> Mapping[str, dict[str, int]]:
    """Masks per class and status, for the report."""
    table = matches.groupby(["class", "status"]).size()
    out: dict[str, dict[str, int]] = {}
    for (label, status), value in table.items():
        out.setdefault(str(label), {})[str(status)] = int(value)
    return out
