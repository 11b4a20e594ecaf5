"""int8 post-training quantisation of the exported model, measured honestly (issue 22 item 3).

Usage (from the repository root, after ``make run``)::

    .venv/bin/python bench/int8.py [--model models/bundle] [--data data/processed]
        [--representative 200] [--out bench/out/int8.json]

The bundle's Keras model is exported twice through ``serving.export.to_tflite``: float (what
bundles carry) and full-integer int8 calibrated on ``--representative`` validation slices
(the processed ``val`` split, never test). Every test view of the evaluate stage
(``stages.evaluate.test_views`` on the processed test index) is scored by Keras, the float
LiteRT graph and the int8 one; int8 is **adopted only if every view's accuracy stays within
0.5 points of the float model's** (``adopted``) **and its maps stay within the served map's
parity bound of the float ones** (1e-4, ``serving.export.PARITY_TOLERANCE``: the app shows
the map, and the export holds the float graph's to it; ``map_parity``), so a quantised graph
that keeps its accuracy but moves the explanation is reported, not served. Reported either
way: accuracy per view and the largest
drop, the out-of-distribution detector's false alarms on the real test slices (it reads the
pooled features, which quantisation moves), the file sizes, and the forward pass at batch 1
(p50 of 50) and batch 32 (images/s), interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.serving.export import PARITY_TOLERANCE

REPO = Path(__file__).resolve().parents[1]
ADOPT_POINTS = 0.5


def batched(
    model: Any, head: Any, images: np.ndarray, size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, pooled features and one-pass Grad-CAM maps (``explain.headcam``) of
    an ``ExportedModel`` over ``images``."""
    from braintumor.explain.headcam import head_gradcam

    probabilities, pooled, maps = [], [], []
    for start in range(0, len(images), size):
        outputs = model(images[start : start + size])
        probabilities.append(outputs.probabilities)
        pooled.append(outputs.pooled)
        cams = head_gradcam(head, outputs.pooled, outputs.maps, images.shape[1:3])
        maps.append(cams.heatmaps.astype(np.float16))
    return np.concatenate(probabilities), np.concatenate(pooled), np.concatenate(maps)


def timing(model: Any, images: np.ndarray) -> tuple[float, float]:
    """Batch-1 p50 ms (50 calls) and batch-32 images/s (median of 5)."""
    one, batch = images[:1], images[:32]
    model(one), model(batch)
    ones, batches = [], []
    for _ in range(50):
        started = time.perf_counter()
        model(one)
        ones.append(time.perf_counter() - started)
    for _ in range(5):
        started = time.perf_counter()
        model(batch)
        batches.append(time.perf_counter() - started)
    return float(np.median(ones) * 1e3), float(len(batch) / np.median(batches))


def score(
    views: dict[str, np.ndarray],
    labels: np.ndarray,
    keras_p: np.ndarray,
    answers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    head: Any,
    detector: Any,
    temperature: float,
) -> dict[str, Any]:
    """Accuracy and calibrated ECE per view (Keras, float, int8), int8's accuracy drop in
    points and the decision, the OOD false alarms on the test slices, the largest
    probability difference from Keras, and how far int8's Grad-CAM maps move."""
    from braintumor.evaluation.calibration import apply_temperature, expected_calibration_error

    result: dict[str, Any] = {"accuracy": {}, "ece_calibrated": {}}
    probabilities = {"keras": keras_p, **{kind: p for kind, (p, _, _) in answers.items()}}
    for view, mask in views.items():
        if mask.any():
            result["accuracy"][view] = {
                name: float((p.argmax(1)[mask] == labels[mask]).mean())
                for name, p in probabilities.items()
            }
            result["ece_calibrated"][view] = {
                name: expected_calibration_error(
                    labels[mask], apply_temperature(p[mask].astype(np.float64), temperature)
                )
                for name, p in probabilities.items()
            }
    float_maps, int8_maps = answers["none"][2], answers["int8"][2]
    difference = np.abs(float_maps.astype(np.float32) - int8_maps.astype(np.float32))
    result["int8_gradcam_vs_float"] = {
        "max_abs": float(difference.max()),
        "mean_abs": float(difference.mean()),
        "same_hottest_pixel": float(
            (
                float_maps.reshape(len(float_maps), -1).argmax(1)
                == int8_maps.reshape(len(int8_maps), -1).argmax(1)
            ).mean()
        ),
    }
    drops = {
        view: 100 * (values["none"] - values["int8"]) for view, values in result["accuracy"].items()
    }
    result["int8_drop_points"] = drops
    result["within_accuracy_rule"] = bool(max(drops.values()) <= ADOPT_POINTS)
    result["map_parity"] = bool(result["int8_gradcam_vs_float"]["max_abs"] <= PARITY_TOLERANCE)
    result["adopted"] = result["within_accuracy_rule"] and result["map_parity"]
    if detector is not None:
        result["ood_false_alarms_test"] = {}
        for kind, (_, pooled, _) in answers.items():
            logits, _ = head.forward(pooled)
            refused = detector.is_outlier(detector.score(pooled, logits))
            result["ood_false_alarms_test"][kind] = float(refused.mean())
    result["max_probability_difference_vs_keras"] = {
        kind: float(np.abs(p - keras_p).max()) for kind, (p, _, _) in answers.items()
    }
    return result


