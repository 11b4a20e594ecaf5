"""Benchmark serving side by side: the Keras path against the exported model (LiteRT, ONNX
Runtime, optionally LiteRT int8), per upload, in batches, and the app's memory.

Usage (from the repository root)::

    .venv/bin/python bench/serve.py [--model models/bundle] [--runtimes keras,litert,onnxruntime]
        [--reexport] [--explanation hirescam:block10_add] [--gate-width 0.25]
        [--int8] [--uploads 40] [--images 100] [--duration 30] [--clients 8]
        [--serving-python .venv-serving/bin/python] [--skip-concurrency] [--mirror DIR]
        [--isolated-rounds 3]

The model: ``--model`` (a trained bundle, e.g. ``models/bundle`` of ``make run``; exported
here first if it has no exported model, or with ``--reexport``, serving the map
``--explanation`` names) or, by default, ``model.build_model`` with
``--backbone`` at ``--size`` (``weights="none"``: timings do not depend on the weights'
values), exported the same way (``serving.export``, parity-checked). The runtimes, each
behind the same ``Predictor`` (decode, checks, preprocessing, the OOD check, calibration):

- ``keras``: ``Bundle.load(runtime="keras")``: Keras's compiled ``predict_on_batch``, the
  ``FeatureExtractor`` pass of the OOD check and the GradientTape map of the bundle's
  explanation (a second pass);
- ``litert``: the bundle's ``model.tflite`` in ``ai-edge-litert`` (XNNPACK), one invoke per
  upload, the served map (e.g. HiResCAM at ``block10_add``) from the head and the
  backbone's tail in NumPy (``explain.headcam``, ``explain.tailcam``; the tail backward
  only, on the tail values the graph returns, or forward too for a graph exported before
  it returned them: the report says which): what serving runs;
- ``onnxruntime``: the same graph converted with tf2onnx, in ONNX Runtime (CPU provider);
- ``litert-int8`` (``--int8``): post-training full-integer quantisation, calibrated on 100
  real Training slices (not test ones).

In one run:

1. **Latency of one upload** (real test slices, a different file each time, the runtimes
   interleaved so machine load hits them alike), p50 and p95: ``served`` (prepare, then
   the probabilities) and ``served + map`` (prepare, probabilities and the served map,
   overlay blend: what the app does per upload); the model's forward pass alone per
   runtime; the largest probability and map differences from the Keras path.
   With ``--isolated-rounds K``, the same per-upload work again **with each runtime in its
   own process, as deployed** (a child of this script per runtime and round: Keras under
   this interpreter, an exported runtime under ``--serving-python`` when that install has
   its package, importing no TensorFlow either way; the order rotated each round): p50/p95
   per round, keras / exported ratios, the median of the round p50s and their range. In
   one process TensorFlow's worker threads keep spinning after each Keras call and take
   the cores from the exported call timed right after it; a deployment runs one runtime.
2. **Throughput**: ``predict.predict_files`` with overlays on a folder of real slices, and
   a batch of 32 preprocessed slices through ``Predictor.predict``, images/s per runtime.
3. **The app** (``python -m braintumor.serving.app --runtime keras|auto``, with
   ``--serving-python`` for the exported model if given: the serving install, no
   TensorFlow): RSS after warm-up, then ``--clients`` ``gradio_client`` clients for
   ``--duration`` seconds (one upload in ten a text file renamed .png, which must come
   back as a refusal): errors, latency, peak RSS and its growth over the second half.
   (``bench/app_load.py --rounds 5`` is the 50-client soak.)

Not a test: numbers depend on the machine and its load (printed with the results).
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


def preprocessed(paths: list[Path], size: int, params: Any) -> np.ndarray:
    from braintumor.data.imaging import decode_image, preprocess_gray

    return np.stack(
        [preprocess_gray(decode_image(p.read_bytes()).gray, size, params) for p in paths]
    )


def build_bundle(folder: Path, mirror: Path, size: int, backbone: str) -> Path:
    """The serving model (random weights) as a bundle, without an exported model yet."""
    import keras

    from braintumor.core.schema import ModelParams, PreprocessParams
    from braintumor.model.classifier import build_model, feature_layer_name
    from braintumor.serving.bundle import BundleMeta, InputStats, write_bundle

    params = PreprocessParams()
    images = preprocessed(real_slices(mirror, "Training", 40), size, params)
    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone=backbone, weights="none"), size, len(CLASSES))
    model.save(folder / "model.keras")
    meta = BundleMeta(
        classes=CLASSES,
        image_size=size,
        preprocess=params,
        gradcam_layer=feature_layer_name(backbone),
        temperature=1.5,
        input_stats=InputStats.from_images(images[..., None]),
    )
    write_bundle(folder / "source", folder / "model.keras", meta)
    return folder / "source"


def exported_bundle(
    source: Path,
    work: Path,
    mirror: Path,
    int8: bool,
    explanation: tuple[str, str] | None = None,
    gate_width: float = 0.0,
) -> dict[str, Any]:
    """``source`` with an exported model (exported here if it has none, or if
    ``explanation`` (method, layer) is given: re-exported to serve that map, its tail's
    ReLUs soft-gated by ``gate_width``), the ONNX file of the same graph and, with
    ``int8``, a quantised flatbuffer; export times and sizes."""
    import keras

    from braintumor.evaluation.ood import OodDetector
    from braintumor.serving.bundle import MODEL_FILE, OOD_FILE, read_meta, write_bundle
    from braintumor.serving.export import export_model, inference_graph, to_onnx, to_tflite
    from braintumor.serving.exported import EXTRA_PREFIX

    meta = read_meta(source)
    model = keras.saving.load_model(source / MODEL_FILE, compile=False)
    info: dict[str, Any] = {"keras_model_mb": (source / MODEL_FILE).stat().st_size / 1e6}
    folder = source
    if not meta.exported or explanation is not None:
        check = preprocessed(
            real_slices(mirror, "Training", 32, offset=200), meta.image_size, meta.preprocess
        )
        started = time.perf_counter()
        exported = export_model(
            model,
            meta.gradcam_layer,
            work / "export",
            check,
            explanation=explanation or ("gradcam", "auto"),
            gate_width=gate_width,
        )
        info["export_s"] = time.perf_counter() - started
        detector = OodDetector.load(source / OOD_FILE) if (source / OOD_FILE).is_file() else None
        folder = work / "bundle"
        write_bundle(folder, source / MODEL_FILE, meta, detector, exported)
        meta = read_meta(folder)
    info["bundle"] = folder
    info["parity"] = meta.exported.get("parity")
    info["explanation"] = meta.exported.get("explanation")
    info["litert_mb"] = meta.exported["bytes"] / 1e6
    # The same outputs as the bundle's graph (the served map's layer among them).
    extras = tuple(
        name[len(EXTRA_PREFIX) :]
        for name in meta.exported.get("outputs", [])
        if name.startswith(EXTRA_PREFIX)
    )
    graph = inference_graph(model, meta.gradcam_layer, extras)
    started = time.perf_counter()
    to_onnx(graph, meta.image_size, work / "model.onnx")
    info["onnx_export_s"] = time.perf_counter() - started
    info["onnx"] = work / "model.onnx"
    info["onnx_mb"] = (work / "model.onnx").stat().st_size / 1e6
    if int8:
        representative = preprocessed(
            real_slices(mirror, "Training", 100, offset=400), meta.image_size, meta.preprocess
        )
        started = time.perf_counter()
        blob = to_tflite(graph, meta.image_size, "int8", representative)
        info["int8_export_s"] = time.perf_counter() - started
        (work / "int8.tflite").write_bytes(blob)
        info["int8"] = work / "int8.tflite"
        info["int8_mb"] = len(blob) / 1e6
    return info


def predictors(info: dict[str, Any], runtimes: list[str], settings: Any) -> dict[str, Any]:
    """One ``Predictor`` per runtime over the same bundle (the other exported files swapped
    in for the bundle's LiteRT model), each warmed up."""
    from braintumor.serving.bundle import Bundle
    from braintumor.serving.exported import ExportedModel
    from braintumor.serving.predictor import Predictor

    made: dict[str, Any] = {}
    for runtime in runtimes:
        started = time.perf_counter()
        if runtime == "keras":
            bundle = Bundle.load(info["bundle"], runtime="keras")
        else:
            bundle = Bundle.load(info["bundle"])
            if runtime == "onnxruntime":
                bundle.exported = ExportedModel(info["onnx"], "onnxruntime")
            elif runtime == "litert-int8":
                bundle.exported = ExportedModel(info["int8"])
        predictor = Predictor(bundle, settings)
        predictor.warm_up()
        info.setdefault("load_and_warm_up_s", {})[runtime] = time.perf_counter() - started
        made[runtime] = predictor
    return made


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1000.0
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(array, 50)),
        "p95_ms": float(np.percentile(array, 95)),
        "min_ms": float(array.min()),
    }


