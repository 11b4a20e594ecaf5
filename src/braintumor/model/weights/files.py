"""The backbone weights file that the ``weights`` stage writes and the model builder reads.

One HDF5 file of ``<layer>/<index>`` datasets, tagged with a format name, so that training
loads converted ImageNet weights without the package they came from and without torch.
Reading checks every layer's shapes before assigning anything, so a bad file leaves the
model as it was and the error names the first layer that differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.files import atomic_path


class PretrainedError(ValueError):
    """Pretrained weights cannot be found, read, converted or loaded."""


def weights_file(folder: Path, backbone: str) -> Path:
    """Where the stage writes the converted weights of ``backbone``."""
    return Path(folder) / f"{backbone}.weights.h5"


def assign_weights(model: Any, layers: Mapping[str, list[np.ndarray]], origin: str) -> int:
    """Set every weighted layer of ``model`` from ``layers`` (a name -> arrays mapping).

    Checks everything before assigning anything, so a bad file leaves the model as it was;
    the error names the first layer (in model order) that is missing or differs in shape.
    Entries for layers the model lacks (the ImageNet classifier of a headless backbone)
    are ignored. Returns the number of arrays assigned.
    """
    weighted = [layer for layer in model.layers if layer.weights]
    for layer in weighted:
        if layer.name not in layers:
            raise PretrainedError(f"{origin}: no weights for layer {layer.name!r}")
        arrays = layers[layer.name]
        expected = [tuple(weight.shape) for weight in layer.weights]
        found = [tuple(np.shape(array)) for array in arrays]
        if expected != found:
            raise PretrainedError(
                f"{origin}: layer {layer.name!r} needs shapes {expected}, the file has {found}"
            )
    count = 0
    for layer in weighted:
        layer.set_weights([np.asarray(array) for array in layers[layer.name]])
        count += len(layer.weights)
    return count


def save_weights_file(layers: Mapping[str, list[np.ndarray]], path: Path) -> None:
    """Write layer weights as HDF5 (``<layer>/<index>`` datasets), atomically."""
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as handle:
            handle.attrs["format"] = "braintumor-layer-weights-1"
            for name, arrays in layers.items():
                group = handle.create_group(name)
                for index, array in enumerate(arrays):
                    group.create_dataset(str(index), data=np.asarray(array, dtype=np.float32))


def read_weights_file(path: Path) -> dict[str, list[np.ndarray]]:
    """The layer weights of a file written by ``save_weights_file``; one-line errors."""
    import h5py

    if not path.is_file():
        raise PretrainedError(f"{path}: weights file not found; run `dvc repro weights`")
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != "braintumor-layer-weights-1":
                raise PretrainedError(f"{path}: not a weights file of the weights stage")
            return {
                name: [np.asarray(group[str(i)]) for i in range(len(group))]
                for name, group in handle.items()
            }
    except OSError as error:
        raise PretrainedError(f"{path}: unreadable weights file ({error})") from None


def load_backbone_weights(model: Any, path: Path) -> None:
    """Fill a backbone built by ``model.efficientnet_lite0`` from the stage's file."""
    assign_weights(model, read_weights_file(path), str(path))
