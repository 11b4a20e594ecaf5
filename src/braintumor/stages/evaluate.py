"""The ``evaluate`` stage: honest metrics, calibration, explanations and the model bundle.

Both models (after phase 1, "base"; after phase 2, "fine-tuned") are scored on the test
set three ways: all of it, its leakage-free subset (no training twin and no same-patient
neighbour, from the clean stage) and per source. Each view gets accuracy, per-class
precision / recall / specificity / F1 / support, macro and weighted averages, the
confusion matrix and its one-vs-rest table, one-vs-rest ROC AUC and bootstrap intervals.
A temperature fitted on the validation split only calibrates the test probabilities; the
expected calibration error is reported before and after.

Outputs: ``metrics/evaluate.json``, the DVC metric (a short headline, ``headline.py``:
``dvc metrics diff`` and ``dvc exp show`` compare experiments on it), ``metrics/eval.json``
(every number, logged to MLflow),
a Markdown + JSON comparison with the study's published numbers (recomputed from its
confusion matrices), confusion matrices and ROC curves as DVC plot tables and figures,
Grad-CAM and occlusion figures, and the fine-tuned model's bundle (``bundle.py``, with the
out-of-distribution detector ``ood.npz`` from ``ood.py``), which the registry and the app
serve. The stage logs all of it to an MLflow child run of the
pipeline's run and registers the bundle as a new version with the alias ``challenger``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.config import load_params
from braintumor.core.schema import ConfigError, Params
from braintumor.model.backend import configure_backend
from braintumor.model.saved import SavedModelError, load_classifier
from braintumor.reports.headline import evaluation_headline

MODELS = ("base", "finetuned")
EXPORT_CHECK_IMAGES = 32  # validation images the exported model's parity is checked on
VIEW_TEST = "test"
VIEW_LEAKAGE_FREE = "leakage_free"


class EvaluateError(ValueError):
    """The models or data cannot be evaluated together (wrong file, wrong class list)."""


def load_keras_model(path: Path, num_classes: int) -> Any:
    """The trained model at ``path``, checked (``model.saved.load_classifier``)."""
    try:
        return load_classifier(path, num_classes)
    except SavedModelError as error:
        raise EvaluateError(str(error)) from None


def gradcam_layer(params: Params, model: Any) -> str:
    """The Grad-CAM layer: ``model.gradcam_layer``, or the backbone's last convolutional
    block when it is ``auto``; an error if the model has no such layer."""
    from braintumor.model.classifier import feature_layer_name

    name = params.model.gradcam_layer
    if name == "auto":
        name = feature_layer_name(params.model.backbone)
    if name not in {layer.name for layer in model.layers}:
        raise EvaluateError(f"model.gradcam_layer: the model has no layer {name!r}")
    return name


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax outputs for a uint8 (N, H, W, 1) array, batch by batch from the memory map."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        outputs.append(np.asarray(model.predict_on_batch(batch), dtype=np.float64))
    if not outputs:
        return np.zeros((0, int(model.output_shape[-1])))
    return np.concatenate(outputs)


def test_views(index: Any) -> dict[str, np.ndarray]:
    """Row masks of the test set: all of it (with two sources, the study's composite test
    set), its leakage-free subset, and each source's Testing folder (``msoud_test``,
    ``sartaj_test``: the study's second source's test images are SARTAJ's Testing folder)
    and, with several sources, each one's leakage-free part (``msoud_leakage_free``).

    A test image found in both sources' Testing folders is kept once (clean's policy), under
    the source whose copy has more pixels, so a source's view can hold fewer images than its
    folder."""
    views = {
        VIEW_TEST: np.ones(len(index), dtype=bool),
        VIEW_LEAKAGE_FREE: index["leakage_free"].astype(bool).to_numpy(),
    }
    sources = sorted(index["source"].unique())
    for source in sources:
        views[f"{source}_test"] = (index["source"] == source).to_numpy()
        if len(sources) > 1:  # the mixed leakage-free view hides very different sources
            views[f"{source}_leakage_free"] = views[f"{source}_test"] & views[VIEW_LEAKAGE_FREE]
    return views


def read_raw_grays(raw_dir: Path, paths: list[str]) -> list[np.ndarray]:
    """The raw gray slices of index paths (relative to ``data/raw``), decoded as clean did."""
    from braintumor.data.imaging import ImageDecodeError, decode_image

    grays = []
    for relative in paths:
        path = raw_dir / relative
        try:
            grays.append(decode_image(path.read_bytes(), name=str(path)).gray)
        except (OSError, ImageDecodeError) as error:
            raise EvaluateError(f"{path}: cannot read the raw test image ({error})") from None
    return grays


def robustness_view(
    predict: Any, raw_grays: list[np.ndarray], labels: np.ndarray, params: Params
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Accuracy of ``predict`` (uint8 images, batch size -> probabilities) on the raw test
    slices under each perturbation of ``evaluate.robustness`` (clean first), each perturbed
    before the project's preprocessing, as an upload would be (``robustness.py``); and the
    probabilities per perturbation."""
    from braintumor.evaluation.robustness import (
        perturbation_names,
        perturbed_inputs,
        robustness_table,
    )

    settings = params.evaluate.robustness
    predictions = {}
    for name in perturbation_names(settings):
        images = perturbed_inputs(
            raw_grays, name, params.common.image_size, params.preprocess, settings.seed
        )
        predictions[name] = predict(images, params.evaluate.batch_size)
    return robustness_table(labels, predictions), predictions


