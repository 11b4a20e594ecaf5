"""Classification metrics of the evaluate stage: from labels and probabilities, or from a
confusion matrix alone.

Everything the study reports per model (accuracy; per-class precision, recall, specificity,
F1 and support; macro and weighted averages; the confusion matrix; a one-vs-rest table of
TP, FP, FN and TN) is derived here from one confusion matrix, so the same code can be
applied to our predictions and to the study's published matrices. That matters because
the study's own tables do not add up: its fine-tuned matrix sums to 1,717 images (accuracy
1690 / 1717 = 98.4 %) yet it printed 92.2 %, and its one-vs-rest table swaps TN and FP.
Deriving every table from the matrix makes such slips impossible and testable.

On top of the matrix metrics: one-vs-rest ROC AUC and ROC curves from the probabilities,
and percentile bootstrap confidence intervals (seeded, vectorised) for accuracy, macro-F1
and each class's recall, so a comparison between models shows its uncertainty.

Conventions: class ``k`` is row and column ``k`` of the matrix (rows true, columns
predicted). A ratio whose denominator is zero (precision of a class never predicted,
recall of a class absent from the data) is 0.0, as scikit-learn's ``zero_division=0``,
and the report says so in its ``notes``. Core layer: numpy and scikit-learn only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from braintumor.core.schema import STUDY_BASE_MATRIX, STUDY_FINETUNED_MATRIX

# The study's published confusion matrices (rows true, columns predicted), classes in the
# order glioma, meningioma, notumor, pituitary. Both sum to 1,717 images.
STUDY_CONFUSION_MATRICES: dict[str, tuple[tuple[int, ...], ...]] = {
    "base": STUDY_BASE_MATRIX,
    "fine-tuned": STUDY_FINETUNED_MATRIX,
}

# Columns of the one-vs-rest table, in order.
ONE_VS_REST_COLUMNS: tuple[str, ...] = ("tp", "fp", "fn", "tn")

# Per-class metrics averaged into the macro and weighted rows.
AVERAGED_METRICS: tuple[str, ...] = ("precision", "recall", "specificity", "f1")

# Tolerance on the row sums of a probability matrix: float32 softmax rows sum to 1 within
# about 1e-6; anything further off is not a probability matrix (logits, a wrong axis).
PROBABILITY_SUM_TOLERANCE = 1e-3

# Above this many index entries (resamples x samples) the bootstrap runs in chunks, so its
# memory stays bounded (about 8 bytes each) whatever the resample count.
_BOOTSTRAP_CHUNK_ENTRIES = 4_000_000


# --------------------------------------------------------------------------- validation


def validate_labels(y_true: Any, num_classes: int, *, name: str = "y_true") -> np.ndarray:
    """Return ``y_true`` as a 1-D int64 array, or raise ``ValueError`` saying what is wrong.

    Labels must be integers (floats holding whole numbers are accepted, as from a CSV) in
    ``[0, num_classes)``; anything else means the labels and the class list disagree.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D integer labels, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError(f"{name} must hold whole-number class indices")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} has labels in [{low}, {high}], outside [0, {num_classes - 1}] "
            f"for {num_classes} classes"
        )
    return labels


def validate_probabilities(
    y_prob: Any, num_classes: int | None = None, *, name: str = "y_prob"
) -> np.ndarray:
    """Return ``y_prob`` as an (N, K) float64 array of probabilities, or raise ``ValueError``.

    Rows must be finite, non-negative and sum to 1 (within ``PROBABILITY_SUM_TOLERANCE``):
    passing logits or a transposed array by mistake would otherwise give plausible-looking
    but meaningless AUCs and calibration numbers.
    """
    probabilities = np.asarray(y_prob, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples x classes), got shape {probabilities.shape}")
    if num_classes is not None and probabilities.shape[1] != num_classes:
        raise ValueError(
            f"{name} has {probabilities.shape[1]} columns but there are {num_classes} classes"
        )
    if probabilities.shape[0] == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError(f"{name} holds NaN or infinite values")
    if np.any(probabilities < 0):
        raise ValueError(f"{name} holds negative values: probabilities expected, not logits")
    sums = probabilities.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(
            f"{name} rows must sum to 1 (row {worst} sums to {sums[worst]:.6g}): "
            "probabilities expected, not logits"
        )
    return probabilities


