"""Hostile inputs to the ``acquire`` stage and to params validation (issue 10).

Every test builds its hostile file itself (a tar with a link member, a zip bomb, a mirror
archive whose bytes differ from the pinned sum, a stage killed with SIGKILL, a params file
with a NaN gain) and runs the real stage or the real loader on it. Each is named after the
finding it guards.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import random
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from braintumor.core.config import load_params
from braintumor.core.schema import ConfigError
from braintumor.data.sources import (
    AcquireError,
    ArchiveLimits,
    ChecksumError,
    acquire,
    extract_archive,
    remove_stale_temporaries,
)
from braintumor.stages.acquire import main

from conftest import committed_params_text, http_server, params_file, write_acquire_params
from conftest import write_params as write_full_params

LABELS = {"glioma": "glioma", "notumor": "notumor"}
TREE = {
    "Training/glioma/a.jpg": b"\xff\xd8 first image",
    "Training/notumor/b.jpg": b"\xff\xd8 second image",
    "Testing/glioma/c.jpg": b"\xff\xd8 third image",
}
LOOSE = {"max_extracted_bytes": 10**12, "max_members": 10**6, "max_compression_ratio": 1e9}


pytestmark = pytest.mark.usefixtures("acquire_environment")


# --------------------------------------------------------------------------- helpers


def write_params(folder: Path, sources: list[dict[str, object]], **acquire_extra: object) -> Path:
    """The acquire tests' params file, with no retries (hostile input is not retried)."""
    return write_acquire_params(folder, sources, **{"retries": 0, **acquire_extra})


def source(name: str, uri: str, **extra: object) -> dict[str, object]:
    return {"name": name, "uri": uri, "labels": LABELS, **extra}


def run_acquire(params_path: Path, out: Path) -> None:
    acquire(load_params(params_path).acquire, out, base_dir=params_path.parent, backoff_s=0.0)


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))


def tar_with(path: Path, files: dict[str, bytes], specials: list[tarfile.TarInfo]) -> Path:
    """A tar.gz of ``files`` under ``wrapper/``, then the hand-made ``specials`` members."""
    with tarfile.open(path, "w:gz") as bundle:
        for relative, content in files.items():
            info = tarfile.TarInfo(f"wrapper/{relative}")
            info.size = len(content)
            bundle.addfile(info, io.BytesIO(content))
        for info in specials:
            bundle.addfile(info)
    return path


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.devmajor, info.devminor = 1, 3
    return info


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return path


def assert_one_line_refusal(error: BaseException, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------- 1. links


def test_tar_symlink_moved_outside_by_root_relocation_is_refused(tmp_path: Path) -> None:
    """Finding 1: in the archive the link stays inside; once the root folder is moved to
    data/raw/<name> it points at data/secret.txt, which used to be hashed into the
    manifest."""
    link = special("wrapper/Training/glioma/leak.jpg", tarfile.SYMTYPE, "../../../secret.txt")
    archive = tar_with(tmp_path / "evil.tar.gz", TREE, [link])
    out = tmp_path / "data" / "raw"
    write_tree(tmp_path / "data", {"secret.txt": b"outside the destination"})
    params = write_params(tmp_path, [source("evil", str(archive))])

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "evil.tar.gz", "wrapper/Training/glioma/leak.jpg")
    assert "symlink" in str(caught.value)
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize(
    ("kind", "linkname", "word"),
    [
        (tarfile.SYMTYPE, "../nowhere.jpg", "symlink"),  # dangling: used to crash clean
        (tarfile.LNKTYPE, "wrapper/Training/glioma/a.jpg", "hard link"),
        (tarfile.FIFOTYPE, "", "fifo"),
        (tarfile.CHRTYPE, "", "device"),
    ],
)
def test_tar_link_device_and_fifo_members_are_refused(
    tmp_path: Path, kind: bytes, linkname: str, word: str
) -> None:
    """Finding 1: only regular files and folders are extracted."""
    member = special("wrapper/Training/glioma/odd.jpg", kind, linkname)
    archive = tar_with(tmp_path / "odd.tar.gz", TREE, [member])
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("odd", str(archive))])

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "odd.tar.gz", "wrapper/Training/glioma/odd.jpg", word)
    assert not out.exists() and leftovers(out) == []


