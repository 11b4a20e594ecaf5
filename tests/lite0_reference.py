"""Run by test_pretrained in a fresh process per Keras backend (the backend is fixed when
keras is first imported): the converted Keras EfficientNet-Lite0 against the reference
PyTorch implementation (``efficientnet-lite-pytorch``) loaded strictly with the same state
dict, on real images. Prints one JSON object: the largest logit difference, the logits'
scale and both models' top-5 ImageNet classes per image.

    KERAS_BACKEND=jax python tests/lite0_reference.py IMAGE [IMAGE ...]
"""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np

SIZE = 224


def load_rgb(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"{path}: not an image")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)


def main(paths: list[str]) -> None:
    import keras
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from braintumor.model.weights.convert import (
        assign_weights,
        build_lite0_classifier,
        lite0_keras_weights,
        package_state_dict_path,
        read_state_dict,
    )

    source = package_state_dict_path()
    images = np.stack([load_rgb(path) for path in paths])

    model = build_lite0_classifier(SIZE)
    assign_weights(model, lite0_keras_weights(read_state_dict(source)), str(source))
    ours = np.asarray(model.predict(images, batch_size=8, verbose=0), dtype=np.float64)

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=SIZE)
    missing = reference.load_state_dict(
        torch.load(source, map_location="cpu", weights_only=True), strict=True
    )
    reference.eval()
    with torch.no_grad():
        tensor = torch.from_numpy((images - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
        theirs = reference(tensor).numpy().astype(np.float64)
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "strict_load": str(missing),
                "max_abs_difference": float(np.abs(ours - theirs).max()),
                "max_abs_logit": float(np.abs(theirs).max()),
                "top5": np.argsort(-ours, axis=1)[:, :5].tolist(),
                "reference_top5": np.argsort(-theirs, axis=1)[:, :5].tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
