"""Tests of the ``acquire`` stage on real files, real archives and a real loopback server.

The HTTP tests start a ``http.server`` on 127.0.0.1 (a free port) whose handler can cut a
transfer mid-file, so retries and resumption run through the real ``requests`` stack.
The Kaggle tests run the real ``kagglehub`` code: kagglesdk has no endpoint setting that
takes a port, but ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` sends its calls to
``http://localhost/api/v1/...`` and ``requests`` honours ``HTTP_PROXY``, so pointing the
proxy at our server lets it answer ``GetDataset`` and ``DownloadDataset`` itself.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from braintumor.core.config import load_params
from braintumor.data.sources import (
    MANIFEST_COLUMNS,
    AcquireError,
    acquire,
    find_root,
)
from braintumor.stages.acquire import main

from conftest import http_server, mirror_dir, write_acquire_params

DATASETS = mirror_dir()
MSOUD = DATASETS / "msoud"
SARTAJ = DATASETS / "sartaj"
LABELS = {"glioma": "glioma", "meningioma": "meningioma", "notumor": "notumor"}

# A missing mirror fails, with its path; no machine setting leaks into acquire.
pytestmark = pytest.mark.usefixtures("mirror", "acquire_environment")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree() -> dict[str, bytes]:
    """A tiny source "as found": a few real JPEGs, a hidden folder and a stray file."""
    picks = [
        "Training/glioma/Tr-glTr_0000.jpg",
        "Training/glioma/Tr-glTr_0001.jpg",
        "Training/notumor/" + sorted(os.listdir(MSOUD / "Training/notumor"))[0],
        "Testing/glioma/Te-glTr_0000.jpg",
        "Testing/meningioma/.ipynb_checkpoints/Te-me_0011-checkpoint.jpg",
    ]
    files = {relative: (MSOUD / relative).read_bytes() for relative in picks}
    files["Training/notes.txt"] = b"stray file, kept as found\n"
    return files


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def make_archive(path: Path, files: dict[str, bytes], top: str = "Brain Tumor MRI") -> Path:
    """A zip or tar.gz (by suffix) that wraps everything in one top folder, plus a README."""
    members = {f"{top}/{relative}": content for relative, content in files.items()}
    members["README.txt"] = b"outside the root, not part of the data\n"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as bundle:
            for name, content in members.items():
                bundle.writestr(name, content)
    else:
        with tarfile.open(path, "w:gz") as bundle:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                bundle.addfile(info, io.BytesIO(content))
    return path


def source(name: str, uri: str, **extra: object) -> dict[str, object]:
    return {"name": name, "uri": uri, "labels": LABELS, **extra}


def run_acquire(params_path: Path, out: Path) -> None:
    """The stage's function with no retry back-off, to keep retry tests fast."""
    acquire(load_params(params_path).acquire, out, base_dir=params_path.parent, backoff_s=0.0)