def test_dangling_symlink_archive_fails_the_cli_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1: the dangling link used to pass acquire and crash ``clean`` with a
    traceback; now the stage itself exits 1 with one line naming archive and member."""
    link = special("wrapper/Training/glioma/gone.jpg", tarfile.SYMTYPE, "missing.jpg")
    archive = tar_with(tmp_path / "dangling.tar.gz", TREE, [link])
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("dangling", str(archive))])

    assert main(["--params", str(params), "--out", str(out)]) == 1

    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith("error: source 'dangling': ")
    assert "dangling.tar.gz" in errors[0] and "gone.jpg" in errors[0]
    assert not out.exists() and leftovers(out) == []


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    """Finding 1: a zip member whose Unix mode says symlink (zipfile would write the
    target path as a regular file's content) is refused, not silently altered."""
    archive = zip_with(tmp_path / "evil.zip", {f"wrapper/{k}": v for k, v in TREE.items()})
    with zipfile.ZipFile(archive, "a") as bundle:
        info = zipfile.ZipInfo("wrapper/Training/glioma/leak.jpg")
        info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(info, "../../../secret.txt")
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("evil", str(archive))])

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "evil.zip", "wrapper/Training/glioma/leak.jpg", "symlink")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_mirror_folder_with_a_symlink_inside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: str
) -> None:
    """Finding 1: a link in a mirror folder used to be followed (file) or silently
    dropped (folder); either way data/raw no longer matched the mirror."""
    mirror = tmp_path / "mirror"
    write_tree(mirror / "msoud", TREE)
    outside = write_tree(tmp_path / "outside", {"secret.jpg": b"not ours"})
    if linked == "file":
        (mirror / "msoud/Training/glioma/leak.jpg").symlink_to(outside / "secret.jpg")
    else:
        (mirror / "msoud/Training/linked").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(mirror))
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("msoud", "kaggle://someone/brain-mri")])

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'msoud'", "symlink")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("entry", ["folder", "archive"])
def test_a_mirror_entry_that_is_itself_a_link_is_still_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    """Finding 1 (what is not refused): the mirror's entry for a source may be a link to
    where the operator keeps it; only links inside the source are refused."""
    elsewhere = tmp_path / "elsewhere"
    if entry == "folder":
        target = write_tree(elsewhere / "msoud", TREE)
        extra = {}
    else:
        elsewhere.mkdir()
        target = tar_with(elsewhere / "msoud.tar.gz", TREE, [])
        extra = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "msoud").symlink_to(target)
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(tmp_path / "mirror"))
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("msoud", "kaggle://someone/brain-mri", **extra)])

    run_acquire(params, out)

    for relative, content in TREE.items():
        assert (out / "msoud" / relative).read_bytes() == content


def test_plain_tar_and_zip_still_extract_with_the_default_caps(tmp_path: Path) -> None:
    """The hardening must not refuse an honest archive (default caps from params.yaml)."""
    tar = tar_with(tmp_path / "plain.tar.gz", TREE, [])
    packed = zip_with(tmp_path / "plain.zip", {f"top/{k}": v for k, v in TREE.items()})
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("tarred", str(tar)), source("zipped", str(packed))])

    run_acquire(params, out)

    for name in ("tarred", "zipped"):
        for relative, content in TREE.items():
            assert (out / name / relative).read_bytes() == content
    assert leftovers(out) == []


# --------------------------------------------------------------------------- 2. bombs


