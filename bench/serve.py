"""Benchmark serving: upload latency, batch throughput and the app under 8 parallel clients.

Usage (from the repository root)::

    .venv/bin/python bench/serve.py [--backbone efficientnet_lite0] [--size 128]
        [--uploads 40] [--images 100] [--naive-images 20] [--duration 60] [--clients 8]
        [--skip-concurrency] [--mirror DIR]

The model is the real serving model at its real size: ``model.build_model`` with
``--backbone`` (``weights="none"``: the timing does not depend on the weights' values),
Grad-CAM on ``model.feature_layer_name(backbone)``, saved and loaded as a bundle exactly
as the app loads one. The default, EfficientNet-Lite0 at 128 px, is what the CPU
quickstart profile serves; ``--backbone resnet50 --size 224`` is the paper profile's
model. In one run:

1. **Latency of one upload** (real test slices, a different file each time, the variants
   interleaved so machine load hits them alike), p50 and p95:
   - ``served``: ``Predictor.prepare`` (decode, checks, preprocessing) then
     ``Predictor.predict`` (Keras's compiled ``predict_on_batch``);
   - ``served + Grad-CAM``: ``prepare``, then ``Predictor.explain`` (the cached, compiled
     ``explain.GradCam``: probabilities and map from one pass) and the overlay blend: what
     the app does per upload;
   - ``naive``: ``Bundle.preprocess_bytes`` then ``model.predict`` per image;
   - ``naive + Grad-CAM``: the same plus the tutorial Grad-CAM rebuilt from scratch on
     every call (a new ``keras.Model(inputs, [layer.output, output])`` and an eager
     ``GradientTape``), then the same blend.
2. **Throughput of ``predict``** on a folder of real slices: ``predict.predict_files``
   (batched, reading ahead) with and without overlays, against the naive per-image loop
   (without Grad-CAM on every image; with Grad-CAM from scratch on ``--naive-images``).
3. **Concurrency**: ``python -m braintumor.serving.app`` on loopback with that bundle, ``--clients``
   ``gradio_client`` clients calling ``/predict`` in parallel for ``--duration`` seconds
   (one upload in ten a text file renamed .png, which must come back as a refusal). It
   counts errors (exceptions, or a wrong answer), client-side latency, and samples the
   app's resident memory. Stated bound: **no errors, and the app's RSS grows less than
   150 MB over the second half of the run** (a leak would grow with requests; the first
   half absorbs allocator warm-up); the peak RSS is printed beside it.

Not a test: numbers depend on the machine and its load (printed with the results). The
default run takes a few minutes on 2 cores; ``--uploads 10 --images 30 --naive-images 5
--duration 20`` is a quick one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
RSS_GROWTH_BOUND_MB = 150.0
DEFAULT_BACKBONE = "efficientnet_lite0"  # what the CPU quickstart profile serves
DEFAULT_SIZE = 128


def _mirror(path: Path | None) -> Path:
    root = path or Path(os.environ.get("BRAINTUMOR_MIRROR") or REPO.parent / "shared" / "datasets")
    if not (root / "msoud").is_dir():
        raise SystemExit(f"data mirror not found at {root}: set BRAINTUMOR_MIRROR or --mirror")
    return root


def real_slices(mirror: Path, split: str, count: int, offset: int = 0) -> list[Path]:
    """``count`` real msoud slices, taken round-robin over the classes."""
    per_class = [
        sorted(p for p in (mirror / "msoud" / split / name).iterdir() if p.is_file())[offset:]
        for name in CLASSES
    ]
    chosen = []
    for index in range(count):
        chosen.append(per_class[index % len(CLASSES)][index // len(CLASSES)])
    return chosen


def build_bundle(folder: Path, mirror: Path, size: int, backbone: str) -> tuple[Path, float]:
    """The serving model (random weights) as a bundle; returns its folder and build time."""
    import keras

    from braintumor.core.schema import ModelParams, PreprocessParams
    from braintumor.data.imaging import decode_image, preprocess_gray
    from braintumor.model.classifier import build_model, feature_layer_name
    from braintumor.serving.bundle import BundleMeta, InputStats, write_bundle

    started = time.perf_counter()
    params = PreprocessParams()
    images = np.stack(
        [
            preprocess_gray(decode_image(p.read_bytes()).gray, size, params)
            for p in real_slices(mirror, "Training", 40)
        ]
    )[..., None]
    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone=backbone, weights="none"), size, len(CLASSES))
    model.save(folder / "model.keras")
    meta = BundleMeta(
        classes=CLASSES,
        image_size=size,
        preprocess=params,
        gradcam_layer=feature_layer_name(backbone),
        temperature=1.5,
        input_stats=InputStats.from_images(images),
    )
    write_bundle(folder / "bundle", folder / "model.keras", meta)
    return folder / "bundle", time.perf_counter() - started


def naive_gradcam(model: Any, image: np.ndarray, layer_name: str) -> np.ndarray:
    """The tutorial recipe, rebuilt on every call: a new gradient model, eager tape, the
    predicted class's probability as the score."""
    import cv2
    import keras
    import tensorflow as tf

    gradient_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
    batch = tf.constant(image[None, ..., None], tf.float32)
    with tf.GradientTape() as tape:
        features, probabilities = gradient_model(batch, training=False)
        index = int(tf.argmax(probabilities[0]))
        score = probabilities[:, index]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))[0].numpy()
    cam = cv2.resize(cam, (image.shape[1], image.shape[0]))
    return (cam / (cam.max() + 1e-8)).astype(np.float32)


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1000.0
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(array, 50)),
        "p95_ms": float(np.percentile(array, 95)),
        "min_ms": float(array.min()),
    }


