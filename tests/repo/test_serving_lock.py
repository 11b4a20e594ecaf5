"""Issue 22 item 2: a serving install without the training framework.

``requirements-serving.lock`` is installed with ``pip install --no-deps`` like the other
locks, so these tests keep it closed (every requirement of a listed package listed),
pinned as ``requirements.lock`` pins the same packages (one set of versions is tested),
and free of TensorFlow, Keras, JAX and torch; the slow one builds a virtual environment
from it alone (once per module) and runs ``predict`` there on a bundle's exported model,
with TensorFlow not importable, and ``mlflow models serve`` of the registered pyfunc, whose
answers must match the training install's Keras model.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from test_locks import RUNTIME, missing_requirements, pins

from conftest import free_port
from serving_helpers import CLASSES, real_images, tiny_exported_bundle

ROOT = Path(__file__).resolve().parents[2]
SERVING = pins(ROOT / "requirements-serving.lock")
TRAINING_FRAMEWORKS = {
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "jax",
    "jaxlib",
    "torch",
    "tf-keras",
}


def test_the_serving_lock_holds_no_training_framework() -> None:
    assert not TRAINING_FRAMEWORKS & set(SERVING)
    assert "ai-edge-litert" in SERVING


def test_the_serving_lock_is_closed() -> None:
    assert missing_requirements(set(SERVING)) == []


def test_the_serving_lock_pins_what_the_runtime_lock_pins() -> None:
    differ = {
        name: (version, RUNTIME[name])
        for name, version in SERVING.items()
        if name in RUNTIME and RUNTIME[name] != version
    }
    assert not differ
    assert set(SERVING) <= set(RUNTIME), sorted(set(SERVING) - set(RUNTIME))


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """About a minute, once per module: a fresh venv from requirements-serving.lock plus
    the package (not editable), with TensorFlow checked not importable; yields its bin/."""
    root = tmp_path_factory.mktemp("serving-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements-serving.lock")], check=True)
    # From a copy: pip builds in the source tree (a build/ folder), not in the checkout.
    package = root / "package"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", package / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, package / name)
    subprocess.run([*pip, str(package)], check=True, cwd=root)
    blocked = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import tensorflow"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert blocked.returncode != 0 and "No module named 'tensorflow'" in blocked.stderr
    yield venv / "bin"


@pytest.mark.slow
def test_predict_runs_from_the_serving_install_alone(
    mirror: Path, tmp_path: Path, serving_venv: Path
) -> None:
    """``predict`` on real slices with the exported bundle, from the serving venv."""
    bundle = tiny_exported_bundle(mirror, tmp_path / "bundle")
    python = str(serving_venv / "python")
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in real_images(mirror, 1, "Testing", offset=5):
        (scans / path.name).write_bytes(path.read_bytes())
    (scans / "broken.jpg").write_bytes(b"not an image")
    done = subprocess.run(
        [python, "-m", "braintumor.serving.predict", "--model", str(bundle), str(scans)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines()[1:] if line]
    assert len(rows) == 5 and sum(",ok," in row for row in rows) == 4, done.stdout
    assert "litert" in done.stderr  # the model line names the exported runtime


def _save_pyfunc(bundle: Path, folder: Path) -> Path:
    """The bundle saved as the evaluate stage registers it (``tracking.registry``): the
    ``BundleModel`` pyfunc with the bundle as its artifact, the package as its code, the
    serving settings and the serving requirements."""
    import mlflow

    import braintumor
    from braintumor.core.schema import CleanParams, ServingParams
    from braintumor.serving.bundle import read_meta
    from braintumor.serving.pyfunc import (
        BUNDLE_ARTIFACT,
        BundleModel,
        model_config,
        served_requirements,
        signature,
    )

    meta = read_meta(bundle)
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=BundleModel(),
        artifacts={BUNDLE_ARTIFACT: str(bundle)},
        code_paths=[str(Path(braintumor.__file__).parent)],
        signature=signature(meta.classes),
        model_config=model_config(ServingParams(), CleanParams()),
        pip_requirements=served_requirements(True, []),
    )
    return folder


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the CLI and its uvicorn), in MB."""
    import psutil

    process = psutil.Process(pid)
    tree = [process, *process.children(recursive=True)]
    return sum(item.memory_info().rss for item in tree) / 1e6


@pytest.mark.slow
def test_mlflow_models_serve_runs_from_the_serving_install_alone(
    mirror: Path, tmp_path: Path, serving_venv: Path
) -> None:
    """``mlflow models serve --env-manager local`` with the serving venv's mlflow-skinny
    (uvicorn and FastAPI are in the lock): a real Msoud test slice posted as base64 in
    ``dataframe_split`` gets the class probabilities of the training install's Keras model
    (to 1e-4: LiteRT against Keras), and a non-image its own error row. The venv's bin/
    must be on PATH (activated): mlflow starts the server as ``exec uvicorn``. Prints the
    cold start to /ping and the server's resident memory."""
    from braintumor.serving.bundle import Bundle

    bundle = tiny_exported_bundle(mirror, tmp_path / "bundle")
    model = _save_pyfunc(bundle, tmp_path / "pyfunc")
    port = free_port()
    env = {**os.environ, "PATH": f"{serving_venv}:{os.environ['PATH']}"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONDONTWRITEBYTECODE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(serving_venv / "mlflow"), "models", "serve", "-m", str(model)]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        started = time.monotonic()
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        try:
            while True:
                if server.poll() is not None:
                    pytest.fail(log_path.read_text()[-3000:])
                if time.monotonic() - started > 180:
                    pytest.fail("waited 180 s for `mlflow models serve` to answer /ping")
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            cold_start = time.monotonic() - started
            image_path = real_images(mirror, 1, "Testing", offset=16)[1]  # a meningioma
            image = image_path.read_bytes()
            rows = [[base64.b64encode(data).decode()] for data in (image, b"not an image")]
            payload = {"dataframe_split": {"columns": ["image"], "data": rows}}
            response = requests.post(
                f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60
            )
            assert response.status_code == 200, response.text
            answer, refused = response.json()["predictions"]
            rss = _tree_rss_mb(server.pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    assert answer["status"] == "ok" and refused["status"] == "error", (answer, refused)
    assert refused["reason"] == "not_an_image" and refused["predicted"] == ""
    trained = Bundle.load(bundle, runtime="keras")
    expected = trained.predict(trained.preprocess_bytes(image)[None])[0]
    served = np.array([answer[name] for name in CLASSES])
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert answer["predicted"] == CLASSES[int(np.argmax(expected))]
    print(f"\nmlflow models serve (serving venv): /ping after {cold_start:.1f} s, {rss:.0f} MB RSS")