def zeros_zip(path: Path, size: int) -> Path:
    return zip_with(path, {"wrapper/Training/glioma/zeros.jpg": bytes(size)})


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_expanding_past_max_extracted_bytes_is_refused_before_extracting(
    tmp_path: Path, suffix: str
) -> None:
    """Finding 2: total uncompressed bytes are capped, read from the headers first."""
    noise = random.Random(0).randbytes(400_000)  # incompressible: the ratio cap stays quiet
    files = {f"Training/glioma/{i}.jpg": noise for i in range(3)}
    if suffix == ".zip":
        archive = zip_with(tmp_path / "big.zip", {f"wrapper/{k}": v for k, v in files.items()})
    else:
        archive = tar_with(tmp_path / "big.tar.gz", files, [])
    limits = ArchiveLimits(max_bytes=1_000_000, max_members=100, max_ratio=100.0)
    destination = tmp_path / "extracted"

    with pytest.raises(AcquireError) as caught:
        extract_archive(archive, destination, limits)

    assert_one_line_refusal(caught.value, archive.name, "1200000", "max_extracted_bytes")
    assert list(destination.rglob("*")) == []  # refused before a byte was written


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_with_too_many_members_is_refused(tmp_path: Path, suffix: str) -> None:
    """Finding 2: a small archive of very many files is refused by member count."""
    files = {f"Training/glioma/{i}.jpg": b"x" for i in range(1001)}
    if suffix == ".zip":
        archive = zip_with(tmp_path / "many.zip", files)
    else:
        archive = tar_with(tmp_path / "many.tar.gz", files, [])
    out = tmp_path / "data" / "raw"
    params = write_params(
        tmp_path, [source("many", str(archive))], **{**LOOSE, "max_members": 1000}
    )

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'many'", archive.name, "max_members")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_over_max_compression_ratio_is_refused(tmp_path: Path, suffix: str) -> None:
    """Finding 2: 5 MB of zeros packs into about 5 KB (ratio ~1000): a bomb's signature."""
    if suffix == ".zip":
        archive = zeros_zip(tmp_path / "bomb.zip", 5_000_000)
    else:
        archive = tar_with(
            tmp_path / "bomb.tar.gz", {"Training/glioma/z.jpg": bytes(5_000_000)}, []
        )
    out = tmp_path / "data" / "raw"
    params = write_params(
        tmp_path, [source("bomb", str(archive))], **{**LOOSE, "max_compression_ratio": 100.0}
    )

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'bomb'", archive.name, "max_compression_ratio")
    assert not out.exists() and leftovers(out) == []


def test_zip_of_many_members_each_under_the_ratio_floor_is_refused_as_a_whole(
    tmp_path: Path,
) -> None:
    """Finding 2: 30 members of 1 MB of zeros (each below the 1 MiB floor of the member
    check) still make a ~30 KB zip expand a thousandfold; the archive's ratio catches it."""
    members = {f"wrapper/Training/glioma/{i}.jpg": bytes(1_000_000) for i in range(30)}
    archive = zip_with(tmp_path / "spread.zip", members)
    limits = ArchiveLimits(max_bytes=10**12, max_members=1000, max_ratio=100.0)
    destination = tmp_path / "extracted"

    with pytest.raises(AcquireError) as caught:
        extract_archive(archive, destination, limits)

    assert_one_line_refusal(caught.value, "spread.zip expands", "max_compression_ratio")
    assert list(destination.rglob("*")) == []


def test_zip_whose_headers_understate_sizes_is_stopped_while_streaming(tmp_path: Path) -> None:
    """Finding 2: the zip's central directory says 1,000 bytes for a member that inflates
    to 5 MB; headers pass the caps, so extraction itself must stop at the stated size."""
    archive = zeros_zip(tmp_path / "liar.zip", 5_000_000)
    content = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = content.find(signature)
        content[at + offset : at + offset + 4] = struct.pack("<I", 1000)
    archive.write_bytes(bytes(content))
    limits = ArchiveLimits(max_bytes=100_000, max_members=10, max_ratio=100.0)
    destination = tmp_path / "extracted"

    with pytest.raises(AcquireError) as caught:
        extract_archive(archive, destination, limits)

    assert_one_line_refusal(caught.value, "liar.zip")
    written = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())
    assert written <= 100_000


# --------------------------------------------------------------------------- 3. sums


