"""Epoch-start stalls of Keras ``fit`` on an ``ArrayBatches`` by reader setting.

With ``workers=1`` Keras's TensorFlow trainer reads a ``PyDataset`` through ``tf.data``
(``from_generator(...).prefetch(AUTOTUNE)``); destroying that iterator at the next epoch's
start waits for the pipeline's autotuning thread, which sleeps between rounds whose period
doubles up to a minute: some epochs then last seconds (in the fine-tuning stage ~30 s)
longer than their training steps, the machine idle. With ``workers >= 2`` Keras reads
through its own ordered threads, autotuning off. Each setting runs in a fresh process
(settings alternate, ``--repeats`` each) training a small CNN on seeded uint8 images; per
epoch, the wall time minus the time inside the training steps is the stall. Reported per
setting: epochs that stalled over ``--threshold`` s, the stall total, the fit's wall time,
and the ratio of the fit times, measured in this run.

    python bench/loader_stall.py --epochs 25 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CHILD = "--child"


def fit_once(workers: int, epochs: int, images: int, size: int) -> dict[str, Any]:
    """In this (fresh) process: ``epochs`` of a small CNN; per-epoch wall and step seconds."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    from braintumor.training.inputs import ArrayBatches

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (images, size, size, 1)).astype(np.uint8)
    y = rng.integers(0, 4, images).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((size, size, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[float, float]] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start, self.steps = time.perf_counter(), 0.0

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.step_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps += time.perf_counter() - self.step_start

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.rows.append((time.perf_counter() - self.start, self.steps))

    timer = Timer()
    batches = ArrayBatches(x, y, 32, shuffle=True, seed=1, workers=workers)
    started = time.perf_counter()
    model.fit(batches, epochs=epochs, callbacks=[timer], verbose=0, shuffle=False)
    return {"fit_seconds": time.perf_counter() - started, "epochs": timer.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.5, help="stall seconds counted")
    parser.add_argument(CHILD, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(fit_once(args.child, args.epochs, args.images, args.size)))
        return
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for workers in results:
            command = [sys.executable, __file__, CHILD, str(workers)]
            command += ["--epochs", str(args.epochs), "--images", str(args.images)]
            command += ["--size", str(args.size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[workers].append(json.loads(done.stdout.strip().splitlines()[-1]))
    fit_times = {}
    for workers, runs in results.items():
        stalls = [wall - steps for run in runs for wall, steps in run["epochs"]]
        stalled = [stall for stall in stalls if stall > args.threshold]
        fit_times[workers] = statistics.median(run["fit_seconds"] for run in runs)
        print(
            f"workers={workers}: {len(stalled)} of {len(stalls)} epochs stalled "
            f"> {args.threshold} s, {sum(stalled):.1f} s in all; "
            f"fit {fit_times[workers]:.1f} s (median of {len(runs)})"
        )
    print(f"fit time, workers=1 / workers=2: {fit_times[1] / fit_times[2]:.2f}x")


if __name__ == "__main__":
    main()