def evaluate_probabilities(
    val_labels: np.ndarray,
    val_probabilities: np.ndarray,
    val_leakage_free: np.ndarray,
    test_labels: np.ndarray,
    test_probabilities: np.ndarray,
    views: dict[str, np.ndarray],
    params: Params,
    val_flagged: np.ndarray | None = None,
) -> dict[str, Any]:
    """Calibrate on validation, then report every test view (pure: arrays in, dict out).

    The calibration is fitted on the validation rows without a training neighbour, less
    those the label audit flagged (``val_flagged``) under ``fit_view: val_unflagged``
    (``evaluate.calibration``; see ``calibration.calibrate``), never on test; every view
    reports its ECE and NLL before and after it, validation included."""
    from braintumor.evaluation.calibration import apply_calibration, calibrate, calibration_summary
    from braintumor.evaluation.metrics import classification_report

    settings = params.evaluate
    classes = list(params.common.classes)
    bins = settings.calibration_bins
    fit = calibrate(
        val_labels, val_probabilities, val_leakage_free, settings.calibration, val_flagged
    )
    calibrated = apply_calibration(test_probabilities, fit)
    result: dict[str, Any] = {
        "temperature": fit.temperature,
        "calibration": fit.to_dict(),
        "validation": calibration_summary(
            val_labels, val_probabilities, apply_calibration(val_probabilities, fit), bins
        ),
        "views": {},
    }
    for name, mask in views.items():
        if not mask.any():
            continue
        report = classification_report(
            test_labels[mask],
            calibrated[mask],
            classes,
            resamples=settings.bootstrap_resamples,
            confidence=settings.confidence,
            seed=params.common.seed,
        )
        report["calibration"] = calibration_summary(
            test_labels[mask], test_probabilities[mask], calibrated[mask], bins
        )
        report["count"] = int(mask.sum())
        result["views"][name] = report
    result["calibrated"] = calibrated
    return result


def model_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The flat numbers of ``metrics/eval.json`` for one model: per view, the summary."""
    from braintumor.evaluation.metrics import summary_metrics

    flat: dict[str, float] = {
        "temperature": round(float(result["temperature"]), 4),
        "calibration_at_bound": bool(result["calibration"]["at_bound"]),
    }
    for view, report in result["views"].items():
        for key, value in summary_metrics(report).items():
            flat[f"{view}.{key}"] = value
        for key, value in report["calibration"].items():
            flat[f"{view}.{key}"] = round(float(value), 4)
        flat[f"{view}.count"] = report["count"]
    return flat


def study_reports(params: Params) -> dict[str, dict[str, Any]]:
    """The study's reported models, recomputed from its published confusion matrices."""
    from braintumor.evaluation.metrics import metrics_from_confusion

    classes = list(params.common.classes)
    return {
        "study base (recomputed)": metrics_from_confusion(
            np.array(params.evaluate.study_base_matrix), classes
        ),
        "study fine-tuned (recomputed)": metrics_from_confusion(
            np.array(params.evaluate.study_finetuned_matrix), classes
        ),
    }


def confusion_rows(report: dict[str, Any], classes: list[str], model: str) -> list[dict]:
    """Long-format rows (actual, predicted) for DVC's confusion template."""
    matrix = np.asarray(report["confusion_matrix"])
    rows = []
    for i, actual in enumerate(classes):
        for j, predicted in enumerate(classes):
            rows.extend(
                {"model": model, "actual": actual, "predicted": predicted}
                for _ in range(int(matrix[i, j]))
            )
    return rows


