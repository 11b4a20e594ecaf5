"""Metrics from labels, probabilities and confusion matrices, checked against the study's
published matrices and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from braintumor.evaluation.metrics import (
    AVERAGED_METRICS,
    ONE_VS_REST_COLUMNS,
    STUDY_CONFUSION_MATRICES,
    bootstrap_intervals,
    classification_report,
    comparison_table,
    confusion_matrix,
    labels_from_confusion,
    metrics_from_confusion,
    normalize_rows,
    one_vs_rest,
    roc_auc_per_class,
    roc_curves,
    summary_metrics,
)

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
FINE_TUNED = np.array(STUDY_CONFUSION_MATRICES["fine-tuned"])
BASE = np.array(STUDY_CONFUSION_MATRICES["base"])


def synthetic(count: int, seed: int, skill: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a decent but imperfect 4-class classifier."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    logits = rng.normal(size=(count, 4))
    logits[np.arange(count), labels] += skill
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probabilities


# --------------------------------------------------------------------------- the matrix


def test_the_study_matrices_are_as_published() -> None:
    np.testing.assert_array_equal(
        FINE_TUNED, [[429, 0, 0, 1], [13, 409, 0, 10], [0, 0, 396, 2], [0, 1, 0, 456]]
    )
    np.testing.assert_array_equal(
        BASE, [[323, 96, 3, 8], [30, 342, 20, 40], [0, 9, 388, 1], [3, 4, 8, 442]]
    )


@pytest.mark.parametrize("matrix", [FINE_TUNED, BASE], ids=["fine-tuned", "base"])
def test_one_vs_rest_adds_up(matrix: np.ndarray) -> None:
    table = one_vs_rest(matrix)
    total = matrix.sum()
    assert table.shape == (4, len(ONE_VS_REST_COLUMNS))
    tp, fp, fn, tn = table.T
    np.testing.assert_array_equal(table.sum(axis=1), np.full(4, total))
    np.testing.assert_array_equal(tp + fn, matrix.sum(axis=1))
    np.testing.assert_array_equal(tp + fp, matrix.sum(axis=0))
    np.testing.assert_array_equal(tp, np.diag(matrix))
    np.testing.assert_array_equal(tn, total - matrix.sum(axis=1) - matrix.sum(axis=0) + tp)


def test_study_fine_tuned_accuracy_is_98_4_not_92_2() -> None:
    report = metrics_from_confusion(FINE_TUNED, CLASSES)
    assert report["n"] == 1717
    assert report["accuracy"] == pytest.approx(1690 / 1717)
    assert round(report["accuracy"], 4) == 0.9843
    # the study divided by 1,833 and printed 92.2 %
    assert 1690 / 1833 == pytest.approx(0.922, abs=5e-4)


def test_study_base_accuracy() -> None:
    report = metrics_from_confusion(BASE, CLASSES)
    assert report["n"] == 1717
    assert round(report["accuracy"], 3) == 0.871
    assert report["accuracy"] == pytest.approx(1495 / 1717)


def test_study_one_vs_rest_for_glioma_fine_tuned() -> None:
    """The study's table mixes up TN and FP; from the matrix: 13 meningiomas were called
    glioma (FP), one glioma was missed (FN)."""
    glioma = metrics_from_confusion(FINE_TUNED, CLASSES)["per_class"]["glioma"]
    assert (glioma["tp"], glioma["fp"], glioma["fn"], glioma["tn"]) == (429, 13, 1, 1274)


@pytest.mark.parametrize("matrix", [FINE_TUNED, BASE], ids=["fine-tuned", "base"])
def test_metrics_from_the_matrix_agree_with_sklearn(matrix: np.ndarray) -> None:
    y_true, y_pred = labels_from_confusion(matrix)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 4), matrix)
    report = metrics_from_confusion(matrix, CLASSES)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(4), zero_division=0
    )
    for index, name in enumerate(CLASSES):
        values = report["per_class"][name]
        assert values["precision"] == pytest.approx(precision[index])
        assert values["recall"] == pytest.approx(recall[index])
        assert values["f1"] == pytest.approx(f1[index])
        assert values["support"] == support[index]
        negatives = y_true != index
        assert values["specificity"] == pytest.approx(np.mean(y_pred[negatives] != index))
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(
            y_true, y_pred, labels=range(4), average=average, zero_division=0
        )
        assert report[average]["precision"] == pytest.approx(expected[0])
        assert report[average]["recall"] == pytest.approx(expected[1])
        assert report[average]["f1"] == pytest.approx(expected[2])


def test_study_base_per_class_matches_the_published_table() -> None:
    """The study's base-model row (.91/.75/.82, .76/.79/.77, .93/.97/.95, .90/.97/.93)."""
    per_class = metrics_from_confusion(BASE, CLASSES)["per_class"]
    published = {
        "glioma": (0.91, 0.75, 0.82),
        "meningioma": (0.76, 0.79, 0.77),
        "notumor": (0.93, 0.97, 0.95),
        "pituitary": (0.90, 0.97, 0.93),
    }
    for name, values in published.items():
        computed = tuple(per_class[name][m] for m in ("precision", "recall", "f1"))
        np.testing.assert_allclose(computed, values, atol=0.0051)