def read_manifest(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "manifest.csv", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        return list(reader)


def assert_output(out: Path, expected: dict[str, dict[str, bytes]]) -> None:
    """``out`` holds exactly ``expected`` (source -> files) and a manifest that agrees."""
    found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    wanted = {f"{name}/{relative}" for name, files in expected.items() for relative in files}
    assert found == wanted | {"manifest.csv"}
    for name, files in expected.items():
        for relative, content in files.items():
            assert (out / name / relative).read_bytes() == content
    rows = read_manifest(out)
    assert [(row["source"], row["path"]) for row in rows] == sorted(
        (name, f"{name}/{relative}") for name, files in expected.items() for relative in files
    )
    for row in rows:
        content = (out / row["path"]).read_bytes()
        assert int(row["bytes"]) == len(content)
        assert row["sha256"] == hashlib.sha256(content).hexdigest()


def leftovers(out: Path) -> list[str]:
    """Anything beside ``out`` that a run may have left (temporaries start with a dot)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- HTTP server


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}  # path -> how many more responses to cut mid-body
        self.stalls: dict[str, int] = {}  # path -> how many more responses to stall mid-body
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.kaggle: dict[str, object] = {}


class _Handler(http.server.BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.state.requests.append(("GET", self.path, self.headers.get("Range")))
        body = self.state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes="):
            start = int(requested[len("bytes=") :].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self._send_body(self.path, body[start:])

    def do_POST(self) -> None:
        """A two-call Kaggle API: GetDataset (the version) and DownloadDataset (the zip)."""
        length = int(self.headers.get("Content-Length", 0))
        request = json.loads(self.rfile.read(length) or b"{}")
        path = urlsplit(self.path).path  # a proxied request line carries the absolute URL
        self.state.requests.append(("POST", path, json.dumps(request, sort_keys=True)))
        status = self.state.kaggle.get("status", 200)
        if status != 200:
            self.send_error(int(status))  # type: ignore[arg-type]
            return
        if path.endswith("/datasets.DatasetApiService/GetDataset"):
            body = json.dumps({"currentVersionNumber": 2}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self._send_body(path, body)
        elif path.endswith("/datasets.DatasetApiService/DownloadDataset"):
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self._send_body(path, self.state.kaggle["archive"])  # type: ignore[arg-type]
        else:
            self.send_error(404)

    def _send_body(self, path: str, body: bytes) -> None:
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.state.cuts.get(path, 0) > 0:
            self.state.cuts[path] -= 1
            self.wfile.write(body[: len(body) // 2])  # then the connection closes
            self.close_connection = True
            return
        if self.state.stalls.get(path, 0) > 0:
            self.state.stalls[path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(1.0)  # longer than the client's timeout_s
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[tuple[str, _State]]:
    """A real HTTP server on 127.0.0.1 and a free port; yields its base URL and state."""
    state = _State()
    with http_server(type("Handler", (_Handler,), {"state": state})) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state


# --------------------------------------------------------------------------- local sources


def test_local_folder_with_auto_root_copies_everything_as_found(
    tmp_path: Path, tree: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    write_tree(tmp_path / "downloads" / "wrapper", tree)
    (tmp_path / "downloads" / "LICENSE").write_text("outside the root")
    params = write_acquire_params(tmp_path, [source("local", "downloads")])  # relative to params
    out = tmp_path / "data" / "raw"

    assert main(["--params", str(params), "--out", str(out)]) == 0

    assert_output(out, {"local": tree})
    summary = capsys.readouterr().out
    assert "1 source(s), 6 files" in summary and "local: 6 files" in summary
    assert leftovers(out) == []


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_local_archive_with_wrapping_folder(
    tmp_path: Path, tree: dict[str, bytes], suffix: str
) -> None:
    archive = make_archive(tmp_path / f"dataset{suffix}", tree)
    params = write_acquire_params(tmp_path, [source("packed", str(archive))])
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"packed": tree})
    assert leftovers(out) == []


def test_explicit_root_and_ambiguous_roots(tmp_path: Path, tree: dict[str, bytes]) -> None:
    write_tree(tmp_path / "a" / "Training", {"x.jpg": b"1"})
    write_tree(tmp_path / "b" / "Testing", {"y.jpg": b"2"})
    with pytest.raises(AcquireError, match="several folders.*set root"):
        find_root(tmp_path, ["Training", "Testing"])
    assert find_root(tmp_path, ["Training", "Testing"], "b") == (tmp_path / "b").resolve()
    with pytest.raises(AcquireError, match="root 'c' is not a folder"):
        find_root(tmp_path, ["Training", "Testing"], "c")
    with pytest.raises(AcquireError, match="outside the source"):
        find_root(tmp_path / "a", ["Training"], "../b")
    with pytest.raises(AcquireError, match="no folder holds"):
        find_root(tmp_path / "a" / "Training", ["Training", "Testing"])


# --------------------------------------------------------------------------- mirror


def test_mirror_env_var_wins_over_param_and_uri(
    tmp_path: Path, tree: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path / "env-mirror" / "msoud", tree)
    write_tree(tmp_path / "param-mirror" / "msoud", {"Training/glioma/other.jpg": b"other"})
    # The uri would need the network; the mirror must be used instead.
    params = write_acquire_params(
        tmp_path,
        [source("msoud", "kaggle://masoudnickparvar/brain-tumor-mri-dataset")],
        mirror="param-mirror",
    )
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)  # no env var: the param mirror, relative to the params file
    assert_output(out, {"msoud": {"Training/glioma/other.jpg": b"other"}})

    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(tmp_path / "env-mirror"))
    run_acquire(params, out)  # the env var wins, and the previous output is replaced
    assert_output(out, {"msoud": tree})
    assert leftovers(out) == []


def test_mirror_entry_may_be_an_archive(
    tmp_path: Path, tree: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mirror").mkdir()
    make_archive(tmp_path / "mirror.tar.gz", tree).rename(tmp_path / "mirror" / "packed")
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(tmp_path / "mirror"))
    # The pinned sum is checked on the mirror's copy too (test_acquire_hardening.py).
    digest = hashlib.sha256((tmp_path / "mirror" / "packed").read_bytes()).hexdigest()
    params = write_acquire_params(
        tmp_path, [source("packed", "https://example.org/x.zip", sha256=digest)]
    )
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"packed": tree})


def test_team_mirror_sartaj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(DATASETS))
    labels = {"glioma_tumor": "glioma", "no_tumor": "notumor"}
    uri = "kaggle://sartajbhuvaji/brain-tumor-classification-mri"
    # root names the folder inside a Kaggle download; the mirror stores the source already
    # rooted (Training/ and Testing/ at its top), which is accepted too.
    entry = {"name": "sartaj", "uri": uri, "labels": labels, "root": "wrapped"}
    params = write_acquire_params(tmp_path, [entry])
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    expected = sorted(p.relative_to(SARTAJ).as_posix() for p in SARTAJ.rglob("*") if p.is_file())
    rows = read_manifest(out)
    assert len(expected) == 3264
    assert [row["path"] for row in rows] == [f"sartaj/{path}" for path in expected]
    spaced = next(row for row in rows if " (" in row["path"])  # "gg (15).jpg"
    content = (SARTAJ / spaced["path"].removeprefix("sartaj/")).read_bytes()
    assert spaced["sha256"] == hashlib.sha256(content).hexdigest()
    assert (out / spaced["path"]).read_bytes() == content


# --------------------------------------------------------------------------- failures


def test_missing_source_is_one_clear_line_and_keeps_existing_output(
    tmp_path: Path, tree: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real CLI: exit status 1, one line on stderr, no traceback."""
    write_tree(tmp_path / "mirror" / "present", tree)
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(tmp_path / "mirror"))
    params = write_acquire_params(
        tmp_path, [source("present", "nowhere-a"), source("ghost", "nowhere-b")]
    )
    out = write_tree(tmp_path / "data" / "raw", {"old/kept.jpg": b"previous run"})

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.stages.acquire",
            "--params",
            str(params),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in completed.stderr
    message = errors[0]
    assert "source 'ghost'" in message and "nowhere-b" in message
    assert "set BRAINTUMOR_MIRROR to a folder containing ghost/" in message
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["old", "old/kept.jpg"]
    assert leftovers(out) == []


