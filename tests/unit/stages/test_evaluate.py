"""The evaluate stage on tiny real data with two small trained models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braintumor.serving.bundle import Bundle

from conftest import (
    TINY_FLAGGED_VAL_ROWS,
    TINY_OVERRIDES,
    TINY_SIZE,
    evaluate_args,
    write_params,
)

SIZE = TINY_SIZE


@pytest.fixture(scope="module")
def project(tiny_project: dict[str, Path]) -> dict[str, Path]:
    return tiny_project


def _args(project: dict[str, Path], out: Path, **replace: Path) -> list[str]:
    return [*evaluate_args(project, out, **replace), "--no-tracking"]


# The tiny validation split is smaller than the default minimum for a temperature fit;
# lowered here so that the stage really fits one (and the tests can check which data it used).
CALIBRATION_MIN_SAMPLES = 5


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory) -> Path:
    from braintumor.core.config import deep_merge
    from braintumor.stages.evaluate import main

    out = tmp_path_factory.mktemp("evaluated")
    overrides = deep_merge(
        TINY_OVERRIDES, {"evaluate": {"calibration": {"min_samples": CALIBRATION_MIN_SAMPLES}}}
    )
    params = write_params(out / "params", overrides)
    assert main(_args(project, out, params=params)) == 0
    return out


def test_metrics_cover_both_models_and_every_view(evaluated: Path, project) -> None:
    metrics = json.loads((evaluated / "metrics" / "eval.json").read_text())
    test = pd.read_csv(project["data"] / "test_index.csv")
    for model in ("base", "finetuned"):
        values = metrics[model]
        assert values["test.count"] == len(test)
        assert values["leakage_free.count"] == int(test["leakage_free"].sum())
        assert values["msoud_test.count"] == len(test)
        assert 0 <= values["test.accuracy"] <= 1
        assert values["test.accuracy_ci_low"] <= values["test.accuracy"]
        assert values["test.accuracy"] <= values["test.accuracy_ci_high"]
        assert values["temperature"] > 0
        for name in ("glioma", "meningioma", "notumor", "pituitary"):
            assert f"test.{name}_recall" in values and f"test.{name}_specificity" in values


def test_report_recomputes_the_study_and_tables_add_up(evaluated: Path, project) -> None:
    report = json.loads((evaluated / "eval.json").read_text())
    assert report["study"]["study fine-tuned (recomputed)"]["accuracy"] == pytest.approx(
        1690 / 1717
    )
    markdown = (evaluated / "eval.md").read_text()
    assert "study fine-tuned (recomputed)" in markdown and "0.984" in markdown
    n = report["finetuned"]["views"]["test"]["n"]
    matrix = np.array(report["finetuned"]["views"]["test"]["confusion_matrix"])
    assert matrix.sum() == n
    confusion = pd.read_csv(evaluated / "plots" / "confusion.csv")
    assert len(confusion) == 2 * n  # one row per test image per model
    roc = pd.read_csv(evaluated / "plots" / "roc.csv")
    assert set(roc["model"]) == {"base", "finetuned"}


def test_calibration_is_fitted_on_validation_and_reported(evaluated: Path, project) -> None:
    report = json.loads((evaluated / "eval.json").read_text())
    for view in ["validation", *(f"views.{v}" for v in report["finetuned"]["views"])]:
        node = report["finetuned"]
        for key in view.split("."):
            node = node[key]
        calibration = node if view == "validation" else node["calibration"]
        assert set(calibration) == {
            "ece_before",
            "ece_after",
            "ece_floor",
            "nll_before",
            "nll_after",
        }
    fit = report["finetuned"]["calibration"]
    assert fit["fit_view"] == "val_unflagged"
    # Refit here: the reported temperature is the one the leakage-free validation
    # predictions less the audit's suspects give, and not the one the test predictions
    # would give.
    on_validation, on_test = _refit_calibration(evaluated, project)
    assert fit["samples"] == on_validation.samples >= CALIBRATION_MIN_SAMPLES
    val_rows = pd.read_csv(project["data"] / "val_index.csv")["leakage_free"].astype(bool)
    flagged = val_rows.iloc[list(TINY_FLAGGED_VAL_ROWS)]
    assert flagged.any() and fit["samples"] == int(val_rows.sum() - flagged.sum())
    assert fit["fitted_temperature"] == pytest.approx(on_validation.fitted_temperature, rel=1e-6)
    assert fit["fitted_temperature"] != pytest.approx(on_test.fitted_temperature, rel=1e-3)
    assert (fit["temperature"], fit["reason"]) == (on_validation.temperature, on_validation.reason)
    assert report["finetuned"]["temperature"] == fit["temperature"]


def _refit_calibration(evaluated: Path, project: dict[str, Path]) -> tuple:
    """The calibration fitted on the fine-tuned model's validation predictions (the
    leakage-free rows) and, for contrast, on its test predictions."""
    from braintumor.core.config import load_params
    from braintumor.evaluation.calibration import calibrate
    from braintumor.stages.evaluate import load_keras_model, predict_probabilities
    from braintumor.training.inputs import load_processed

    params = load_params(evaluated / "params" / "params.yaml")
    classes, settings = params.common.classes, params.evaluate.calibration
    data = load_processed(project["data"], classes, SIZE, ("val", "test"))
    model = load_keras_model(project["finetuned"], len(classes))
    val, test = data.splits["val"], data.splits["test"]
    val_rows = pd.read_csv(project["data"] / "val_index.csv")["leakage_free"].astype(bool)
    flagged = np.isin(np.arange(len(val_rows)), TINY_FLAGGED_VAL_ROWS)

    def fit(split, rows: np.ndarray, flags: np.ndarray):
        probabilities = predict_probabilities(model, split.images, params.evaluate.batch_size)
        return calibrate(split.labels, probabilities, rows, settings, flags)

    whole_test = np.ones(len(test.labels), dtype=bool)
    return fit(val, val_rows.to_numpy(), flagged), fit(test, whole_test, ~whole_test)


def test_robustness_view_starts_from_the_raw_slices(evaluated: Path) -> None:
    """The ``clean`` row re-reads and re-preprocesses the raw files, so it must reproduce
    the fine-tuned model's accuracy on the cached leakage-free arrays exactly."""
    metrics = json.loads((evaluated / "metrics" / "eval.json").read_text())["finetuned"]
    report = json.loads((evaluated / "eval.json").read_text())["robustness"]["finetuned"]
    assert report[0]["perturbation"] == "clean"
    assert report[0]["count"] == metrics["leakage_free.count"]
    assert metrics["robustness.clean"] == pytest.approx(metrics["leakage_free.accuracy"], abs=1e-4)
    assert {row["perturbation"] for row in report} >= {"jpeg_30", "rotate_10", "noise_10"}
    plot = pd.read_csv(evaluated / "plots" / "robustness.csv")
    assert list(plot["perturbation"]) == [row["perturbation"] for row in report]
    assert (evaluated / "figures" / "robustness.png").is_file()