def test_normalized_rows_sum_to_one_and_absent_class_stays_zero() -> None:
    normalised = normalize_rows(FINE_TUNED)
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(normalised), FINE_TUNED.diagonal() / FINE_TUNED.sum(1))
    with_absent = np.array([[5, 1, 0], [0, 0, 0], [1, 0, 3]])
    assert np.all(normalize_rows(with_absent)[1] == 0)


def test_absent_class_gives_zeros_and_a_note_not_nan() -> None:
    matrix = np.array([[5, 1, 0], [0, 0, 0], [1, 0, 3]])
    report = metrics_from_confusion(matrix, ["a", "b", "c"])
    assert report["per_class"]["b"]["recall"] == 0.0
    assert report["per_class"]["b"]["precision"] == 0.0
    assert any("b: no true samples" in note for note in report["notes"])
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------- ROC


def test_roc_auc_matches_sklearn_and_is_nan_safe() -> None:
    labels, probabilities = synthetic(300, seed=0)
    aucs, notes = roc_auc_per_class(labels, probabilities)
    for index in range(4):
        expected = roc_auc_score(labels == index, probabilities[:, index])
        assert aucs[index] == pytest.approx(expected)
    assert notes == []

    present = labels != 2  # class 2 absent
    aucs, notes = roc_auc_per_class(labels[present], probabilities[present], CLASSES)
    assert np.isnan(aucs[2]) and np.isfinite(aucs[[0, 1, 3]]).all()
    assert notes == ["notumor: no positive samples; its ROC AUC is undefined"]


def test_roc_curves_are_monotone_and_json_ready() -> None:
    labels, probabilities = synthetic(200, seed=1)
    curves = roc_curves(labels, probabilities, CLASSES)
    assert set(curves) == set(CLASSES)
    for curve in curves.values():
        assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
        assert curve["fpr"][0] == 0 and curve["tpr"][-1] == 1
    json.dumps(curves, allow_nan=False)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_the_estimate_and_is_reproducible() -> None:
    labels, probabilities = synthetic(1500, seed=2)
    predictions = probabilities.argmax(axis=1)
    first = bootstrap_intervals(labels, predictions, 4, resamples=500, seed=7)
    again = bootstrap_intervals(labels, predictions, 4, resamples=500, seed=7)
    other = bootstrap_intervals(labels, predictions, 4, resamples=500, seed=8)
    assert first == again
    assert first["accuracy"] != other["accuracy"]
    report = metrics_from_confusion(confusion_matrix(labels, predictions, 4), CLASSES)
    low, high = first["accuracy"]
    assert low < report["accuracy"] < high
    low, high = first["macro_f1"]
    assert low < report["macro"]["f1"] < high
    for index, name in enumerate(CLASSES):
        low, high = first["recall"][index]
        assert low < report["per_class"][name]["recall"] < high


def test_bootstrap_narrows_with_more_samples() -> None:
    small = synthetic(150, seed=3)
    large = synthetic(3000, seed=3)
    widths = []
    for labels, probabilities in (small, large):
        interval = bootstrap_intervals(labels, probabilities.argmax(1), 4, resamples=400)
        widths.append(interval["accuracy"][1] - interval["accuracy"][0])
    # the width shrinks like 1 / sqrt(n): sqrt(3000 / 150) = 4.5
    assert widths[1] < widths[0] / 3


def test_bootstrap_of_a_published_matrix() -> None:
    y_true, y_pred = labels_from_confusion(FINE_TUNED)
    interval = bootstrap_intervals(y_true, y_pred, 4, resamples=300, seed=0)
    low, high = interval["accuracy"]
    assert low < 1690 / 1717 < high and high - low < 0.02


