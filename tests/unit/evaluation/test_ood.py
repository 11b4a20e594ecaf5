"""Out-of-distribution detection (``braintumor.evaluation.ood``): the scores against their textbook
definitions, the threshold's promise on held-out scores, the saved file, the extractor on
a real model and real slices, and the evaluate stage's step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from braintumor.evaluation.ood import (
    FeatureExtractor,
    ModelOutputs,
    OodDetector,
    OodError,
    auroc,
    choose_threshold,
    energy_scores,
    fit_detector,
    fit_mahalanobis,
    mahalanobis_scores,
)


def clustered(count: int, seed: int, dims: int = 12, classes: int = 3) -> tuple:
    """Features in ``classes`` Gaussian clusters with correlated noise, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 4, (classes, dims))
    mixing = np.random.default_rng(1).normal(0, 1, (dims, dims))
    labels = np.arange(count) % classes
    return centres[labels] + rng.normal(0, 1, (count, dims)) @ mixing, labels


def outputs_of(features: np.ndarray, classes: int = 3) -> ModelOutputs:
    logits = np.zeros((len(features), classes))
    return ModelOutputs(np.full((len(features), classes), 1 / classes), features, logits)


def test_mahalanobis_matches_the_explicit_formula_with_ledoit_wolf() -> None:
    from sklearn.covariance import LedoitWolf

    features, labels = clustered(600, seed=2)
    means, whitening = fit_mahalanobis(features, labels, 3)
    class_means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    precision = LedoitWolf(assume_centered=True).fit(features - class_means[labels]).precision_
    queries, _ = clustered(20, seed=3)
    expected = np.min(
        [np.einsum("nd,de,ne->n", queries - m, precision, queries - m) for m in class_means],
        axis=0,
    )
    np.testing.assert_allclose(mahalanobis_scores(queries, means, whitening), expected, rtol=1e-6)


def test_far_points_score_higher_than_cluster_members() -> None:
    features, labels = clustered(600, seed=4)
    means, whitening = fit_mahalanobis(features, labels, 3)
    members, _ = clustered(200, seed=5)
    strangers = np.random.default_rng(6).normal(0, 30, (200, features.shape[1]))
    inside = mahalanobis_scores(members, means, whitening)
    outside = mahalanobis_scores(strangers, means, whitening)
    assert auroc(inside, outside) > 0.99


def test_mahalanobis_refuses_missing_classes_and_bad_shapes() -> None:
    features, labels = clustered(60, seed=7)
    with pytest.raises(OodError, match="every class"):
        fit_mahalanobis(features, np.minimum(labels, 1), 3)
    with pytest.raises(OodError, match="labels"):
        fit_mahalanobis(features, labels[:-1], 3)
    means, whitening = fit_mahalanobis(features, labels, 3)
    with pytest.raises(OodError, match="dimensions"):
        mahalanobis_scores(features[:, :5], means, whitening)
    with pytest.raises(OodError, match="NaN"):
        mahalanobis_scores(np.full_like(features, np.nan), means, whitening)


def test_energy_is_negative_logsumexp_and_lower_for_confident_logits() -> None:
    from scipy.special import logsumexp

    logits = np.random.default_rng(8).normal(0, 5, (50, 4))
    np.testing.assert_allclose(energy_scores(logits), -logsumexp(logits, axis=1), rtol=1e-10)
    np.testing.assert_allclose(
        energy_scores(logits, 2.0), -2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-10
    )
    confident, unsure = np.array([[20.0, 0, 0, 0]]), np.array([[1.0, 1, 1, 1]])
    assert energy_scores(confident)[0] < energy_scores(unsure)[0]
    with pytest.raises(OodError, match="temperature"):
        energy_scores(logits, 0.0)


def test_threshold_keeps_the_false_alarm_rate_on_the_scores_it_was_chosen_on() -> None:
    scores = np.random.default_rng(9).gamma(2.0, 1.0, 1000)
    for rate in (0.01, 0.05, 0.2):
        threshold = choose_threshold(scores, rate)
        assert (scores > threshold).mean() <= rate
        assert (scores >= threshold).mean() >= rate  # the tightest such threshold
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(OodError, match="false_alarm_rate"):
            choose_threshold(scores, bad)
    with pytest.raises(OodError, match="non-empty"):
        choose_threshold(np.array([]), 0.01)