def roc_rows(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], model: str):
    """Long-format ROC points per class for a DVC linear plot."""
    from braintumor.evaluation.metrics import roc_curves

    rows = []
    for name, curve in roc_curves(labels, probabilities, classes).items():
        for fpr, tpr in zip(curve["fpr"], curve["tpr"], strict=True):
            rows.append({"model": model, "class": name, "fpr": round(fpr, 5), "tpr": round(tpr, 5)})
    return rows


def explanation_examples(
    labels: np.ndarray, predicted: np.ndarray, per_class: int, num_classes: int
) -> list[tuple[int, bool]]:
    """Per class, the first ``per_class`` correct and wrong test images: (row, correct)."""
    chosen = []
    for label in range(num_classes):
        rows = np.flatnonzero(labels == label)
        right = rows[predicted[rows] == label][:per_class]
        wrong = rows[predicted[rows] != label][:per_class]
        chosen += [(int(r), True) for r in right] + [(int(r), False) for r in wrong]
    return chosen


def explanation_figure(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    examples: list[tuple[int, bool]],
    params: Params,
    path: Path,
) -> None:
    """Grad-CAM and occlusion overlays of correctly and wrongly classified test images."""
    from braintumor.explain.gradcam import gradcam
    from braintumor.explain.occlusion import occlusion_sensitivity
    from braintumor.explain.overlay import overlay

    classes = params.common.classes
    rows = max(1, len(examples))
    from braintumor.reports.figures import new_figure, save_figure

    figure = new_figure(figsize=(7.5, 2.6 * rows))
    axes = figure.subplots(rows, 3, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    if examples:
        indices = [row for row, _ in examples]
        batch = np.asarray(images[indices], dtype=np.float32)
        predicted = probabilities[indices].argmax(axis=1)
        cams = gradcam(model, batch, gradcam_layer(params, model), predicted)
        occlusions = occlusion_sensitivity(
            model,
            batch,
            predicted,
            patch_size=params.evaluate.occlusion_patch,
            stride=params.evaluate.occlusion_stride,
        )
        for row, ((index, correct), cam, occlusion) in enumerate(
            zip(examples, cams, occlusions, strict=True)
        ):
            gray = np.asarray(images[index, :, :, 0])
            axes[row, 0].imshow(gray, cmap="gray", vmin=0, vmax=255)
            axes[row, 0].set_title(
                f"true {classes[labels[index]]}\npred {classes[predicted[row]]} "
                f"{probabilities[index].max():.2f} ({'right' if correct else 'WRONG'})",
                fontsize=7,
            )
            axes[row, 1].imshow(overlay(gray, cam, 0.45))
            axes[row, 1].set_title("Grad-CAM", fontsize=7)
            axes[row, 2].imshow(overlay(gray, occlusion, 0.45))
            axes[row, 2].set_title("occlusion", fontsize=7)
    save_figure(figure, path, dpi=100)


@dataclass
class Inputs:
    """What the stage evaluates: the processed splits, the test index and its views, the
    validation rows without a training neighbour, the two models, and the validation rows
    the label audit suspects (None without its table)."""

    data: Any
    test_index: Any
    views: dict[str, np.ndarray]
    val_leakage_free: np.ndarray
    models: dict[str, Any]
    val_flagged: np.ndarray | None = None
    # The fine-tuned model's val and test outputs (probabilities, pooled features, logits)
    # from score_models' forward pass, reused by the OOD fit instead of a second pass.
    finetuned_outputs: dict[str, Any] = field(default_factory=dict)
    # The fine-tuned model as exported for serving (``ServedForward``), when ``evaluate``
    # exported it first: the robustness view and the OOD fit's training pass run on it.
    served: Any = None


class ServedForward:
    """The exported graph that serving runs (``serving.export``), as the forward pass of
    the robustness view and of the OOD detector's training features: those ~25,000 images
    are most of the stage's inference, and LiteRT runs this model ~2.5x faster than Keras
    on these CPUs. It is the model users get, and the export has already checked it
    against Keras (probabilities within ``PARITY_TOLERANCE``); the stage also records the
    largest difference on every leakage-free test slice (``served.max_probability_diff``).
    The headline views stay on the Keras model."""

    runtime = "litert"

    def __init__(self, export: Any) -> None:
        from braintumor.explain.headcam import HeadParams
        from braintumor.serving.exported import ExportedModel

        self._graph = ExportedModel(export.model_file)
        self._head = HeadParams.load(export.head_file)

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> Any:
        """``ModelOutputs`` for uint8 images (N, S, S[, 1]), as ``FeatureExtractor``'s:
        probabilities before calibration, pooled features and the head's logits."""
        from braintumor.evaluation.ood import ModelOutputs

        parts: list[list[np.ndarray]] = [[], []]
        for start in range(0, len(images), batch_size):
            graph = self._graph(np.asarray(images[start : start + batch_size]))
            parts[0].append(graph.probabilities.astype(np.float64))
            parts[1].append(graph.pooled.astype(np.float64))
        if not parts[0]:
            raise EvaluateError("no images for the exported model")
        probabilities, features = (np.concatenate(part) for part in parts)
        return ModelOutputs(probabilities, features, self._head.forward(features)[0])

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities before calibration alone (no head pass for logits)."""
        parts = [
            self._graph(np.asarray(images[start : start + batch_size])).probabilities
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts).astype(np.float64)


@dataclass(frozen=True)
class EvaluatePaths:
    """Where the stage reads (the processed splits, the raw slices for the robustness view,
    the two models) and writes (metrics, reports, plot tables, figures, the bundle, the
    MLflow run file). ``raw``, ``headline`` and the run files are optional."""

    data: Path
    base_model: Path
    finetuned_model: Path
    metrics: Path
    report: Path
    plots: Path
    figures: Path
    bundle: Path
    raw: Path | None = None
    headline: Path | None = None
    parent_run_file: Path | None = None
    run_file: Path | None = None
    audit: Path | None = None
    label_issues: Path | None = None
    localisation: Path | None = None  # metrics/localisation_detail.json, for the model card


@dataclass
class Evaluation:
    """What ``evaluate`` found, before anything is written: the inputs it scored, both
    models' calibrated reports, the robustness rows, the OOD detector and its summary, and
    the detail metrics (``metrics/eval.json``; the headline is picked from them)."""

    inputs: Inputs
    results: dict[str, dict[str, Any]]
    robustness: list[dict]
    detector: Any
    metrics: dict[str, Any]
    export: Any = None  # the ExportResult ``evaluate`` made first, for the bundle


def load_inputs(paths: EvaluatePaths, params: Params) -> Inputs:
    import pandas as pd

    from braintumor.evaluation.robustness import perturbation_names
    from braintumor.training.inputs import load_processed

    perturbation_names(params.evaluate.robustness)  # a bad name fails before the models load
    data = load_processed(
        paths.data, params.common.classes, params.common.image_size, ("train", "val", "test")
    )
    test_index = pd.read_csv(paths.data / "test_index.csv")
    val_index = pd.read_csv(paths.data / "val_index.csv")
    if "leakage_free" in val_index:
        val_leakage_free = val_index["leakage_free"].astype(bool).to_numpy()
    else:  # a processed folder from before validation rows were flagged
        val_leakage_free = np.ones(len(val_index), dtype=bool)
    val_flagged = flagged_rows(paths.label_issues, "val", val_index["path"])
    if params.evaluate.calibration.fit_view == "val_unflagged" and val_flagged is None:
        raise EvaluateError(
            "evaluate.calibration.fit_view: val_unflagged needs --label-issues (the audit's "
            "metrics/label_issues.csv)"
        )
    model_paths = {"base": paths.base_model, "finetuned": paths.finetuned_model}
    models = {
        name: load_keras_model(path, len(params.common.classes))
        for name, path in model_paths.items()
    }
    return Inputs(data, test_index, test_views(test_index), val_leakage_free, models, val_flagged)


def flagged_rows(table: Path | None, split: str, paths: Any) -> np.ndarray | None:
    """Which rows of ``split`` (given by their index's ``path`` column) the label audit
    suspects of a wrong label (``metrics/label_issues.csv``); None without the table."""
    from braintumor.training.inputs import suspected_paths

    if table is None:
        return None
    chosen = sorted(suspected_paths(table, split))
    return np.isin(np.asarray(paths).astype(str), chosen)


def score_models(inputs: Inputs, params: Params) -> dict[str, dict[str, Any]]:
    """Both models' calibrated reports on every view (``evaluate_probabilities``). The
    fine-tuned model's pass also keeps its features for the OOD detector."""
    from braintumor.evaluation.ood import FeatureExtractor

    val, test = inputs.data.splits["val"], inputs.data.splits["test"]
    size = params.evaluate.batch_size
    results: dict[str, dict[str, Any]] = {}
    for name, model in inputs.models.items():
        if name == "finetuned" and params.evaluate.ood_method != "none":
            extractor = FeatureExtractor(model)
            outputs = {"val": extractor(val.images, size), "test": extractor(test.images, size)}
            inputs.finetuned_outputs.update(outputs)
            val_probabilities = outputs["val"].probabilities
            test_probabilities = outputs["test"].probabilities
        else:
            val_probabilities = predict_probabilities(model, val.images, size)
            test_probabilities = predict_probabilities(model, test.images, size)
        results[name] = evaluate_probabilities(
            val.labels,
            val_probabilities,
            inputs.val_leakage_free,
            test.labels,
            test_probabilities,
            inputs.views,
            params,
            inputs.val_flagged,
        )
        results[name]["raw"] = test_probabilities
    return results


def score_robustness(
    inputs: Inputs, raw_dir: Path | None, params: Params, results: dict[str, dict[str, Any]]
) -> tuple[list[dict], dict[str, Any]]:
    """The fine-tuned model (as served, when exported) on the leakage-free test slices
    under each perturbation; empty when turned off or when no raw folder is given. With
    the exported model, also how far its clean probabilities are from Keras's on the same
    slices (``score_models``' pass over the cached arrays)."""
    if raw_dir is None or not params.evaluate.robustness.enabled:
        return [], {}
    rows = inputs.views[VIEW_LEAKAGE_FREE]
    paths = inputs.test_index.loc[rows, "path"].tolist()
    labels = inputs.data.splits["test"].labels[rows]
    if inputs.served is not None:
        predict, runtime = inputs.served.probabilities, inputs.served.runtime
    else:
        model = inputs.models["finetuned"]
        predict, runtime = partial(predict_probabilities, model), "keras"
    table, predictions = robustness_view(predict, read_raw_grays(raw_dir, paths), labels, params)
    for row in table:  # which runtime scored it, in eval.json and the plot table
        row["runtime"] = runtime
    summary: dict[str, Any] = {}
    if inputs.served is not None and len(labels):
        keras_clean = np.asarray(results["finetuned"]["raw"])[rows]
        difference = np.abs(predictions["clean"] - keras_clean).max()
        summary["served.max_probability_diff"] = float(f"{difference:.3g}")
    return table, summary


def comparison_markdown(results: dict[str, dict[str, Any]], params: Params) -> str:
    """Base vs fine-tuned vs the study's recomputed numbers, per headline view."""
    from braintumor.evaluation.metrics import comparison_table

    study = study_reports(params)
    tables = []
    for view in (VIEW_TEST, VIEW_LEAKAGE_FREE):
        reports = {
            f"{name} ({view})": results[name]["views"][view]
            for name in MODELS
            if view in results[name]["views"]
        }
        if view == VIEW_TEST:
            reports.update(study)
        tables.append(
            f"### {view}\n\n" + comparison_table(reports, class_names=list(params.common.classes))
        )
    return (
        "# Evaluation: base vs fine-tuned vs the study\n\n"
        "Calibrated on the validation rows without a training neighbour. The study's rows are "
        "recomputed from its published confusion matrices (its printed 92.2% accuracy "
        "divided by the wrong total).\n\n" + "\n\n".join(tables) + "\n"
    )


def write_figures(
    folder: Path,
    inputs: Inputs,
    results: dict[str, dict[str, Any]],
    robustness: list[dict],
    params: Params,
) -> tuple[list[dict], list[dict]]:
    """Every figure, atomically; returns the confusion and ROC plot rows."""
    from braintumor.core.files import atomic_path
    from braintumor.evaluation.calibration import reliability_figure
    from braintumor.evaluation.robustness import robustness_figure
    from braintumor.reports.figures import confusion_figure, roc_figure

    test = inputs.data.splits["test"]
    classes = list(params.common.classes)
    confusion, roc = [], []
    with atomic_path(folder, directory=True) as figures:
        for name in MODELS:
            report = results[name]["views"][VIEW_TEST]
            confusion += confusion_rows(report, classes, name)
            roc += roc_rows(test.labels, results[name]["calibrated"], classes, name)
            for view in (VIEW_TEST, VIEW_LEAKAGE_FREE):
                if view in results[name]["views"]:
                    confusion_figure(
                        np.asarray(results[name]["views"][view]["confusion_matrix"]),
                        classes,
                        f"{name}: {view}",
                        figures / f"confusion_{name}_{view}.png",
                    )
            roc_figure(
                [r for r in roc if r["model"] == name], f"ROC ({name})", figures / f"roc_{name}.png"
            )
            reliability_figure(
                test.labels,
                results[name]["raw"],
                results[name]["calibrated"],
                figures / f"reliability_{name}.png",
                bins=params.evaluate.calibration_bins,
            )
        if robustness:
            robustness_figure({"finetuned": robustness}, figures / "robustness.png")
        predicted = results["finetuned"]["calibrated"].argmax(axis=1)
        examples = explanation_examples(
            test.labels, predicted, params.evaluate.gradcam_examples, len(classes)
        )
        explanation_figure(
            inputs.models["finetuned"],
            test.images,
            test.labels,
            results["finetuned"]["calibrated"],
            examples,
            params,
            figures / "explanations.png",
        )
    return confusion, roc


def write_plot_tables(
    folder: Path, confusion: list[dict], roc: list[dict], robustness: list[dict]
) -> None:
    import pandas as pd

    from braintumor.core.files import atomic_path
    from braintumor.evaluation.robustness import robustness_rows_for_plot

    tables = {
        "confusion.csv": confusion,
        "roc.csv": roc,
        "robustness.csv": robustness_rows_for_plot({"finetuned": robustness}),
    }
    for name, rows in tables.items():
        with atomic_path(folder / name) as temporary:
            pd.DataFrame(
                rows, columns=None if rows else ["perturbation", "accuracy", "model"]
            ).to_csv(temporary, index=False)


def write_model_bundle(
    paths: EvaluatePaths,
    inputs: Inputs,
    results: dict[str, dict[str, Any]],
    params: Params,
    detector: Any = None,
    card: str | None = None,
    export: Any = None,
) -> Any:
    """The bundle, through its one writer: the model, its metadata, the OOD detector
    (when fitted), the exported model serving runs (``export``, from ``evaluate``; None
    off TensorFlow) and the model card, every file hashed into bundle.json."""
    from braintumor.serving.bundle import BundleMeta, InputStats, write_bundle

    return write_bundle(
        paths.bundle,
        paths.finetuned_model,
        BundleMeta(
            classes=tuple(params.common.classes),
            image_size=params.common.image_size,
            preprocess=params.preprocess,
            gradcam_layer=gradcam_layer(params, inputs.models["finetuned"]),
            temperature=float(results["finetuned"]["temperature"]),
            input_stats=InputStats.from_images(inputs.data.splits["train"].images),
            source={"data_digest": inputs.data.digest, "profile": params.profile},
            # The served map, also for a bundle Keras serves (serving.explanation).
            explanation={
                "method": params.serving.explanation.method,
                "layer": gradcam_layer(params, inputs.models["finetuned"])
                if params.serving.explanation.layer == "auto"
                else params.serving.explanation.layer,
                "gate_width": params.serving.explanation.gate_width,
            },
        ),
        detector,
        export,
        card,
    )


def export_for_bundle(inputs: Inputs, params: Params, folder: Path) -> Any:
    """The fine-tuned model exported for serving (``serving.export``: LiteRT, the head's
    parameters, parity with Keras checked on validation images), or None off the
    TensorFlow backend (the LiteRT converter needs TensorFlow's Keras; that bundle is
    then served by Keras). A failed parity check stops the stage with its one line."""
    import keras

    from braintumor.serving.export import ExportError, export_model

    if keras.backend.backend() != "tensorflow":
        print(f"evaluate: no exported model on the {keras.backend.backend()} backend")
        return None
    model = inputs.models["finetuned"]
    check = inputs.data.splits["val"].images[:EXPORT_CHECK_IMAGES]
    try:
        served = params.serving.explanation  # the localise stage's choice
        return export_model(
            model,
            gradcam_layer(params, model),
            folder,
            check,
            explanation=(served.method, served.layer),
            gate_width=served.gate_width,
        )
    except ExportError as error:
        raise EvaluateError(str(error)) from None


def fit_ood_detector(inputs: Inputs, params: Params) -> tuple[Any, dict[str, float]]:
    """The bundle's out-of-distribution detector (``ood.py``): fitted on the fine-tuned
    model's training outputs, thresholded on validation; and its false-alarm rate per test
    view, so a detector that would refuse too many real slices shows in the metrics.
    ``(None, {})`` when ``evaluate.ood_method`` is ``none``."""
    from braintumor.evaluation.ood import FeatureExtractor, fit_detector

    settings = params.evaluate
    if settings.ood_method == "none":
        return None, {}
    extractor = FeatureExtractor(inputs.models["finetuned"])
    splits = inputs.data.splits
    known = inputs.finetuned_outputs
    val = known.get("val") or extractor(splits["val"].images, settings.batch_size)
    outputs = known.get("test") or extractor(splits["test"].images, settings.batch_size)
    train = splits["train"]
    # The training pass is the stage's largest: on the exported graph when there is one
    # (the features serving computes); val and test reuse score_models' Keras pass.
    training = inputs.served or extractor
    detector = fit_detector(
        settings.ood_method,
        training(train.images, settings.batch_size),
        train.labels,
        val,
        settings.ood_false_alarm_rate,
    )
    refused = detector.is_outlier(detector.score(outputs.features, outputs.logits))
    summary = {"ood.threshold": round(detector.threshold, 4)}
    for view in (VIEW_TEST, VIEW_LEAKAGE_FREE):
        mask = inputs.views[view]
        if mask.any():
            summary[f"ood.{view}.false_alarms"] = round(float(refused[mask].mean()), 4)
    return detector, summary


def detail_metrics(results: dict[str, dict[str, Any]], robustness: list[dict]) -> dict[str, Any]:
    """``metrics/eval.json``: per model and view the summary, and the fine-tuned model's
    accuracy per perturbation."""
    metrics: dict[str, Any] = {name: model_metrics(result) for name, result in results.items()}
    for row in robustness:
        metrics["finetuned"][f"robustness.{row['perturbation']}"] = round(row["accuracy"], 4)
    return metrics


def external_views(audit: Path | None) -> dict[str, Any]:
    """The audit stage's external-validation views (phase 1's head trained without a source,
    scored on that source's Testing images) and the same head trained on every source, as
    the eval.json entries ``external`` and ``external_reference`` (flat, like a model's)."""
    import json

    if audit is None:
        return {}
    if not audit.is_file():
        raise EvaluateError(f"{audit}: not found; run the audit stage")
    found = json.loads(audit.read_text(encoding="utf-8"))
    return {key: found[key] for key in ("external", "external_reference") if found.get(key)}


def evaluate(params: Params, paths: EvaluatePaths, export_dir: Path) -> Evaluation:
    """Score both models on every view, the fine-tuned one under perturbations, and fit
    the OOD detector; writes nothing but the export (``write_evaluation`` writes the
    rest). The fine-tuned model is exported into ``export_dir`` first (parity checked) and
    the robustness view and the detector's training pass run on it (``ServedForward``)."""
    started = time.perf_counter()
    inputs = load_inputs(paths, params)
    export = export_for_bundle(inputs, params, export_dir)
    if export is not None:
        inputs.served = ServedForward(export)
    results = score_models(inputs, params)
    robustness, served_summary = score_robustness(inputs, paths.raw, params, results)
    detector, ood_summary = fit_ood_detector(inputs, params)
    metrics = detail_metrics(results, robustness)
    metrics["finetuned"].update(ood_summary)
    metrics["finetuned"].update(served_summary)
    metrics.update(external_views(paths.audit))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return Evaluation(inputs, results, robustness, detector, metrics, export)


def write_evaluation(evaluation: Evaluation, paths: EvaluatePaths, params: Params) -> Any:
    """Every output of the stage, each atomically: figures, the bundle (with the OOD
    detector beside model.keras, so it is registered with it), plot tables, the reports,
    eval.json and the headline file. Returns the bundle's metadata."""
    from braintumor.core.files import write_json, write_text

    inputs, results, robustness = evaluation.inputs, evaluation.results, evaluation.robustness
    confusion, roc = write_figures(paths.figures, inputs, results, robustness, params)
    card = model_card_text(evaluation, paths, params)
    bundle_meta = write_model_bundle(
        paths, inputs, results, params, evaluation.detector, card, evaluation.export
    )
    write_text(card_path(paths), card)  # also logged to the evaluate run with the reports
    write_plot_tables(paths.plots, confusion, roc, robustness)
    report_json: dict[str, Any] = {
        name: {k: v for k, v in result.items() if k not in ("calibrated", "raw")}
        for name, result in results.items()
    }
    report_json["study"] = study_reports(params)
    report_json["robustness"] = {"finetuned": robustness}
    write_json(paths.report.with_suffix(".json"), report_json)
    write_text(paths.report.with_suffix(".md"), comparison_markdown(results, params))
    write_json(paths.metrics, evaluation.metrics)
    if paths.headline is not None:
        write_json(paths.headline, evaluation_headline(evaluation.metrics, params.common.classes))
    return bundle_meta


def card_path(paths: EvaluatePaths) -> Path:
    """Where the model card goes: beside the comparison report (reports/MODEL_CARD.md)."""
    from braintumor.reports.model_card import CARD_FILE

    return paths.report.parent / CARD_FILE


def model_card_text(evaluation: Evaluation, paths: EvaluatePaths, params: Params) -> str:
    """The model card (``reports/model_card.py``) from this evaluation, the audit and the
    localisation detail when their files exist (the card says what was not measured when
    they do not). Built before the bundle is written (it names the model by the sha256 of
    the file the bundle copies), so that the bundle can carry it."""
    import json

    from braintumor.core.files import file_sha256
    from braintumor.reports.model_card import model_card

    def optional(path: Path | None) -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EvaluateError(f"{path}: not valid JSON ({error})") from None

    splits = evaluation.inputs.data.splits
    return model_card(
        evaluation.metrics,
        params.common.classes,
        model={
            "backbone": params.model.backbone,
            "input": f"{params.common.image_size} px grey",
            "profile": params.profile,
            "temperature": round(float(evaluation.results["finetuned"]["temperature"]), 3),
            "model.keras sha256": file_sha256(paths.finetuned_model)[:16],
            "data digest": str(evaluation.inputs.data.digest)[:16],
        },
        data={
            "sources": [source.name for source in params.acquire.sources],
            "splits": {name: len(split.labels) for name, split in splits.items()},
        },
        audit=optional(paths.audit),
        localisation=optional(paths.localisation),
    )


def run(params: Params, paths: EvaluatePaths, tracking: bool = True) -> dict[str, Any]:
    """The stage: evaluate, write, then log to MLflow and register. Returns eval.json."""
    import tempfile

    # The export comes first and lives until the bundle holds it (``evaluate``).
    with tempfile.TemporaryDirectory(prefix="braintumor-export-") as folder:
        evaluation = evaluate(params, paths, export_dir=Path(folder))
        bundle_meta = write_evaluation(evaluation, paths, params)
    if tracking:
        log_to_mlflow(evaluation, paths, params, bundle_meta)
    return evaluation.metrics


def log_to_mlflow(
    evaluation: Evaluation, paths: EvaluatePaths, params: Params, bundle_meta: Any
) -> None:
    """The evaluate run (a few dozen of eval.json's numbers, every one of them as tables
    and as the file; the registered bundle) and, on the pipeline run above it, the
    headline of ``metrics/evaluate.json``: the numbers experiments are compared on."""
    from braintumor.reports.headline import detail_tables, evaluation_run_metrics, flat_headline
    from braintumor.tracking import registry, runs

    classes = params.common.classes
    run_file = paths.run_file or paths.bundle.parent / "evaluate_run.json"
    registry.log_evaluation(
        params,
        project_root=Path.cwd(),
        parent_file=paths.parent_run_file,
        run_file=run_file,
        metrics=evaluation_run_metrics(evaluation.metrics, classes),
        figures=paths.figures,
        reports=[
            paths.report.with_suffix(".json"),
            paths.report.with_suffix(".md"),
            card_path(paths),
        ],
        bundle=paths.bundle,
        bundle_meta=bundle_meta,
    )
    runs.log_pipeline_results(
        params,
        project_root=Path.cwd(),
        run_file=run_file,
        metrics=flat_headline(evaluation_headline(evaluation.metrics, classes)),
        tables=detail_tables(evaluation.metrics),
        detail_file=paths.metrics,
        data=evaluation.inputs.data,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path, help="data/processed")
    parser.add_argument("--raw", type=Path, help="data/raw: test slices for the robustness view")
    parser.add_argument("--base-model", required=True, type=Path)
    parser.add_argument("--finetuned-model", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path, help="metrics/eval.json")
    parser.add_argument("--headline", type=Path, help="metrics/evaluate.json: the DVC metric")
    parser.add_argument("--report", required=True, type=Path, help="report path (.md/.json)")
    parser.add_argument("--plots", required=True, type=Path, help="folder for plot tables")
    parser.add_argument("--figures", required=True, type=Path)
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--parent-run-file", type=Path, help="finetune's MLflow run file")
    parser.add_argument("--run-file", type=Path, default=None, help="this stage's run file")
    parser.add_argument("--audit", type=Path, help="metrics/audit.json: the external views")
    parser.add_argument(
        "--label-issues",
        type=Path,
        help="metrics/label_issues.csv: validation rows left out of calibration (val_unflagged)",
    )
    parser.add_argument(
        "--localisation", type=Path, help="metrics/localisation_detail.json: the card's line"
    )
    parser.add_argument("--no-tracking", action="store_true", help="skip MLflow")
    args = vars(parser.parse_args(argv))
    params_file, tracking = args.pop("params"), not args.pop("no_tracking")
    try:
        params = load_params(params_file)
        configure_backend(params.train, Path(params_file).resolve().parent)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # Imported once the backend is set: data_loading imports keras.
    from braintumor.serving.bundle import BundleError
    from braintumor.training.inputs import DataError

    try:
        metrics = run(params, EvaluatePaths(**args), tracking=tracking)
    except (EvaluateError, ConfigError, DataError, BundleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    view = metrics["finetuned"]
    print(
        "evaluate: fine-tuned accuracy "
        f"{view.get('test.accuracy', float('nan')):.4f} on the test set, "
        f"{view.get('leakage_free.accuracy', float('nan')):.4f} leakage-free; temperature "
        f"{view['temperature']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