# --------------------------------------------------------------------------- 1. latency


def measure_latency(predictor: Any, uploads: list[Path]) -> dict[str, Any]:
    from braintumor.evaluation.calibration import apply_temperature
    from braintumor.serving.predictor import overlay_image

    bundle, model = predictor.bundle, predictor.bundle.model
    layer, temperature = bundle.meta.gradcam_layer, bundle.meta.temperature
    alpha = predictor.settings.overlay_alpha
    payloads = [(path.name, path.read_bytes()) for path in uploads]

    def served(name: str, data: bytes) -> np.ndarray:
        return predictor.predict(predictor.prepare(data, name).image)[0]

    def served_gradcam(name: str, data: bytes) -> np.ndarray:
        image = predictor.prepare(data, name).image
        probabilities, heatmaps = predictor.explain(image[None])
        overlay_image(image, heatmaps[0], alpha)
        return probabilities[0]

    def naive(name: str, data: bytes) -> np.ndarray:
        image = bundle.preprocess_bytes(data, name)
        raw = model.predict(image[None, ..., None].astype(np.float32), verbose=0)
        return apply_temperature(raw, temperature)[0]

    def naive_gradcam_call(name: str, data: bytes) -> np.ndarray:
        image = bundle.preprocess_bytes(data, name)
        raw = model.predict(image[None, ..., None].astype(np.float32), verbose=0)
        overlay_image(image, naive_gradcam(model, image, layer), alpha)
        return apply_temperature(raw, temperature)[0]

    variants = {
        "served": served,
        "served + Grad-CAM": served_gradcam,
        "naive": naive,
        "naive + Grad-CAM": naive_gradcam_call,
    }
    for function in variants.values():  # one untimed call each: tracing, first allocations
        function(*payloads[0])
    times: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    names = list(variants)
    for index, (name, data) in enumerate(payloads):
        order = names[index % len(names) :] + names[: index % len(names)]
        for variant in order:
            started = time.perf_counter()
            answers[variant].append(variants[variant](name, data))
            times[variant].append(time.perf_counter() - started)
    reference = np.stack(answers["naive"])
    agreement = {
        variant: float(np.abs(np.stack(values) - reference).max())
        for variant, values in answers.items()
    }
    # Where the served path's time goes (medians over a few uploads).
    stages: dict[str, list[float]] = {"prepare": [], "predict": [], "explain": [], "overlay": []}
    for name, data in payloads[: min(10, len(payloads))]:
        started = time.perf_counter()
        image = predictor.prepare(data, name).image
        stages["prepare"].append(time.perf_counter() - started)
        started = time.perf_counter()
        predictor.predict(image)
        stages["predict"].append(time.perf_counter() - started)
        started = time.perf_counter()
        _, heatmaps = predictor.explain(image[None])
        stages["explain"].append(time.perf_counter() - started)
        started = time.perf_counter()
        overlay_image(image, heatmaps[0], alpha)
        stages["overlay"].append(time.perf_counter() - started)
    return {
        "latency": {variant: percentiles(values) for variant, values in times.items()},
        # Shows the agreement check is not vacuous: the model's answers vary by image.
        "probability_std_across_uploads": float(reference.std(axis=0).max()),
        "max_abs_probability_difference_vs_naive": agreement,
        "served_stage_median_ms": {k: float(np.median(v) * 1000) for k, v in stages.items()},
    }


