"""Op determinism: does the same seed repeat the same weights, and what does asking for it cost?

Each run is a fresh process (determinism is a process-wide switch, set before the first
op), training the quickstart's fine-tuning model (EfficientNet-Lite0 at ``--size``, blocks
from ``--first-block`` on trainable, the quickstart augmentation with noise and the
resolution round trip, Adam with weight averaging) for ``--steps`` steps on the same
seeded uint8 batches. Runs alternate off, on, off, on, ... (``--repeats`` of each), so both
settings see about the same load. Reported per setting: whether the repeats ended with
bit-identical weights (and the largest difference when not), and the median CPU seconds
per step (``time.process_time`` of the process: what a step costs whoever else runs), with
the on/off ratio measured in this run.

    python bench/determinism.py --steps 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import numpy as np

CHILD = "--child"


def train_once(deterministic: bool, steps: int, size: int, first_block: int) -> dict[str, Any]:
    """In this (fresh) process: the steps, then a digest of the weights and the timing."""
    from braintumor.model.backend import deterministic_ops, use_backend

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    use_backend(backend)
    if deterministic:
        deterministic_ops(backend)
    import time

    import keras

    from braintumor.core.schema import AugmentParams, ModelParams
    from braintumor.model.augment import build_augmenter, build_training_model
    from braintumor.model.classifier import build_model, set_trainable

    keras.utils.set_random_seed(7)
    model = build_model(ModelParams(backbone="efficientnet_lite0", weights="none"), size, 4)
    set_trainable(model, "from_block", first_block)
    augment = AugmentParams(interpolation="nearest", noise=10.0, downscale=0.6)
    wrapped = build_training_model(model, build_augmenter(augment, size, 0))
    wrapped.compile(
        optimizer=keras.optimizers.Adam(1e-4, use_ema=True, ema_momentum=0.99),
        loss="sparse_categorical_crossentropy",
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps + 1, 32, size, size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, (steps + 1, 32))
    wrapped.train_on_batch(images[0], labels[0])  # compiles
    seconds = []
    for step in range(1, steps + 1):
        started = time.process_time()
        wrapped.train_on_batch(images[step], labels[step])
        seconds.append(time.process_time() - started)
    weights = [np.asarray(w) for w in model.get_weights()]
    return {
        "deterministic": deterministic,
        "cpu_seconds_per_step": statistics.median(seconds),
        "weights": [w.ravel()[:: max(1, w.size // 64)].tolist() for w in weights],
        "digest": float(sum(float(np.abs(w).sum()) for w in weights)),
    }


def run_child(deterministic: bool, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        CHILD,
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--first-block",
        str(args.first_block),
    ]
    if deterministic:
        command.append("--deterministic")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"determinism: a child run failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_difference(first: dict[str, Any], second: dict[str, Any]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
        for a, b in zip(first["weights"], second["weights"], strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--first-block", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        result = train_once(args.deterministic, args.steps, args.size, args.first_block)
        print(json.dumps(result))
        return 0
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for setting in (False, True):
            runs[setting].append(run_child(setting, args))
    print(f"{args.steps} steps of batch 32 at {args.size} px, {args.repeats} runs each\n")
    print("| setting | repeats bit-identical | largest weight difference | CPU s/step |")
    print("|---|---|---|---|")
    medians = {}
    for setting, results in runs.items():
        gaps = [largest_difference(results[0], other) for other in results[1:]]
        medians[setting] = statistics.median(r["cpu_seconds_per_step"] for r in results)
        name = "deterministic" if setting else "default"
        identical = all(gap == 0.0 for gap in gaps)
        print(f"| {name} | {identical} | {max(gaps, default=0.0):.3g} | {medians[setting]:.3f} |")
    print(f"\ncost of determinism (CPU s/step, on / off): {medians[True] / medians[False]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