# --------------------------------------------------------------------------- 1. latency


def measure_latency(runs: dict[str, Any], uploads: list[Path]) -> dict[str, Any]:
    from braintumor.serving.predictor import overlay_image

    payloads = [(path.name, path.read_bytes()) for path in uploads]

    from braintumor.serving.predictor import InputError

    refused: dict[str, int] = dict.fromkeys(runs, 0)
    missing = np.full(len(CLASSES), np.nan)
    shown: dict[str, list[np.ndarray]] = {runtime: [] for runtime in runs}

    def served(predictor: Any, name: str, data: bytes) -> np.ndarray:
        try:
            return predictor.classify([predictor.prepare(data, name)])[0]
        except InputError:  # counted: a runtime whose features move refuses real slices
            refused[next(k for k, v in runs.items() if v is predictor)] += 1
            return missing

    def served_map(predictor: Any, name: str, data: bytes) -> np.ndarray:
        try:
            prepared = predictor.prepare(data, name)
        except InputError:
            return missing
        probabilities, heatmaps = predictor.explain_prepared([prepared])
        overlay_image(prepared.image, heatmaps[0], predictor.settings.overlay_alpha)
        shown[next(k for k, v in runs.items() if v is predictor)].append(heatmaps[0])
        return probabilities[0]

    variants = [
        (runtime, kind, function)
        for runtime in runs
        for kind, function in (("served", served), ("served + map", served_map))
    ]
    for runtime, _, function in variants:  # one untimed call each: first allocations
        function(runs[runtime], *payloads[0])
    shown = {runtime: [] for runtime in runs}
    times: dict[str, list[float]] = {f"{r} {k}": [] for r, k, _ in variants}
    answers: dict[str, list[np.ndarray]] = {f"{r} {k}": [] for r, k, _ in variants}
    for index, (name, data) in enumerate(payloads):
        shift = index % len(variants)
        for runtime, kind, function in variants[shift:] + variants[:shift]:
            started = time.perf_counter()
            answers[f"{runtime} {kind}"].append(function(runs[runtime], name, data))
            times[f"{runtime} {kind}"].append(time.perf_counter() - started)
    reference_key = next(iter(answers))
    reference = np.stack(answers[reference_key])
    agreement = {
        key: float(np.nanmax(np.abs(np.stack(values) - reference)))
        for key, values in answers.items()
    }
    # The forward pass alone, per runtime, on one preprocessed slice (interleaved).
    forward: dict[str, list[float]] = {runtime: [] for runtime in runs}
    first = next(iter(runs.values()))
    image = first.prepare(payloads[0][1], payloads[0][0]).image[None]
    for _ in range(50):
        for runtime, predictor in runs.items():
            started = time.perf_counter()
            predictor.predict(image)
            forward[runtime].append(time.perf_counter() - started)
    first_runtime = next(iter(runs))
    # Whether each exported runtime's map ran the tail backward on the graph's own values
    # (None: Keras, or no tail).
    from_values: dict[str, bool | None] = {}
    for runtime, predictor in runs.items():
        exported, explanation = predictor.bundle.exported, predictor.bundle.explanation
        from_values[runtime] = (
            None
            if exported is None or explanation.tail is None
            else explanation.tail_values(exported(image)) is not None
        )
    map_difference = {
        runtime: float(np.abs(np.stack(maps) - np.stack(shown[first_runtime])).max())
        for runtime, maps in shown.items()
        if maps and len(maps) == len(shown[first_runtime])
    }
    return {
        "explanation": {
            runtime: predictor.explanation_label for runtime, predictor in runs.items()
        },
        "max_abs_map_difference": map_difference,
        "tail_values_from_runtime": from_values,
        "latency": {key: percentiles(values) for key, values in times.items()},
        "forward": {key: percentiles(values) for key, values in forward.items()},
        "probability_std_across_uploads": float(np.nanstd(reference, axis=0).max()),
        "reference": reference_key,
        "refused_as_out_of_distribution": refused,
        "max_abs_probability_difference": agreement,
    }