def validate_inputs(
    y_true: Any, y_prob: Any, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Check labels, probabilities and class names together; return (labels, probabilities)."""
    num_classes = _check_class_names(class_names)
    probabilities = validate_probabilities(y_prob, num_classes)
    labels = validate_labels(y_true, num_classes)
    if labels.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"y_true has {labels.shape[0]} samples but y_prob has {probabilities.shape[0]} rows"
        )
    return labels, probabilities


def validate_confusion_matrix(matrix: Any) -> np.ndarray:
    """Return ``matrix`` as a square int64 array of non-negative counts, or raise."""
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 1:
        raise ValueError(f"a confusion matrix must be square (K x K), got shape {counts.shape}")
    if counts.dtype.kind == "f":
        if not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)):
            raise ValueError("a confusion matrix must hold whole-number counts")
    elif counts.dtype.kind not in "iub":
        raise ValueError(f"a confusion matrix must hold counts, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if np.any(counts < 0):
        raise ValueError("a confusion matrix cannot hold negative counts")
    if counts.sum() == 0:
        raise ValueError("the confusion matrix is empty (all counts are zero)")
    return counts


def _check_class_names(class_names: Sequence[str]) -> int:
    names = list(class_names)
    if len(names) < 2:
        raise ValueError(f"class_names needs at least two classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has repeats: {names}")
    return len(names)


# --------------------------------------------------------------------------- the matrix


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts (K x K, int64): row = true class, column = predicted class.

    Every class gets a row and a column even when absent, so matrices of different models
    and data sets line up.
    """
    labels = validate_labels(y_true, num_classes)
    predictions = validate_labels(y_pred, num_classes, name="y_pred")
    if labels.shape != predictions.shape:
        raise ValueError(
            f"y_true has {labels.shape[0]} samples but y_pred has {predictions.shape[0]}"
        )
    codes = labels * num_classes + predictions
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def normalize_rows(matrix: Any) -> np.ndarray:
    """Row-normalised matrix (each row: the fraction of that true class predicted as each
    class; its diagonal is the per-class recall). A row of zeros (class absent) stays zero
    instead of becoming NaN."""
    counts = validate_confusion_matrix(matrix).astype(np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def one_vs_rest(matrix: Any) -> np.ndarray:
    """The one-vs-rest table, (K x 4) int64, columns ``ONE_VS_REST_COLUMNS`` (TP, FP, FN, TN).

    For class k: TP = matrix[k, k]; FP = column k minus TP (others predicted as k); FN =
    row k minus TP (k predicted as others); TN = everything else. Each row sums to N, TP +
    FN is the row sum (the class's support) and TP + FP the column sum, by construction.
    """
    counts = validate_confusion_matrix(matrix)
    total = counts.sum()
    true_positive = np.diag(counts)
    false_positive = counts.sum(axis=0) - true_positive
    false_negative = counts.sum(axis=1) - true_positive
    true_negative = total - true_positive - false_positive - false_negative
    return np.stack([true_positive, false_positive, false_negative, true_negative], axis=1)


def labels_from_confusion(matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    """Expand a confusion matrix into (y_true, y_pred) label arrays that reproduce it.

    Lets label-based tools (the bootstrap, scikit-learn) run on a published matrix.
    """
    counts = validate_confusion_matrix(matrix)
    num_classes = counts.shape[0]
    true_index, predicted_index = np.indices((num_classes, num_classes))
    repeats = counts.ravel()
    return (
        np.repeat(true_index.ravel(), repeats).astype(np.int64),
        np.repeat(predicted_index.ravel(), repeats).astype(np.int64),
    )


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def metrics_from_confusion(matrix: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Every matrix-derived metric, as a JSON-ready dict.

    Keys: ``classes``, ``n``, ``accuracy``, ``per_class`` (name -> precision, recall,
    specificity, f1, support, tp, fp, fn, tn), ``macro`` and ``weighted`` (averages of
    ``AVERAGED_METRICS``; weighted by support), ``confusion_matrix`` (counts),
    ``confusion_matrix_normalized`` (rows) and ``notes``. Works on the study's published
    matrices as well as on ours, so both are computed by the same code.
    """
    counts = validate_confusion_matrix(matrix)
    names = list(class_names)
    num_classes = _check_class_names(names)
    if counts.shape[0] != num_classes:
        raise ValueError(
            f"the confusion matrix is {counts.shape[0]} x {counts.shape[0]} "
            f"but there are {num_classes} class names"
        )
    table = one_vs_rest(counts)
    true_positive, false_positive, false_negative, true_negative = table.T
    total = int(counts.sum())
    support = true_positive + false_negative
    predicted = true_positive + false_positive
    precision = _safe_ratio(true_positive, predicted)
    recall = _safe_ratio(true_positive, support)
    specificity = _safe_ratio(true_negative, true_negative + false_positive)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    values = {"precision": precision, "recall": recall, "specificity": specificity, "f1": f1}

    notes = []
    for index, name in enumerate(names):
        if support[index] == 0:
            notes.append(f"{name}: no true samples; its recall and F1 are reported as 0")
        if predicted[index] == 0:
            notes.append(f"{name}: never predicted; its precision is reported as 0")

    weights = support / total
    per_class = {
        name: {
            **{metric: float(values[metric][index]) for metric in AVERAGED_METRICS},
            "support": int(support[index]),
            **{column: int(table[index, j]) for j, column in enumerate(ONE_VS_REST_COLUMNS)},
        }
        for index, name in enumerate(names)
    }
    return {
        "classes": names,
        "n": total,
        "accuracy": float(np.trace(counts) / total),
        "per_class": per_class,
        "macro": {metric: float(values[metric].mean()) for metric in AVERAGED_METRICS},
        "weighted": {
            metric: float(np.sum(values[metric] * weights)) for metric in AVERAGED_METRICS
        },
        "confusion_matrix": counts.tolist(),
        "confusion_matrix_normalized": normalize_rows(counts).tolist(),
        "notes": notes,
    }


# --------------------------------------------------------------------------- ROC


def roc_auc_per_class(
    y_true: Any, y_prob: Any, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """One-vs-rest ROC AUC of each class (scikit-learn ``roc_auc_score`` on class k's
    probability against "is class k"), and notes.

    AUC is undefined when a class has no positive or no negative sample; that class gets
    NaN and a note instead of an exception, so evaluating a small or unbalanced subset
    still yields a report.
    """
    from sklearn.metrics import roc_auc_score

    probabilities = validate_probabilities(y_prob)
    num_classes = probabilities.shape[1]
    labels = validate_labels(y_true, num_classes)
    _check_same_length(labels, probabilities)
    names = [f"class {index}" for index in range(num_classes)]
    if class_names is not None:
        if _check_class_names(class_names) != num_classes:
            raise ValueError(f"y_prob has {num_classes} columns but class_names {len(class_names)}")
        names = list(class_names)
    aucs = np.full(num_classes, np.nan)
    notes = []
    for index in range(num_classes):
        positive = labels == index
        if positive.all() or not positive.any():
            kind = "no" if not positive.any() else "only"
            notes.append(f"{names[index]}: {kind} positive samples; its ROC AUC is undefined")
            continue
        aucs[index] = roc_auc_score(positive, probabilities[:, index])
    return aucs, notes


def roc_curves(
    y_true: Any, y_prob: Any, class_names: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC curve points per class, for plotting: name -> ``fpr``, ``tpr``,
    ``thresholds`` (lists; infinite thresholds become ``None`` so the dict is JSON-ready).
    A class whose curve is undefined (no positives or no negatives) is left out."""
    from sklearn.metrics import roc_curve

    labels, probabilities = validate_inputs(y_true, y_prob, class_names)
    curves = {}
    for index, name in enumerate(class_names):
        positive = labels == index
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thresholds = roc_curve(positive, probabilities[:, index])
        curves[name] = {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "thresholds": [float(t) if np.isfinite(t) else None for t in thresholds],
        }
    return curves


def _check_same_length(labels: np.ndarray, probabilities: np.ndarray) -> None:
    if labels.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"y_true has {labels.shape[0]} samples but y_prob has {probabilities.shape[0]} rows"
        )


# --------------------------------------------------------------------------- bootstrap


def _batched_confusion(
    labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray, num_classes: int
) -> np.ndarray:
    """Confusion matrices of many resamples at once: (B, K, K) from (B, N) indices, with one
    ``bincount`` over resample-offset codes instead of a Python loop."""
    resamples = indices.shape[0]
    codes = labels[indices] * num_classes + predictions[indices]
    codes += (np.arange(resamples, dtype=np.int64) * num_classes * num_classes)[:, None]
    flat = np.bincount(codes.ravel(), minlength=resamples * num_classes * num_classes)
    return flat.reshape(resamples, num_classes, num_classes)


def bootstrap_intervals(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals for accuracy, macro-F1 and per-class recall.

    Resamples the (true, predicted) pairs with replacement ``resamples`` times (a seeded
    ``numpy.random.Generator``, so the same seed gives the same intervals), computes each
    resample's confusion matrix in one vectorised pass, and takes the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles. A class absent from
    a resample has no recall there; that resample is skipped for that class only.

    Returns ``{"confidence", "resamples", "seed", "accuracy": [low, high], "macro_f1":
    [low, high], "recall": [[low, high] per class]}``.
    """
    labels = validate_labels(y_true, num_classes)
    predictions = validate_labels(y_pred, num_classes, name="y_pred")
    if labels.shape != predictions.shape:
        raise ValueError(
            f"y_true has {labels.shape[0]} samples but y_pred has {predictions.shape[0]}"
        )
    _check_bootstrap_settings(resamples, confidence)
    accuracy, macro_f1, recall = _bootstrap_statistics(
        labels, predictions, num_classes, resamples, seed
    )
    return {
        "confidence": confidence,
        "resamples": int(resamples),
        "seed": seed,
        "accuracy": _percentile_interval(accuracy, confidence),
        "macro_f1": _percentile_interval(macro_f1, confidence),
        "recall": [
            _percentile_interval(recall[:, index], confidence) for index in range(num_classes)
        ],
    }


def _check_bootstrap_settings(resamples: int, confidence: float) -> None:
    """At least two resamples (an integer) and a confidence strictly between 0 and 1."""
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer):
        raise ValueError(f"resamples must be an integer, got {resamples!r}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _bootstrap_statistics(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy (B,), macro-F1 (B,) and per-class recall (B, K, NaN where the class is
    absent) of ``resamples`` seeded resamples of the (true, predicted) pairs.

    Resamples are drawn chunk by chunk (``_BOOTSTRAP_CHUNK_ENTRIES``) from one seeded
    generator, so the memory stays bounded whatever the resample count.
    """
    generator = np.random.default_rng(seed)
    samples = labels.shape[0]
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // samples)
    accuracy = np.empty(resamples)
    macro_f1 = np.empty(resamples)
    recall = np.empty((resamples, num_classes))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        indices = generator.integers(0, samples, size=(stop - start, samples))
        counts = _batched_confusion(labels, predictions, indices, num_classes)
        accuracy[start:stop], macro_f1[start:stop], recall[start:stop] = _resample_metrics(
            counts, samples
        )
    return accuracy, macro_f1, recall


def _resample_metrics(
    counts: np.ndarray, samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, macro-F1 and per-class recall of a stack of confusion matrices (B, K, K).

    Recall is NaN for a class absent from a resample (it has no recall there, and the
    interval skips it); inside the F1 it counts as 0, like a precision of a class never
    predicted, as ``metrics_from_confusion`` reports them.
    """
    true_positive = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    support = counts.sum(axis=2)
    predicted = counts.sum(axis=1)
    accuracy = true_positive.sum(axis=1) / samples
    with np.errstate(divide="ignore", invalid="ignore"):
        class_recall = np.where(support > 0, true_positive / support, np.nan)
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
    recall_zeroed = np.nan_to_num(class_recall, nan=0.0)
    denominator = precision + recall_zeroed
    f1 = _safe_ratio(2 * precision * recall_zeroed, denominator)
    return accuracy, f1.mean(axis=1), class_recall


def _percentile_interval(values: np.ndarray, confidence: float) -> list[float | None]:
    """The central ``confidence`` percentile interval of the finite values, or
    ``[None, None]`` when there are none (a class absent from every resample)."""
    quantiles = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [None, None]
    return [float(q) for q in np.percentile(finite, quantiles)]


# --------------------------------------------------------------------------- the report


def classification_report(
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluate stage's full report, JSON-ready (NaN becomes ``None``).

    ``metrics_from_confusion`` of the argmax predictions, plus ``macro_f1`` at the top
    level, per-class and macro ``roc_auc`` (the macro over classes where it is defined),
    and ``confidence_intervals`` from ``bootstrap_intervals`` (recall keyed by class name;
    ``resamples=0`` skips them).
    """
    labels, probabilities = validate_inputs(y_true, y_prob, class_names)
    names = list(class_names)
    predictions = probabilities.argmax(axis=1)
    report = metrics_from_confusion(confusion_matrix(labels, predictions, len(names)), names)
    aucs, auc_notes = roc_auc_per_class(labels, probabilities, names)
    for index, name in enumerate(names):
        report["per_class"][name]["roc_auc"] = _finite_or_none(aucs[index])
    report["macro"]["roc_auc"] = (
        _finite_or_none(float(np.nanmean(aucs))) if np.isfinite(aucs).any() else None
    )
    report["notes"] += auc_notes
    report["macro_f1"] = report["macro"]["f1"]
    if resamples:
        intervals = bootstrap_intervals(
            labels, predictions, len(names), resamples=resamples, confidence=confidence, seed=seed
        )
        intervals["recall"] = dict(zip(names, intervals["recall"], strict=True))
        report["confidence_intervals"] = intervals
    return report


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``name -> number`` view of a report for ``metrics/<stage>.json`` and MLflow:
    accuracy, macro and weighted averages, and ``<class>_<metric>`` per class. Undefined
    values (``None``) are left out rather than written as NaN."""
    flat: dict[str, float] = {"accuracy": report["accuracy"]}
    for average in ("macro", "weighted"):
        for metric, value in report[average].items():
            if value is not None:
                flat[f"{average}_{metric}"] = value
    for name, values in report["per_class"].items():
        for metric in (*AVERAGED_METRICS, "roc_auc"):
            if values.get(metric) is not None:
                flat[f"{name}_{metric}"] = values[metric]
    intervals = report.get("confidence_intervals")
    if intervals:
        for metric in ("accuracy", "macro_f1"):
            low, high = intervals[metric]
            if low is not None:
                flat[f"{metric}_ci_low"], flat[f"{metric}_ci_high"] = low, high
    return flat


# --------------------------------------------------------------------------- rendering


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_table(
    reports: Mapping[str, Mapping[str, Any]], *, digits: int = 3, class_names: Sequence[str] = ()
) -> str:
    """A Markdown table comparing models, one row per report (e.g. base, fine-tuned, and
    the study's matrices through ``metrics_from_confusion``).

    Columns: model, n, accuracy (with its bootstrap interval when the report has one),
    macro-F1, then precision/recall/F1 of each class (the study's layout). ``class_names``
    defaults to the first report's classes; every report must have them all.
    """
    if not reports:
        raise ValueError("comparison_table needs at least one report")
    first = next(iter(reports.values()))
    names = list(class_names) or list(first["classes"])
    for label, report in reports.items():
        missing = [name for name in names if name not in report["per_class"]]
        if missing:
            raise ValueError(f"report {label!r} lacks classes {missing}")
    header = ["model", "n", "accuracy", "macro F1", *(f"{name} P/R/F1" for name in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        accuracy = _number(report["accuracy"], digits)
        intervals = report.get("confidence_intervals")
        if intervals and intervals["accuracy"][0] is not None:
            low, high = intervals["accuracy"]
            accuracy += f" [{_number(low, digits)}, {_number(high, digits)}]"
        cells = [
            str(label),
            str(report["n"]),
            accuracy,
            _number(report["macro"]["f1"], digits),
            *(
                "/".join(
                    _number(report["per_class"][name][metric], digits)
                    for metric in ("precision", "recall", "f1")
                )
                for name in names
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
