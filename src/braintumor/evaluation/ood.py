"""Out-of-distribution detection on the model's own features: is this input a brain MRI slice?

The classifier answers one of four tumour classes for any picture, so a photograph or a
noise image gets a confident "notumor". Brightness and contrast statistics of the input
cannot tell a slice from a gray photograph with a similar histogram, and they flag real
slices from a scanner with another contrast. The model's own representation can: a slice
lands near one of the class clusters of the pooled backbone features, other content does
not. This module scores that, and picks the refusal threshold from validation slices so
the false-alarm rate on real slices is a parameter, not a guess.

Methods (higher score = more unusual):

- ``mahalanobis``: the smallest Mahalanobis distance (squared) of the pooled backbone
  features (square-rooted, ``transform_features``) to the class means of the training
  features, under one covariance shared by the classes and shrunk towards a scaled
  identity (Ledoit-Wolf), because 1,280 feature dimensions from a few thousand images
  give a singular sample covariance (Lee et al., NeurIPS 2018, without their input
  perturbation).
- ``energy``: the negative log-sum-exp of the logits (Liu et al., NeurIPS 2020); needs no
  fit, but a network trained with softmax can be sure about what it has never seen.

Fitted in the evaluate stage on training features, thresholded on validation features,
saved as ``ood.npz`` in the model bundle (no pickles; ``serving.bundle`` writes, hashes
and reads it). Serving runs ``FeatureExtractor`` once per batch (probabilities, features
and logits from one forward pass), then ``OodDetector.score`` and
``OodDetector.is_outlier``.

Core layer: NumPy and scikit-learn, Keras only inside ``FeatureExtractor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.files import read_arrays, write_arrays

METHODS = ("mahalanobis", "energy")
FEATURE_LAYER = "head_pool"  # model.HEAD_PREFIX + "pool": global average of the backbone
LOGIT_LAYER = "head_predictions"  # model.OUTPUT: a softmax Dense, its logits are rebuilt
FORMAT_VERSION = 1


class OodError(ValueError):
    """Features, labels or a saved detector cannot be used (wrong shape, unknown method)."""


def _check_matrix(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise OodError(f"{name}: expected a non-empty (N, D) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise OodError(f"{name}: contains NaN or infinite values")
    return array


def transform_features(features: np.ndarray) -> np.ndarray:
    """Square roots of the pooled activations, the Mahalanobis method's input.

    Pooled ReLU activations are non-negative and right-skewed; a shared-covariance
    Gaussian fits their square roots better (a variance-stabilising transform). Measured
    with ``bench/ood.py``: fewer false alarms on real test slices at the same detection.
    """
    return np.sqrt(np.maximum(np.asarray(features, dtype=np.float64), 0.0))


def fit_mahalanobis(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix of the shared, shrunk within-class covariance.

    Returns ``(means, whitening)`` already whitened: the squared Mahalanobis distance of a
    feature vector ``f`` to class ``k`` is ``|f @ whitening - means[k]|^2``. Whitening once
    here keeps scoring a matrix product, and the saved file free of a matrix inverse.
    """
    from sklearn.covariance import ledoit_wolf

    features = _check_matrix(features, "features")
    labels = np.asarray(labels)
    if labels.shape != (len(features),):
        raise OodError(f"labels: expected shape ({len(features)},), got {labels.shape}")
    present = np.unique(labels)
    if present.min() < 0 or present.max() >= num_classes or len(present) != num_classes:
        raise OodError(f"labels: every class 0..{num_classes - 1} needs training features")
    means = np.stack([features[labels == k].mean(axis=0) for k in range(num_classes)])
    centred = features - means[labels]
    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(float(eigenvalues.max()) * 1e-9, 1e-12)
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
    return means @ whitening, whitening