def packed_tree(path: Path) -> tuple[Path, str]:
    archive = tar_with(path, TREE, [])
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_pinned_sha256_is_verified_for_a_mirror_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3: the mirror's copy of a pinned archive used to be taken on trust."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive, digest = packed_tree(mirror / "web")
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(mirror))
    out = tmp_path / "data" / "raw"
    wrong = hashlib.sha256(b"another file").hexdigest()
    params = write_params(tmp_path, [source("web", "https://example.org/w.tgz", sha256=wrong)])

    with pytest.raises(ChecksumError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'web'", str(archive), wrong, digest)
    assert not out.exists() and leftovers(out) == []

    params = write_params(tmp_path, [source("web", "https://example.org/w.tgz", sha256=digest)])
    run_acquire(params, out)  # the right sum, upper case too: accepted
    assert (out / "web" / "Training/glioma/a.jpg").read_bytes() == TREE["Training/glioma/a.jpg"]


def test_pinned_sha256_is_verified_for_a_local_archive_uri(tmp_path: Path) -> None:
    """Finding 3: wherever the bytes come from, a pinned sum is checked."""
    archive, digest = packed_tree(tmp_path / "local.tar.gz")
    wrong = "0" * 64
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("local", str(archive), sha256=wrong)])

    with pytest.raises(ChecksumError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'local'", wrong, digest)
    params = write_params(tmp_path, [source("local", str(archive), sha256=digest.upper())])
    run_acquire(params, out)
    assert leftovers(out) == []


def test_pinned_source_refuses_a_mirror_folder_it_cannot_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3: the sum pins the archive's bytes; an unpacked folder cannot be checked
    against it, so a pinned source is not silently taken from one."""
    mirror = tmp_path / "mirror"
    write_tree(mirror / "web", TREE)
    monkeypatch.setenv("BRAINTUMOR_MIRROR", str(mirror))
    out = tmp_path / "data" / "raw"
    params = write_params(tmp_path, [source("web", "https://example.org/w.tgz", sha256="a" * 64)])

    with pytest.raises(AcquireError) as caught:
        run_acquire(params, out)

    assert_one_line_refusal(caught.value, "source 'web'", "sha256", "folder", "archive")
    assert not out.exists() and leftovers(out) == []


# --------------------------------------------------------------------------- 4. kill -9


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Sends half of a body, then waits until the test releases it (a hung transfer)."""

    release: threading.Event
    seen: threading.Event

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b"z" * 100_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:50_000])
        self.wfile.flush()
        self.seen.set()
        self.release.wait(60)
        self.close_connection = True


@pytest.fixture
def stalling_server() -> Iterator[tuple[str, threading.Event]]:
    release, seen = threading.Event(), threading.Event()
    handler = type("Handler", (_StallingHandler,), {"release": release, "seen": seen})
    with http_server(handler) as httpd:
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/data.tgz", seen
        finally:
            release.set()  # before the server's shutdown waits for the stalled request


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))


def test_temporary_of_a_killed_run_is_removed_at_next_start_but_a_live_one_is_kept(
    tmp_path: Path, stalling_server: tuple[str, threading.Event]
) -> None:
    """Finding 4: a real ``python -m braintumor.stages.acquire`` hangs mid-download and its
    temporary folder exists; a second run must leave it alone while its owner lives, and
    remove it once the owner has been killed with SIGKILL."""
    url, seen = stalling_server
    out = tmp_path / "data" / "raw"
    hung = write_params(tmp_path / "hung", [source("web", url, sha256="a" * 64)], timeout_s=60.0)
    good = write_params(tmp_path / "good", [source("local", str(write_tree(tmp_path / "s", TREE)))])
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braintumor.stages.acquire",
            "--params",
            str(hung),
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert seen.wait(60), "the stage never reached the download"
        live = temporaries(out)
        assert len(live) == 1

        run_acquire(good, out)  # the owner is alive: its temporary stays
        assert temporaries(out) == live and (out / "local").is_dir()

        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert temporaries(out) == live  # what kill -9 leaves behind

        run_acquire(good, out)  # the next start removes it
        assert temporaries(out) == [] and leftovers(out) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_stale_cleanup_touches_only_our_temporary_folders(tmp_path: Path) -> None:
    """Finding 4: only unlocked ``.<out>.tmp-*`` folders go; other dot entries stay."""
    out = tmp_path / "data" / "raw"
    data = tmp_path / "data"
    write_tree(data / ".raw.tmp-dead", {"a.jpg": b"left by a killed run"})
    for keep in (".raw.old-123", ".clean.tmp-x", ".rawish", ".raw.tmp-file"):
        target = data / keep
        if keep.endswith("file"):
            target.write_bytes(b"a file, not a stage temporary")
        else:
            write_tree(target, {"kept.txt": b"not ours"})

    removed = remove_stale_temporaries(out)

    assert [p.name for p in removed] == [".raw.tmp-dead"]
    assert sorted(p.name for p in data.iterdir()) == [
        ".clean.tmp-x",
        ".raw.old-123",
        ".raw.tmp-file",
        ".rawish",
    ]


