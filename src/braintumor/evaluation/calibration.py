"""Calibration: how far a model's confidence can be trusted, and temperature scaling.

A classifier fine-tuned to 98 % accuracy with cross-entropy is typically over-confident:
its top probability is higher than its hit rate (Guo et al., 2017, "On Calibration of
Modern Neural Networks"). For a screening aid the displayed confidence matters, so the
evaluate stage reports the expected calibration error (ECE) with its reliability diagram,
and fits one temperature ``T`` on the validation split that divides the logits before the
softmax. Dividing by a single positive scalar never changes the arg-max, so accuracy and
the confusion matrix are untouched; only the confidence moves.

The temperature is fitted on validation data and applied to test data: fitting it on the
test set would make the test calibration numbers optimistic. The validation data must be
as hard as the test data, too. Validation drawn image by image from the training folders
holds neighbouring slices of training patients; the model is right and sure on those, a
temperature below 1 fits, and it sharpens test probabilities exactly where the model errs
more often (test ECE 0.044 -> 0.062 in one run). So ``calibrate`` fits on the validation
rows with no training neighbour (the preprocess stage's grouped split makes that all of
them), and refuses a fit that lands on its search bound (the NLL still falling at the
edge: a validation set the model gets all right, or nearly all wrong) or rests on too few
rows, keeping the identity instead, with the reason in the result. Even honest validation
comes from the training folders, and the testing folders are harder (SARTAJ's above all),
so by default a fit that would sharpen (T < 1) is refused too: in the runs measured (small
CNNs on msoud + sartaj), sharpening fitted on validation raised the ECE and NLL of the test
set and of its leakage-free subset, and softening lowered both.

Wrong labels in the fitting rows pull the other way: a confident, correct prediction
against a wrong label costs the NLL most, and a higher temperature is the fit's only way
to pay less, so noisy validation labels soften every prediction. The label audit
(``label_audit``) flags ~6% of validation rows, SARTAJ's and Msoud's alike; with them in,
the fitted T was 1.03-1.36 on the quickstart models and raised the leakage-free Msoud
ECE on most seeds (0.020 -> 0.029, 0.018 -> 0.043), with them out it was ~1.0
(``fit_view: val_unflagged``; docs/training.md).

Log-probabilities can stand in for logits everywhere here: ``log p = z - logsumexp(z)``
differs from the logits ``z`` by a per-row constant, which the softmax ignores, so
``softmax(log p / T) == softmax(z / T)``. Models that end in a softmax (ours) therefore
need no access to their pre-softmax layer. Core layer: numpy, scipy and matplotlib.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from braintumor.core.schema import CalibrationParams
from braintumor.evaluation.metrics import validate_labels, validate_probabilities
from braintumor.reports.figures import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Search range of the temperature (bounded, on log T). Real networks land in about 0.5-5;
# the range keeps the search finite, and a fit that reaches it is flagged (``at_bound``).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

# A fit within this relative distance of a bound counts as at the bound (the bounded
# search approaches an edge but never evaluates it exactly).
BOUND_TOLERANCE = 0.01

METHOD_TEMPERATURE = "temperature"
METHOD_NONE = "none"

# Probabilities are clipped here before the logarithm, so a float32 softmax that
# underflowed to exactly 0 yields a large finite log-probability instead of -inf.
_LOG_FLOOR = 1e-12


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin data of a reliability diagram (equal-width bins of the top probability).

    ``confidence`` and ``accuracy`` are the mean top probability and the hit rate of the
    samples in each bin (NaN for an empty bin); ``count`` is the number of samples.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def expected_calibration_error(self) -> float:
        """Sum over bins of (bin share of samples) x |accuracy - confidence|."""
        filled = self.count > 0
        weights = self.count[filled] / self.count.sum()
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(weights * gaps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (empty bins get ``None``)."""

        def clean(values: np.ndarray) -> list[float | None]:
            return [float(v) if math.isfinite(v) else None for v in values]

        return {
            "bin_edges": self.bin_edges.tolist(),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "count": self.count.astype(int).tolist(),
            "ece": self.expected_calibration_error,
        }


def _check_pair(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    probabilities = validate_probabilities(y_prob)
    labels = validate_labels(y_true, probabilities.shape[1])
    if labels.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"y_true has {labels.shape[0]} samples but y_prob has {probabilities.shape[0]} rows"
        )
    return labels, probabilities


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")


def reliability_data(y_true: Any, y_prob: Any, bins: int = 15) -> ReliabilityData:
    """Bin the samples by their top probability into ``bins`` equal-width bins on [0, 1]
    (bin i holds confidences in (edge_i, edge_i+1]; the first bin also holds 0) and return
    each bin's mean confidence, accuracy and count."""
    _check_bins(bins)
    labels, probabilities = _check_pair(y_true, y_prob)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins: searchsorted(side="left") puts a value equal to an edge in the bin
    # that ends there; 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return ReliabilityData(edges, mean_confidence, accuracy, count.astype(np.int64))


