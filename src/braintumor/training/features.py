"""The frozen phase on cached features: the backbone's pooled output computed once, and the
head trained alone on it.

A frozen backbone gives every epoch the same features, so the head can train on them in
seconds instead of running the backbone every step; the price is no augmentation (which
would change the features), so only a phase that trains the head alone may do it.

The audit stage computes the same pooled features of every split for its out-of-fold
heads (one backbone pass over ~6,000 images, ~25 s on two cores), so it saves them
(``save_features``) and phase 1 reuses them (``load_features``) when their key says they
come from the same model, weights file, input size, data and numerics; otherwise phase 1
computes its own, and its metrics say why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from braintumor.core.files import atomic_path, optional_sha256, write_json
from braintumor.core.schema import Params
from braintumor.training.checkpointing import PhaseError

if TYPE_CHECKING:
    import keras


def check_cacheable(phase: str, trainable: str) -> None:
    """Refuse cached features for a phase whose ``trainable`` mode is not the head alone."""
    if trainable != "head":
        raise PhaseError(
            f"train.{phase}.cache_features: only a phase that trains the head alone can "
            f"reuse backbone features (trainable is {trainable!r})"
        )


# A head on cached features is a few small dense layers: a step costs less than Keras's
# per-step dispatch, so each compiled call runs this many steps. The same batches in the
# same order give the same weights (equal to the last digit on real Lite0 features), in
# 17.1 s instead of 29.2 s for 12 epochs of 128 steps (2 busy cores).
HEAD_STEPS_PER_EXECUTION = 16


def head_steps_per_execution() -> int:
    """``HEAD_STEPS_PER_EXECUTION``, or 1 on PyTorch (Keras allows no more there)."""
    import keras

    return 1 if keras.backend.backend() == "torch" else HEAD_STEPS_PER_EXECUTION


def head_model(model: keras.Model) -> keras.Model:
    """The head of a ``build_model`` model as a model of its own, taking pooled backbone
    features. It shares the layers (and so the weights) of ``model``: training it trains
    ``model``'s head, and ``model`` is what gets saved."""
    import keras

    from braintumor.model.classifier import HEAD_PREFIX, is_head_layer

    layers = [layer for layer in model.layers if is_head_layer(layer)]
    pool = model.get_layer(f"{HEAD_PREFIX}pool")
    if not layers or layers[0] is not pool:
        raise PhaseError("model has no head_pool layer first in its head")
    inputs = keras.Input(pool.output.shape[1:], name="features")
    x = inputs
    for layer in layers[1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def backbone_features(
    model: keras.Model, images: np.ndarray, indices: np.ndarray | None, batch_size: int
) -> np.ndarray:
    """Pooled backbone features (float32) of ``images[indices]``, batch by batch, with the
    backbone in inference mode (as a frozen backbone runs while its head trains)."""
    import keras

    from braintumor.model.classifier import HEAD_PREFIX

    extractor = keras.Model(model.inputs, model.get_layer(f"{HEAD_PREFIX}pool").output)
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    features = np.zeros((len(rows), extractor.output_shape[-1]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        # Read each batch in file order (memory map), write it back in the caller's order.
        order = start + np.argsort(rows[start : start + batch_size])
        batch = np.asarray(images[rows[order]], dtype=np.float32)
        features[order] = np.asarray(extractor.predict_on_batch(batch), dtype=np.float32)
    return features


FEATURES_META = "meta.json"


def features_key(params: Params, data_digest: str, pretrained: Path | None) -> str:
    """What pooled features depend on: the model section (backbone, weights, input
    normalisation), the input size, the backbone file's bytes, the processed data (its
    digest changes with every row, and with the label-issue rows a phase drops) and the
    numerics (backend, mixed precision); without a backbone file, the seed that initialises
    the backbone. Equal keys, the same features to float rounding."""
    weights = optional_sha256(pretrained)
    content = {
        "model": dataclasses.asdict(params.model),
        "image_size": params.common.image_size,
        "classes": list(params.common.classes),
        "pretrained": weights,
        "init_seed": params.common.seed if weights is None else None,
        "data": data_digest,
        "backend": params.train.backend,
        "mixed_precision": params.train.mixed_precision,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def save_features(folder: Path, features: dict[str, np.ndarray], key: str) -> None:
    """Each split's pooled features (``<split>.npy``) and their key, as one folder that
    appears whole or not at all (the audit stage writes it; phase 1 reads it)."""
    with atomic_path(folder, directory=True) as temporary:
        for split, values in features.items():
            np.save(temporary / f"{split}.npy", np.asarray(values, dtype=np.float32))
        rows = {split: int(len(values)) for split, values in features.items()}
        write_json(temporary / FEATURES_META, {"key": key, "rows": rows})


def load_features(
    folder: Path | None, key: str, rows: dict[str, int]
) -> tuple[dict[str, np.ndarray] | None, str]:
    """The saved features of ``rows``' splits when ``folder`` holds them for ``key`` with
    those row counts, else None; the reason goes in the phase's metrics either way, so a
    silent recomputation (another backbone file, dropped rows) can be seen."""
    if folder is None:
        return None, "no features folder given"
    meta_path = folder / FEATURES_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, f"{meta_path}: missing or unreadable"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None, f"{folder}: made from another model, input size or data"
    loaded = {}
    for split, count in rows.items():
        try:
            values = np.load(folder / f"{split}.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            return None, f"{folder / f'{split}.npy'}: unreadable ({type(error).__name__})"
        if values.ndim != 2 or len(values) != count or meta.get("rows", {}).get(split) != count:
            return None, f"{folder / f'{split}.npy'}: {len(values)} rows, the data has {count}"
        loaded[split] = values.astype(np.float32, copy=False)
    return loaded, f"reused {folder}"
