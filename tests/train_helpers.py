"""Helpers of the training tests (test_train.py, test_tracking.py): a tiny processed data
set from real mirror images, and the project's parameters shrunk to train in seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from braintumor.core.schema import PreprocessParams
from braintumor.data.imaging import decode_image, preprocess_gray

from conftest import mirror_dir, params_file, require_mirror

MSOUD = mirror_dir() / "msoud"
PARAMS_FILE = params_file()
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SIZE = 32


def make_processed(
    folder: Path,
    size: int = SIZE,
    counts: dict[str, int] | None = None,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """A ``data/processed`` look-alike from real JPEGs: ``counts`` images per class per
    split (train and val from Training, disjoint; test from Testing)."""
    require_mirror()
    counts = counts or {"train": 8, "val": 3}
    folder.mkdir(parents=True, exist_ok=True)
    first = {"train": 0, "val": 400, "test": 0}
    for split, per_class in counts.items():
        source = "Testing" if split == "test" else "Training"
        images, labels, paths = [], [], []
        for label, name in enumerate(CLASSES):
            files = sorted((MSOUD / source / name).glob("*.jpg"))
            for path in files[first[split] : first[split] + per_class]:
                gray = decode_image(path.read_bytes(), name=path.name).gray
                images.append(preprocess_gray(gray, size, PreprocessParams()))
                labels.append(label)
                paths.append(f"msoud/{source}/{name}/{path.name}")
        np.save(folder / f"{split}_images.npy", np.stack(images)[..., None])
        np.save(folder / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        with (folder / f"{split}_index.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "path", "source", "label", "leakage_free"])
            for row, (path, label) in enumerate(zip(paths, labels, strict=True)):
                writer.writerow([row, path, "msoud", CLASSES[label], split == "test"])
    meta = {
        "classes": list(classes),
        "image_size": size,
        "digest": f"test-{size}-{sorted(counts.items())}",
        "counts": counts,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny_raw_params(**train: Any) -> dict[str, Any]:
    """The project's params.yaml, shrunk: 32 px, tinycnn, small head, 2 epochs, no XLA."""
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["profile"] = "paper"
    raw["common"]["image_size"] = SIZE
    raw["model"].update(backbone="tinycnn", weights="none", dense_units=[32, 16])
    raw["train"]["jit_compile"] = False
    for phase in ("frozen", "finetune"):
        raw["train"][phase].update(epochs=2, batch_size=8)
    for key, value in train.items():
        phase, _, name = key.partition("__")
        raw["train"][phase][name] = value
    return raw


def run_phase_cli(
    params_file: Path,
    data_dir: Path,
    out: Path,
    launcher: tuple[str, ...] = ("-m", "braintumor.stages.train"),
    phase: str = "frozen",
    init: Path | None = None,
) -> Any:
    """``braintumor.stages.train --phase <phase>`` (fine-tuning starts from ``init``) in a process:
    the backend comes from the parameters, not this process's environment, and starts
    fresh. ``launcher`` is what follows the interpreter (``-c <driver> ...`` to set devices
    up first). Returns the completed process; the phase writes ``out/m.json`` (metrics),
    ``out/h.csv`` (history) and ``out/m/model.keras``."""
    import os
    import subprocess
    import sys

    command = [
        sys.executable,
        *launcher,
        "--phase",
        phase,
        "--params",
        str(params_file),
        "--data",
        str(data_dir),
        "--model-dir",
        str(out / "m"),
        "--checkpoints",
        str(out / "c"),
        "--metrics",
        str(out / "m.json"),
        "--history",
        str(out / "h.csv"),
        "--figures",
        str(out / "f"),
        "--no-tracking",
        "--verbose",
        "0",
        *(["--init", str(init)] if init is not None else []),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
