"""Expected calibration error, reliability data, temperature scaling and its figure, and
the evaluate stage's calibration choice, on synthetic data whose true calibration is known
by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from braintumor.core.schema import CalibrationParams, ConfigError
from braintumor.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    CalibrationFit,
    TemperatureFit,
    apply_calibration,
    apply_temperature,
    apply_temperature_to_logits,
    calibrate,
    calibration_summary,
    ece_floor,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
    negative_log_likelihood,
    reliability_data,
    reliability_figure,
    softmax,
)

TRUE_TEMPERATURE = 2.5


def calibrated(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, logits, probabilities) where each label is drawn from softmax(logits): the
    probabilities are calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(count, 4))
    probabilities = softmax(logits)
    cumulative = probabilities.cumsum(axis=1)
    labels = (rng.random(count)[:, None] > cumulative).sum(axis=1)
    return labels, logits, probabilities


def overconfident(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) whose logits are the calibrated ones times 2.5: a model that is
    too sure of itself, exactly fixed by T = 2.5."""
    labels, logits, _ = calibrated(count, seed)
    return labels, TRUE_TEMPERATURE * logits


def test_ece_of_calibrated_data_is_near_zero() -> None:
    labels, _, probabilities = calibrated(20000, seed=0)
    assert expected_calibration_error(labels, probabilities, bins=15) < 0.015


def test_ece_of_overconfident_data_is_large() -> None:
    labels, logits = overconfident(20000, seed=0)
    assert expected_calibration_error(labels, softmax(logits), bins=15) > 0.1


def test_ece_extremes() -> None:
    labels = np.array([0, 1, 0, 1])
    sure_and_right = np.eye(2)[labels]
    assert expected_calibration_error(labels, sure_and_right) == 0.0
    sure_and_wrong = np.eye(2)[1 - labels]
    assert expected_calibration_error(labels, sure_and_wrong) == 1.0


def test_reliability_data_bins() -> None:
    labels, _, probabilities = calibrated(5000, seed=1)
    data = reliability_data(labels, probabilities, bins=10)
    assert data.bin_edges.shape == (11,) and data.count.sum() == 5000
    filled = data.count > 0
    edges = data.bin_edges
    assert np.all(data.confidence[filled] > edges[:-1][filled])
    assert np.all(data.confidence[filled] <= edges[1:][filled])
    assert np.all(np.isnan(data.confidence[~filled]))
    assert data.count[:2].sum() == 0  # a top probability of 4 classes is at least 0.25
    summary = data.to_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["ece"] == pytest.approx(expected_calibration_error(labels, probabilities, 10))


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin() -> None:
    probabilities = np.array([[0.5, 0.5], [1.0, 0.0]])
    data = reliability_data([0, 0], probabilities, bins=2)
    assert data.count.tolist() == [1, 1]


def test_fitted_temperature_recovers_the_truth_and_improves_calibration() -> None:
    validation_labels, validation_logits = overconfident(6000, seed=2)
    test_labels, test_logits = overconfident(6000, seed=3)
    fit = fit_temperature(validation_logits, validation_labels)
    assert isinstance(fit, TemperatureFit) and not fit.at_bound
    assert fit.temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.06)
    assert fit.nll_after < fit.nll_before
    temperature = fit.temperature

    before = softmax(test_logits)
    after = apply_temperature(before, temperature)
    assert expected_calibration_error(test_labels, after) < 0.3 * expected_calibration_error(
        test_labels, before
    )
    assert negative_log_likelihood(test_labels, after) < negative_log_likelihood(
        test_labels, before
    )


def test_log_probabilities_fit_the_same_temperature_as_logits() -> None:
    labels, logits = overconfident(3000, seed=4)
    from_logits = fit_temperature(logits, labels).temperature
    from_probabilities = fit_temperature(log_probabilities(softmax(logits)), labels).temperature
    assert from_probabilities == pytest.approx(from_logits, rel=1e-4)


