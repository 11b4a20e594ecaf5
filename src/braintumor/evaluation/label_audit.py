"""The label audit: out-of-fold class probabilities from frozen features, ranked by cleanlab.

Every label of the sources is taken on trust by cleaning and preprocessing; this module
asks which ones a model that never saw the image disagrees with. The model is cheap on
purpose: a standardised multinomial logistic regression on the frozen ImageNet backbone's
pooled features (the ones phase 1 already computes), cross-validated by groups of
same-patient neighbours (clean's ``neighbour_group``), so no image is scored by a model
that trained on its neighbouring slice. ``cleanlab.filter.find_label_issues`` then flags
the images whose given label is unlikely under those out-of-fold probabilities (confident
learning: per-class thresholds, so a class the model finds hard is not flagged wholesale),
and ``cleanlab.rank.get_label_quality_scores`` orders them.

The audit never changes a label: it returns a table of suspects (given label, suggested
label, score) and counts; what training does with them is ``train.label_issues``.
Arrays in, numbers out; no network is built here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

SUSPECT_COLUMNS = [
    "id",
    "split",
    "source",
    "path",
    "label",
    "suggested",
    "label_quality",
    "label_probability",
    "suggested_probability",
]


class AuditError(ValueError):
    """The audit cannot run on this input (one line naming the cause)."""


def check_groups(
    labels: np.ndarray, groups: np.ndarray, classes: Sequence[str], folds: int, where: str
) -> None:
    """Refuse a class with fewer groups of images than folds: some fold would have none of
    it to learn from, and its out-of-fold probabilities would mean nothing."""
    for index, name in enumerate(classes):
        count = len(np.unique(groups[labels == index]))
        if count < folds:
            raise AuditError(
                f"{where}: class {name!r} has {count} group(s) of images, fewer than "
                f"audit.folds={folds}; lower the folds or add images"
            )


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    *,
    folds: int,
    seed: int,
    where: str = "audit",
) -> np.ndarray:
    """Class probabilities (N x K) of every row from a model fitted on the other folds.

    Folds are stratified by label and never split a group (``StratifiedGroupKFold``), so a
    row's neighbouring slices are never in the model that scores it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups)
    if not len(features) == len(labels) == len(groups):
        raise AuditError(
            f"{where}: {len(features)} feature rows, {len(labels)} labels, {len(groups)} groups"
        )
    check_groups(labels, groups, classes, folds, where)
    probabilities = np.zeros((len(labels), len(classes)), dtype=np.float64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, score_rows in splitter.split(features, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(features[fit_rows], labels[fit_rows])
        scored = model.predict_proba(features[score_rows])
        probabilities[np.ix_(score_rows, model.classes_)] = scored
    return probabilities


def find_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(suspect mask, label-quality score per row) from cleanlab; a low score is a likely
    error. Raises ``AuditError`` naming the cause when cleanlab is not installed."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError as error:
        raise AuditError(
            f"the label audit needs cleanlab ({error}); install requirements.lock (cleanlab==2.9.0)"
        ) from None
    labels = np.asarray(labels, dtype=np.int64)
    mask = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate")
    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return np.asarray(mask, dtype=bool), np.asarray(scores, dtype=np.float64)


def suspects_table(
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    mask: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
) -> pd.DataFrame:
    """The suspects of ``rows`` (columns id, split, source, path, label, label_index), most
    likely errors first: given label, suggested label (the out-of-fold argmax) and score."""
    labels = rows["label_index"].to_numpy()
    suggested = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "split": rows["split"].to_numpy(),
            "source": rows["source"].to_numpy(),
            "path": rows["path"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "suggested": np.asarray(classes)[suggested],
            "label_quality": np.round(scores, 4),
            "label_probability": np.round(probabilities[np.arange(len(labels)), labels], 4),
            "suggested_probability": np.round(probabilities.max(axis=1), 4),
        }
    )
    return table[mask].sort_values(["label_quality", "id"], kind="stable")[SUSPECT_COLUMNS]


def issue_counts(
    rows: pd.DataFrame, mask: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{split: {source: {class: {images, suspects, share}}}}`` for every combination that
    has images."""
    counts: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    frame = rows.assign(suspect=np.asarray(mask, dtype=bool))
    for (split, source, label), group in frame.groupby(["split", "source", "label"], sort=True):
        if label not in classes:
            continue
        images, suspects = len(group), int(group["suspect"].sum())
        counts.setdefault(str(split), {}).setdefault(str(source), {})[str(label)] = {
            "images": images,
            "suspects": suspects,
            "share": round(suspects / images, 4),
        }
    return counts


def flat_counts(counts: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """``label_issues.<split>.<source>.<class>.<images|suspects|share>`` as flat keys, the
    form of the other data metrics (DVC and MLflow read flat numbers)."""
    flat: dict[str, Any] = {}
    for split, sources in counts.items():
        for source, labels in sources.items():
            for label, values in labels.items():
                for key, value in values.items():
                    flat[f"label_issues.{split}.{source}.{label}.{key}"] = value
    return flat


def suggested_matrix(
    rows: pd.DataFrame, probabilities: np.ndarray, mask: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Among suspects, given label -> suggested label counts (where the errors would go)."""
    labels = rows["label_index"].to_numpy()[mask]
    suggested = probabilities.argmax(axis=1)[mask]
    return {
        given: {
            other: int(((labels == i) & (suggested == j)).sum()) for j, other in enumerate(classes)
        }
        for i, given in enumerate(classes)
    }


def audit_headline(
    counts: dict[str, dict[str, dict[str, dict[str, Any]]]], external: dict[str, Any]
) -> dict[str, Any]:
    """The DVC metric: suspects per split and source, and the external views' accuracy and
    macro-F1 (the detail stays in ``metrics/audit.json``)."""
    headline: dict[str, Any] = {}
    for split, sources in counts.items():
        for source, labels in sources.items():
            suspects = sum(values["suspects"] for values in labels.values())
            images = sum(values["images"] for values in labels.values())
            headline[f"label_issues.{split}.{source}.suspects"] = suspects
            headline[f"label_issues.{split}.{source}.share"] = round(suspects / images, 4)
    for key, value in external.items():
        if key.endswith((".accuracy", ".macro_f1")):
            headline[f"external.{key}"] = value
    return headline


def suspects_figure(images: np.ndarray, table: pd.DataFrame, path: Any, columns: int = 4) -> None:
    """A grid of suspects (``images`` row-aligned with ``table``): each titled with its
    source, given label, suggested label and label-quality score."""
    from braintumor.reports.figures import new_figure, save_figure

    count = len(table)
    rows = max(1, -(-count // columns))
    figure = new_figure(figsize=(2.6 * columns, 2.9 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, (_, row) in zip(axes.ravel(), images, table.iterrows(), strict=False):
        axis.imshow(np.asarray(image).squeeze(), cmap="gray", vmin=0, vmax=255)
        axis.set_title(
            f"{row['source']} {row['split']}\n{row['label']} -> {row['suggested']} "
            f"({row['label_quality']:.3f})",
            fontsize=8,
        )
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no suspects", ha="center", va="center")
    save_figure(figure, path)
