"""The web app: its API driven by ``gradio_client`` against the real server, and its
handlers and example finder called directly.

The server is ``python -m braintumor.app`` in a subprocess, on a free loopback port, with
the small real bundle of ``test_predict``; ``test_browser`` reuses the same server
(``app_server``), so it starts once per session.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from braintumor.app import Handlers, find_examples
from braintumor.bundle import Bundle
from braintumor.config import load_params
from braintumor.imaging import decode_image
from braintumor.predict import predict_files
from braintumor.serving import Predictor, ServingSettings

from conftest import REPO
from serving_helpers import (
    CLASSES,
    bad_files,
    dicom_of,
    real_images,
    tiny_bundle_folder,
    write_dicom,
)

STARTUP_TIMEOUT_S = 240
_SERVERS: dict[str, dict] = {}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(bundle: Path, examples: list[Path], folder: Path) -> dict:
    """Start the app (once per session) in ``folder``/cwd, an empty working directory;
    returns its URL, process, log and the upload folder it reports."""
    if "app" in _SERVERS and _SERVERS["app"]["process"].poll() is None:
        return _SERVERS["app"]
    cwd = folder / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = folder / "app.log"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [
        sys.executable, "-m", "braintumor.app", "--model", str(bundle),
        "--host", "127.0.0.1", "--port", str(port), "--params", str(REPO / "params.yaml"),
        "--examples", *map(str, examples),
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
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
    }
    return _SERVERS["app"]


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


@pytest.fixture
def client(app_server, tmp_path):
    from gradio_client import Client

    return Client(app_server["url"], verbose=False, download_files=str(tmp_path / "downloads"))


def confidences(label: dict) -> dict[str, float]:
    return {item["label"]: float(item["confidence"]) for item in label["confidences"]}


# --------------------------------------------------------------------------- API


def test_api_gives_calibrated_probabilities_equal_to_predict(
    client, app_server, reference_predictor, mirror
) -> None:
    from gradio_client import handle_file
    from PIL import Image

    image = real_images(mirror, 1, offset=20)[2]
    label, predicted, overlay, preprocessed, message, *rest = client.predict(
        handle_file(str(image)), 0.4, api_name="/predict"
    )
    assert not rest, "the slider state must not be part of the API"
    got = confidences(label)
    assert sorted(got) == sorted(CLASSES)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
    (expected,) = predict_files(reference_predictor, [image], progress=False)
    for name in CLASSES:
        assert got[name] == pytest.approx(expected.probabilities[name], abs=1e-5)
    assert label["label"] == expected.predicted_class
    assert predicted.startswith(expected.predicted_class)
    assert message.startswith(f"Analysed {image.name}")
    assert Image.open(overlay).size == (64, 64) and Image.open(overlay).mode == "RGB"
    assert Image.open(preprocessed).size == (64, 64)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("text.png", "not an image"),
        ("empty.jpg", "empty file"),
        ("truncated.jpg", "truncated jpeg"),
        ("colour.png", "colour image"),
        ("blank.png", "blank image"),
    ],
)
def test_api_explains_bad_uploads(client, mirror, tmp_path, name, words) -> None:
    from gradio_client import handle_file

    path, _ = bad_files(tmp_path / "bad", mirror)[name]
    label, predicted, overlay, preprocessed, message = client.predict(
        handle_file(str(path)), 0.4, api_name="/predict"
    )
    assert message.startswith("Cannot analyse this file:") and words in message, message
    assert name in message
    assert "Traceback" not in message and "Error" not in message
    assert not label or not label.get("confidences")
    assert (predicted, overlay, preprocessed) == ("", None, None)


def test_api_reads_dicom_with_its_window(client, mirror, tmp_path, reference_predictor) -> None:
    from gradio_client import handle_file

    image = real_images(mirror, 1, offset=30)[3]
    pixels, window = dicom_of(decode_image(image.read_bytes()).gray)
    dicom = write_dicom(tmp_path / "slice.dcm", pixels, window=window)
    label, *_, message = client.predict(handle_file(str(dicom)), 0.4, api_name="/predict")
    assert message.startswith("Analysed slice.dcm"), message
    (expected,) = predict_files(reference_predictor, [image], progress=False)
    for name, value in confidences(label).items():
        assert value == pytest.approx(expected.probabilities[name], abs=1e-5)


def test_page_offers_the_examples_and_writes_nothing_outside_temp(app_server, client) -> None:
    config = requests.get(app_server["url"].rstrip("/") + "/config", timeout=30).json()
    samples = [
        component["props"]["samples"]
        for component in config["components"]
        if component.get("type") == "dataset"
    ]
    names = [sample[0] for sample in samples[0]] if samples else []
    assert names == [path.name for path in app_server["examples"]]
    assert list(app_server["cwd"].iterdir()) == []  # nothing in the working directory
    uploads = app_server["uploads"]
    assert uploads is not None and uploads.is_dir()
    assert uploads.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


# --------------------------------------------------------------------------- handlers


@pytest.fixture
def handlers(reference_predictor, tmp_path) -> Handlers:
    (tmp_path / "uploads").mkdir()
    return Handlers(reference_predictor, tmp_path / "uploads")


def test_handler_opens_only_files_in_the_upload_folder(handlers, mirror, tmp_path) -> None:
    outside = real_images(mirror, 1)[0]
    *_, message, state = handlers.analyse(str(outside), 0.4)
    assert "only uploaded files" in message and state is None
    link = handlers.upload_folder / "link.jpg"
    link.symlink_to(outside)
    *_, message, state = handlers.analyse(str(link), 0.4)
    assert "only uploaded files" in message and state is None
    *_, message, state = handlers.analyse(None, 0.4)
    assert message.startswith("Upload") and state is None


def test_slider_reblends_without_running_the_model(handlers, mirror, monkeypatch) -> None:
    upload = handlers.upload_folder / "slice.jpg"
    upload.write_bytes(real_images(mirror, 1, offset=5)[0].read_bytes())
    label, predicted, overlay, preprocessed, message, state = handlers.analyse(str(upload), 0.4)
    assert message.startswith("Analysed slice.jpg") and overlay.shape == (64, 64, 3)

    def no_model(*args, **kwargs):
        raise AssertionError("the slider must not run the model")

    monkeypatch.setattr(handlers.predictor, "explain", no_model)
    monkeypatch.setattr(handlers.predictor, "predict", no_model)
    plain = handlers.blend(state, 0.0)
    np.testing.assert_array_equal(plain, np.repeat(preprocessed[..., None], 3, axis=2))
    assert not np.array_equal(handlers.blend(state, 1.0), plain)
    np.testing.assert_array_equal(handlers.blend(state, 0.4), overlay)
    assert handlers.blend(None, 0.5) is None


def test_handler_refuses_an_oversized_upload(reference_predictor, mirror, tmp_path) -> None:
    small = Predictor(reference_predictor.bundle, ServingSettings(max_upload_bytes=2048))
    handlers = Handlers(small, tmp_path)
    upload = tmp_path / "big.jpg"
    upload.write_bytes(real_images(mirror, 1)[0].read_bytes() + b"\0" * 4096)
    *_, message, state = handlers.analyse(str(upload), 0.4)
    assert "big.jpg: file too large" in message and "the limit is 2 kB" in message
    assert state is None


def test_unusual_images_are_classified_with_a_warning(reference_predictor, mirror, tmp_path):
    strict = Predictor(reference_predictor.bundle, ServingSettings(ood_warn_z=1e-3))
    upload = tmp_path / "odd.jpg"
    upload.write_bytes(real_images(mirror, 1)[0].read_bytes())
    label, *_, message, state = Handlers(strict, tmp_path).analyse(str(upload), 0.4)
    assert message.startswith("Analysed odd.jpg: predicted ")
    assert "Warning: unusual image" in message and "standard deviations" in message
    assert len(label) == 4 and state is not None


def test_internal_errors_show_a_message_not_a_trace(handlers, mirror, monkeypatch) -> None:
    upload = handlers.upload_folder / "slice.jpg"
    upload.write_bytes(real_images(mirror, 1)[0].read_bytes())

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(handlers.predictor, "explain", broken)
    *_, message, state = handlers.analyse(str(upload), 0.4)
    assert "internal error" in message and "secret" not in message and state is None


def test_examples_come_from_the_test_split(mirror, tmp_path) -> None:
    params = load_params(REPO / "params.yaml")
    found = find_examples(6, CLASSES, params=params, data_dir=tmp_path / "data", mirror=mirror)
    assert [path.parent.name for path in found] == [*CLASSES, *CLASSES[:2]]
    assert all(path.parent.parent.name == "Testing" for path in found)
    # After the pipeline ran: the processed test index, leakage-free rows first.
    raw = tmp_path / "data" / "raw"
    (raw / "x").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (raw / "x" / name).write_bytes(b"")
    processed = tmp_path / "data" / "processed"
    processed.mkdir()
    (processed / "test_index.csv").write_text(
        "id,path,source,label,label_index,leakage_free,dup_group\n"
        "1,x/a.jpg,s,glioma,0,False,\n2,x/b.jpg,s,glioma,0,True,\n"
    )
    found = find_examples(4, CLASSES, params=params, data_dir=tmp_path / "data", mirror=mirror)
    assert found == [raw / "x" / "b.jpg", raw / "x" / "a.jpg"]
    assert find_examples(0, CLASSES, params=params, mirror=mirror) == []