def test_calibrated_data_fits_a_temperature_near_one() -> None:
    labels, logits, _ = calibrated(6000, seed=5)
    assert fit_temperature(logits, labels).temperature == pytest.approx(1.0, abs=0.08)


def test_temperature_one_leaves_probabilities_unchanged() -> None:
    _, _, probabilities = calibrated(500, seed=6)
    np.testing.assert_allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5, 10.0])
def test_scaling_never_changes_the_argmax(temperature: float) -> None:
    _, logits, probabilities = calibrated(2000, seed=7)
    scaled = apply_temperature(probabilities, temperature)
    np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    from_logits = apply_temperature_to_logits(logits, temperature)
    np.testing.assert_allclose(from_logits, scaled, atol=1e-9)


def test_temperature_softens_and_sharpens() -> None:
    _, _, probabilities = calibrated(500, seed=8)
    top = probabilities.max(axis=1)
    assert np.all(apply_temperature(probabilities, 2.0).max(axis=1) <= top + 1e-12)
    assert np.all(apply_temperature(probabilities, 0.5).max(axis=1) >= top - 1e-12)


def test_underflowed_probabilities_stay_finite() -> None:
    probabilities = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 2])
    scaled = apply_temperature(probabilities, 3.0)
    assert np.isfinite(scaled).all()
    assert np.isfinite(negative_log_likelihood(labels, probabilities))
    assert np.isfinite(fit_temperature(log_probabilities(probabilities), labels).temperature)


def test_reliability_figure_writes_a_png(tmp_path) -> None:
    labels, logits = overconfident(2000, seed=9)
    before = softmax(logits)
    after = apply_temperature(before, TRUE_TEMPERATURE)
    path = reliability_figure(labels, before, after, tmp_path / "figures" / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporaries


def test_bad_input_raises() -> None:
    labels, logits = overconfident(50, seed=10)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(labels, softmax(logits), bins=0)
    with pytest.raises(ValueError, match="not logits"):
        expected_calibration_error(labels, logits)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(labels, np.abs(logits))
    with pytest.raises(ValueError, match="samples"):
        expected_calibration_error(labels[:10], softmax(logits))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(softmax(logits), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(softmax(logits), float("nan"))
    with pytest.raises(ValueError, match="infinite"):
        fit_temperature(np.array([[0.0, -np.inf], [-np.inf, 0.0]]), [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        fit_temperature(logits[:, 0], labels)
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(logits, np.full(50, 7))
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(logits, labels, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="bound_tolerance"):
        fit_temperature(logits, labels, bound_tolerance=0.7)


def test_ece_and_nll_keep_their_definitions() -> None:
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.9, 0.1]])
    # bins of 0.1: {0.8: right}, {0.6: right}, {0.7: wrong}, {0.9: right}
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(
        (0.2 + 0.4 + 0.7 + 0.1) / 4
    )
    expected = -np.mean(np.log([0.8, 0.6, 0.3, 0.9]))
    assert negative_log_likelihood(labels, probabilities) == pytest.approx(expected)


# --------------------------------------------------------------------------- bounds


def separable(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) where the top class is always right: the NLL keeps falling
    as T -> 0, so the search runs into its lower bound (a leaky validation set)."""
    labels, logits, _ = calibrated(count, seed)
    logits[np.arange(count), labels] = logits.max(axis=1) + 0.5
    return labels, softmax(logits)


def test_a_fit_at_the_lower_bound_is_flagged() -> None:
    labels, probabilities = separable(2000, seed=11)
    fit = fit_temperature(log_probabilities(probabilities), labels)
    assert fit.at_bound and fit.temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=0.02)


def test_a_fit_at_the_upper_bound_is_flagged() -> None:
    labels, logits = overconfident(3000, seed=12)  # the truth, 2.5, lies outside
    fit = fit_temperature(logits, labels, bounds=(0.5, 2.0))
    assert fit.at_bound and fit.temperature == pytest.approx(2.0, rel=0.02)
    assert not fit_temperature(logits, labels, bounds=(0.5, 4.0)).at_bound


# --------------------------------------------------------------------------- calibrate


PARAMS = CalibrationParams()


def test_calibrate_softens_an_overconfident_model_and_improves_held_out_nll() -> None:
    labels, logits = overconfident(4000, seed=13)
    fit = calibrate(labels, softmax(logits), np.ones(4000, dtype=bool), PARAMS)
    assert isinstance(fit, CalibrationFit) and fit.reason == "" and not fit.is_identity
    assert fit.temperature > 1 and fit.temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.08)
    assert fit.nll_after < fit.nll_before and fit.samples == 4000
    test_labels, test_logits = overconfident(4000, seed=14)
    before = softmax(test_logits)
    after = apply_calibration(before, fit)
    summary = calibration_summary(test_labels, before, after)
    assert summary["nll_after"] < summary["nll_before"]
    assert summary["ece_after"] < 0.3 * summary["ece_before"]
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))


def test_a_fit_at_the_bound_keeps_the_identity() -> None:
    labels, probabilities = separable(2000, seed=15)
    fit = calibrate(labels, probabilities, np.ones(2000, dtype=bool), PARAMS)
    assert fit.at_bound and fit.reason == "at_bound" and fit.is_identity
    assert fit.fitted_temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=0.02)
    assert fit.nll_after == fit.nll_before
    np.testing.assert_allclose(apply_calibration(probabilities, fit), probabilities, atol=1e-12)


def test_calibrate_fits_on_the_leakage_free_rows_only() -> None:
    """Validation rows with a training neighbour are right and sure (the model has seen
    their twins): fitted on all rows they pull T below the honest rows' value."""
    honest_labels, honest_logits = overconfident(3000, seed=16)
    leaky_labels, leaky_probabilities = separable(3000, seed=17)
    labels = np.r_[honest_labels, leaky_labels]
    probabilities = np.r_[softmax(honest_logits), leaky_probabilities]
    leakage_free = np.r_[np.ones(3000, dtype=bool), np.zeros(3000, dtype=bool)]
    honest = calibrate(labels, probabilities, leakage_free, PARAMS)
    assert honest.samples == 3000 and honest.fit_view == "val_leakage_free"
    assert honest.temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.08)
    everything = calibrate(labels, probabilities, leakage_free, CalibrationParams(fit_view="val"))
    assert everything.samples == 6000
    assert everything.fitted_temperature < 0.8 * honest.temperature