def test_the_robustness_view_runs_on_the_exported_model_and_agrees_with_keras(
    evaluated: Path, project
) -> None:
    """The robustness view and the OOD detector's training pass run on the exported graph
    (what serving runs): each row says so, the clean probabilities stay within the
    export's parity bound of Keras's on the same slices, and the detector in the bundle
    accepts the exported model's own features of the training slices it was fitted on."""
    from braintumor.serving.export import PARITY_TOLERANCE

    metrics = json.loads((evaluated / "metrics" / "eval.json").read_text())["finetuned"]
    report = json.loads((evaluated / "eval.json").read_text())["robustness"]["finetuned"]
    assert {row["runtime"] for row in report} == {"litert"}
    assert 0 <= metrics["served.max_probability_diff"] <= PARITY_TOLERANCE
    bundle = Bundle.load(evaluated / "bundle")
    assert bundle.exported is not None and bundle.head is not None
    train = np.load(project["data"] / "train_images.npy")[:, :, :, 0]
    pooled = bundle.exported(train).pooled.astype(np.float64)
    detector = bundle.ood_detector
    assert detector is not None
    scores = detector.score(pooled, bundle.head.forward(pooled)[0])
    assert detector.is_outlier(scores).mean() <= 0.5
    card = (evaluated / "bundle" / "MODEL_CARD.md").read_text()
    assert "Scored on the exported model that serving runs" in card


def test_figures_and_the_bundle(evaluated: Path, project, mirror: Path) -> None:
    names = {p.name for p in (evaluated / "figures").iterdir()}
    assert {
        "explanations.png",
        "roc_finetuned.png",
        "reliability_finetuned.png",
        "confusion_finetuned_test.png",
    } <= names
    bundle = Bundle.load(evaluated / "bundle")
    assert bundle.meta.gradcam_layer == "top_activation"
    assert bundle.meta.image_size == SIZE and bundle.meta.input_stats is not None
    # the bundle reproduces the stage's calibrated probabilities from the raw file
    report = json.loads((evaluated / "eval.json").read_text())
    temperature = report["finetuned"]["temperature"]
    assert bundle.meta.temperature == pytest.approx(temperature)
    test = pd.read_csv(project["data"] / "test_index.csv")
    raw_root = project["raw"]
    image = bundle.preprocess_bytes((raw_root / test.loc[0, "path"]).read_bytes())
    cached = np.load(project["data"] / "test_images.npy")[0, :, :, 0]
    assert np.array_equal(image, cached)
    probabilities = bundle.predict(image[None])
    assert probabilities.shape == (1, 4) and probabilities.sum() == pytest.approx(1.0)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "braintumor.stages.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_file_that_is_not_a_keras_model_is_a_clear_error(project, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.keras"
    bogus.write_text("not a model")
    result = _run_cli(_args(project, tmp_path / "out", finetuned=bogus))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bogus}: not a Keras model")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics").exists()


def test_a_model_with_another_class_list_is_a_clear_error(project, tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((SIZE, SIZE, 1))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    three = tmp_path / "three.keras"
    keras.Model(inputs, outputs).save(three)
    result = _run_cli(_args(project, tmp_path / "out", base=three))
    assert result.returncode == 1
    assert "model predicts 3 classes but the data has 4" in result.stderr


def test_views_per_source_and_their_leakage_free_parts() -> None:
    from braintumor.stages.evaluate import test_views

    index = pd.DataFrame(
        {"source": ["msoud", "sartaj", "msoud", "sartaj"], "leakage_free": [1, 1, 0, 0]}
    )
    views = {name: mask.tolist() for name, mask in test_views(index).items()}
    assert views == {
        "test": [True, True, True, True],
        "leakage_free": [True, True, False, False],
        "msoud_test": [True, False, True, False],
        "msoud_leakage_free": [True, False, False, False],
        "sartaj_test": [False, True, False, True],
        "sartaj_leakage_free": [False, True, False, False],
    }
    one_source = test_views(index.assign(source="msoud"))
    assert set(one_source) == {"test", "leakage_free", "msoud_test"}