def expected_calibration_error(y_true: Any, y_prob: Any, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width bins of the top probability (Guo et al., 2017):
    0 is perfectly calibrated; it is an average gap between confidence and accuracy."""
    return reliability_data(y_true, y_prob, bins).expected_calibration_error


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64 (the maximum is subtracted first)."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=axis, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=axis, keepdims=True)


def log_probabilities(y_prob: Any) -> np.ndarray:
    """``log p`` with p clipped at 1e-12: logits up to a per-row constant (see the module
    docstring), finite even where a float32 softmax underflowed to 0."""
    probabilities = validate_probabilities(y_prob)
    return np.log(np.clip(probabilities, _LOG_FLOOR, 1.0))


def negative_log_likelihood(y_true: Any, y_prob: Any) -> float:
    """Mean negative log-likelihood of the true class (the cross-entropy), in nats."""
    labels, probabilities = _check_pair(y_true, y_prob)
    picked = probabilities[np.arange(labels.shape[0]), labels]
    return float(-np.mean(np.log(np.clip(picked, _LOG_FLOOR, 1.0))))


def _check_logits(logits: Any) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"logits must be 2-D (samples x classes >= 2), got shape {values.shape}")
    if values.shape[0] == 0:
        raise ValueError("logits is empty: fitting a temperature needs samples")
    if not np.all(np.isfinite(values)):
        raise ValueError(
            "logits hold NaN or infinite values (use log_probabilities(p), which clips, "
            "rather than np.log(p))"
        )
    return values


def _nll_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_normaliser = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_normaliser - scaled[np.arange(labels.shape[0]), labels]))


@dataclass(frozen=True)
class TemperatureFit:
    """What ``fit_temperature`` found: the NLL-minimising ``temperature`` in ``bounds``,
    the mean NLL at T = 1 (``nll_before``) and at the fit (``nll_after``), and
    ``at_bound``: the fit lies within the tolerance of a bound, so the true minimum is
    probably outside the range and the value must not be used as is."""

    temperature: float
    nll_before: float
    nll_after: float
    at_bound: bool
    bounds: tuple[float, float]
    method: str = METHOD_TEMPERATURE


def fit_temperature(
    logits: Any,
    y_true: Any,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    bound_tolerance: float = BOUND_TOLERANCE,
) -> TemperatureFit:
    """The temperature T > 0 that minimises the mean NLL of ``softmax(logits / T)``.

    ``logits`` are validation-set logits or log-probabilities (``log_probabilities(p)``).
    The search is a bounded scalar minimisation over log T, which keeps T positive and
    treats halving and doubling symmetrically; the NLL is convex in 1 / T, so the bounded
    search finds the global minimum in the range. T > 1 softens an over-confident model.
    A result within ``bound_tolerance`` (relative) of either bound is flagged
    ``at_bound``: the NLL was still falling at the edge (typically every validation
    prediction right, which rewards ever sharper probabilities).
    """
    from scipy.optimize import minimize_scalar

    values = _check_logits(logits)
    labels = validate_labels(y_true, values.shape[1])
    if labels.shape[0] != values.shape[0]:
        raise ValueError(f"y_true has {labels.shape[0]} samples but logits {values.shape[0]} rows")
    low, high = (float(b) for b in bounds)
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    if not 0 <= bound_tolerance < 0.5:
        raise ValueError(f"bound_tolerance must be in [0, 0.5), got {bound_tolerance}")
    result = minimize_scalar(
        lambda log_temperature: _nll_at(values, labels, math.exp(log_temperature)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    if not result.success:  # pragma: no cover - the bounded method does not fail on finite input
        raise RuntimeError(f"temperature fit did not converge: {result.message}")
    temperature = float(math.exp(result.x))
    margin = math.log1p(bound_tolerance) + 1e-4  # 1e-4 > the search's own tolerance
    at_bound = (
        math.log(temperature) - math.log(low) <= margin
        or math.log(high) - math.log(temperature) <= margin
    )
    return TemperatureFit(
        temperature=temperature,
        nll_before=_nll_at(values, labels, 1.0),
        nll_after=_nll_at(values, labels, temperature),
        at_bound=at_bound,
        bounds=(low, high),
    )


@dataclass(frozen=True)
class CalibrationFit:
    """The calibration the evaluate stage applies (``apply_calibration``) and reports.

    ``temperature`` is what is applied: the fitted one, or 1.0 (the identity) when
    ``method`` is ``none`` or the fit was refused, in which case ``reason`` says why
    (``method_none``, ``too_few_samples``, ``at_bound``, ``would_sharpen``).
    ``fitted_temperature`` is the search's result even when refused (None when no fit was
    attempted). ``nll_before`` and ``nll_after`` are the mean NLL on the ``samples``
    fitting rows (``fit_view``) at T = 1 and at the applied temperature."""

    method: str
    temperature: float
    fitted_temperature: float | None
    at_bound: bool
    nll_before: float
    nll_after: float
    fit_view: str
    samples: int
    reason: str = ""

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for metrics and the report); a NaN NLL (no rows) becomes None."""
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


