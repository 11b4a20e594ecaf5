"""Calibration: how far a model's confidence can be trusted, and temperature scaling.

A classifier fine-tuned to 98 % accuracy with cross-entropy is typically over-confident:
its top probability is higher than its hit rate (Guo et al., 2017, "On Calibration of
Modern Neural Networks"). For a screening aid the displayed confidence matters, so the
evaluate stage reports the expected calibration error (ECE) with its reliability diagram,
and fits one temperature ``T`` on the validation split that divides the logits before the
softmax. Dividing by a single positive scalar never changes the arg-max, so accuracy and
the confusion matrix are untouched; only the confidence moves.

The temperature is fitted on validation data and applied to test data: fitting it on the
test set would make the test calibration numbers optimistic.

Log-probabilities can stand in for logits everywhere here: ``log p = z - logsumexp(z)``
differs from the logits ``z`` by a per-row constant, which the softmax ignores, so
``softmax(log p / T) == softmax(z / T)``. Models that end in a softmax (ours) therefore
need no access to their pre-softmax layer. Core layer: numpy, scipy and matplotlib.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.metrics import validate_labels, validate_probabilities

# Search range of the temperature (bounded, on log T). Real networks land in about 0.5-5;
# the range is wide enough never to bind in practice and keeps the search finite.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

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


def fit_temperature(
    logits: Any, y_true: Any, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature T > 0 that minimises the mean NLL of ``softmax(logits / T)``.

    ``logits`` are validation-set logits or log-probabilities (``log_probabilities(p)``).
    The search is a bounded scalar minimisation over log T, which keeps T positive and
    treats halving and doubling symmetrically; the NLL is convex in 1 / T, so the bounded
    search finds the global minimum. T > 1 softens an over-confident model.
    """
    from scipy.optimize import minimize_scalar

    values = _check_logits(logits)
    labels = validate_labels(y_true, values.shape[1])
    if labels.shape[0] != values.shape[0]:
        raise ValueError(f"y_true has {labels.shape[0]} samples but logits {values.shape[0]} rows")
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda log_temperature: _nll_at(values, labels, math.exp(log_temperature)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    if not result.success:  # pragma: no cover - the bounded method does not fail on finite input
        raise RuntimeError(f"temperature fit did not converge: {result.message}")
    return float(math.exp(result.x))


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        reliability_data(y_true, probabilities_before, bins),
        reliability_data(y_true, probabilities_after, bins),
    ]
    figure = Figure(figsize=(10, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, data, title in zip(axes, panels, titles, strict=True):
        width = np.diff(data.bin_edges)
        left = data.bin_edges[:-1]
        filled = data.count > 0
        axis.bar(
            left[filled], data.accuracy[filled], width=width[filled], align="edge",
            color="#4c72b0", edgecolor="white", label="accuracy",
        )  # fmt: skip
        axis.bar(
            left[filled], (data.confidence - data.accuracy)[filled], width=width[filled],
            bottom=data.accuracy[filled], align="edge", color="#dd8452", alpha=0.45,
            edgecolor="#dd8452", label="gap to confidence",
        )  # fmt: skip
        share = data.count / max(1, data.count.sum())
        axis.step(
            data.bin_edges, np.append(share, share[-1]), where="post", color="0.4",
            linewidth=1, label="share of samples",
        )  # fmt: skip
        axis.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (top probability)")
        axis.set_title(f"{title}\nECE = {data.expected_calibration_error:.4f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)

    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    return destination