# --------------------------------------------------------------------------- 1b. isolated


# What an exported runtime's child must be able to import (else it runs under this python).
RUNTIME_MODULE = {"litert": "ai_edge_litert", "litert-int8": "ai_edge_litert"}
ISOLATED_VARIANTS = ("served", "served + map")


def latency_child(spec_path: Path) -> int:
    """The hidden ``--latency-child SPEC`` entry point: one runtime alone in this process
    (as deployed: the Keras app, or the serving install with no TensorFlow), loaded, warmed
    up, then the uploads of ``SPEC`` timed as ``measure_latency`` times them (``served`` and
    ``served + map``, a different file each time, the two alternating); percentiles to
    ``SPEC["out"]``. Imports nothing of Keras or TensorFlow for an exported runtime
    (``Bundle.load(runtime="exported")``); the result says whether any got imported."""
    from braintumor.core.schema import ServingParams
    from braintumor.serving.bundle import Bundle
    from braintumor.serving.exported import ExportedModel
    from braintumor.serving.predictor import InputError, Predictor, overlay_image

    spec = json.loads(spec_path.read_text())
    runtime = spec["runtime"]
    started = time.perf_counter()
    bundle = Bundle.load(spec["bundle"], runtime="keras" if runtime == "keras" else "exported")
    if runtime == "onnxruntime":
        bundle.exported = ExportedModel(Path(spec["exported_file"]), "onnxruntime")
    elif runtime == "litert-int8":
        bundle.exported = ExportedModel(Path(spec["exported_file"]))
    predictor = Predictor(bundle, ServingParams(**spec["settings"]))
    predictor.warm_up()
    load_s = time.perf_counter() - started
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in spec["uploads"]]
    refused = 0

    def served(name: str, data: bytes) -> None:
        nonlocal refused
        try:
            predictor.classify([predictor.prepare(data, name)])
        except InputError:
            refused += 1

    def served_map(name: str, data: bytes) -> None:
        try:
            prepared = predictor.prepare(data, name)
        except InputError:
            return
        _, heatmaps = predictor.explain_prepared([prepared])
        overlay_image(prepared.image, heatmaps[0], predictor.settings.overlay_alpha)

    variants = list(zip(ISOLATED_VARIANTS, (served, served_map), strict=True))
    for _, function in variants:  # one untimed call each: first allocations
        function(*payloads[0])
    times: dict[str, list[float]] = {kind: [] for kind in ISOLATED_VARIANTS}
    for index, (name, data) in enumerate(payloads):
        shift = index % len(variants)
        for kind, function in variants[shift:] + variants[:shift]:
            began = time.perf_counter()
            function(name, data)
            times[kind].append(time.perf_counter() - began)
    heavy = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
    result = {
        "runtime": runtime,
        "python": sys.executable,
        "load_and_warm_up_s": load_s,
        "refused_as_out_of_distribution": refused,
        "imported_tensorflow_or_keras": heavy,
        "latency": {kind: percentiles(values) for kind, values in times.items()},
    }
    Path(spec["out"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def child_python(runtime: str, serving_python: str | None) -> str:
    """The interpreter for ``runtime``'s child: this one for Keras; the serving install's
    for an exported runtime when given and it has the runtime's package (ONNX Runtime is
    not in the serving install: then this interpreter, which still imports no TensorFlow)."""
    if runtime == "keras" or not serving_python:
        return sys.executable
    module = RUNTIME_MODULE.get(runtime, runtime)
    probe = subprocess.run(
        [
            serving_python,
            "-c",
            f"import importlib.util, sys; sys.exit(not importlib.util.find_spec({module!r}))",
        ],
        capture_output=True,
        check=False,
    )
    return serving_python if probe.returncode == 0 else sys.executable


def measure_isolated(
    info: dict[str, Any],
    runtimes: list[str],
    uploads: list[Path],
    rounds: int,
    serving_python: str | None,
    settings: dict[str, Any],
    work: Path,
) -> dict[str, Any]:
    """Each runtime in its own process, as deployed: ``rounds`` rounds, one child per
    runtime at a time, the order rotated each round so that machine load drifts over them
    alike; per round p50/p95 and keras / exported ratios, then the median of the round p50s
    and their range. (In one process TensorFlow's worker threads keep spinning after a
    Keras call and take the cores from the exported call timed right after it.)"""
    exported_files = {"onnxruntime": info.get("onnx"), "litert-int8": info.get("int8")}
    # abspath, not resolve(): a venv's python is a link that must stay one
    pythons = {
        runtime: os.path.abspath(child_python(runtime, serving_python)) for runtime in runtimes
    }
    per_round: list[dict[str, Any]] = []
    for number in range(rounds):
        shift = number % len(runtimes)
        order = runtimes[shift:] + runtimes[:shift]
        children: dict[str, Any] = {}
        for runtime in order:
            out = work / f"isolated-{number}-{runtime}.json"
            spec = work / f"isolated-{number}-{runtime}.spec.json"
            spec.write_text(
                json.dumps(
                    {
                        "runtime": runtime,
                        "bundle": str(info["bundle"]),
                        "exported_file": str(exported_files.get(runtime) or ""),
                        "settings": settings,
                        "uploads": [str(p) for p in uploads],
                        "out": str(out),
                    }
                )
            )
            command = [
                pythons[runtime],
                str(Path(__file__).resolve()),
                "--latency-child",
                str(spec),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
            if done.returncode != 0 or not out.is_file():
                raise SystemExit(
                    f"isolated latency child {runtime} ({pythons[runtime]}) failed "
                    f"(exit {done.returncode}):\n{done.stderr[-3000:]}"
                )
            children[runtime] = json.loads(out.read_text())
        ratios = {
            kind: {
                runtime: children["keras"]["latency"][kind]["p50_ms"]
                / children[runtime]["latency"][kind]["p50_ms"]
                for runtime in runtimes
                if runtime != "keras"
            }
            for kind in ISOLATED_VARIANTS
            if "keras" in children
        }
        per_round.append(
            {
                "order": order,
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "runtimes": children,
                "p50_ratio_keras_over": ratios,
            }
        )

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": float(np.median(values)), "min": min(values), "max": max(values)}

    overall: dict[str, Any] = {}
    for runtime in runtimes:
        for kind in ISOLATED_VARIANTS:
            rows = [r["runtimes"][runtime]["latency"][kind] for r in per_round]
            overall[f"{runtime} {kind}"] = {
                "p50_ms": summary([row["p50_ms"] for row in rows]),
                "p95_ms": summary([row["p95_ms"] for row in rows]),
            }
    ratio_summary = {
        kind: {
            runtime: summary([r["p50_ratio_keras_over"][kind][runtime] for r in per_round])
            for runtime in runtimes
            if runtime != "keras"
        }
        for kind in ISOLATED_VARIANTS
        if "keras" in runtimes
    }
    return {
        "rounds": rounds,
        "uploads": len(uploads),
        "python": pythons,
        "imported_tensorflow_or_keras": {
            runtime: sorted(
                {
                    m
                    for r in per_round
                    for m in r["runtimes"][runtime]["imported_tensorflow_or_keras"]
                }
            )
            for runtime in runtimes
        },
        "per_round": per_round,
        "overall": overall,
        "p50_ratio_keras_over": ratio_summary,
    }


# --------------------------------------------------------------------------- 2. throughput


def measure_throughput(runs: dict[str, Any], paths: list[Path], work: Path) -> dict[str, Any]:
    from braintumor.serving.predict import predict_files

    results: dict[str, Any] = {}
    batch = None
    for runtime, predictor in runs.items():
        started = time.perf_counter()
        rows = predict_files(
            predictor, paths, overlays_dir=work / f"overlays-{runtime}", root=None, progress=False
        )
        seconds = time.perf_counter() - started
        if batch is None:
            batch = np.stack([predictor.prepare_file(p).image for p in paths[:32]])
        predictor.predict(batch)
        started = time.perf_counter()
        for _ in range(3):
            predictor.predict(batch)
        batch_seconds = (time.perf_counter() - started) / 3
        results[runtime] = {
            "images": len(paths),
            "refused": sum(row.status != "ok" for row in rows),
            "predict_overlays_img_s": len(paths) / seconds,
            "batch32_img_s": len(batch) / batch_seconds,
        }
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
    bundle: Path,
    uploads: list[Path],
    text_file: Path,
    clients: int,
    duration: float,
    work: Path,
    runtime: str = "auto",
    python: str = sys.executable,
) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    port = free_port()
    log_path = work / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [
        python,
        "-m",
        "braintumor.serving.app",
        "--runtime",
        runtime,
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
        time.sleep(2.0)  # the app has warmed up (the model traced) before it listens
        idle_rss = tree_rss(process)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        lock = threading.Lock()
        counts = {"ok": 0, "refused_as_expected": 0, "refused_by_ood_check": 0, "errors": 0}
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
                    if not bad and "does not look like a brain MRI slice" in message:
                        outcome = "refused_by_ood_check"  # a real slice the detector refuses
                    elif not good:
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
            "runtime": runtime,
            "python": python,
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
    files = result["files"]
    print(
        f"files: model.keras {files['keras_model_mb']:.1f} MB, LiteRT {files['litert_mb']:.1f} MB, "
        f"ONNX {files['onnx_mb']:.1f} MB"
        + (f", LiteRT int8 {files['int8_mb']:.1f} MB" if "int8_mb" in files else "")
        + f"; export parity {files['parity']}"
    )
    if "latency" in result:
        print()
        print(
            "one upload (decode + checks + preprocessing + OOD + model [+ map + blend]), "
            "in one process, the runtimes interleaved"
        )
        print(f"map served: {result['explanation']}")
        print(
            "tail backward on the runtime's own forward values (False: NumPy forward too): "
            f"{result.get('tail_values_from_runtime')}"
        )
        header = f"{'runtime and variant':<34} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'min ms':>9}"
        print(header)
        print("-" * len(header))
        for variant, values in result["latency"].items():
            print(
                f"{variant:<34} {values['n']:>4} {values['p50_ms']:>9.1f} "
                f"{values['p95_ms']:>9.1f} {values['min_ms']:>9.1f}"
            )
        print("forward pass alone (Predictor.predict, one preprocessed slice, 50 interleaved)")
        for runtime, values in result["forward"].items():
            print(f"  {runtime:<14} p50 {values['p50_ms']:.2f} ms, p95 {values['p95_ms']:.2f} ms")
        keras_key = "keras served + map"
        if keras_key in result["latency"]:
            base = result["latency"][keras_key]["p50_ms"]
            for runtime in result["forward"]:
                key = f"{runtime} served + map"
                if runtime != "keras" and key in result["latency"]:
                    ratio = base / result["latency"][key]["p50_ms"]
                    print(f"  p50 per upload with the map, keras / {runtime}: {ratio:.1f}x")
        diffs = ", ".join(
            f"{k} {v:.1e}" for k, v in result["max_abs_probability_difference"].items()
        )
        print(f"max |probability difference| vs {result['reference']}: {diffs}")
        maps = ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_map_difference"].items())
        print(f"max |served map difference| vs {next(iter(result['explanation']))}: {maps}")
        print(
            f"real test slices refused by the OOD check: {result['refused_as_out_of_distribution']}"
        )
        print(
            "(largest std of a class probability across uploads: "
            f"{result['probability_std_across_uploads']:.1e})"
        )
    report_isolated(result.get("isolated"))
    if "throughput" in result:
        print()
        print(
            "throughput, images/s: predict --overlays on a folder; "
            "a batch of 32 via Predictor.predict"
        )
        for runtime, values in result["throughput"].items():
            print(
                f"  {runtime:<14} {values['predict_overlays_img_s']:>7.1f} (folder of "
                f"{values['images']}, {values['refused']} refused)  {values['batch32_img_s']:>7.1f}"
            )
    for c in result.get("concurrency", []):
        print()
        print(
            f"app --runtime {c['runtime']} ({c['python']}): started in {c['app_startup_s']:.0f} s; "
            f"RSS after warm-up {c['rss_idle_mb']:.0f} MB"
        )
        print(
            f"  {c['clients']} clients for {c['duration_s']:.0f} s: {c['requests']} requests "
            f"({c['requests_per_s']:.2f}/s), ok {c['ok']}, refused as expected "
            f"{c['refused_as_expected']}, real slices refused by the OOD check "
            f"{c['refused_by_ood_check']}, errors {c['errors']}"
        )
        if c["client_latency"]:
            print(
                f"  client-side latency p50 {c['client_latency']['p50_ms']:.0f} ms, "
                f"p95 {c['client_latency']['p95_ms']:.0f} ms (queued: one analysis at a time)"
            )
        print(
            f"  RSS peak {c['rss_peak_mb']:.0f} MB, end {c['rss_end_mb']:.0f} MB, growth over the "
            f"second half {c['rss_growth_second_half_mb']:.0f} MB -> bound "
            f"{'met' if c['bound_met'] else 'NOT met'}"
        )
        for message in c["error_examples"]:
            print(f"  error: {message}")
    if "serving_install_mb" in result:
        print(
            f"\nserving install (site-packages of {result['serving_python']}): "
            f"{result['serving_install_mb']:.0f} MB"
        )


def report_isolated(isolated: dict[str, Any] | None) -> None:
    if not isolated:
        return
    print()
    print(
        f"one upload, each runtime in its own process, as deployed: {isolated['rounds']} rounds "
        f"of {isolated['uploads']} uploads, one process at a time, the order rotated"
    )
    for runtime, python in isolated["python"].items():
        heavy = isolated["imported_tensorflow_or_keras"][runtime]
        print(f"  {runtime:<12} {python} (imported: {', '.join(heavy) or 'no TensorFlow/Keras'})")
    header = (
        f"{'round':<6} {'runtime and variant':<28} {'p50 ms':>9} {'p95 ms':>9} {'keras/x p50':>12}"
    )
    print(header)
    print("-" * len(header))
    for number, row in enumerate(isolated["per_round"], 1):
        for runtime, child in row["runtimes"].items():
            for kind, values in child["latency"].items():
                ratio = row["p50_ratio_keras_over"].get(kind, {}).get(runtime)
                shown = f"{ratio:>11.2f}x" if ratio is not None else f"{'':>12}"
                print(
                    f"{number:<6} {runtime + ' ' + kind:<28} {values['p50_ms']:>9.1f} "
                    f"{values['p95_ms']:>9.1f} {shown}"
                )
        print(f"{'':<6} (order {', '.join(row['order'])}; load after {row['load_after']})")
    print("overall: median of the round p50s [range]; median p95")
    for key, values in isolated["overall"].items():
        p50 = values["p50_ms"]
        print(
            f"  {key:<28} p50 {p50['median']:>6.1f} ms [{p50['min']:.1f}-{p50['max']:.1f}], "
            f"p95 {values['p95_ms']['median']:.1f} ms"
        )
    for kind, ratios in isolated["p50_ratio_keras_over"].items():
        for runtime, value in ratios.items():
            print(
                f"  p50 {kind}, keras / {runtime}: {value['median']:.2f}x "
                f"[{value['min']:.2f}-{value['max']:.2f}]"
            )


def folder_mb(path: Path) -> float:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    )


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--latency-child"] and len(arguments) == 2:
        return latency_child(Path(arguments[1]))  # before any import of Keras below
    from braintumor.model.classifier import BACKBONES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained bundle (default: random weights)")
    parser.add_argument("--runtimes", default="keras,litert,onnxruntime")
    parser.add_argument("--int8", action="store_true", help="add litert-int8")
    parser.add_argument("--uploads", type=int, default=40, help="uploads timed per variant")
    parser.add_argument("--images", type=int, default=100, help="folder size for throughput")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--serving-python", help="python of the serving install, for the exported app run"
    )
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument(
        "--isolated-rounds",
        type=int,
        default=0,
        help="also time each runtime in its own process (as deployed), this many rounds",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default=DEFAULT_BACKBONE,
        help="the served backbone without --model (the paper profile's: resnet50 at 224 px)",
    )
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px")
    parser.add_argument("--mirror", type=Path)
    parser.add_argument(
        "--reexport", action="store_true", help="export --model again (with --explanation)"
    )
    parser.add_argument(
        "--explanation",
        default="hirescam:block10_add",
        help="METHOD:LAYER of the map to serve when exporting here (auto: the last map)",
    )
    parser.add_argument(
        "--gate-width",
        type=float,
        default=0.25,
        help="soft ReLU gate width of that map when exporting here (params.yaml's; 0: exact)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "serve.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    mirror = _mirror(args.mirror)
    from braintumor.core.schema import ServingParams

    runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    if args.int8:
        runtimes.append("litert-int8")
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        if args.model is not None:
            source = Path(shutil.copytree(args.model, work / "source"))
            what = f"bundle {args.model}"
        else:
            source = build_bundle(work, mirror, args.size, args.backbone)
            what = f"{args.backbone} at {args.size} px (weights none)"
        method, _, layer = args.explanation.partition(":")
        reexport = args.model is None or args.reexport
        if args.model is None and args.backbone != DEFAULT_BACKBONE:
            layer = "auto"  # the default layer is Lite0's; name another backbone's with --model
        info = exported_bundle(
            source,
            work,
            mirror,
            args.int8,
            (method, layer or "auto") if reexport else None,
            args.gate_width,
        )
        serving_settings = {"grayscale_tolerance": 6.0}
        settings = ServingParams(**serving_settings)
        runs = predictors(info, runtimes, settings)
        result["files"] = {k: v for k, v in info.items() if not isinstance(v, Path)}
        warm = ", ".join(f"{k} {v:.1f} s" for k, v in info["load_and_warm_up_s"].items())
        result["setup"] = f"{what}, {os.cpu_count()} CPUs; load + warm-up: {warm}"
        uploads = real_slices(mirror, "Testing", max(args.uploads, 1), offset=50)
        if not args.skip_latency:
            result.update(measure_latency(runs, uploads))
        if args.isolated_rounds > 0:
            result["isolated"] = measure_isolated(
                info,
                runtimes,
                uploads,
                args.isolated_rounds,
                args.serving_python,
                serving_settings,
                work,
            )
        if not args.skip_throughput:
            folder = work / "folder"
            for path in real_slices(mirror, "Testing", args.images, offset=120):
                target = folder / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            paths = sorted(folder.rglob("*.jpg"))
            result["throughput"] = measure_throughput(runs, paths, work)
        if not args.skip_concurrency:
            text_file = work / "text.png"
            text_file.write_text("not an image\n" * 20)
            # abspath, not resolve(): the app starts in another folder, and a venv's python
            # is a link that must stay one (resolving it leaves the venv)
            serving = os.path.abspath(args.serving_python) if args.serving_python else None
            apps = [("keras", sys.executable), ("auto", serving or sys.executable)]
            result["concurrency"] = [
                measure_concurrency(
                    info["bundle"], uploads, text_file, args.clients, args.duration, work, r, py
                )
                for r, py in apps
            ]
        if args.serving_python:
            prefix = Path(args.serving_python).parent.parent
            result["serving_python"] = args.serving_python
            result["serving_install_mb"] = sum(
                folder_mb(p) for p in prefix.glob("lib/python*/site-packages")
            )
        result["load_after"] = [round(x, 2) for x in os.getloadavg()]
        report(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