def calibrate(
    val_labels: Any,
    val_probs: Any,
    val_leakage_free_mask: Any,
    params: CalibrationParams,
    val_flagged_mask: Any = None,
) -> CalibrationFit:
    """Fit the calibration on validation probabilities, per ``params`` (a pure function).

    Rows: every validation row when ``params.fit_view`` is ``val``, else those where
    ``val_leakage_free_mask`` is true (no training neighbour; the preprocess stage's
    ``val_index.csv`` column), and for ``val_unflagged`` only those of them that
    ``val_flagged_mask`` does not mark (the label audit's suspected label errors). The
    temperature is fitted on the log-probabilities (logits up to a per-row constant). The
    identity is kept, with the reason, when the method is ``none``, when fewer than
    ``params.min_samples`` rows remain, when the fit lands at a search bound, or when it
    would sharpen (T < 1) and ``params.allow_sharpening`` is false: validation images come
    from the training folders, test images from the testing folders, on which the model is
    less accurate, so confidence learnt on validation should only ever go down on test.
    """
    labels, probabilities = _fitting_rows(
        val_labels, val_probs, val_leakage_free_mask, params.fit_view, val_flagged_mask
    )
    samples = int(labels.shape[0])
    nll = negative_log_likelihood(labels, probabilities) if samples else float("nan")
    if params.method == METHOD_NONE:
        return _identity_fit(params, samples, nll, "method_none")
    if samples < params.min_samples:
        return _identity_fit(params, samples, nll, "too_few_samples")
    low, high = params.temperature_bounds
    fit = fit_temperature(
        log_probabilities(probabilities),
        labels,
        bounds=(low, high),
        bound_tolerance=params.bound_tolerance,
    )
    reason = _refusal_reason(fit, params.allow_sharpening)
    if reason:
        return _identity_fit(params, samples, nll, reason, fit)
    return CalibrationFit(
        method=params.method,
        temperature=fit.temperature,
        fitted_temperature=fit.temperature,
        at_bound=False,
        nll_before=fit.nll_before,
        nll_after=fit.nll_after,
        fit_view=params.fit_view,
        samples=samples,
    )


