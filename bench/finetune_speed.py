"""Seconds per fine-tuning step of two ``trainable`` modes, measured interleaved.

On a shared machine wall times drift with the other load, so the seconds measured are the
process's CPU seconds (user + system of all its threads, ``time.process_time``: what a
step costs, whoever else runs), wall seconds beside them, and the two modes run in
alternating rounds of ``--steps`` training steps each (the order swapped every round) and
the report is the median of the per-round ratios (each round's two modes ran back to back,
under about the same load) and the ratio of the medians, plus the validation
(forward-only) seconds per batch, which freezing does not change. The model is the
quickstart's: EfficientNet-Lite0 (random weights: the speed does not depend on their
values), the quickstart augmentation, Adam, uint8 batches; the epoch ratio uses the
quickstart's batch counts per epoch.

    python bench/finetune_speed.py --rounds 3 --steps 15 --size 128 --first-block 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def training_model(mode: str, first_block: int, size: int, noise: float):  # noqa: ANN201
    """A compiled training model (augmenter in front) with ``mode``'s layers trainable."""
    import keras

    from braintumor.core.schema import AugmentParams, ModelParams
    from braintumor.model.augment import build_augmenter, build_training_model
    from braintumor.model.classifier import build_model, set_trainable

    model = build_model(ModelParams(backbone="efficientnet_lite0", weights="none"), size, 4)
    set_trainable(model, mode, first_block)
    augment = AugmentParams(interpolation="nearest", noise=noise)
    wrapped = build_training_model(model, build_augmenter(augment, size, 0))
    wrapped.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    return wrapped


WALL: dict[str, list[float]] = {}


def seconds_per_step(model, images: np.ndarray, labels: np.ndarray, name: str = "") -> float:  # noqa: ANN001
    """CPU seconds per training step (wall seconds per step go to ``WALL[name]``)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(images, labels, batch_size=32, epochs=1, shuffle=False, verbose=0)
    steps = len(images) // 32
    WALL.setdefault(name, []).append((time.perf_counter() - wall) / steps)
    return (time.process_time() - cpu) / steps


def seconds_per_val_batch(model, images: np.ndarray) -> float:  # noqa: ANN001
    cpu = time.process_time()
    model.predict(images, batch_size=32, verbose=0)
    return (time.process_time() - cpu) / (len(images) // 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--first-block", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--train-batches", type=int, default=128, help="per epoch")
    parser.add_argument("--val-batches", type=int, default=23, help="per epoch")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32 * args.steps, args.size, args.size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, len(images))
    modes = {
        "all_but_batchnorm": training_model("all_but_batchnorm", 0, args.size, args.noise),
        f"from_block {args.first_block}": training_model(
            "from_block", args.first_block, args.size, args.noise
        ),
    }
    for model in modes.values():  # compile (and warm) before anything is timed
        seconds_per_step(model, images[:64], labels[:64])
    times: dict[str, list[float]] = {name: [] for name in modes}
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
        for name in order:
            times[name].append(seconds_per_step(modes[name], images, labels, name))
            print(
                f"round {round_index}: {name} {times[name][-1]:.3f} CPU s/step, "
                f"{WALL[name][-1]:.3f} wall s/step",
                flush=True,
            )
    val = seconds_per_val_batch(modes["all_but_batchnorm"], images)
    median = {name: statistics.median(values) for name, values in times.items()}
    epoch = {
        name: args.train_batches * step + args.val_batches * val for name, step in median.items()
    }
    base, cheap = list(modes)
    paired = [slow / fast for slow, fast in zip(times[base], times[cheap], strict=True)]
    report = {
        "cpu_seconds_per_step": {name: round(value, 4) for name, value in median.items()},
        "wall_seconds_per_step": {
            name: round(statistics.median(values), 4) for name, values in WALL.items() if name
        },
        "all_steps": times,
        "val_cpu_seconds_per_batch": round(val, 4),
        "step_speedup_paired_median": round(statistics.median(paired), 3),
        "step_speedup_per_round": [round(value, 3) for value in paired],
        "step_speedup": round(median[base] / median[cheap], 3),
        "epoch_speedup": round(epoch[base] / epoch[cheap], 3),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