def test_val_unflagged_leaves_the_audits_suspects_out_of_the_fit() -> None:
    """Wrong labels on confident rows push the fitted temperature up (softening every
    prediction); without the rows the audit flags, the fit finds the model's own T."""
    labels, logits = overconfident(3000, seed=21)
    probabilities = softmax(logits)
    rng = np.random.default_rng(22)
    flagged = np.zeros(3000, dtype=bool)
    flagged[rng.choice(3000, 240, replace=False)] = True
    noisy = labels.copy()
    noisy[flagged] = (probabilities[flagged].argmax(axis=1) + 1) % probabilities.shape[1]
    leakage_free = np.ones(3000, dtype=bool)
    leakage_free[:100] = False
    unflagged = CalibrationParams(fit_view="val_unflagged")
    clean = calibrate(noisy, probabilities, leakage_free, unflagged, flagged)
    assert clean.samples == int((leakage_free & ~flagged).sum()) and clean.reason == ""
    assert clean.fit_view == "val_unflagged"
    assert clean.temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.08)
    with_noise = calibrate(noisy, probabilities, leakage_free, PARAMS, flagged)
    assert with_noise.samples == int(leakage_free.sum())  # the default ignores the flags
    assert with_noise.temperature > 1.2 * clean.temperature
    with pytest.raises(ValueError, match="label audit"):
        calibrate(noisy, probabilities, leakage_free, unflagged)
    with pytest.raises(ValueError, match="val_flagged_mask"):
        calibrate(noisy, probabilities, leakage_free, unflagged, flagged[:10])