def mahalanobis_scores(
    features: np.ndarray, means: np.ndarray, whitening: np.ndarray
) -> np.ndarray:
    """The squared Mahalanobis distance of each row to its nearest class mean (N,).

    The whitening product runs in ``whitening``'s own dtype (``OodDetector.score`` passes
    the float32 matrix its file holds: half the memory float64 reads, 0.5 -> 0.25 ms per
    upload on a busy core, scores within 2e-7 relative), the distances in float64."""
    features = _check_matrix(features, "features")
    if features.shape[1] != whitening.shape[0]:
        raise OodError(
            f"features: {features.shape[1]} dimensions, the detector expects {whitening.shape[0]}"
        )
    whitened = np.asarray(features.astype(whitening.dtype) @ whitening, np.float64)
    distances = (
        (whitened**2).sum(axis=1, keepdims=True)
        - 2.0 * whitened @ means.T
        + (means**2).sum(axis=1)[None, :]
    )
    return np.maximum(distances.min(axis=1), 0.0)


def energy_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp(logits / T)`` per row: low (very negative) for confident inputs."""
    logits = _check_matrix(logits, "logits")
    if temperature <= 0:
        raise OodError(f"temperature: must be > 0, got {temperature}")
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    return -temperature * (top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1)))


def choose_threshold(validation_scores: np.ndarray, false_alarm_rate: float) -> float:
    """The score above which at most ``false_alarm_rate`` of validation slices lie.

    Validation slices are real in-distribution inputs the detector was not fitted on, so
    this sets the refusal rate on real slices directly (the upper empirical quantile).
    """
    scores = np.asarray(validation_scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.isfinite(scores).all():
        raise OodError("validation scores: need a non-empty, finite array")
    if not 0 < false_alarm_rate < 1:
        raise OodError(f"false_alarm_rate: must be in (0, 1), got {false_alarm_rate}")
    return float(np.quantile(scores, 1.0 - false_alarm_rate, method="higher"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out-of-distribution (positive) from real
    inputs by score: 1.0 separates perfectly, 0.5 is chance (ties count half)."""
    inside = np.asarray(in_scores, dtype=np.float64).ravel()
    outside = np.asarray(out_scores, dtype=np.float64).ravel()
    if inside.size == 0 or outside.size == 0:
        raise OodError("auroc: both score arrays must be non-empty")
    ranks = _average_ranks(np.concatenate([inside, outside]))
    positive_ranks = ranks[inside.size :].sum()
    return float(
        (positive_ranks - outside.size * (outside.size + 1) / 2) / (inside.size * outside.size)
    )


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (Mann-Whitney)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