# --------------------------------------------------------------------------- 2. throughput


def measure_throughput(
    predictor: Any, paths: list[Path], naive_count: int, work: Path
) -> dict[str, Any]:
    from braintumor.serving.predict import predict_files

    bundle, model = predictor.bundle, predictor.bundle.model
    results: dict[str, Any] = {}

    def rate(label: str, count: int, seconds: float) -> None:
        results[label] = {"images": count, "seconds": seconds, "images_per_s": count / seconds}

    started = time.perf_counter()
    rows = predict_files(predictor, paths, progress=False)
    rate("predict (batched)", len(paths), time.perf_counter() - started)
    errors = sum(row.status != "ok" for row in rows)
    started = time.perf_counter()
    predict_files(predictor, paths, overlays_dir=work / "overlays", root=None, progress=False)
    rate("predict --overlays (batched, Grad-CAM)", len(paths), time.perf_counter() - started)
    started = time.perf_counter()
    for path in paths:
        image = bundle.preprocess_bytes(path.read_bytes(), path.name)
        model.predict(image[None, ..., None].astype(np.float32), verbose=0)
    rate("naive loop (model.predict per image)", len(paths), time.perf_counter() - started)
    subset = paths[:naive_count]
    started = time.perf_counter()
    for path in subset:
        image = bundle.preprocess_bytes(path.read_bytes(), path.name)
        model.predict(image[None, ..., None].astype(np.float32), verbose=0)
        naive_gradcam(model, image, bundle.meta.gradcam_layer)
    rate("naive loop + Grad-CAM from scratch", len(subset), time.perf_counter() - started)
    results["refused_files"] = errors
    return results


# --------------------------------------------------------------------------- 3. concurrency