def test_kaggle_handle_is_validated_without_network(tmp_path: Path) -> None:
    params = write_acquire_params(tmp_path, [source("bad", "kaggle://only-one-part")])
    with pytest.raises(AcquireError) as caught:
        run_acquire(params, tmp_path / "data" / "raw")
    message = str(caught.value)
    assert "source 'bad'" in message and "kaggle://owner/dataset" in message
    assert "KAGGLE_USERNAME" in message and "\n" not in message
    assert not (tmp_path / "data" / "raw").exists() and leftovers(tmp_path / "data" / "raw") == []


# --------------------------------------------------------------------------- URL sources


def url_params(tmp_path: Path, url: str, content: bytes, **extra: object) -> Path:
    digest = hashlib.sha256(content).hexdigest()
    return write_acquire_params(tmp_path, [source("web", url, sha256=digest)], **extra)


def test_url_download_verifies_and_extracts(
    tmp_path: Path, tree: dict[str, bytes], server: tuple[str, _State]
) -> None:
    base, state = server
    archive = make_archive(tmp_path / "web.tar.gz", tree).read_bytes()
    state.files["/files/web.tar.gz"] = archive
    params = url_params(tmp_path, f"{base}/files/web.tar.gz", archive)
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"web": tree})
    assert [method for method, _, _ in state.requests] == ["GET"]
    assert leftovers(out) == []


def test_url_wrong_checksum_fails_without_retry_and_leaves_nothing(
    tmp_path: Path, tree: dict[str, bytes], server: tuple[str, _State]
) -> None:
    base, state = server
    archive = make_archive(tmp_path / "web.zip", tree).read_bytes()
    state.files["/web.zip"] = archive
    wrong = hashlib.sha256(b"another file").hexdigest()
    params = url_params(tmp_path, f"{base}/web.zip", b"another file")
    out = tmp_path / "data" / "raw"

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    message = str(caught.value)
    assert "source 'web'" in message and "sha256 mismatch" in message
    assert wrong in message and hashlib.sha256(archive).hexdigest() in message
    assert "\n" not in message
    assert len(state.requests) == 1  # a wrong file stays wrong: not retried
    assert not out.exists() and leftovers(out) == []


