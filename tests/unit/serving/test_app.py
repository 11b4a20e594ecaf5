"""The web app: its API driven by ``gradio_client`` and plain HTTP against the real server,
its hardening (closed direct API, bounded queue, login, uploads deleted), and its handlers
and example finder called directly.

The server is ``python -m braintumor.serving.app`` in a subprocess, on a free loopback port, with
the small real bundle of ``test_predict``; ``test_browser`` reuses the same server
(``app_server``), so it starts once per session. Its temp root is seeded with the folders
a killed earlier run would leave, which the start must remove. The queue and login tests
launch the same ``build_app`` and ``serve`` in this process (``local_app``), with the real
predictor held at ``explain`` by an event so a queue can be built up on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from braintumor.core.config import load_params
from braintumor.core.schema import ServingParams
from braintumor.core.tempdirs import FolderInUse, lock_folder
from braintumor.data.imaging import decode_image
from braintumor.serving.app.cli import main
from braintumor.serving.app.examples import find_examples
from braintumor.serving.app.handlers import DISPLAY_SIZE, Handlers, fit_for_display
from braintumor.serving.app.login import Logins, read_auth_file
from braintumor.serving.app.page import build_app
from braintumor.serving.app.server import STATE_SESSIONS, ClientLimits, serve
from braintumor.serving.app.uploads import claim_upload_folder
from braintumor.serving.bundle import Bundle
from braintumor.serving.predict import predict_files
from braintumor.serving.predictor import Predictor, SetupError

from conftest import REPO, free_port, params_file
from serving_helpers import (
    CLASSES,
    bad_files,
    dicom_of,
    real_images,
    write_dicom,
)


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
    label, predicted, overlay, shown, message, *rest = client.predict(
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
    # Both images at display size (the model's input is 64 px; the slice 224 px).
    assert Image.open(overlay).size == (DISPLAY_SIZE, DISPLAY_SIZE)
    assert Image.open(overlay).mode == "RGB"
    assert Image.open(shown).size == (DISPLAY_SIZE, DISPLAY_SIZE)
    original = decode_image(image.read_bytes()).gray
    np.testing.assert_array_equal(np.asarray(Image.open(shown)), fit_for_display(original))


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
    label, predicted, overlay, shown, message = client.predict(
        handle_file(str(path)), 0.4, api_name="/predict"
    )
    assert message.startswith("Cannot analyse this file:") and words in message, message
    assert name in message
    assert "Traceback" not in message and "Error" not in message
    assert not label or not label.get("confidences")
    assert (predicted, overlay, shown) == ("", None, None)


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


# --------------------------------------------------------------------------- hardening


def upload_file(session: requests.Session, url: str, path: Path) -> dict:
    """Upload ``path`` as the page does; returns the FileData to send to an event."""
    with path.open("rb") as handle:
        response = session.post(url + "gradio_api/upload", files={"files": handle}, timeout=60)
    response.raise_for_status()
    (stored,) = response.json()
    return {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def call_result(session: requests.Session, url: str, event_id: str) -> list:
    """Wait for a queued call's outcome (the SSE stream of ``/call/predict/<id>``): the
    outputs, the slider's state included (``None``; ``gradio_client`` hides it)."""
    stream = session.get(f"{url}gradio_api/call/predict/{event_id}", stream=True, timeout=120)
    event = None
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event in ("complete", "error"):
            assert event == "complete", line
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the call's stream ended without a result")


def test_direct_api_is_closed_and_the_queue_answers(app_server, mirror, tmp_path) -> None:
    """Before: ``/gradio_api/run/predict`` ran the handler outside the queue (4 parallel
    calls decoded in parallel); now every direct route answers 404, the queue still
    works."""
    url = app_server["url"]
    session = requests.Session()
    image = real_images(mirror, 1, offset=21)[1]
    data = upload_file(session, url, image)

    def direct(route: str) -> requests.Response:
        return requests.post(url + route, json={"data": [data, 0.4]}, timeout=60)

    routes = ["gradio_api/run/predict", "gradio_api/api/predict"] * 2
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(direct, routes))
    for answer in answers:
        assert answer.status_code == 404, (answer.status_code, answer.text[:200])
        assert "does not accept direct HTTP POST" in answer.text
    started = session.post(url + "gradio_api/call/predict", json={"data": [data, 0.4]})
    message = call_result(session, url, started.json()["event_id"])[4]
    assert message.startswith(f"Analysed {image.name}"), message