def free_port() -> int:
    """A free loopback port for a server started as a subprocess."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of ``process`` and all its children (the app spawns workers)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure_concurrency(
    bundle: Path, uploads: list[Path], text_file: Path, clients: int, duration: float, work: Path
) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    port = free_port()
    log_path = work / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [
        sys.executable,
        "-m",
        "braintumor.serving.app",
        "--model",
        str(bundle),
        "--port",
        str(port),
        "--params",
        str(REPO / "params.yaml"),
        "--examples",
    ]
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.perf_counter()
    try:
        url = None
        while url is None:
            found = re.search(r"Running on local URL: (\S+)", log_path.read_text())
            if found:
                url = found.group(1)
            elif server.poll() is not None or time.perf_counter() - started > 300:
                raise SystemExit(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            else:
                time.sleep(0.5)
        startup_s = time.perf_counter() - started
        process = psutil.Process(server.pid)
        idle_rss = tree_rss(process)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        lock = threading.Lock()
        counts = {"ok": 0, "refused_as_expected": 0, "errors": 0}
        latencies: list[float] = []
        error_messages: list[str] = []

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), tree_rss(process)))
                stop.wait(0.5)

        def client_loop(number: int) -> None:
            client = Client(url, verbose=False, download_files=False)
            index = number
            while not stop.is_set():
                bad = index % 10 == 9
                path = text_file if bad else uploads[index % len(uploads)]
                index += clients
                began = time.perf_counter()
                try:
                    result = client.predict(handle_file(str(path)), 0.4, api_name="/predict")
                    message = result[4]
                    good = (
                        message.startswith("Cannot analyse this file") and "not an image" in message
                        if bad
                        else message.startswith("Analysed") and len(result[0]["confidences"]) == 4
                    )
                    outcome = ("refused_as_expected" if bad else "ok") if good else "errors"
                    if not good:
                        error_messages.append(message[:200])
                except Exception as error:  # noqa: BLE001 - every failure counts
                    outcome = "errors"
                    error_messages.append(f"{type(error).__name__}: {str(error)[:200]}")
                elapsed = time.perf_counter() - began
                with lock:
                    counts[outcome] += 1
                    latencies.append(elapsed)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
        load_start = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(duration)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        wall = time.perf_counter() - load_start
        sampler.join(timeout=5)
        middle = load_start + duration / 2
        second_half = [rss for moment, rss in samples if moment >= middle]
        peak = max(rss for _, rss in samples)
        growth = (max(second_half) - second_half[0]) / 1e6 if second_half else float("nan")
        requests_done = sum(counts.values())
        uploads_dir = re.search(r"uploads kept in (\S+)", log_path.read_text())
        disk = (
            sum(f.stat().st_size for f in Path(uploads_dir.group(1)).rglob("*") if f.is_file())
            if uploads_dir and Path(uploads_dir.group(1)).exists()
            else 0
        )
        return {
            "clients": clients,
            "duration_s": wall,
            "app_startup_s": startup_s,
            "requests": requests_done,
            "requests_per_s": requests_done / wall,
            **counts,
            "error_examples": error_messages[:5],
            "client_latency": percentiles(latencies) if latencies else {},
            "rss_idle_mb": idle_rss / 1e6,
            "rss_peak_mb": peak / 1e6,
            "rss_end_mb": samples[-1][1] / 1e6 if samples else float("nan"),
            "rss_growth_second_half_mb": growth,
            "upload_folder_mb": disk / 1e6,
            "bound": f"errors == 0 and RSS growth over the second half < {RSS_GROWTH_BOUND_MB} MB",
            "bound_met": counts["errors"] == 0 and growth < RSS_GROWTH_BOUND_MB,
        }
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


# --------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> None:
    print()
    print(f"serving benchmark: {result['setup']}")
    print(f"command: {result['command']}")
    print(f"load average before / after: {result['load_before']} / {result['load_after']}")
    if "latency" in result:
        print()
        print(
            "latency of one upload (decode + checks + preprocessing + model [+ Grad-CAM + blend])"
        )
        header = f"{'variant':<22} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'min ms':>9}"
        print(header)
        print("-" * len(header))
        for variant, values in result["latency"].items():
            print(
                f"{variant:<22} {values['n']:>4} {values['p50_ms']:>9.1f} "
                f"{values['p95_ms']:>9.1f} {values['min_ms']:>9.1f}"
            )
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result["served_stage_median_ms"].items())
        print(f"served path, median ms per stage: {stages}")
        target = result["latency"]["served + Grad-CAM"]["p50_ms"]
        verdict = "met" if target < 300 else "NOT met"
        print(f"target: prediction + Grad-CAM p50 < 300 ms -> {target:.0f} ms ({verdict})")
        diffs = ", ".join(
            f"{k} {v:.1e}" for k, v in result["max_abs_probability_difference_vs_naive"].items()
        )
        print(
            f"max |probability difference| vs naive: {diffs} (largest std of a class "
            f"probability across uploads: {result['probability_std_across_uploads']:.1e})"
        )
    if "throughput" in result:
        print()
        print("throughput of batch prediction on a folder of real slices")
        header = f"{'variant':<42} {'images':>7} {'seconds':>8} {'img/s':>7}"
        print(header)
        print("-" * len(header))
        for variant, values in result["throughput"].items():
            if isinstance(values, dict):
                print(
                    f"{variant:<42} {values['images']:>7} {values['seconds']:>8.1f} "
                    f"{values['images_per_s']:>7.2f}"
                )
    if "concurrency" in result:
        c = result["concurrency"]
        print()
        print(
            f"concurrency: {c['clients']} gradio_client clients for {c['duration_s']:.0f} s "
            f"(app started in {c['app_startup_s']:.0f} s)"
        )
        print(
            f"requests {c['requests']} ({c['requests_per_s']:.2f}/s): ok {c['ok']}, refused as "
            f"expected {c['refused_as_expected']}, errors {c['errors']}"
        )
        if c["client_latency"]:
            print(
                f"client-side latency p50 {c['client_latency']['p50_ms']:.0f} ms, "
                f"p95 {c['client_latency']['p95_ms']:.0f} ms (queued: one request at a time)"
            )
        print(
            f"app RSS: idle {c['rss_idle_mb']:.0f} MB, peak {c['rss_peak_mb']:.0f} MB, end "
            f"{c['rss_end_mb']:.0f} MB, growth over the second half "
            f"{c['rss_growth_second_half_mb']:.0f} MB; upload folder {c['upload_folder_mb']:.1f} MB"
        )
        print(f"bound: {c['bound']} -> {'met' if c['bound_met'] else 'NOT met'}")
        for message in c["error_examples"]:
            print(f"  error: {message}")


def main(argv: list[str] | None = None) -> int:
    from braintumor.model.classifier import BACKBONES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=40, help="uploads timed per variant")
    parser.add_argument("--images", type=int, default=100, help="folder size for throughput")
    parser.add_argument(
        "--naive-images", type=int, default=20, help="images for the naive Grad-CAM loop"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="concurrency seconds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default=DEFAULT_BACKBONE,
        help="the served backbone (the paper profile's is resnet50 at 224 px)",
    )
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px")
    parser.add_argument("--mirror", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "serve.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    mirror = _mirror(args.mirror)
    from braintumor.core.schema import ServingParams
    from braintumor.serving.bundle import Bundle
    from braintumor.serving.predictor import Predictor

    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        bundle_folder, build_s = build_bundle(work, mirror, args.size, args.backbone)
        started = time.perf_counter()
        predictor = Predictor(Bundle.load(bundle_folder), ServingParams(grayscale_tolerance=6.0))
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        predictor.warm_up()
        warm_s = time.perf_counter() - started
        result["setup"] = (
            f"{args.backbone} at {args.size} px (weights none), {os.cpu_count()} CPUs; bundle "
            f"built in {build_s:.0f} s, loaded in {load_s:.1f} s, warmed up in {warm_s:.1f} s"
        )
        uploads = real_slices(mirror, "Testing", max(args.uploads, 1), offset=50)
        if not args.skip_latency:
            result.update(measure_latency(predictor, uploads))
        if not args.skip_throughput:
            folder = work / "folder"
            for path in real_slices(mirror, "Testing", args.images, offset=120):
                target = folder / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            paths = sorted(folder.rglob("*.jpg"))
            result["throughput"] = measure_throughput(predictor, paths, args.naive_images, work)
        if not args.skip_concurrency:
            text_file = work / "text.png"
            text_file.write_text("not an image\n" * 20)
            result["concurrency"] = measure_concurrency(
                bundle_folder, uploads, text_file, args.clients, args.duration, work
            )
        result["load_after"] = [round(x, 2) for x in os.getloadavg()]
        report(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