@dataclass(frozen=True)
class OodDetector:
    """A fitted detector: the method, its fitted arrays, the refusal threshold, and the
    sorted validation scores (so an input's score can be told as a percentile of real
    slices: "more unusual than 99.7% of validation slices")."""

    method: str
    threshold: float
    false_alarm_rate: float
    validation_scores: np.ndarray
    means: np.ndarray | None = None
    whitening: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OodError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "mahalanobis" and (self.means is None or self.whitening is None):
            raise OodError("mahalanobis: the detector needs class means and a whitening matrix")

    @property
    def needs_logits(self) -> bool:
        """Whether ``score`` reads the logits (the energy score); Mahalanobis does not, so a
        caller may skip computing them."""
        return self.method == "energy"

    @cached_property
    def _whitening(self) -> np.ndarray:
        """The whitening matrix in float32 (what ``save`` writes), made once: scoring reads
        it for every upload."""
        return np.ascontiguousarray(self.whitening, np.float32)

    def score(self, features: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
        """Scores (N,) of a batch from ``FeatureExtractor``: higher is more unusual."""
        if self.method == "energy":
            if logits is None:
                raise OodError("energy: the score needs the logits")
            return energy_scores(logits)
        return mahalanobis_scores(
            transform_features(features), np.asarray(self.means, np.float64), self._whitening
        )

    def is_outlier(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is above the threshold: refuse, it is not like a slice."""
        return np.asarray(scores) > self.threshold

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share (0-100) of validation slices with a lower score than each score."""
        ordered = np.sort(self.validation_scores)
        below = np.searchsorted(ordered, np.asarray(scores, dtype=np.float64), side="left")
        return 100.0 * below / len(ordered)

    def save(self, path: Path) -> None:
        """Write (atomically) an ``.npz`` of plain arrays, loadable without pickle."""
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "method": np.array(self.method),
            "threshold": np.array(self.threshold),
            "false_alarm_rate": np.array(self.false_alarm_rate),
            "validation_scores": np.sort(np.asarray(self.validation_scores, np.float64)),
        }
        if self.method == "mahalanobis":
            arrays["means"] = np.asarray(self.means, np.float32)
            arrays["whitening"] = np.asarray(self.whitening, np.float32)
        write_arrays(path, arrays, compressed=True)

    @classmethod
    def load(cls, path: Path) -> OodDetector:
        """Read a detector written by ``save``; ``OodError`` for a missing or bad file."""
        try:
            arrays = read_arrays(path)
        except (OSError, ValueError) as error:
            raise OodError(f"{path}: not an out-of-distribution detector ({error})") from None
        version = int(arrays.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise OodError(f"{path}: format {version}, expected {FORMAT_VERSION}")
        missing = {"method", "threshold", "false_alarm_rate", "validation_scores"} - set(arrays)
        if missing:
            raise OodError(f"{path}: missing {', '.join(sorted(missing))}")
        means, whitening = arrays.get("means"), arrays.get("whitening")
        return cls(
            method=str(arrays["method"]),
            threshold=float(arrays["threshold"]),
            false_alarm_rate=float(arrays["false_alarm_rate"]),
            validation_scores=np.asarray(arrays["validation_scores"], np.float64),
            means=None if means is None else np.asarray(means, np.float64),
            whitening=None if whitening is None else np.asarray(whitening, np.float64),
        )


@dataclass(frozen=True)
class ModelOutputs:
    """One forward pass: probabilities (N, K), pooled features (N, D), logits (N, K)."""

    probabilities: np.ndarray
    features: np.ndarray
    logits: np.ndarray


def fit_detector(
    method: str,
    train: ModelOutputs,
    train_labels: np.ndarray,
    validation: ModelOutputs,
    false_alarm_rate: float,
) -> OodDetector:
    """Fit on the training outputs, then set the threshold on validation outputs.

    Fitting and thresholding on different images matters: the network has memorised its
    training slices, so their distances are smaller than an unseen real slice's, and a
    threshold taken from them would refuse far more real slices than asked for.
    """
    if method not in METHODS:
        raise OodError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    means = whitening = None
    if method == "mahalanobis":
        num_classes = int(np.asarray(train.probabilities).shape[1])
        fitted = fit_mahalanobis(transform_features(train.features), train_labels, num_classes)
        # rounded as saved, so the threshold holds for the loaded detector's scores exactly
        means, whitening = (array.astype(np.float32).astype(np.float64) for array in fitted)
    unthresholded = OodDetector(method, np.inf, false_alarm_rate, np.zeros(1), means, whitening)
    scores = unthresholded.score(validation.features, validation.logits)
    return OodDetector(
        method,
        choose_threshold(scores, false_alarm_rate),
        false_alarm_rate,
        scores,
        means,
        whitening,
    )


class FeatureExtractor:
    """Probabilities, pooled backbone features and logits of a bundle's model in one pass.

    The served model ends in a softmax Dense layer; its logits are rebuilt from that
    layer's input and weights, so the saved model file does not change.
    """

    def __init__(self, model: Any) -> None:
        import keras

        try:
            pooled = model.get_layer(FEATURE_LAYER).output
            head = model.get_layer(LOGIT_LAYER)
        except ValueError as error:
            raise OodError(
                f"model has no {FEATURE_LAYER} / {LOGIT_LAYER} layer ({error})"
            ) from None
        self._model = keras.Model(model.inputs, [model.output, pooled, head.input])
        kernel, bias = (np.asarray(weight, np.float64) for weight in head.get_weights())
        self._kernel, self._bias = kernel, bias

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> ModelOutputs:
        """Outputs for uint8 images (N, S, S) or (N, S, S, 1), batch by batch."""
        batch = np.asarray(images)
        if batch.ndim == 3:
            batch = batch[..., None]
        parts: list[list[np.ndarray]] = [[], [], []]
        for start in range(0, len(batch), batch_size):
            chunk = np.asarray(batch[start : start + batch_size], dtype=np.float32)
            for part, value in zip(parts, self._model.predict_on_batch(chunk), strict=True):
                part.append(np.asarray(value, dtype=np.float64))
        probabilities, features, head_inputs = (np.concatenate(part) for part in parts)
        return ModelOutputs(probabilities, features, head_inputs @ self._kernel + self._bias)