def test_auroc_agrees_with_scikit_learn_including_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(10)
    inside, outside = rng.integers(0, 5, 300), rng.integers(2, 8, 120)  # many ties
    expected = roc_auc_score(
        np.r_[np.zeros(300), np.ones(120)], np.r_[inside, outside].astype(float)
    )
    assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12)
    assert auroc(np.zeros(3), np.ones(3)) == 1.0
    assert auroc(np.ones(3), np.zeros(3)) == 0.0


@pytest.mark.parametrize("method", ["mahalanobis", "energy"])
def test_detector_round_trips_through_its_file(method: str, tmp_path: Path) -> None:
    features, labels = clustered(300, seed=11)
    train = outputs_of(features)
    train = ModelOutputs(train.probabilities, features, features[:, :3])
    val_features, _ = clustered(200, seed=12)
    validation = ModelOutputs(train.probabilities[:200], val_features, val_features[:, :3])
    detector = fit_detector(method, train, labels, validation, 0.05)
    path = tmp_path / "ood.npz"
    detector.save(path)
    loaded = OodDetector.load(path)
    queries, _ = clustered(30, seed=13)
    assert loaded.method == method and loaded.threshold == pytest.approx(detector.threshold)
    np.testing.assert_allclose(
        loaded.score(queries, queries[:, :3]), detector.score(queries, queries[:, :3]), rtol=1e-12
    )
    val_scores = detector.score(val_features, val_features[:, :3])
    assert detector.is_outlier(val_scores).mean() <= 0.05
    assert loaded.percentile(np.array([-np.inf, np.inf])).tolist() == [0.0, 100.0]


def test_a_file_that_is_not_a_detector_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ood.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(OodError, match="not an out-of-distribution detector"):
        OodDetector.load(path)
    np.savez(path, format_version=np.array(99))
    with pytest.raises(OodError, match="format 99"):
        OodDetector.load(path)
    np.savez(path, format_version=np.array(1), method=np.array("energy"))
    with pytest.raises(OodError, match="missing false_alarm_rate, threshold"):
        OodDetector.load(path)
    with pytest.raises(OodError, match="method"):
        fit_detector(
            "knn", outputs_of(np.ones((3, 2))), np.zeros(3), outputs_of(np.ones((3, 2))), 0.1
        )


def real_slices(mirror: Path, count: int, size: int) -> np.ndarray:
    """``count`` real Testing slices, decoded and preprocessed as the model sees them."""
    from braintumor.core.schema import PreprocessParams
    from braintumor.data.imaging import decode_image, preprocess_gray

    paths = sorted((mirror / "msoud" / "Testing" / "glioma").glob("*.jpg"))[:count]
    grays = [decode_image(path.read_bytes(), name=path.name).gray for path in paths]
    return np.stack([preprocess_gray(gray, size, PreprocessParams()) for gray in grays])


@pytest.mark.slow
def test_extractor_gives_the_models_probabilities_and_matching_logits(mirror: Path) -> None:
    import keras

    from braintumor.core.schema import ModelParams
    from braintumor.model.classifier import build_model

    keras.utils.set_random_seed(3)
    model = build_model(ModelParams(backbone="tinycnn", weights="none", dense_units=(8,)), 32, 4)
    images = real_slices(mirror, 5, 32)
    outputs = FeatureExtractor(model)(images, batch_size=2)
    expected = model.predict(images[..., None].astype("float32"), verbose=0)
    np.testing.assert_allclose(outputs.probabilities, expected, rtol=1e-5, atol=1e-6)
    softmax = np.exp(outputs.logits - outputs.logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, expected, rtol=1e-4, atol=1e-6)
    pooled = model.get_layer("head_pool").output.shape[-1]
    assert outputs.features.shape == (5, pooled)
    with pytest.raises(OodError, match="head_pool"):
        FeatureExtractor(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


@pytest.mark.slow
def test_evaluate_fits_the_detector_on_train_and_thresholds_on_val(tiny_project) -> None:
    from braintumor.core.config import load_params
    from braintumor.evaluation.ood import FeatureExtractor
    from braintumor.stages.evaluate import EvaluatePaths, fit_ood_detector, load_inputs

    params = load_params(tiny_project["params"])
    unused = tiny_project["data"] / "unused"
    paths = EvaluatePaths(
        data=tiny_project["data"],
        base_model=tiny_project["base"],
        finetuned_model=tiny_project["finetuned"],
        metrics=unused,
        report=unused,
        plots=unused,
        figures=unused,
        bundle=unused,
        label_issues=tiny_project["label_issues"],
    )
    inputs = load_inputs(paths, params)
    detector, summary = fit_ood_detector(inputs, params)
    val = inputs.data.splits["val"]
    outputs = FeatureExtractor(inputs.models["finetuned"])(val.images)
    val_scores = detector.score(outputs.features, outputs.logits)
    assert detector.method == params.evaluate.ood_method == "mahalanobis"
    assert detector.is_outlier(val_scores).mean() <= params.evaluate.ood_false_alarm_rate
    assert set(summary) == {
        "ood.threshold",
        "ood.test.false_alarms",
        "ood.leakage_free.false_alarms",
    }


@pytest.mark.slow
def test_the_evaluate_stage_ships_the_detector_in_the_bundle(tiny_project, tmp_path: Path) -> None:
    import json

    from braintumor.serving.bundle import OOD_FILE, Bundle
    from braintumor.stages.evaluate import main

    from conftest import evaluate_args

    assert main([*evaluate_args(tiny_project, tmp_path), "--no-tracking"]) == 0
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["files"]
    assert OOD_FILE in manifest  # written by the bundle's writer, so hashed with the model
    detector = Bundle.load(tmp_path / "bundle").ood_detector
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())["finetuned"]
    assert metrics["ood.threshold"] == pytest.approx(detector.threshold, abs=1e-4)
    assert 0 <= metrics["ood.leakage_free.false_alarms"] <= 1


