"""The app as the serving tests meet it: one real server per test session (a subprocess on
loopback over a tiny trained bundle), shared by the API tests and the browser tests."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from braintumor.core.schema import ServingParams
from braintumor.serving.bundle import Bundle
from braintumor.serving.predictor import Predictor

from conftest import free_port, params_file
from serving_helpers import real_images, tiny_bundle_folder

STARTUP_TIMEOUT_S = 240
READY = re.compile(r"Running on local URL: (\S+)")
_SERVERS: dict[str, dict] = {}


def follow_output(process: subprocess.Popen, log_path: Path, pattern: re.Pattern) -> queue.Queue:
    """Copy ``process``'s output, line by line as it comes, to ``log_path`` (in a thread,
    for the process's whole life, so its pipe never fills); the returned queue receives
    the first match of ``pattern``, or ``None`` once the output ends without one."""
    found: queue.Queue = queue.Queue()

    def copy() -> None:
        matched = False
        with log_path.open("w") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                match = None if matched else pattern.search(line)
                if match:
                    matched = True
                    found.put(match)
        if not matched:
            found.put(None)

    threading.Thread(target=copy, name=f"output of {process.pid}", daemon=True).start()
    return found


def wait_for_match(
    process: subprocess.Popen, found: queue.Queue, log_path: Path, timeout_s: float
) -> re.Match:
    """The match ``follow_output`` reports; fails the test with the log's end when the
    process exits first or ``timeout_s`` passes (the process is then killed)."""
    try:
        match = found.get(timeout=timeout_s)
    except queue.Empty:
        match = None
    if match is None:
        process.kill()
        process.wait()
        pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
    return match


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
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found = follow_output(process, log_path, READY)
    url = wait_for_match(process, found, log_path, STARTUP_TIMEOUT_S).group(1)
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
    """A temp root as killed runs leave it: ``run-stale`` (a DICOM upload) and
    ``run-other`` (an empty one), their locks free; and entries not to touch: a file
    named like a run folder and someone else's notes."""
    stale = root / "run-stale" / "0123abcd"
    stale.mkdir(parents=True)
    (stale / "patient.dcm").write_bytes(b"DICM with a patient name")
    (root / "run-other").mkdir()
    (root / "run-file.txt").write_text("a file, not a run folder")
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
    return Predictor(Bundle.load(served_bundle), ServingParams(grayscale_tolerance=6.0))
