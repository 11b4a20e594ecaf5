"""Benchmark out-of-distribution detection: learned (``evaluation.ood``) vs input statistics.

Usage (from the repository root; ``--clone`` is a project copy where ``dvc repro`` ran)::

    nice -n 10 .venv/bin/python bench/ood.py --clone /tmp/clone2 [--rate 0.01] [--per-set 100]

With the clone's fine-tuned model (``models/finetune/model.keras``) and its processed
splits, the learned detectors are fitted on the training slices' outputs and thresholded on
the validation slices (``--rate``: the false-alarm rate asked for), exactly as the evaluate
stage does. The baseline is today's serving check: the largest z-score of an image's mean
and spread against the training images (``bundle.InputStats``), refused above
``serving.ood_refuse_z`` (8) and warned about above ``ood_warn_z`` (4).

Out-of-distribution sets, each made into the gray slice serving would make and then put
through ``imaging.preprocess_gray`` (what the model sees); inputs serving already refuses
as blank (``serving.BLANK_STD``) are left out, since no detector ever sees them:

- ``photo_colour``: the 218 food photographs of ``datasets/not-mri`` decoded as an upload
  is (colour to gray by ``imaging.decode_image``); ``photo_gray``: the same photographs
  saved as gray JPEGs first (a user desaturating a picture).
- ``noise_uniform``, ``noise_gaussian``, ``noise_smooth`` (blurred noise: blobs): what a
  random-noise DICOM becomes after windowing, and a harder, textured variant.
- ``gradient`` (linear and radial ramps), ``text`` (lines of random characters, dark on
  light and light on dark), ``ellipses`` (random bright ellipses on black: a crude
  phantom, the hardest synthetic set).
- From the leakage-free test slices (raw, before preprocessing), images that are no longer
  slices: ``zoom4`` (a quarter-side crop between centre and corner, 4x zoomed),
  ``rot90_crop`` (rotated 90 degrees, central half-side crop), ``mosaic`` (2x2 and 3x3
  tiles of different slices), and ``inverted`` (negative; informative, not a target).

Reported per method: the false-alarm rate on validation, on the leakage-free test slices
and on all test slices at the method's threshold; per set, the AUROC against the
leakage-free test slices and the share of the set refused at the threshold.
Not a test: numbers depend on the trained model.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


# ------------------------------------------------------------------ out-of-distribution sets


def photo_grays(folder: Path, gray_first: bool) -> list[np.ndarray]:
    """The not-MRI photographs as serving decodes them (optionally saved as gray JPEG first)."""
    from PIL import Image

    from braintumor.data.imaging import decode_image

    grays = []
    for path in sorted(folder.glob("*.jpg")):
        data = path.read_bytes()
        if gray_first:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("L").save(buffer, "JPEG", quality=85)
            data = buffer.getvalue()
        grays.append(decode_image(data, name=path.name).gray)
    return grays


def noise_images(kind: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform, Gaussian or blurred ("smooth") noise at random sizes from 128 to 512 px."""
    images = []
    for _ in range(count):
        side = int(rng.integers(128, 513))
        if kind == "uniform":
            values = rng.uniform(0, 255, (side, side))
        elif kind == "gaussian":
            values = rng.normal(rng.uniform(60, 190), rng.uniform(20, 60), (side, side))
        else:
            values = cv2.GaussianBlur(rng.normal(0, 1, (side, side)), (0, 0), rng.uniform(2, 12))
            values = (values - values.min()) / max(np.ptp(values), 1e-9) * 255
        images.append(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return images


def gradient_images(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Linear ramps at random angles and radial ramps, some reversed."""
    images = []
    for index in range(count):
        side = int(rng.integers(128, 513))
        rows, cols = np.mgrid[0:side, 0:side] / (side - 1)
        if index % 2:
            angle = rng.uniform(0, 2 * np.pi)
            values = np.cos(angle) * cols + np.sin(angle) * rows
        else:
            centre = rng.uniform(0.2, 0.8, 2)
            values = -np.hypot(rows - centre[0], cols - centre[1])
        values = (values - values.min()) / max(np.ptp(values), 1e-9)
        images.append(
            np.rint(255 * (values if rng.random() < 0.5 else 1 - values)).astype(np.uint8)
        )
    return images


def text_images(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pages of random characters; half dark on light, half light on dark."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,"))
    images = []
    for index in range(count):
        side = int(rng.integers(200, 513))
        dark = index % 2 == 0
        image = np.full((side, side), 240 if dark else 15, dtype=np.uint8)
        scale = rng.uniform(0.4, 1.2)
        step = int(30 * scale) + 4
        for y in range(step, side, step):
            line = "".join(rng.choice(letters, 40))
            cv2.putText(
                image,
                line,
                (4, y),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                20 if dark else 235,
                1,
                cv2.LINE_AA,
            )
        images.append(image)
    return images


def ellipse_images(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Black images with a few bright, filled, blurred ellipses: a crude phantom."""
    images = []
    for _ in range(count):
        side = int(rng.integers(200, 513))
        image = np.zeros((side, side), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            centre = tuple(int(v) for v in rng.uniform(0.25, 0.75, 2) * side)
            axes = tuple(int(v) for v in rng.uniform(0.05, 0.35, 2) * side)
            cv2.ellipse(
                image, centre, axes, rng.uniform(0, 180), 0, 360, int(rng.integers(60, 256)), -1
            )
        images.append(cv2.GaussianBlur(image, (0, 0), 2))
    return images


def mri_transforms(slices: list[np.ndarray], rng: np.random.Generator) -> dict[str, list]:
    """Images made from real slices that are no longer slices (see the module docstring)."""
    zoom, rotated, mosaic = [], [], []
    for index, gray in enumerate(slices):
        height, width = gray.shape
        top, left = (height * 3) // 16, (width * 3) // 16  # between centre and a corner
        if index % 2:
            left = width - left - width // 4
        zoom.append(gray[top : top + height // 4, left : left + width // 4])
        turned = np.rot90(gray)
        h, w = turned.shape
        rotated.append(np.ascontiguousarray(turned[h // 4 : h - h // 4, w // 4 : w - w // 4]))
        tiles = 2 + index % 2
        chosen = rng.choice(len(slices), tiles * tiles, replace=False)
        parts = [cv2.resize(slices[c], (128, 128), interpolation=cv2.INTER_AREA) for c in chosen]
        mosaic.append(
            np.vstack([np.hstack(parts[r * tiles : (r + 1) * tiles]) for r in range(tiles)])
        )
    return {
        "zoom4": zoom,
        "rot90_crop": rotated,
        "mosaic": mosaic,
        "inverted": [255 - gray for gray in slices],
    }


def ood_sets(test_slices: list[np.ndarray], per_set: int, seed: int) -> dict[str, list]:
    """Every out-of-distribution set, as raw gray images (before the model's transform)."""
    rng = np.random.default_rng(seed)
    photos = DATASETS / "not-mri"
    sets = {
        "photo_colour": photo_grays(photos, gray_first=False),
        "photo_gray": photo_grays(photos, gray_first=True),
        "noise_uniform": noise_images("uniform", per_set, rng),
        "noise_gaussian": noise_images("gaussian", per_set, rng),
        "noise_smooth": noise_images("smooth", per_set, rng),
        "gradient": gradient_images(per_set, rng),
        "text": text_images(per_set, rng),
        "ellipses": ellipse_images(per_set, rng),
    }
    sets.update(mri_transforms(test_slices, rng))
    return sets


def preprocess_set(grays: list[np.ndarray], size: int, preprocess: Any) -> np.ndarray:
    """What the model sees: serving's blank check, then ``imaging.preprocess_gray``."""
    from braintumor.data.imaging import preprocess_gray
    from braintumor.serving.predictor import BLANK_STD

    kept = [g for g in grays if float(g.std()) >= BLANK_STD]
    return np.stack([preprocess_gray(g, size, preprocess) for g in kept])


# ------------------------------------------------------------------ scoring and the table


def extract(
    clone: Path, sets: dict[str, np.ndarray], batch_size: int, cache: Path | None
) -> dict[str, Any]:
    """``ood.ModelOutputs`` of the fine-tuned model on every split and set; with ``cache``,
    read from / written to that ``.npz`` (the inputs are deterministic given the seed)."""
    import keras

    from braintumor.evaluation.ood import FeatureExtractor, ModelOutputs

    fields = ("probabilities", "features", "logits")
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            return {name: ModelOutputs(*(stored[f"{name}.{f}"] for f in fields)) for name in sets}

    model = keras.saving.load_model(clone / "models" / "finetune" / "model.keras", compile=False)
    extractor = FeatureExtractor(model)
    outputs = {name: extractor(images, batch_size) for name, images in sets.items()}
    if cache is not None:
        np.savez(
            cache,
            **{f"{name}.{f}": getattr(out, f) for name, out in outputs.items() for f in fields},
        )
    return outputs


def baseline_scores(stats: Any, images: np.ndarray) -> np.ndarray:
    """Today's check: the larger of the mean and spread z-scores (``InputStats``)."""
    return np.array([max(stats.z_scores(image)) for image in images])


REAL = ("train", "val", "leakage_free", "test")


def method_rows(name: str, scores: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """One table row: false alarms on the real views, AUROC (against the leakage-free test
    slices) and the share refused for each out-of-distribution set."""
    from braintumor.evaluation.ood import auroc

    row: dict[str, Any] = {"method": name, "threshold": threshold}
    for view, values in scores.items():
        if view in REAL or view.startswith("leakage_free_"):
            row[f"far_{view}"] = float((values > threshold).mean())
        else:
            row[f"auroc_{view}"] = auroc(scores["leakage_free"], values)
            row[f"refused_{view}"] = float((values > threshold).mean())
    return row


def print_table(rows: list[dict[str, Any]], set_names: list[str], counts: dict[str, int]) -> None:
    """Two Markdown tables: false alarms per method, then AUROC (refused) per set."""
    views = [key[4:] for key in rows[0] if key.startswith("far_") and key != "far_train"]
    print("False alarms on real slices at the threshold\n")
    print("| method | threshold | " + " | ".join(f"{v} ({counts[v]})" for v in views) + " |")
    print("|---|---:|" + "---:|" * len(views))
    for row in rows:
        cells = " | ".join(f"{row[f'far_{v}']:.2%}" for v in views)
        print(f"| {row['method']} | {row['threshold']:.4g} | {cells} |")
    print("\nAUROC against the leakage-free test slices (share refused at the threshold)\n")
    print("| set (n) | " + " | ".join(row["method"] for row in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for set_name in set_names:
        cells = [
            f"{row[f'auroc_{set_name}']:.3f} ({row[f'refused_{set_name}']:.0%})" for row in rows
        ]
        print(f"| {set_name} ({counts[set_name]}) | " + " | ".join(cells) + " |")


def load_images(args: argparse.Namespace, params: Any) -> tuple[dict[str, np.ndarray], Any, Any]:
    """The real splits (preprocessed by the clone's pipeline) and every OOD set, as the
    model sees them; the test index's leakage-free rows give the sources' views."""
    import pandas as pd

    from braintumor.stages.evaluate import read_raw_grays
    from braintumor.training.inputs import load_processed

    size, processed = params.common.image_size, args.clone / "data" / "processed"
    data = load_processed(processed, params.common.classes, size, ("train", "val", "test"))
    index = pd.read_csv(processed / "test_index.csv")
    leakage_free = index["leakage_free"].astype(bool).to_numpy()
    raw_slices = read_raw_grays(
        args.clone / "data" / "raw", index.loc[leakage_free, "path"].tolist()
    )
    images = {split: np.asarray(data.splits[split].images)[..., 0] for split in REAL[:2]}
    images["test"] = np.asarray(data.splits["test"].images)[..., 0]
    images["leakage_free"] = images["test"][leakage_free]
    raw_sets = ood_sets(raw_slices, args.per_set, args.seed)
    images.update(
        {name: preprocess_set(grays, size, params.preprocess) for name, grays in raw_sets.items()}
    )
    return images, data, index["source"].to_numpy()[leakage_free]


def with_sources(scores: dict[str, np.ndarray], sources: np.ndarray) -> dict[str, np.ndarray]:
    """Add each source's leakage-free test slices as a view (``leakage_free_sartaj``)."""
    extra = {f"leakage_free_{s}": scores["leakage_free"][sources == s] for s in np.unique(sources)}
    return {**scores, **extra}


def run(args: argparse.Namespace) -> None:
    """Build the sets, extract outputs, fit and threshold, score every method, print."""
    from braintumor.core.config import load_params
    from braintumor.evaluation.ood import fit_detector
    from braintumor.serving.bundle import InputStats, read_meta

    params = load_params(args.clone / "params.yaml")
    images, data, sources = load_images(args, params)
    started = time.perf_counter()
    outputs = extract(args.clone, images, args.batch_size, args.cache)
    print(
        f"model outputs of {sum(len(v) for v in images.values())} images in "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    stats = read_meta(args.clone / "models" / "bundle").input_stats  # what serving uses
    stats = stats or InputStats.from_images(data.splits["train"].images)
    z = with_sources({name: baseline_scores(stats, v) for name, v in images.items()}, sources)
    rows = [
        method_rows("input stats z>8 (refuse)", z, params.serving.ood_refuse_z),
        method_rows("input stats z>4 (warn)", z, params.serving.ood_warn_z),
    ]
    labels = np.asarray(data.splits["train"].labels)
    for method in ("energy", "mahalanobis"):
        for rate in args.rates:
            detector = fit_detector(method, outputs["train"], labels, outputs["val"], rate)
            scores = {
                name: detector.score(out.features, out.logits) for name, out in outputs.items()
            }
            rows.append(
                method_rows(
                    f"{method} @{rate:.1%}", with_sources(scores, sources), detector.threshold
                )
            )
    counts = {name: len(values) for name, values in with_sources(images, sources).items()}
    print_table(rows, [n for n in images if n not in REAL], counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone", type=Path, required=True, help="a project copy after repro")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0.01, 0.005],
        help="false-alarm rates on validation to threshold at",
    )
    parser.add_argument("--per-set", type=int, default=100, help="images per synthetic set")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, help="an .npz to keep the model outputs in")
    args = parser.parse_args(argv)
    print(f"$ {shlex.join([sys.executable, *sys.argv])}", file=sys.stderr)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
