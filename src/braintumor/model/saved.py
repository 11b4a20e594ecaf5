"""Reading a saved ``.keras`` classifier back, checked: the stages that load a trained
model (evaluate, localise) refuse a missing file, a file Keras cannot read and a model
whose output disagrees with the class list, each in one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SavedModelError(ValueError):
    """A ``.keras`` file that is missing, unreadable or not for these classes."""


def load_classifier(path: Path, num_classes: int, producer: str = "the training stages") -> Any:
    """The model saved at ``path`` (not compiled), or ``SavedModelError``; ``producer``
    names what writes the file, for the hint when it is missing."""
    import keras

    if not path.is_file():
        raise SavedModelError(f"{path}: model file not found; run {producer}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a bad file
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SavedModelError(f"{path}: not a Keras model ({first[:200]})") from None
    outputs = int(model.output_shape[-1])
    if outputs != num_classes:
        raise SavedModelError(
            f"{path}: model predicts {outputs} classes but the data has {num_classes}"
        )
    return model