def test_uploads_are_deleted_after_analysis(app_server, client, mirror, tmp_path) -> None:
    """Before: uploads stayed in gradio's cache for an hour (a DICOM with the patient's
    name); now the file is gone once analysed, accepted or refused."""
    import pydicom
    from gradio_client import handle_file

    image = real_images(mirror, 1, offset=31)[2]
    pixels, window = dicom_of(decode_image(image.read_bytes()).gray)
    dicom = write_dicom(tmp_path / "patient-4711.dcm", pixels, window=window)
    dataset = pydicom.dcmread(dicom)
    dataset.PatientName = "Doe^Jane"
    dataset.save_as(dicom)
    refused = tmp_path / "notes-4711.png"
    refused.write_text("not an image\n" * 20)
    uploads = app_server["uploads"]
    for path, start in ((dicom, "Analysed"), (refused, "Cannot analyse")):
        *_, message = client.predict(handle_file(str(path)), 0.4, api_name="/predict")
        assert message.startswith(start), message
        assert not list(uploads.rglob(path.name)), f"{path.name} left in {uploads}"
    assert not any(b"Doe^Jane" in p.read_bytes() for p in uploads.rglob("*") if p.is_file())


def test_stale_upload_folders_are_removed_at_start(app_server) -> None:
    """Before: a ``kill -9`` left the run's uploads on disk for good; now the next start
    removes every earlier run folder whose lock is free, and nothing else."""
    root = app_server["temp_root"]
    uploads = app_server["uploads"]
    assert uploads.parent == root and uploads.name.startswith("run-")
    assert not (root / "run-stale").exists() and not (root / "run-other").exists()
    assert (root / "notes.txt").read_text() == "not the app's"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["notes.txt", "run-file.txt", uploads.name]
    )
    with pytest.raises(FolderInUse):
        lock_folder(uploads)  # the running app holds it
    assert "removed the upload folder of an earlier run" in app_server["log"].read_text()


# Claims an upload folder, reports it, and holds it until its stdin closes.
CLAIM_AND_WAIT = (
    "import sys; from pathlib import Path;"
    "from braintumor.serving.app.uploads import claim_upload_folder;"
    "claimed = claim_upload_folder(Path(sys.argv[1])); folder = claimed.path;"
    "(folder / 'patient.dcm').write_bytes(b'DICM');"
    "print(folder, flush=True); sys.stdin.read()"
)


