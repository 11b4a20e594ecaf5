"""The app as the serving tests meet it: one real server per test session (a subprocess on
loopback over a tiny trained bundle), shared by the API tests and the browser tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from braintumor.serving.bundle import Bundle
from braintumor.serving.predictor import Predictor, ServingSettings

from conftest import free_port, params_file
from serving_helpers import real_images, tiny_bundle_folder

STARTUP_TIMEOUT_S = 240
_SERVERS: dict[str, dict] = {}


def start_app(bundle: Path, examples: list[Path], folder: Path) -> dict:
    """Start the app (once per session) in ``folder``/cwd, an empty working directory;
    returns its URL, process, log and the upload folder it reports."""
    if "app" in _SERVERS and _SERVERS["app"]["process"].poll() is None:
        return _SERVERS["app"]
    cwd = folder / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = folder / "app.log"
    port = free_port()
    temp_root = seed_stale_runs(folder / "app-temp")
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "BRAINTUMOR_APP_TEMP": str(temp_root),
    }
    env.pop("GRADIO_TEMP_DIR", None)
    env.pop("BRAINTUMOR_APP_AUTH_FILE", None)
    command = [
        sys.executable,
        "-m",
        "braintumor.serving.app",
        "--model",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--params",
        str(params_file()),
        "--examples",
        *map(str, examples),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    url = None
    while url is None:
        text = log_path.read_text()
        found = re.search(r"Running on local URL: (\S+)", text)
        if found:
            url = found.group(1)
        elif process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not start:\n{text[-3000:]}")
        else:
            time.sleep(0.5)
    uploads = re.search(r"uploads kept in (\S+)", log_path.read_text())
    _SERVERS["app"] = {
        "url": url,
        "process": process,
        "log": log_path,
        "cwd": cwd,
        "uploads": Path(uploads.group(1)) if uploads else None,
        "bundle": bundle,
        "examples": examples,
        "temp_root": temp_root,
    }
    return _SERVERS["app"]


def seed_stale_runs(root: Path) -> Path:
    """A temp root as a killed run leaves it: ``run-stale`` (a DICOM upload, its lock file
    free), ``run-orphan`` (no lock file), and a file of someone else's not to touch."""
    stale = root / "run-stale" / "0123abcd"
    stale.mkdir(parents=True)
    (stale / "patient.dcm").write_bytes(b"DICM with a patient name")
    (root / "run-stale.lock").write_text("")
    (root / "run-orphan").mkdir()
    (root / "run-orphan" / "upload.jpg").write_bytes(b"jpeg")
    (root / "notes.txt").write_text("not the app's")
    return root


def stop_app() -> None:
    """SIGTERM, like a service manager; the app must exit and remove its upload folder."""
    server = _SERVERS.pop("app", None)
    if server is None or server["process"].poll() is not None:
        return
    server["process"].send_signal(signal.SIGTERM)
    try:
        server["process"].wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server["process"].pid, signal.SIGKILL)
        server["process"].wait()
        pytest.fail("the app did not stop on SIGTERM within 30 s")
    if server["uploads"] is not None and server["uploads"].exists():
        pytest.fail(f"the app left its upload folder behind: {server['uploads']}")


@pytest.fixture(scope="session")
def served_bundle(mirror: Path, tmp_path_factory) -> Path:
    return tiny_bundle_folder(mirror, tmp_path_factory.mktemp("serving-bundle"))


@pytest.fixture(scope="session")
def app_server(served_bundle: Path, mirror: Path, tmp_path_factory):
    examples = real_images(mirror, 1, offset=40)[:2]
    server = start_app(served_bundle, examples, tmp_path_factory.mktemp("app-server"))
    yield server
    stop_app()


@pytest.fixture(scope="session")
def reference_predictor(served_bundle: Path) -> Predictor:
    """The app's bundle in this process, through the ``predict`` command's code."""
    return Predictor(Bundle.load(served_bundle), ServingSettings(grayscale_tolerance=6.0))