# --------------------------------------------------------------------------- 5. params


SHA_SOURCE = {
    "name": "msoud",
    "uri": "kaggle://masoudnickparvar/brain-tumor-mri-dataset",
    "labels": {c: c for c in ("glioma", "meningioma", "notumor", "pituitary")},
}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"registry": {"gate": {"min_macro_f1_gain": -0.1}}}, "registry.gate.min_macro_f1_gain:"),
        (
            {"registry": {"gate": {"min_macro_f1_gain": float("nan")}}},
            "registry.gate.min_macro_f1_gain:",
        ),
        (
            {"registry": {"gate": {"min_macro_f1_gain": float("inf")}}},
            "registry.gate.min_macro_f1_gain:",
        ),
        ({"clean": {"workers": 100000}}, "clean.workers: must be 0 (all cores) or 1-256"),
        ({"preprocess": {"workers": 100000}}, "preprocess.workers: must be 0 (all cores)"),
        ({"preprocess": {"workers": -1}}, "preprocess.workers: must be 0 (all cores)"),
        ({"train": {"loader_workers": 100000}}, "train.loader_workers: must be in [1, 256]"),
        (
            {"acquire": {"sources": [{**SHA_SOURCE, "sha256": "g" * 64}]}},
            "acquire.sources[0].sha256: must be 64 hexadecimal digits",
        ),
        (
            {"acquire": {"sources": [{**SHA_SOURCE, "sha256": "ab" * 16}]}},
            "acquire.sources[0].sha256: must be 64 hexadecimal digits",
        ),
        ({"profile": "../../x"}, "profile: '../../x' is not a plain profile name"),
        ({"profile": "/tmp/x"}, "profile: '/tmp/x' is not a plain profile name"),
        ({"acquire": {"max_extracted_bytes": 0}}, "acquire.max_extracted_bytes: must be >= 1"),
        ({"acquire": {"max_members": -5}}, "acquire.max_members: must be >= 1"),
        ({"acquire": {"max_compression_ratio": 0.5}}, "acquire.max_compression_ratio: must be"),
        ({"acquire": {"max_compression_ratio": float("nan")}}, "acquire.max_compression_ratio:"),
    ],
)
def test_hostile_params_fail_with_one_line_naming_the_param(
    tmp_path: Path, override: dict, message: str
) -> None:
    """Finding 5: each of these used to load without complaint."""
    folder = tmp_path / "project" / "sub"
    (folder / "profiles").mkdir(parents=True)
    # A profile file that '../../x' reaches from profiles/, so only the name check stops it.
    (tmp_path / "project" / "x.yaml").write_text("common: {}\n")
    path = write_full_params(folder, override)

    with pytest.raises(ConfigError) as caught:
        load_params(path)

    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text


def test_params_yaml_documents_the_archive_caps() -> None:
    """Finding 2: the caps are params with comments, and the shipped values load."""
    params = load_params(params_file()).acquire
    assert params.max_extracted_bytes >= 1_000_000_000  # the real sources are ~250 MB
    assert params.max_members >= 20_000  # msoud has 7,023 files, sartaj 3,264
    assert 10 <= params.max_compression_ratio <= 1000
    text = committed_params_text()
    for key in ("max_extracted_bytes", "max_members", "max_compression_ratio"):
        line = next(line for line in text.splitlines() if line.strip().startswith(key + ":"))
        assert "#" in line, f"{key} needs a comment in params.yaml"


def test_workers_zero_and_a_plain_profile_name_still_load(tmp_path: Path) -> None:
    path = write_full_params(tmp_path, {"clean": {"workers": 0}, "preprocess": {"workers": 256}})
    params = load_params(path)
    assert params.clean.workers == 0 and params.preprocess.workers == 256
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine-2.yaml").write_text("common: {image_size: 64}\n")
    path = write_full_params(tmp_path, {"profile": "mine-2"})
    assert load_params(path).common.image_size == 64