def test_a_sharpening_fit_keeps_the_identity_unless_allowed() -> None:
    labels, logits = overconfident(3000, seed=20)
    underconfident = softmax(logits / TRUE_TEMPERATURE**2)  # fixed by T = 1 / 2.5
    mask = np.ones(3000, dtype=bool)
    refused = calibrate(labels, underconfident, mask, PARAMS)
    assert refused.is_identity and refused.reason == "would_sharpen" and not refused.at_bound
    assert refused.fitted_temperature == pytest.approx(1 / TRUE_TEMPERATURE, rel=0.08)
    allowed = calibrate(labels, underconfident, mask, CalibrationParams(allow_sharpening=True))
    assert allowed.temperature == pytest.approx(1 / TRUE_TEMPERATURE, rel=0.08)
    assert allowed.nll_after < allowed.nll_before


def test_calibrate_keeps_the_identity_for_method_none_and_too_few_rows() -> None:
    labels, logits = overconfident(200, seed=18)
    probabilities = softmax(logits)
    mask = np.zeros(200, dtype=bool)
    mask[:20] = True
    none = calibrate(labels, probabilities, mask, CalibrationParams(method="none"))
    assert none.is_identity and none.reason == "method_none" and none.fitted_temperature is None
    few = calibrate(labels, probabilities, mask, PARAMS)
    assert few.is_identity and few.reason == "too_few_samples" and few.samples == 20
    empty = calibrate(labels, probabilities, np.zeros(200, dtype=bool), PARAMS)
    assert empty.is_identity and empty.to_dict()["nll_before"] is None
    json.dumps(empty.to_dict(), allow_nan=False)
    json.dumps(few.to_dict(), allow_nan=False)


def test_calibrate_checks_its_inputs() -> None:
    labels, logits = overconfident(100, seed=19)
    with pytest.raises(ValueError, match="boolean"):
        calibrate(labels, softmax(logits), np.ones(100), PARAMS)
    with pytest.raises(ValueError, match="shape"):
        calibrate(labels, softmax(logits), np.ones(99, dtype=bool), PARAMS)
    with pytest.raises(ValueError, match="sum to 1"):
        calibrate(labels, np.abs(logits), np.ones(100, dtype=bool), PARAMS)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature_bounds": (2.0, 1.0)},
        {"temperature_bounds": (1.5, 3.0)},  # must contain the identity
        {"temperature_bounds": (0.1, 1.0, 10.0)},
        {"bound_tolerance": -0.1},
        {"min_samples": 0},
    ],
)
def test_calibration_params_reject_bad_values(settings: dict) -> None:
    with pytest.raises(ConfigError):
        CalibrationParams(**settings)


def dirichlet_rows(count: int, seed: int) -> np.ndarray:
    """Confident four-class probabilities, as a trained classifier gives."""
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet([0.3, 0.3, 0.3, 0.3], size=count)
    return 0.1 * rows + 0.9 * np.eye(4)[rows.argmax(axis=1)] * rows.max(axis=1, keepdims=True)


def test_ece_floor_is_what_perfectly_calibrated_labels_score() -> None:
    """Labels drawn from the probabilities themselves are calibrated by construction; their
    ECE still averages the floor, not 0, and the floor shrinks as the view grows."""
    small = dirichlet_rows(300, seed=1)
    small = small / small.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(5)
    observed = []
    for _ in range(200):
        labels = np.array([rng.choice(4, p=row) for row in small])
        observed.append(expected_calibration_error(labels, small))
    floor = ece_floor(small)
    assert floor == pytest.approx(np.mean(observed), rel=0.1)
    assert floor > 0.01
    large = np.repeat(small, 10, axis=0)
    assert ece_floor(large) < 0.5 * floor
    assert ece_floor(small) == floor  # seeded


def test_ece_floor_of_certain_predictions_is_zero_and_bad_input_is_refused() -> None:
    assert ece_floor(np.eye(4)[[0, 1, 2, 3, 0]]) == 0.0
    with pytest.raises(ValueError, match="y_prob must be"):
        ece_floor(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="bins must be"):
        ece_floor(np.eye(4), bins=0)
