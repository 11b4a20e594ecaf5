"""Benchmark Grad-CAM latency per image on the CPU for a serving backbone and image size.

Usage (from the repository root)::

    .venv/bin/python bench/explain.py [--backbone efficientnet_lite0] [--size 128]
        [--images 16] [--batch-sizes 8 16] [--repeats 3] [--naive-images 4]

The model is ``braintumor.model.classifier.build_model`` with ``--backbone`` built flat, the study's
head, and ``weights: none`` (latency does not depend on the weight values, and no download
or converted file is needed); the layer is ``model.feature_layer_name(backbone)``. The
default, EfficientNet-Lite0 at 128 px (layer ``top_activation``, a 4x4 map), is the model
the CPU quickstart profile serves; ``--backbone resnet50 --size 224`` (layer
``conv5_block3_out``, 7x7) is the paper profile's. On random 0-255 gray images it
measures, in one run and one process:

- ``cached, batch B``: ``braintumor.explain.gradcam.GradCam`` (the auxiliary model and the
  ``tf.function`` step built once per model and layer), B images per call;
- ``cached, one by one``: the same instance, one image per call (what the app does);
- ``eager, model prebuilt``: the auxiliary model built once, the gradient step run
  eagerly per image (isolates what compiling the step buys);
- ``naive``: per image, build the gradient model from scratch and run the step eagerly
  (the common Keras-tutorial shape of Grad-CAM code).

Every variant computes the same map (the centred logit of the predicted class), and the
benchmark checks that they agree before timing. The one-off cost of the cached variants
(building the auxiliary model and tracing) is reported separately. Each timed variant
runs ``--repeats`` times; the table shows the fastest and the median repeat in ms per
image, and each variant's speed-up over ``naive`` (median / median).

Not a test: numbers depend on the machine and its load (printed with the results).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_SIZE = 128


def build(backbone: str, size: int) -> Any:
    """The served architecture (``backbone`` flat + the study's head), random weights."""
    from braintumor.core.schema import ModelParams
    from braintumor.model.classifier import build_model

    return build_model(ModelParams(backbone=backbone, weights="none"), size, 4)


def naive_gradcam(model: Any, image: np.ndarray, layer: str, prebuilt: Any = None) -> np.ndarray:
    """Grad-CAM the tutorial way: build the gradient model (unless ``prebuilt``), run one
    image eagerly under a ``GradientTape``, weight, ReLU, normalise, resize."""
    import cv2
    import keras
    import tensorflow as tf

    from braintumor.model.classifier import OUTPUT

    output_layer = model.get_layer(OUTPUT)
    auxiliary = prebuilt or keras.Model(
        model.input, [model.get_layer(layer).output, output_layer.input]
    )
    with tf.GradientTape() as tape:
        features, penultimate = auxiliary(image[None], training=False)
        logits = tf.matmul(penultimate, output_layer.kernel) + output_layer.bias
        centred = logits - tf.reduce_mean(logits, axis=-1, keepdims=True)
        score = centred[:, int(tf.argmax(logits[0]))]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", features, weights))[0].numpy()
    cam = cv2.resize(cam, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    spread = cam.max() - cam.min()
    return (cam - cam.min()) / spread if spread > 0 else np.zeros_like(cam)


def timed(function: Callable[[], Any], repeats: int, images: int) -> list[float]:
    """Milliseconds per image of each repeat."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        values.append(1000 * (time.perf_counter() - start) / images)
    return values


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from braintumor.model.classifier import BACKBONES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default=DEFAULT_BACKBONE,
        help="the served backbone (the paper profile's is resnet50 at 224 px)",
    )
    parser.add_argument("--images", type=int, default=16, help="images per cached variant")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-images", type=int, default=4, help="images per eager variant")
    parser.add_argument("--naive-repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px")
    args = parser.parse_args(argv)
    if min(args.images, args.repeats, args.naive_images, args.naive_repeats) < 1:
        parser.error("counts must be >= 1")

    import keras

    from braintumor.explain.gradcam import GradCam
    from braintumor.model.classifier import OUTPUT, feature_layer_name

    layer = feature_layer_name(args.backbone)

    if keras.backend.backend() != "tensorflow":
        parser.error("the naive baseline uses tf.GradientTape: run with KERAS_BACKEND=tensorflow")
    total_start = time.perf_counter()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.images, args.size, args.size, 1)).astype(np.float32)

    start = time.perf_counter()
    model = build(args.backbone, args.size)
    build_seconds = time.perf_counter() - start

    start = time.perf_counter()
    explainer = GradCam.for_model(model, layer)
    reference = explainer(images[:1], batch_size=1)  # builds and traces
    first_call_seconds = time.perf_counter() - start

    # The variants must compute the same map before their speed is compared.
    output_layer = model.get_layer(OUTPUT)
    prebuilt = keras.Model(model.input, [model.get_layer(layer).output, output_layer.input])
    grid = tuple(model.get_layer(layer).output.shape[1:3])
    naive = naive_gradcam(model, images[0], layer)
    eager = naive_gradcam(model, images[0], layer, prebuilt)
    batched = explainer(images[:2], batch_size=2)[0]
    disagreement = max(
        float(np.abs(naive - reference[0]).max()),
        float(np.abs(eager - reference[0]).max()),
        float(np.abs(batched - reference[0]).max()),
    )
    if disagreement > 1e-3:
        print(f"variants disagree: max |difference| {disagreement:.2e}", file=sys.stderr)
        return 1

    rows: list[tuple[str, int, list[float]]] = []
    for batch_size in args.batch_sizes:
        explainer(images[:batch_size], batch_size=batch_size)  # warm this batch shape

        def batched_call(size: int = batch_size) -> Any:
            return explainer(images, batch_size=size)

        rows.append(
            (
                f"cached, batch {batch_size}",
                args.images,
                timed(batched_call, args.repeats, args.images),
            )
        )
    rows.append(
        (
            "cached, one by one",
            args.images,
            timed(
                lambda: [explainer(images[i : i + 1], batch_size=1) for i in range(args.images)],
                args.repeats,
                args.images,
            ),
        )
    )
    subset = images[: args.naive_images]
    rows.append(
        (
            "eager, model prebuilt",
            args.naive_images,
            timed(
                lambda: [naive_gradcam(model, image, layer, prebuilt) for image in subset],
                args.naive_repeats,
                args.naive_images,
            ),
        )
    )
    rows.append(
        (
            "naive (build + eager)",
            args.naive_images,
            timed(
                lambda: [naive_gradcam(model, image, layer) for image in subset],
                args.naive_repeats,
                args.naive_images,
            ),
        )
    )

    naive_median = statistics.median(rows[-1][2])
    command = shlex.join([".venv/bin/python", "bench/explain.py", *(argv or sys.argv[1:])])
    load = os.getloadavg()
    print()
    print(
        f"Grad-CAM benchmark: {args.backbone} + head, {args.size} px, layer {layer} "
        f"({grid[0]}x{grid[1]} map), weights none"
    )
    print(f"command: {command}")
    print(
        f"keras {keras.__version__} ({keras.backend.backend()}), {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )
    print(
        f"model build {build_seconds:.1f} s; cached first call (aux model + trace, 1 image) "
        f"{first_call_seconds:.1f} s; variants agree to {disagreement:.1e}"
    )
    print()
    header = "| variant | images x repeats | ms/image min | ms/image median | speed-up vs naive |"
    print(header)
    print("|---|---|---|---|---|")
    for name, count, values in rows:
        median = statistics.median(values)
        print(
            f"| {name} | {count} x {len(values)} | {min(values):.0f} | {median:.0f} "
            f"| {naive_median / median:.1f}x |"
        )
    print()
    print(f"total wall time {time.perf_counter() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
