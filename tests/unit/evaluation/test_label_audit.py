"""The label audit on real images: planted label flips on a separable real set are found,
and the audit's bad inputs fail with one line naming the cause.

The set is separable on purpose, so that a flip is the only reason a label disagrees with
its image: MRI slices of the mirror's msoud ``notumor`` folder against the mirror's
``not-mri`` photographs, each as an 8 x 8 colour thumbnail and its distance from gray
(real pixels, no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.evaluation.label_audit import (
    SUSPECT_COLUMNS,
    AuditError,
    find_issues,
    flat_counts,
    issue_counts,
    out_of_fold_probabilities,
    suspects_table,
)

pytestmark = pytest.mark.usefixtures("mirror")
CLASSES = ("mri", "photo")
PER_CLASS = 60


def thumbnails(paths: list[Path]) -> np.ndarray:
    images = [cv2.imread(str(path), cv2.IMREAD_COLOR) for path in paths]
    small = np.stack(
        [cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA) for image in images]
    ).astype(np.float32)
    # How far each thumbnail pixel is from gray (MRI slices are gray, photographs are not).
    colour = np.abs(small - small.mean(axis=3, keepdims=True)).sum(axis=3)
    return np.concatenate([small.reshape(len(paths), -1), colour.reshape(len(paths), -1)], 1) / 255


@pytest.fixture(scope="module")
def real_set(mirror: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    mri = sorted((mirror / "msoud" / "Training" / "notumor").glob("*.jpg"))[:PER_CLASS]
    photos = sorted((mirror / "not-mri").glob("*.jpg"))[:PER_CLASS]
    paths = mri + photos
    labels = np.repeat([0, 1], PER_CLASS)
    rows = pd.DataFrame(
        {
            "id": np.arange(len(paths)),
            "split": "train",
            "source": np.where(labels == 0, "msoud", "not-mri"),
            "path": [path.name for path in paths],
            "label_index": labels,
        }
    )
    return thumbnails(paths), labels, rows


def test_planted_flips_are_found(real_set) -> None:
    features, labels, rows = real_set
    flipped = np.array([3, 17, PER_CLASS + 5, PER_CLASS + 31])
    noisy = labels.copy()
    noisy[flipped] = 1 - noisy[flipped]
    groups = np.arange(len(labels))
    probabilities = out_of_fold_probabilities(features, noisy, groups, CLASSES, folds=5, seed=0)
    # The clean labels are what the out-of-fold model believes: the set is separable.
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.95
    mask, scores = find_issues(noisy, probabilities)
    assert set(flipped) <= set(np.flatnonzero(mask))
    # A few unflipped images look like the other class (dark photographs): at most three.
    assert mask.sum() <= len(flipped) + 3
    table = suspects_table(
        rows.assign(label_index=noisy, label=np.asarray(CLASSES)[noisy]),
        probabilities,
        mask,
        scores,
        CLASSES,
    )
    assert list(table.columns) == SUSPECT_COLUMNS
    assert set(flipped) <= set(table["id"])
    assert table["label_quality"].is_monotonic_increasing
    # The suggestion is the true class; the given label is the flipped one, left as given.
    top = table.set_index("id").loc[flipped]
    assert list(top["suggested"]) == list(np.asarray(CLASSES)[labels[flipped]])
    assert list(top["label"]) == list(np.asarray(CLASSES)[noisy[flipped]])


def test_counts_per_split_source_and_class(real_set) -> None:
    _, labels, rows = real_set
    frame = rows.assign(label=np.asarray(CLASSES)[labels])
    mask = np.zeros(len(labels), bool)
    mask[[0, 1, 70]] = True
    counts = issue_counts(frame, mask, CLASSES)
    assert counts["train"]["msoud"]["mri"] == {"images": 60, "suspects": 2, "share": 0.0333}
    assert counts["train"]["not-mri"]["photo"]["suspects"] == 1
    assert flat_counts(counts)["label_issues.train.msoud.mri.suspects"] == 2


def test_a_class_with_too_few_groups_for_the_folds_is_one_line(real_set) -> None:
    features, labels, _ = real_set
    groups = np.where(labels == 0, np.arange(len(labels)) % 3, 100 + np.arange(len(labels)))
    with pytest.raises(AuditError, match="class 'mri' has 3 group") as error:
        out_of_fold_probabilities(features, labels, groups, CLASSES, folds=5, seed=0)
    assert "\n" not in str(error.value)


def test_missing_cleanlab_names_the_cause(real_set, monkeypatch: pytest.MonkeyPatch) -> None:
    _, labels, _ = real_set
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(AuditError, match="needs cleanlab") as error:
        find_issues(labels, np.eye(2)[labels])
    assert "\n" not in str(error.value)