def test_url_cut_once_is_retried_with_range_and_succeeds(
    tmp_path: Path, tree: dict[str, bytes], server: tuple[str, _State]
) -> None:
    base, state = server
    archive = make_archive(tmp_path / "web.zip", tree).read_bytes()
    state.files["/web.zip"] = archive
    state.cuts["/web.zip"] = 1
    params = url_params(tmp_path, f"{base}/web.zip", archive)
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"web": tree})
    assert len(state.requests) == 2
    assert state.requests[0][2] is None
    assert state.requests[1][2] == f"bytes={len(archive) // 2}-"  # resumed, not restarted
    assert leftovers(out) == []


def test_url_stalled_transfer_times_out_and_is_retried(
    tmp_path: Path, tree: dict[str, bytes], server: tuple[str, _State]
) -> None:
    base, state = server
    archive = make_archive(tmp_path / "web.zip", tree).read_bytes()
    state.files["/web.zip"] = archive
    state.stalls["/web.zip"] = 1
    params = url_params(tmp_path, f"{base}/web.zip", archive, timeout_s=0.3)
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"web": tree})
    first, second = (byte_range for _, _, byte_range in state.requests)
    assert first is None
    assert second is not None and second != "bytes=0-"  # resumed where the stall began


def test_url_missing_file_is_not_retried(tmp_path: Path, server: tuple[str, _State]) -> None:
    base, state = server
    params = url_params(tmp_path, f"{base}/gone.zip", b"anything")
    with pytest.raises(AcquireError, match=r"source 'web': .*HTTP 404.*BRAINTUMOR_MIRROR"):
        run_acquire(params, tmp_path / "data" / "raw")
    assert len(state.requests) == 1


def test_url_cut_every_time_fails_after_retries_and_keeps_output(
    tmp_path: Path, tree: dict[str, bytes], server: tuple[str, _State]
) -> None:
    base, state = server
    archive = make_archive(tmp_path / "web.zip", tree).read_bytes()
    state.files["/web.zip"] = archive
    state.cuts["/web.zip"] = 100
    params = url_params(tmp_path, f"{base}/web.zip", archive, retries=2)
    out = write_tree(tmp_path / "data" / "raw", {"old.txt": b"previous run"})

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    message = str(caught.value)
    assert "source 'web'" in message and "after 3 attempts" in message
    assert "BRAINTUMOR_MIRROR" in message and "\n" not in message
    assert len(state.requests) == 3
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert (out / "old.txt").read_bytes() == b"previous run"
    assert leftovers(out) == []


# --------------------------------------------------------------------------- Kaggle


@pytest.fixture
def kaggle_api(
    server: tuple[str, _State], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> _State:
    """Route kagglehub's API calls to the loopback server, with throwaway credentials."""
    pytest.importorskip("kagglehub")
    base, state = server
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")  # http://localhost/api/v1/...
    monkeypatch.setenv("HTTP_PROXY", base)
    monkeypatch.setenv("http_proxy", base)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    return state


def test_kaggle_handle_downloads_through_kagglehub(
    tmp_path: Path, tree: dict[str, bytes], kaggle_api: _State
) -> None:
    kaggle_api.kaggle["archive"] = make_archive(tmp_path / "kaggle.zip", tree).read_bytes()
    params = write_acquire_params(tmp_path, [source("msoud", "kaggle://someone/brain-mri")])
    out = tmp_path / "data" / "raw"

    run_acquire(params, out)

    assert_output(out, {"msoud": tree})
    calls = [(path.rsplit("/", 1)[-1], body) for _, path, body in kaggle_api.requests]
    assert [name for name, _ in calls] == ["GetDataset", "DownloadDataset"]
    assert json.loads(calls[1][1] or "{}") == {
        "datasetSlug": "brain-mri",
        "datasetVersionNumber": 2,
        "ownerSlug": "someone",
    }
    assert leftovers(out) == []


def test_kaggle_refusal_is_one_helpful_line(tmp_path: Path, kaggle_api: _State) -> None:
    kaggle_api.kaggle["status"] = 403
    params = write_acquire_params(tmp_path, [source("msoud", "kaggle://someone/private-set")])
    out = tmp_path / "data" / "raw"

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    message = str(caught.value)
    assert message.startswith("source 'msoud': Kaggle download of 'someone/private-set' failed")
    assert "BRAINTUMOR_MIRROR" in message and "KAGGLE_USERNAME" in message
    assert "\n" not in message
    assert not out.exists() and leftovers(out) == []
