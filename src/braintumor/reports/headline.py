"""The few numbers a team compares between experiments, picked from evaluate's detail.

``metrics/eval.json`` holds every number the evaluate stage computes (hundreds: per model,
per view, per class, intervals, calibration, robustness). As DVC metrics they made
``dvc metrics show``, ``dvc metrics diff`` and ``dvc exp show`` hundreds of columns wide.
The headline keeps, for the fine-tuned model (the one that is served): accuracy, macro-F1
and the calibrated ECE on every test view, the per-class recall and its minimum on the two
headline views (all of the test set, and its leakage-free part), the worst accuracy under the
robustness perturbations and the out-of-distribution detector's false-alarm rates (real
test slices it would refuse). It is written as ``metrics/evaluate.json``, the stage's DVC
metric, and the same numbers are the pipeline run's metrics in MLflow (``flat_headline``),
so the two tools compare experiments on one set. The detail stays in ``metrics/eval.json``;
the evaluate run in MLflow gets a few dozen of its numbers (``evaluation_run_metrics``) and
all of it as tables (``detail_tables``).

Pure: dicts in, a dict out, so it is tested on small dicts and applied to any old
``eval.json`` to see what its headline would have been.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

HEADLINE_MODEL = "finetuned"
RECALL_VIEWS = ("test", "leakage_free")
VIEW_FIELDS = {"accuracy": "accuracy", "macro_f1": "macro_f1", "ece": "ece_after"}
DIGITS = 4


class HeadlineError(ValueError):
    """The detail dict lacks what every headline needs (the served model's test view)."""


def _number(value: Any) -> float | None:
    """A rounded float (an int stays an int: a count), or None for a missing or
    non-numeric value (bools are flags)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if isinstance(value, int) else round(float(value), DIGITS)


def _views(flat: Mapping[str, Any]) -> list[str]:
    """The view names of one model's flat numbers (``<view>.accuracy``), test views first
    so the headline reads in the same order whatever order the detail had."""
    names = {key.rsplit(".", 1)[0] for key in flat if key.endswith(".accuracy")}
    return sorted(
        names, key=lambda name: (RECALL_VIEWS.index(name) if name in RECALL_VIEWS else 9, name)
    )


def _view_headline(flat: Mapping[str, Any], view: str, classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, ECE and (on the headline views) recall per class of one view;
    a number the detail does not have (an undefined recall) is left out, not invented."""
    numbers: dict[str, Any] = {}
    for name, key in VIEW_FIELDS.items():
        value = _number(flat.get(f"{view}.{key}"))
        if value is not None:
            numbers[name] = value
    if view in RECALL_VIEWS:
        recall = {name: _number(flat.get(f"{view}.{name}_recall")) for name in classes}
        numbers["recall"] = {name: value for name, value in recall.items() if value is not None}
        if numbers["recall"]:  # the weakest class: what the registry gate checks
            numbers["min_recall"] = min(numbers["recall"].values())
    return numbers


def evaluation_headline(detail: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """The headline of an ``eval.json`` detail dict (``{model: {"<view>.<metric>": x}}``).

    Nested by view (``test.accuracy``, ``test.recall.glioma``) so DVC's flattened column
    names stay short and one ``--keep``/``--drop`` pattern selects a group of them.
    Raises ``HeadlineError`` when the served model or its test view is missing.
    """
    flat = detail.get(HEADLINE_MODEL)
    if not isinstance(flat, Mapping) or _number(flat.get("test.accuracy")) is None:
        raise HeadlineError(f"eval detail: no {HEADLINE_MODEL!r} model with a test.accuracy")
    headline: dict[str, Any] = {view: _view_headline(flat, view, classes) for view in _views(flat)}
    perturbed = _numbers(
        flat, lambda key: key.startswith("robustness.") and key != "robustness.clean"
    )
    if perturbed:
        headline["robustness"] = {"worst_accuracy": min(perturbed.values())}
    false_alarms = _numbers(
        flat, lambda key: key.startswith("ood.") and key.endswith(".false_alarms")
    )
    if false_alarms:  # per view; DVC shows ood.test.false_alarms (not the fitted threshold)
        headline["ood"] = {key.removeprefix("ood."): value for key, value in false_alarms.items()}
    return headline


def _numbers(flat: Mapping[str, Any], wanted: Callable[[str], bool]) -> dict[str, float]:
    """The rounded numbers of the keys ``wanted`` picks; anything else is skipped."""
    picked = {key: _number(value) for key, value in flat.items() if wanted(key)}
    return {key: value for key, value in picked.items() if value is not None}


def count_keys(metrics: Mapping[str, Any]) -> int:
    """How many leaf numbers a metrics dict holds: the columns DVC will show for it."""
    return sum(count_keys(value) if isinstance(value, Mapping) else 1 for value in metrics.values())


def flat_headline(headline: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The headline's numbers under DVC's flattened names (``test.recall.glioma``): the
    pipeline run's metrics in MLflow, so its columns and ``dvc exp show``'s read alike."""
    flat: dict[str, float] = {}
    for key, value in headline.items():
        if isinstance(value, Mapping):
            flat.update(flat_headline(value, f"{prefix}{key}."))
        elif (number := _number(value)) is not None:
            flat[f"{prefix}{key}"] = number
    return flat


# The evaluate run's metrics, under eval.json's names. On the headline views the served
# model keeps what the registry gate reads (accuracy, macro-F1, calibrated ECE, recall per
# class; `registry.gate_metrics`), another model its accuracy and macro-F1.
SERVED_VIEW_FIELDS = ("accuracy", "macro_f1", "ece_after")
OTHER_MODEL_FIELDS = ("accuracy", "macro_f1")


def _run_keys(model: str, view: str, classes: Sequence[str]) -> list[str]:
    if model == HEADLINE_MODEL and view in RECALL_VIEWS:
        fields = [*SERVED_VIEW_FIELDS, *(f"{name}_recall" for name in classes)]
    elif model == HEADLINE_MODEL:
        fields = ["accuracy"]
    elif view in RECALL_VIEWS:
        fields = list(OTHER_MODEL_FIELDS)
    else:
        fields = []
    return [f"{view}.{field}" for field in fields]


def evaluation_run_metrics(
    detail: Mapping[str, Any], classes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """A few dozen numbers of an ``eval.json`` detail, nested like it (``{model: {"<view>.
    <metric>": x}}``), for the evaluate run: hundreds of metrics (every view, class and
    statistic) are too many to chart or scan in MLflow, and ``detail_tables`` holds them
    all. The served model keeps accuracy, macro-F1, calibrated ECE and recall per class on
    the headline views, accuracy on the others, its temperature and the OOD detector's
    false alarms; another model its accuracy and macro-F1 on the headline views."""
    picked: dict[str, dict[str, float]] = {}
    for model, flat in detail.items():
        if not isinstance(flat, Mapping):
            continue
        keys = [key for view in _views(flat) for key in _run_keys(model, view, classes)]
        if model == HEADLINE_MODEL:
            keys += ["temperature", *(key for key in flat if _is_false_alarm_rate(key))]
        numbers = {key: _number(flat.get(key)) for key in keys}
        picked[model] = {key: value for key, value in numbers.items() if value is not None}
    return picked


def _is_false_alarm_rate(key: str) -> bool:
    return key.startswith("ood.") and key.endswith(".false_alarms")


def detail_tables(detail: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every number of an ``eval.json`` detail as two tables for the MLflow UI: ``views``,
    one row per model and test view with one column per statistic (accuracy, intervals,
    per-class precision, recall, specificity, F1 and ROC AUC, calibration, count), and
    ``model``, one row per model and number that belongs to no view (temperature, each
    robustness perturbation, the OOD detector)."""
    views: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    for model, flat in detail.items():
        if not isinstance(flat, Mapping):
            continue
        names = _views(flat)
        for view in names:
            row: dict[str, Any] = {"model": model, "view": view}
            row.update(
                {
                    key.removeprefix(f"{view}."): value
                    for key, value in flat.items()
                    if key.startswith(f"{view}.")
                }
            )
            views.append(row)
        for key, value in flat.items():
            if not any(key.startswith(f"{view}.") for view in names):
                model_rows.append({"model": model, "name": key, "value": value})
    return {"views": views, "model": model_rows}


# A training phase's headline: what decides whether it worked. The detail (timings,
# throughput, parameter counts, the backend) changes on every run and would fill
# `dvc exp show --only-changed` with columns nobody compares.
PHASE_KEYS = ("best_epoch", "best_val_loss", "best_val_accuracy", "epochs_run")


def phase_headline(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/<phase>_headline.json`` from a phase's ``metrics/<phase>.json``; whether
    fine-tuning kept its starting weights as 0/1 (DVC compares numbers)."""
    headline = _numbers(detail, lambda key: key in PHASE_KEYS)
    if isinstance(detail.get("kept_starting_weights"), bool):
        headline["kept_starting_weights"] = int(detail["kept_starting_weights"])
    return headline


PREPROCESS_KEYS = ("images", "test_leakage_free", "val_with_train_neighbour", "neighbour_groups")


def preprocess_headline(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/preprocess_headline.json``: rows per split and the split's leakage
    numbers; not the data digest, the worker count or the timing."""
    headline: dict[str, Any] = _numbers(detail, lambda key: key in PREPROCESS_KEYS)
    counts = detail.get("counts", {})
    if isinstance(counts, Mapping):
        headline["counts"] = _numbers(counts, lambda key: True)
    return headline


def data_headline(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/data_headline.json`` from clean's ``metrics/data.json``: images kept (in
    all and per source and split), duplicate groups (in all, across sources, across
    splits) and the test images with a training twin or none. Nested like the detail."""
    duplicates = detail.get("duplicates", {})
    leakage = detail.get("leakage", {})
    headline: dict[str, Any] = {"kept": _number(detail.get("kept"))}
    by_source = detail.get("kept_by_source_split", {})
    if isinstance(by_source, Mapping) and by_source:
        headline["kept_by_source"] = {
            f"{source}.{split}": _number(count)
            for source, splits in by_source.items()
            for split, count in splits.items()
        }
    headline["duplicates"] = _numbers(
        duplicates, lambda key: key in ("groups", "cross_source_groups", "cross_split_groups")
    )
    headline["leakage"] = _numbers(
        leakage, lambda key: key in ("test_with_train_twin", "kept_test_leakage_free")
    )
    return {key: value for key, value in headline.items() if value not in (None, {})}