@pytest.mark.slow
def test_serving_refuses_what_the_bundles_detector_flags(mirror: Path, tmp_path: Path) -> None:
    """The detector shipped in a bundle is what serving applies: of real slices scored
    once here, one beyond the threshold is refused by ``Predictor.prepare`` (reason
    out_of_distribution, worded by features) and the lowest-scoring one is accepted."""
    from braintumor.data.imaging import decode_image, preprocess_gray
    from braintumor.serving.bundle import MODEL_FILE, Bundle, read_meta, write_bundle
    from braintumor.serving.predictor import OUT_OF_DISTRIBUTION, InputError, Predictor

    from serving_helpers import real_images, tiny_bundle_folder

    source = tiny_bundle_folder(mirror, tmp_path / "built")
    bundle = Bundle.load(source)
    extractor = FeatureExtractor(bundle.model)

    def outputs(paths: list[Path]) -> ModelOutputs:
        size, params = bundle.meta.image_size, bundle.meta.preprocess
        gray = [preprocess_gray(decode_image(p.read_bytes()).gray, size, params) for p in paths]
        return extractor(np.stack(gray))

    train_paths = real_images(mirror, 8, "Training", offset=100)  # what the bundle learnt
    val_paths = real_images(mirror, 10, "Training", offset=300)
    detector = fit_detector(
        "mahalanobis", outputs(train_paths), np.repeat(np.arange(4), 8), outputs(val_paths), 0.1
    )
    folder = tmp_path / "bundle"
    write_bundle(folder, source / MODEL_FILE, read_meta(source), detector)
    scores = detector.score(outputs(val_paths).features, outputs(val_paths).logits)
    assert detector.is_outlier(scores).any()  # the premise: 10% of 40 lie beyond
    predictor = Predictor(Bundle.load(folder))
    flagged = val_paths[int(np.argmax(scores))]
    with pytest.raises(InputError, match="features are further") as refused:
        predictor.prepare_file(flagged)
    assert refused.value.reason == OUT_OF_DISTRIBUTION
    accepted = predictor.prepare_file(val_paths[int(np.argmin(scores))])
    assert accepted.image.shape[0] > 0 and accepted.probabilities is not None
    # The check's forward pass is the prediction: classify runs the model no second time,
    # and gives what a separate predict call gives.
    expected = predictor.predict(accepted.image[None])
    calls: list[int] = []
    original = predictor.bundle.model.predict_on_batch
    predictor.bundle.model.predict_on_batch = lambda batch: (
        calls.append(len(batch)) or original(batch)
    )
    np.testing.assert_allclose(predictor.classify([accepted]), expected, atol=1e-5)
    assert calls == []
    without = dataclasses.replace(accepted, probabilities=None)
    np.testing.assert_allclose(
        predictor.classify([without, accepted]), np.vstack([expected] * 2), atol=1e-5
    )
    assert calls == [1]