def test_a_killed_run_is_cleaned_at_the_next_start_and_a_live_one_kept(tmp_path) -> None:
    """Real processes: one killed with SIGKILL (its folder must go), one alive (its folder
    must stay: two apps may share a temp root)."""
    root = tmp_path / "root"

    def claim() -> tuple[subprocess.Popen, Path]:
        process = subprocess.Popen(
            [sys.executable, "-c", CLAIM_AND_WAIT, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return process, Path(process.stdout.readline().strip())

    killed, killed_folder = claim()
    alive, alive_folder = claim()
    try:
        killed.kill()
        killed.wait(timeout=30)
        assert (killed_folder / "patient.dcm").is_file()  # what kill -9 leaves
        mine = claim_upload_folder(root)
        assert not killed_folder.exists()
        assert (alive_folder / "patient.dcm").is_file()
        assert oct(mine.path.stat().st_mode & 0o777) == "0o700"
        mine.remove()
        assert not mine.path.exists()
    finally:
        alive.kill()
        alive.wait(timeout=30)
    lock_folder(alive_folder).release()  # free once its process is gone


def test_page_shows_no_server_paths(app_server, mirror) -> None:
    """Before: the page showed ``<bundle folder>/model.keras``; now the model is named by
    its hash, and neither the page nor its config holds the bundle, data or work paths."""
    base = app_server["url"].rstrip("/")
    config = requests.get(base + "/config", timeout=30).text
    page = requests.get(base + "/", timeout=30).text
    bundle = app_server["bundle"]
    for secret in (str(bundle), str(bundle.parent), str(mirror), str(REPO), str(app_server["cwd"])):
        assert secret not in config and secret not in page, secret
    sha = json.loads((bundle / "bundle.json").read_text())["model_sha256"][:12]
    assert f"model sha256 {sha}" in config


# --------------------------------------------------------------------------- in-process server


class GatedPredictor(Predictor):
    """The real predictor, held at ``explain`` while ``gate`` is closed, counting how many
    analyses run at once (instrumentation around the real model, which still runs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when an analysis reaches the model
        self.active = 0
        self.most = 0
        self._count = threading.Lock()

    def explain(self, images):
        with self._count:
            self.active += 1
            self.most = max(self.most, self.active)
        self.entered.set()
        try:
            self.gate.wait(60)
            return super().explain(images)
        finally:
            with self._count:
                self.active -= 1


USERS = "# who may log in\nalice:correct horse battery\n\nbob:s3cret:with:colons\n"
# Small on purpose: the tests reach each limit in a few requests and wait out the window.
LIMITS = ClientLimits(login_failures=5, login_window_s=4.0, upload_files=3, upload_bytes=500_000)
WRONG_PASSWORD = "Tr0ub4dor&3-wrong"


class CountingLogins(Logins):
    """The app's password check, counting the logins that reach it."""

    def __init__(self, users: list[tuple[str, str]]) -> None:
        super().__init__(users)
        self.checked = 0
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        with self._lock:
            self.checked += 1
        return super().__call__(username, password)


class SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Connections that leave from ``address``: any 127.x.y.z reaches a server on
    127.0.0.1, and the server sees another client."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def from_address(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(address))
    return session


@pytest.fixture(scope="module")
def local_app(served_bundle, tmp_path_factory):
    """``build_app`` + ``serve`` in this process: login required, at most one waiting,
    the small ``LIMITS`` per client."""
    folder = tmp_path_factory.mktemp("local-app")
    temp = claim_upload_folder(folder / "temp")
    saved = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(temp.path)
    auth_file = folder / "users"
    auth_file.write_text(USERS)
    auth_file.chmod(0o600)
    logins = CountingLogins(read_auth_file(auth_file))
    predictor = GatedPredictor(Bundle.load(served_bundle), ServingParams(grayscale_tolerance=6.0))
    page = build_app(predictor, upload_folder=temp.path)
    url = serve(
        page,
        host="127.0.0.1",
        port=free_port(),
        logins=logins,
        max_queue=1,
        max_file_size=10_000_000,
        limits=LIMITS,
    )
    try:
        yield {
            "url": url,
            "predictor": predictor,
            "uploads": temp.path,
            "logins": logins,
            "page": page,
        }
    finally:
        predictor.gate.set()
        page.blocks.close()
        temp.remove()
        if saved is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved


def logged_in(
    url: str,
    user: str = "alice",
    password: str = "correct horse battery",
    session: requests.Session | None = None,
) -> requests.Session:
    session = session or requests.Session()
    answer = session.post(url + "login", data={"username": user, "password": password})
    assert answer.status_code == 200, answer.text
    return session


@pytest.mark.slow  # the in-process server's start: about 15 s on a busy machine
def test_a_login_is_required_and_a_wrong_password_refused(local_app, mirror) -> None:
    from gradio_client import Client, handle_file

    url = local_app["url"]
    assert requests.get(url + "config", timeout=30).status_code == 401
    image = real_images(mirror, 1, offset=22)[0]
    with image.open("rb") as handle:
        anonymous = requests.post(url + "gradio_api/upload", files={"files": handle}, timeout=30)
    assert anonymous.status_code == 401
    wrong = requests.post(url + "login", data={"username": "alice", "password": "wrong"})
    assert wrong.status_code == 400 and "Incorrect credentials" in wrong.text
    assert logged_in(url).get(url + "config", timeout=30).status_code == 200
    assert logged_in(url, "bob", "s3cret:with:colons").get(url + "config").status_code == 200
    with pytest.raises(Exception):  # noqa: B017, PT011 - gradio_client's own error types
        Client(url, verbose=False)
    client = Client(url, auth=("alice", "correct horse battery"), verbose=False)
    *_, message = client.predict(handle_file(str(image)), 0.4, api_name="/predict")
    assert message.startswith(f"Analysed {image.name}"), message


@pytest.mark.slow  # the in-process server's start: about 15 s on a busy machine
def test_queue_runs_one_analysis_at_a_time_and_refuses_beyond_its_bound(local_app, mirror) -> None:
    """Held at ``explain``: one running, one waiting (``max_queue=1``), the next refused
    with 503 "Queue is full" and its upload deleted at once; the waiting one shares the
    running one's upload path (same bytes) and must still find its file."""
    url, predictor = local_app["url"], local_app["predictor"]
    session = logged_in(url)
    first, third = real_images(mirror, 1, offset=23)[:2]
    data = upload_file(session, url, first)
    again = upload_file(session, url, first)  # the same content: gradio's same path
    assert again["path"] == data["path"]
    predictor.gate.clear()
    predictor.entered.clear()
    predictor.most = 0

    def call(file_data: dict) -> requests.Response:
        return session.post(url + "gradio_api/call/predict", json={"data": [file_data, 0.4]})

    running = call(data)
    assert predictor.entered.wait(60), "the first analysis never reached the model"
    waiting = call(again)
    third_data = upload_file(session, url, third)
    refused = call(third_data)
    direct = session.post(url + "gradio_api/run/predict", json={"data": [data, 0.4]})
    assert refused.status_code == 503 and "Queue is full" in refused.text, refused.text
    assert not Path(third_data["path"]).exists(), "a refused analysis must delete its upload"
    assert Path(data["path"]).exists(), "the waiting analysis still needs the shared upload"
    predictor.gate.set()
    assert direct.status_code == 404
    for started in (running, waiting):
        message = call_result(session, url, started.json()["event_id"])[4]
        assert message.startswith(f"Analysed {first.name}"), message
    assert predictor.most == 1, "two analyses ran at once"
    assert not Path(data["path"]).exists(), "the shared upload must go after the last use"


@pytest.mark.slow  # the in-process server's start
def test_the_app_keeps_a_bounded_number_of_sessions(local_app) -> None:
    """Before: gradio's default kept 10 000 sessions (each a copy of the page's config
    and the slider's state): memory grew for hours under load."""
    assert local_app["page"].blocks.state_session_capacity == STATE_SESSIONS
    assert local_app["page"].blocks.app.state_holder.capacity == STATE_SESSIONS


@pytest.mark.slow  # the in-process server's start, and the throttle's window
def test_a_burst_of_wrong_passwords_is_mostly_refused_unchecked(local_app, caplog) -> None:
    """Before: every one of 300 guesses was checked (and a botnet's worth more). Now a
    client gets ``login_failures`` checks per window; the rest get 429 unchecked, the
    right password included, while another client logs in; after the window it works."""
    url, logins = local_app["url"], local_app["logins"]
    caplog.set_level("INFO", logger="braintumor.serving.app")
    checked_before = logins.checked

    def guess(_: int) -> int:
        data = {"username": "alice", "password": WRONG_PASSWORD}
        return requests.post(url + "login", data=data, timeout=60).status_code

    began = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(guess, range(300)))
    elapsed = time.monotonic() - began
    checked = logins.checked - checked_before
    windows = 1 + int(elapsed // LIMITS.login_window_s)
    print(
        f"burst of 300 wrong passwords in {elapsed:.1f} s: {checked} checked, "
        f"{statuses.count(429)} refused unchecked (429)"
    )
    assert 1 <= checked <= LIMITS.login_failures * windows, (checked, elapsed)
    assert statuses.count(400) == checked and statuses.count(429) == 300 - checked
    right = {"username": "alice", "password": "correct horse battery"}
    throttled = requests.post(url + "login", data=right, timeout=60)
    assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
    assert logins.checked - checked_before == checked, "a throttled login was checked"
    logged_in(url, session=from_address("127.0.0.2"))  # another client is not locked out
    time.sleep(float(throttled.headers["Retry-After"]))  # the server's own word: not a poll
    logged_in(url)
    logs = "\n".join(record.getMessage() for record in caplog.records)
    assert "login failed from 127.0.0.1" in logs and "login: 127.0.0.1 refused" in logs
    assert WRONG_PASSWORD not in logs and "alice" not in logs


@pytest.mark.slow  # the in-process server's start
def test_uploads_in_flight_are_bounded_per_client(local_app, mirror, tmp_path) -> None:
    """Before: a client could fill the disk with uploads it never analysed (each kept for
    the cache age). Now ``upload_files`` uploads in flight per address, then 429 until
    one is analysed (and so deleted); bytes are bounded from ``Content-Length`` before
    the body is read; other addresses are not affected."""
    import http.client
    from urllib.parse import urlsplit

    url = local_app["url"]
    session = logged_in(url)
    images = real_images(mirror, 1, offset=50)  # four distinct files
    stored = [upload_file(session, url, path) for path in images[: LIMITS.upload_files]]
    with images[3].open("rb") as handle:
        refused = session.post(url + "gradio_api/upload", files={"files": handle}, timeout=60)
    assert refused.status_code == 429 and "waiting for analysis" in refused.text
    other = logged_in(url, session=from_address("127.0.0.3"))
    upload_file(other, url, images[3])  # another client: its own quota
    started = session.post(url + "gradio_api/call/predict", json={"data": [stored[0], 0.4]})
    message = call_result(session, url, started.json()["event_id"])[4]
    assert message.startswith(f"Analysed {images[0].name}"), message
    assert not Path(stored[0]["path"]).exists()
    upload_file(session, url, images[3])  # a place came free
    # Too many bytes: refused on the headers alone, no body sent at all.
    address = urlsplit(url)
    connection = http.client.HTTPConnection(
        address.hostname, address.port, timeout=60, source_address=("127.0.0.4", 0)
    )
    connection.putrequest("POST", "/gradio_api/upload")
    connection.putheader("Cookie", "; ".join(f"{k}={v}" for k, v in other.cookies.items()))
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(LIMITS.upload_bytes + 1))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 429 and b"would hold" in answer.read()
    connection.close()


def test_binding_beyond_loopback_needs_a_login(tmp_path, monkeypatch, capsys) -> None:
    """Refused before anything loads: one line on stderr naming the option or file."""
    monkeypatch.delenv("BRAINTUMOR_APP_AUTH_FILE", raising=False)
    monkeypatch.setenv("BRAINTUMOR_APP_TEMP", str(tmp_path / "temp"))
    assert main(["--host", "0.0.0.0", "--model", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --host 0.0.0.0: not a loopback address") and "\n" not in error
    assert "--auth-file" in error and "BRAINTUMOR_APP_AUTH_FILE" in error
    broken = tmp_path / "users"
    broken.write_text("alice:ok\nbob-without-password\n")
    broken.chmod(0o600)
    monkeypatch.setenv("BRAINTUMOR_APP_AUTH_FILE", str(broken))
    assert main(["--host", "192.168.1.10", "--model", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: auth file {broken}: line 2: expected user:password"
    assert main(["--max-queue", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-queue 0: must be at least 1"
    assert not (tmp_path / "temp").exists(), "nothing may be made before the checks pass"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_an_auth_file_others_may_read_or_change_is_refused(tmp_path, monkeypatch, capsys, mode):
    """Before: a world-readable file of passwords was used as is. Now it is refused with
    one line naming the file and its mode, before anything loads."""
    monkeypatch.setenv("BRAINTUMOR_APP_TEMP", str(tmp_path / "temp"))
    users = tmp_path / "users"
    users.write_text("alice:correct horse battery\n")
    users.chmod(mode)
    assert main(["--auth-file", str(users), "--model", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"error: auth file {users}: mode {mode:04o} lets group or others read or change it "
        f"(run chmod 600 {users})"
    )
    assert not (tmp_path / "temp").exists(), "nothing may be made before the checks pass"
    users.chmod(0o600)
    assert read_auth_file(users) == [("alice", "correct horse battery")]
    users.chmod(0o400)
    assert read_auth_file(users) == [("alice", "correct horse battery")]
    with pytest.raises(SetupError, match="cannot read it"):
        read_auth_file(tmp_path / "missing")


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
    assert outside.is_file() and link.is_symlink(), "a refused path must not be deleted"
    *_, message, state = handlers.analyse(None, 0.4)
    assert message.startswith("Upload") and state is None
    gone = handlers.upload_folder / "0123abcd" / "slice.jpg"
    *_, message, state = handlers.analyse(str(gone), 0.4)
    assert "slice.jpg: the upload is no longer on the server; upload it again" in message
    *_, message, state = handlers.analyse(str(handlers.upload_folder), 0.4)
    assert "only uploaded files" in message and handlers.upload_folder.is_dir()


def test_slider_reblends_without_running_the_model(handlers, mirror, monkeypatch) -> None:
    upload = handlers.upload_folder / "slice.jpg"
    upload.write_bytes(real_images(mirror, 1, offset=5)[0].read_bytes())
    data = upload.read_bytes()
    label, predicted, overlay, shown, message, state = handlers.analyse(str(upload), 0.4)
    assert message.startswith("Analysed slice.jpg")
    assert overlay.shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3)
    assert not upload.exists(), "an analysed upload must be deleted"
    # Kept per browser session: the model's input and a float16 map, not display images.
    size = handlers.predictor.bundle.meta.image_size
    assert state["image"].shape == (size, size) and state["image"].dtype == np.uint8
    assert state["heatmap"].dtype == np.float16 and state["heatmap"].shape == (size, size)
    model_view = fit_for_display(handlers.predictor.prepare(data, "slice.jpg").image)

    def no_model(*args, **kwargs):
        raise AssertionError("the slider must not run the model")

    monkeypatch.setattr(handlers.predictor, "explain", no_model)
    monkeypatch.setattr(handlers.predictor, "predict", no_model)
    plain = handlers.blend(state, 0.0)
    np.testing.assert_array_equal(plain, np.repeat(model_view[..., None], 3, axis=2))
    assert not np.array_equal(handlers.blend(state, 1.0), plain)
    np.testing.assert_array_equal(handlers.blend(state, 0.4), overlay)
    assert handlers.blend(None, 0.5) is None


def test_an_upload_sent_again_meanwhile_is_kept_for_its_own_analysis(handlers, mirror) -> None:
    """Gradio stores identical uploads at one path: a copy uploaded again after this
    analysis read the file (a new inode) belongs to a later analysis, which deletes it."""
    upload = handlers.upload_folder / "0123abcd" / "slice.jpg"
    upload.parent.mkdir()
    upload.write_bytes(real_images(mirror, 1, offset=6)[0].read_bytes())
    data, read = handlers.read_upload(upload)
    again = upload.with_name("incoming")
    again.write_bytes(data)
    os.replace(again, upload)  # as gradio's upload route does
    handlers.discard(upload, read)
    assert upload.read_bytes() == data
    *_, message, _ = handlers.analyse(str(upload), 0.4)
    assert message.startswith("Analysed slice.jpg")
    assert not upload.exists() and not upload.parent.exists()


def test_handler_refuses_an_oversized_upload(reference_predictor, mirror, tmp_path) -> None:
    small = Predictor(reference_predictor.bundle, ServingParams(max_upload_bytes=2048))
    handlers = Handlers(small, tmp_path)
    upload = tmp_path / "big.jpg"
    upload.write_bytes(real_images(mirror, 1)[0].read_bytes() + b"\0" * 4096)
    *_, message, state = handlers.analyse(str(upload), 0.4)
    assert "big.jpg: file too large" in message and "the limit is 2 kB" in message
    assert state is None and not upload.exists(), "a refused upload must be deleted too"


def test_unusual_images_are_classified_with_a_warning(reference_predictor, mirror, tmp_path):
    strict = Predictor(reference_predictor.bundle, ServingParams(ood_warn_z=1e-3))
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
    params = load_params(params_file())
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
