"""Training throughput per Keras backend: the real input pipeline against device-resident data.

For every backend installed here (tensorflow; jax and torch when present) a child process
(the backend is fixed at ``import keras``) builds the stage's training model (augmentation
+ backbone + head), compiles it as the stage does, and times the same number of steps on:

- ``memmap``: ``fit`` over ``ArrayBatches`` on the memory-mapped uint8 cache (the stage's
  real path: seeded shuffle, gather from the memory map, host-to-device copy);
- ``host``: ``fit`` over one fixed in-memory batch (no gather: isolates the memory map);
- ``device``: ``train_on_batch`` on a batch already on the device (no input pipeline at
  all: the ceiling).

``memmap / device`` near 1 means the input pipeline keeps the accelerator busy. Data: the
preprocess stage's ``data/processed`` when its image size matches ``--size``, otherwise a
small cache built from ``../shared/datasets/msoud`` with the real preprocessing.

    python bench/train.py                   # ~3 min on 2 idle CPU cores (torch and jax included)
    python bench/train.py --backends tensorflow                 # ~1 min
    python bench/train.py --size 224 --backbone resnet50 --batch-size 64 --steps 50
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MSOUD = ROOT.parent / "shared" / "datasets" / "msoud"
BACKENDS = ("tensorflow", "jax", "torch")


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def cached_arrays(data: Path, size: int, count: int, out: Path) -> Path:
    """A folder holding ``train_images.npy`` / ``train_labels.npy`` at ``size`` px."""
    meta = data / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("image_size") == size:
        return data
    folder = out / f"cache{size}"
    if (folder / "train_images.npy").is_file():
        return folder
    from braintumor.core.schema import PreprocessParams
    from braintumor.data.imaging import decode_image, preprocess_gray

    classes = sorted(p.name for p in (MSOUD / "Training").iterdir() if p.is_dir())
    images, labels = [], []
    per_class = -(-count // len(classes))
    for label, name in enumerate(classes):
        for path in sorted((MSOUD / "Training" / name).glob("*.jpg"))[:per_class]:
            gray = decode_image(path.read_bytes(), name=path.name).gray
            images.append(preprocess_gray(gray, size, PreprocessParams()))
            labels.append(label)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train_images.npy", np.stack(images)[..., None])
    np.save(folder / "train_labels.npy", np.asarray(labels, dtype=np.int64))
    return folder


def measure(args: argparse.Namespace) -> dict[str, float | str]:
    """Runs in the child process, after KERAS_BACKEND was set."""
    import keras

    from braintumor.core.schema import AugmentParams, ModelParams
    from braintumor.model.augment import build_augmenter, build_training_model
    from braintumor.model.classifier import build_model, set_trainable
    from braintumor.training.inputs import ArrayBatches

    class FixedBatch(keras.utils.PyDataset):
        def __init__(self, images: np.ndarray, labels: np.ndarray, steps: int) -> None:
            super().__init__()
            self.batch, self.steps = (images, labels), steps

        def __len__(self) -> int:
            return self.steps

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            return self.batch

    keras.utils.set_random_seed(0)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    images = np.load(Path(args.cache) / "train_images.npy", mmap_mode="r")
    labels = np.load(Path(args.cache) / "train_labels.npy").astype(np.int32)
    params = ModelParams(backbone=args.backbone, weights="none", batchnorm_momentum=0.9)
    model = build_model(params, args.size, 4)
    set_trainable(model, args.trainable)
    training = build_training_model(model, build_augmenter(AugmentParams(), args.size, 0))
    training.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=args.jit_compile if args.jit_compile == "auto" else args.jit_compile == "on",
    )
    batch = args.batch_size

    def memmap_data(epoch: int, steps: int = args.steps) -> ArrayBatches:
        return ArrayBatches(
            images,
            labels,
            batch,
            shuffle=True,
            seed=0,
            epoch=epoch,
            steps=steps,
            workers=args.workers,
        )

    started = time.perf_counter()
    training.fit(memmap_data(0, steps=2), epochs=1, verbose=0, shuffle=False)  # trace, compile
    compile_seconds = time.perf_counter() - started
    fixed_images = np.ascontiguousarray(images[:batch])
    fixed_labels = labels[:batch]
    # The device path traces train_on_batch's function once, untimed.
    device_images = keras.ops.convert_to_tensor(fixed_images)
    device_labels = keras.ops.convert_to_tensor(fixed_labels)
    training.train_on_batch(device_images, device_labels)
    rates: dict[str, list[float]] = {"memmap": [], "host": [], "device": []}
    for repeat in range(args.repeats):
        for mode in rates:
            started = time.perf_counter()
            if mode == "memmap":
                data = memmap_data(repeat + 1)
                training.fit(data, epochs=1, verbose=0, shuffle=False)
                steps = len(data)
            elif mode == "host":
                training.fit(FixedBatch(fixed_images, fixed_labels, args.steps), verbose=0)
                steps = args.steps
            else:
                for _ in range(args.steps):
                    logs = training.train_on_batch(device_images, device_labels)
                float(logs[0])  # wait for the device
                steps = args.steps
            rates[mode].append(steps / (time.perf_counter() - started))
    result: dict[str, float | str] = {
        "backend": keras.backend.backend(),
        "device": _device_name(keras.backend.backend()),
        "compile_seconds": round(compile_seconds, 1),
    }
    for mode, values in rates.items():
        result[f"{mode}_steps_per_second"] = round(float(np.median(values)), 3)
        result[f"{mode}_images_per_second"] = round(float(np.median(values)) * batch, 1)
    result["memmap_over_device"] = round(
        result["memmap_steps_per_second"] / result["device_steps_per_second"], 3
    )
    return result


def _device_name(backend: str) -> str:
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if backend == "jax":
        import jax

        return jax.default_backend()
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--backends", default=",".join(installed_backends()))
    parser.add_argument("--backbone", default="mobilenetv3small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="ArrayBatches reader threads")
    parser.add_argument("--trainable", default="all", choices=("head", "all_but_batchnorm", "all"))
    parser.add_argument("--jit-compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0

    count = args.batch_size * args.steps * 2
    args.cache = str(cached_arrays(args.data, args.size, count, args.out))
    rows = []
    for backend in [b for b in args.backends.split(",") if b]:
        command = [sys.executable, __file__, "--child", *(argv or sys.argv[1:])]
        command += ["--cache", args.cache]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1][len("RESULT ") :])
        row["process_seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
    print(
        f"\n{args.backbone} {args.size}px, batch {args.batch_size}, {args.steps} steps x "
        f"{args.repeats} (median), trainable={args.trainable}, jit={args.jit_compile}, "
        f"workers={args.workers}, data={args.cache}"
    )
    header = "| backend | device | memmap img/s | host img/s | device img/s | memmap/device "
    print(header + "| compile s | process s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['device']} | {row['memmap_images_per_second']} | "
            f"{row['host_images_per_second']} | {row['device_images_per_second']} | "
            f"{row['memmap_over_device']} | {row['compile_seconds']} | "
            f"{row['process_seconds']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