def speeds(runs: dict[str, Any], test: np.ndarray) -> dict[str, Any]:
    """Batch-1 p50 and batch-32 images/s per exported file, 3 interleaved rounds."""
    speed: dict[str, list[tuple[float, float]]] = {kind: [] for kind in runs}
    for _ in range(3):
        for kind, run in runs.items():
            speed[kind].append(timing(run, test))
    return {
        "batch1_p50_ms": {k: float(np.median([a for a, _ in v])) for k, v in speed.items()},
        "batch32_img_s": {k: float(np.median([b for _, b in v])) for k, v in speed.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "bundle")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "processed")
    parser.add_argument("--representative", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "int8.json")
    args = parser.parse_args(argv)
    import keras
    import pandas as pd

    from braintumor.evaluation.ood import OodDetector
    from braintumor.serving.bundle import MODEL_FILE, OOD_FILE, read_meta
    from braintumor.serving.export import head_params, inference_graph, to_tflite
    from braintumor.serving.exported import ExportedModel
    from braintumor.stages.evaluate import test_views

    meta = read_meta(args.model)
    model = keras.saving.load_model(args.model / MODEL_FILE, compile=False)
    test = np.load(args.data / "test_images.npy")[..., 0]
    labels = np.load(args.data / "test_labels.npy")
    views = test_views(pd.read_csv(args.data / "test_index.csv"))
    validation = np.load(args.data / "val_images.npy", mmap_mode="r")[..., 0]
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(validation), args.representative, replace=False))
    representative = np.asarray(validation[chosen])
    graph = inference_graph(model, meta.gradcam_layer)
    work = args.out.parent
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for kind in ("none", "int8"):
        started = time.perf_counter()
        blob = to_tflite(graph, meta.image_size, kind, representative if kind == "int8" else None)
        seconds[kind] = time.perf_counter() - started
        files[kind] = work / f"model-{kind}.tflite"
        files[kind].write_bytes(blob)
    keras_p = np.concatenate(
        [
            np.asarray(model.predict_on_batch(test[s : s + 64, ..., None].astype(np.float32)))
            for s in range(0, len(test), 64)
        ]
    )
    runs = {kind: ExportedModel(path) for kind, path in files.items()}
    head = head_params(model)
    answers = {kind: batched(run, head, test) for kind, run in runs.items()}
    detector = (
        OodDetector.load(args.model / OOD_FILE) if (args.model / OOD_FILE).is_file() else None
    )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load": [round(x, 2) for x in os.getloadavg()],
        "representative": f"{args.representative} validation slices (seed 0)",
        "sizes_mb": {
            "keras": (args.model / MODEL_FILE).stat().st_size / 1e6,
            **{k: p.stat().st_size / 1e6 for k, p in files.items()},
        },
        "convert_s": seconds,
        "accuracy": {},
    }
    result.update(score(views, labels, keras_p, answers, head, detector, meta.temperature))
    result.update(speeds(runs, test))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    drops = result["int8_drop_points"]
    worst = max(drops, key=lambda view: drops[view])
    verdict = "adopted" if result["adopted"] else "NOT adopted"
    maps = result["int8_gradcam_vs_float"]
    print(
        f"int8: {verdict} (largest drop {drops[worst]:.2f} points on {worst}, bound 0.5; "
        f"maps max |difference| {maps['max_abs']:.2g}, same hottest pixel "
        f"{maps['same_hottest_pixel']:.0%}, bound {PARITY_TOLERANCE:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