def _fitting_rows(
    val_labels: Any,
    val_probs: Any,
    val_leakage_free_mask: Any,
    fit_view: str,
    val_flagged_mask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The validation (labels, probabilities) the temperature is fitted on: all rows for
    ``fit_view`` ``val``, the leakage-free ones for ``val_leakage_free``, and those of them
    the label audit does not suspect for ``val_unflagged`` (see the module docstring)."""
    labels, probabilities = _check_pair(val_labels, val_probs)
    mask = _row_mask(val_leakage_free_mask, labels.shape, "val_leakage_free_mask")
    if fit_view == "val":
        return labels, probabilities
    if fit_view == "val_unflagged":
        if val_flagged_mask is None:
            raise ValueError("fit_view val_unflagged needs the label audit's suspects")
        mask = mask & ~_row_mask(val_flagged_mask, labels.shape, "val_flagged_mask")
    return labels[mask], probabilities[mask]


def _row_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A boolean mask with one entry per validation row, or ValueError naming it."""
    rows = np.asarray(mask)
    if rows.dtype != bool or rows.shape != shape:
        raise ValueError(
            f"{name} must be a boolean array of shape {shape}, got {rows.dtype} {rows.shape}"
        )
    return rows


def _refusal_reason(fit: TemperatureFit, allow_sharpening: bool) -> str:
    """Why a fitted temperature must not be applied (``at_bound``, ``would_sharpen``), or
    the empty string when it may be."""
    if fit.at_bound:
        return "at_bound"
    if fit.temperature < 1 and not allow_sharpening:
        return "would_sharpen"
    return ""


def _identity_fit(
    params: CalibrationParams,
    samples: int,
    nll: float,
    reason: str,
    fitted: TemperatureFit | None = None,
) -> CalibrationFit:
    """The identity calibration (T = 1, so the NLL is unchanged), with the reason it was
    kept and, when a fit was attempted, what the search found."""
    return CalibrationFit(
        method=params.method,
        temperature=1.0,
        fitted_temperature=None if fitted is None else fitted.temperature,
        at_bound=False if fitted is None else fitted.at_bound,
        nll_before=nll,
        nll_after=nll,
        fit_view=params.fit_view,
        samples=samples,
        reason=reason,
    )


def apply_calibration(probs: Any, fit: CalibrationFit) -> np.ndarray:
    """Calibrated probabilities (float64, same shape and arg-max as ``probs``)."""
    return apply_temperature(probs, fit.temperature)


def ece_floor(y_prob: Any, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these confidences would show on this many
    images: the mean ECE over ``draws`` label sets drawn from the rows' own probabilities.

    Binned ECE is biased upwards on small views: with a few hundred images, sampling noise
    in each bin's accuracy alone gives ~0.02-0.03 at 15 bins (measured: 0.022-0.030 on the
    368 Msoud leakage-free slices, docs/training.md). An ECE near its floor says nothing
    more can be read from it; one well above says the model is miscalibrated. Seeded, so
    the same probabilities give the same floor.
    """
    _check_bins(bins)
    probabilities = np.asarray(y_prob, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError(
            f"y_prob must be a non-empty (n, classes) array, got {probabilities.shape}"
        )
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    confidence = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    summed_confidence = np.bincount(index, weights=confidence, minlength=bins)
    cumulative = np.cumsum(probabilities, axis=1)
    cumulative[:, -1] = 1.0
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for draw in range(draws):
        uniform = rng.random(len(probabilities))[:, None]
        labels = (uniform > cumulative).sum(axis=1)
        hits = np.bincount(index, weights=(labels == predicted).astype(np.float64), minlength=bins)
        values[draw] = np.abs(hits - summed_confidence).sum() / len(probabilities)
    return float(values.mean())


def calibration_summary(y_true: Any, before: Any, after: Any, bins: int = 15) -> dict[str, float]:
    """ECE and NLL before and after calibration of one view (test, leakage-free, a
    source, validation): the numbers the evaluate stage reports for every view, with the
    ECE floor of the calibrated probabilities (``ece_floor``: what perfect calibration
    would show on this many images)."""
    return {
        "ece_before": expected_calibration_error(y_true, before, bins),
        "ece_after": expected_calibration_error(y_true, after, bins),
        "ece_floor": ece_floor(after, bins),
        "nll_before": negative_log_likelihood(y_true, before),
        "nll_after": negative_log_likelihood(y_true, after),
    }


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def apply_temperature(y_prob: Any, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log p / T)`` (float64, same shape).

    T = 1 returns the input (renormalised); any T keeps each row's arg-max, because
    dividing by a positive constant preserves the order of the log-probabilities.
    """
    value = _check_temperature(temperature)
    return softmax(log_probabilities(y_prob) / value, axis=1)


def apply_temperature_to_logits(logits: Any, temperature: float) -> np.ndarray:
    """``softmax(logits / T)``, for callers that hold real logits."""
    value = _check_temperature(temperature)
    return softmax(_check_logits(logits) / value, axis=1)


def reliability_figure(
    y_true: Any,
    probabilities_before: Any,
    probabilities_after: Any,
    path: str | Path,
    *,
    bins: int = 15,
    titles: tuple[str, str] = ("before temperature scaling", "after temperature scaling"),
) -> Path:
    """Write a PNG with two reliability diagrams side by side (before / after scaling).

    Each panel shows per-bin accuracy as bars against the diagonal of perfect calibration,
    the gap to the bin's mean confidence, the share of samples per bin, and the ECE in the
    title. Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), and
    writes under a temporary name first so a failed write leaves no partial file.
    """
    panels = [
        reliability_data(y_true, probabilities_before, bins),
        reliability_data(y_true, probabilities_after, bins),
    ]
    figure = new_figure(figsize=(10, 4.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for axis, data, title in zip(axes, panels, titles, strict=True):
        _draw_reliability_panel(axis, data, title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return save_figure(figure, Path(path))


def _draw_reliability_panel(axis: Axes, data: ReliabilityData, title: str) -> None:
    """One reliability diagram: per-bin accuracy bars, the gap up to the bin's mean
    confidence, the share of samples per bin, the diagonal of perfect calibration, and
    the ECE in the title. Empty bins draw no bar (their accuracy is NaN)."""
    width = np.diff(data.bin_edges)
    left = data.bin_edges[:-1]
    filled = data.count > 0
    axis.bar(
        left[filled],
        data.accuracy[filled],
        width=width[filled],
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy",
    )
    axis.bar(
        left[filled],
        (data.confidence - data.accuracy)[filled],
        width=width[filled],
        bottom=data.accuracy[filled],
        align="edge",
        color="#dd8452",
        alpha=0.45,
        edgecolor="#dd8452",
        label="gap to confidence",
    )
    share = data.count / max(1, data.count.sum())
    axis.step(
        data.bin_edges,
        np.append(share, share[-1]),
        where="post",
        color="0.4",
        linewidth=1,
        label="share of samples",
    )
    axis.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top probability)")
    axis.set_title(f"{title}\nECE = {data.expected_calibration_error:.4f}")