# --------------------------------------------------------------------------- the report


def test_report_is_json_ready_and_consistent() -> None:
    labels, probabilities = synthetic(400, seed=5)
    report = classification_report(labels, probabilities, CLASSES, resamples=200, seed=1)
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["accuracy"] == report["accuracy"]
    assert report["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == labels))
    assert report["macro_f1"] == report["macro"]["f1"]
    assert set(report["confidence_intervals"]["recall"]) == set(CLASSES)
    assert 0.5 < report["macro"]["roc_auc"] <= 1
    flat = summary_metrics(report)
    assert flat["accuracy"] == report["accuracy"]
    assert all(f"{name}_{metric}" in flat for name in CLASSES for metric in AVERAGED_METRICS)
    assert all(isinstance(value, float) for value in flat.values())


def test_report_with_an_absent_class_has_null_auc_and_notes() -> None:
    labels, probabilities = synthetic(400, seed=6)
    keep = labels != 3
    report = classification_report(labels[keep], probabilities[keep], CLASSES, resamples=50)
    assert report["per_class"]["pituitary"]["roc_auc"] is None
    assert report["confidence_intervals"]["recall"]["pituitary"] == [None, None]
    assert any(note.startswith("pituitary:") for note in report["notes"])
    json.dumps(report, allow_nan=False)
    assert "pituitary_roc_auc" not in summary_metrics(report)


def test_comparison_table_renders_markdown() -> None:
    labels, probabilities = synthetic(400, seed=7)
    table = comparison_table(
        {
            "ours": classification_report(labels, probabilities, CLASSES, resamples=100),
            "study base (from its matrix)": metrics_from_confusion(BASE, CLASSES),
            "study fine-tuned (from its matrix)": metrics_from_confusion(FINE_TUNED, CLASSES),
        },
        digits=3,
    )
    lines = table.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("| model | n | accuracy | macro F1 | glioma P/R/F1")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| study fine-tuned (from its matrix) | 1717 | 0.984 |" in table
    assert "0.907/0.751/0.822" in table  # base glioma
    assert "[" in lines[2]  # our accuracy carries its interval


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 1], [[0.5, 0.5, 0, 0]], "2 samples but y_prob has 1"),
        ([0], [[0.5, 0.5, 0.5, 0.5]], "sum to 1"),
        ([0], [[2.0, -1.0, 0.0, 0.0]], "negative"),
        ([4], [[0.25, 0.25, 0.25, 0.25]], "outside"),
        ([-1], [[0.25, 0.25, 0.25, 0.25]], "outside"),
        ([0.5], [[0.25, 0.25, 0.25, 0.25]], "whole-number"),
        ([0], [[0.5, 0.5]], "2 columns but there are 4 classes"),
        ([0], [0.25, 0.25, 0.25, 0.25], "2-D"),
        ([], np.zeros((0, 4)), "empty"),
        ([0], [[np.nan, 0.5, 0.25, 0.25]], "NaN"),
        ([[0]], [[0.25, 0.25, 0.25, 0.25]], "1-D"),
    ],
)
def test_bad_input_raises_a_clear_value_error(labels, probabilities, message) -> None:
    with pytest.raises(ValueError, match=message):
        classification_report(labels, probabilities, CLASSES, resamples=0)


def test_bad_matrices_and_parameters_raise() -> None:
    with pytest.raises(ValueError, match="square"):
        one_vs_rest(np.ones((2, 3)))
    with pytest.raises(ValueError, match="negative"):
        one_vs_rest([[1, -1], [0, 1]])
    with pytest.raises(ValueError, match="whole-number"):
        one_vs_rest([[1.5, 0], [0, 1]])
    with pytest.raises(ValueError, match="all counts are zero"):
        metrics_from_confusion(np.zeros((4, 4)), CLASSES)
    with pytest.raises(ValueError, match="4 x 4 but there are 3"):
        metrics_from_confusion(BASE, CLASSES[:3])
    with pytest.raises(ValueError, match="repeats"):
        metrics_from_confusion(BASE, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals([0, 1], [0, 1], 2, resamples=1)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals([0, 1], [0, 1], 2, confidence=95)
    with pytest.raises(ValueError, match="y_pred"):
        confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="at least one report"):
        comparison_table({})
