"""Gather every raw data source, as found, into one folder (the ``acquire`` stage's work).

Each source named in ``acquire.sources`` comes from the first place that has it:

1. the offline mirror, ``$BRAINTUMOR_MIRROR/<name>`` (or ``acquire.mirror/<name>``), a
   folder or an archive; our machines have no internet, so this is the usual path;
2. its ``uri``: a local folder, a local archive (``.zip``, ``.tar.gz``, ``.tgz``,
   ``.tar``), an ``https://`` (or ``http://``) archive whose sha256 must match, or a
   Kaggle handle ``kaggle://owner/dataset`` fetched with ``kagglehub``.

The stage writes ``data/raw/<name>/`` with the source's ``root`` folder (the one that
directly holds the split folders) copied byte for byte, hidden folders and stray files
included, because raw data is never edited: the clean stage counts and skips what it
cannot use. ``data/raw/manifest.csv`` lists every file with its size and sha256, so a
silent change of upstream data shows up as a DVC diff.

Sources are untrusted input. A source's ``sha256``, when pinned, is the sum of its
archive and is checked wherever the archive comes from (download, local path, mirror); a
pinned source refuses a folder, whose bytes cannot be checked against it. Archives are
extracted by our own code: only regular files and folders with relative names, within
``acquire.max_extracted_bytes``, ``max_members`` and ``max_compression_ratio`` (read from
the headers first, counted again while writing). Links and special files are refused in
archives and in folders alike, and files are read without following links, so nothing
outside a source can reach ``data/raw`` or its manifest.

The whole output is built in a temporary folder beside ``data/raw`` and swapped in only
once complete, so a failure (a wrong checksum, a missing source, a transfer cut for good)
leaves ``data/raw`` exactly as it was. A run killed outright leaves its temporary folder;
the next run removes it (never one that a live run holds locked). Failures raise
:class:`AcquireError` with a one-line message; :func:`main` prints it and exits with
status 1.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from braintumor.core.files import atomic_path, file_sha256, stream_sha256
from braintumor.core.redaction import one_line, redact_text, redact_uri
from braintumor.core.schema import AcquireParams, SourceParams
from braintumor.core.tempdirs import FolderInUse, LockedFolder, lock_folder, remove_stale_folders

if TYPE_CHECKING:
    import requests

logger = logging.getLogger("braintumor.data.sources")  # not "__main__" under python -m

MIRROR_ENV_VAR = "BRAINTUMOR_MIRROR"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("source", "path", "bytes", "sha256")
KAGGLE_SCHEME = "kaggle://"
# owner/dataset or owner/dataset/versions/N, as kagglehub accepts them.
KAGGLE_HANDLE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/versions/[0-9]+)?")
# Folders that archivers add and that never hold the data (macOS resource forks).
IGNORED_ROOT_CANDIDATES = frozenset({"__MACOSX"})
# HTTP statuses worth another try; any other error status is final (404, 403, ...).
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Copying is dominated by per-file system calls, which release the GIL.
COPY_THREADS = 8


class AcquireError(ValueError):
    """A source could not be acquired; the message is one line naming the source."""


class ChecksumError(AcquireError):
    """A download completed but its sha256 is not the one in params."""


class _TransferError(Exception):
    """A broken transfer (connection, timeout, short read) that is worth retrying."""


@dataclass(frozen=True)
class FileRecord:
    """One row of ``manifest.csv``: ``path`` is relative to the output folder, posix."""

    source: str
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SourceReport:
    """What one source contributed and where it came from (for the run's summary)."""

    name: str
    origin: str
    files: int
    bytes: int


@dataclass(frozen=True)
class AcquireReport:
    """The result of :func:`acquire`: one report per source, and the manifest rows."""

    sources: tuple[SourceReport, ...]
    records: tuple[FileRecord, ...]

    @property
    def files(self) -> int:
        return len(self.records)

    @property
    def bytes(self) -> int:
        return sum(record.bytes for record in self.records)


@dataclass(frozen=True)
class _Location:
    """Where a source's content can be had, before any download or extraction."""

    kind: str  # "folder", "archive", "url" or "kaggle"
    value: str
    from_mirror: bool

    def describe(self) -> str:
        where = self.value if self.from_mirror else redact_uri(self.value)
        return f"mirror {where}" if self.from_mirror else f"{self.kind} {where}"


# --------------------------------------------------------------------------- locating


def mirror_folder(
    configured: str | None,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Path | None:
    """The offline mirror to look in: ``$BRAINTUMOR_MIRROR`` wins over ``acquire.mirror``.

    The environment variable lets each machine point at its own copy without a parameter
    change (which would invalidate the DVC stage); an empty value counts as unset. A
    relative ``acquire.mirror`` is read relative to ``base_dir`` (the params file's
    folder), so it means the same thing whatever the working directory.
    """
    environ = os.environ if environ is None else environ
    from_env = environ.get(MIRROR_ENV_VAR, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path
    return None


def how_to_provide(source: SourceParams) -> str:
    """The hint every 'cannot get this source' message ends with."""
    hint = (
        f"set {MIRROR_ENV_VAR} to a folder containing {source.name}/, "
        f"or fix the uri of source {source.name!r} in params"
    )
    if source.uri.startswith(KAGGLE_SCHEME):
        hint += (
            ", or provide Kaggle credentials"
            " (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json)"
        )
    return hint


def locate_source(
    source: SourceParams, mirror: Path | None, base_dir: Path | None = None
) -> _Location:
    """Decide where ``source`` comes from, without touching the network.

    The mirror wins so that machines without internet never try the URI; a local URI is
    read relative to ``base_dir``. Raises :class:`AcquireError` (without the source
    prefix) when a local source is absent or the URI kind is unknown.
    """
    in_mirror = _mirror_location(source, mirror)
    if in_mirror is not None:
        return in_mirror
    mirror_note = _mirror_note(mirror)
    uri = source.uri
    if uri.startswith(("https://", "http://")):
        return _Location("url", uri, from_mirror=False)
    if uri.startswith(KAGGLE_SCHEME):
        handle = uri[len(KAGGLE_SCHEME) :]
        if not KAGGLE_HANDLE.fullmatch(handle):
            raise AcquireError(
                f"{uri!r} is not a Kaggle handle (kaggle://owner/dataset[/versions/N]) "
                f"and {mirror_note}; {how_to_provide(source)}"
            )
        return _Location("kaggle", handle, from_mirror=False)
    if "://" in uri and not uri.startswith("file://"):
        raise AcquireError(
            f"unsupported uri {uri!r} (use a local path, https://, or kaggle://) "
            f"and {mirror_note}; {how_to_provide(source)}"
        )
    return _local_location(source, mirror_note, base_dir)


def _mirror_location(source: SourceParams, mirror: Path | None) -> _Location | None:
    """``source``'s entry in the mirror (a folder or an archive), or None if it has none."""
    if mirror is None:
        return None
    candidate = mirror / source.name
    if candidate.is_dir():
        return _Location("folder", str(candidate), from_mirror=True)
    if candidate.is_file():
        return _Location("archive", str(candidate), from_mirror=True)
    return None


def _mirror_note(mirror: Path | None) -> str:
    """Why the mirror did not supply a source, for the message when the uri fails too."""
    if mirror is None:
        return "no mirror set"
    if mirror.is_dir():
        return f"not in mirror {mirror}"
    return f"mirror {mirror} is not a folder"


def _local_location(source: SourceParams, mirror_note: str, base_dir: Path | None) -> _Location:
    """``source``'s uri read as a local path (``file://`` allowed, relative to
    ``base_dir``); raises :class:`AcquireError` when nothing is there."""
    path = Path(source.uri.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        return _Location("folder", str(path), from_mirror=False)
    if path.is_file():
        return _Location("archive", str(path), from_mirror=False)
    raise AcquireError(
        f"{mirror_note}, and local uri {str(path)!r} does not exist; {how_to_provide(source)}"
    )


# --------------------------------------------------------------------------- fetching


def download(
    url: str,
    destination: Path,
    expected_sha256: str,
    *,
    retries: int = 3,
    timeout_s: float = 60.0,
    chunk_bytes: int = 1 << 20,
    backoff_s: float = 1.0,
    label: str = "",
) -> None:
    """Stream ``url`` to ``destination``, verifying its sha256, retrying broken transfers.

    Bytes go to ``<destination>.part`` and are hashed as they arrive (read once); the file
    is renamed to ``destination`` only when complete and verified. A broken transfer
    (connection error, timeout, fewer bytes than ``Content-Length``) is retried up to
    ``retries`` times, resuming with an HTTP ``Range`` request when the server supports
    it. A wrong checksum is a property of the file, not of the transfer, so it is not
    retried, except once from scratch when the transfer itself is suspect (stitched from
    resumed pieces, or sent without a ``Content-Length`` so a cut could go unnoticed); it
    raises :class:`ChecksumError` naming the expected and actual sha256.
    """
    import requests  # lazily: most runs use the mirror and never need it

    partial = destination.with_name(destination.name + ".part")
    state = _PartialDownload(partial)
    failures = 0
    restarted = False
    with requests.Session() as session:
        while True:
            try:
                _transfer(
                    session, url, state, timeout_s=timeout_s, chunk_bytes=chunk_bytes, label=label
                )
            except _TransferError as error:
                failures += 1
                _wait_before_retry(
                    url, error, failures, retries=retries, backoff_s=backoff_s, label=label
                )
                continue
            if _verified(state, url, expected_sha256, may_restart=not restarted, label=label):
                break
            restarted = True
    os.replace(partial, destination)


def _wait_before_retry(
    url: str,
    error: _TransferError,
    failures: int,
    *,
    retries: int,
    backoff_s: float,
    label: str,
) -> None:
    """Sleep before the next attempt, backing off exponentially (at most 30 s), or raise
    :class:`AcquireError` once ``retries`` are spent: a server down for good must not hang
    the stage."""
    if failures > retries:
        raise AcquireError(
            redact_text(f"download of {url} failed after {failures} attempts ({error})")
        ) from None
    delay = min(backoff_s * 2 ** (failures - 1), 30.0)
    logger.warning(
        "%s: %s; retry %d of %d in %.1f s",
        label,
        redact_text(str(error)),
        failures,
        retries,
        delay,
    )
    time.sleep(delay)


def _verified(
    state: _PartialDownload,
    url: str,
    expected_sha256: str,
    *,
    may_restart: bool,
    label: str,
) -> bool:
    """True when the completed transfer has the expected sha256.

    A mismatch on a suspect transfer (see :class:`_PartialDownload`) may come from the
    transfer rather than the file, so when ``may_restart`` the partial file is reset and
    False returned, for one more download from scratch. Otherwise the partial file is
    removed and :class:`ChecksumError` raised.
    """
    actual = state.digest.hexdigest()
    if actual == expected_sha256.lower():
        return True
    if state.suspect and may_restart:
        logger.warning("%s: sha256 mismatch; downloading once more from scratch", label)
        state.reset()
        return False
    state.path.unlink(missing_ok=True)
    raise ChecksumError(
        f"sha256 mismatch for {url}: expected {expected_sha256.lower()}, got {actual} "
        "(if the new file is trusted, update sha256 in params)"
    )


class _PartialDownload:
    """The bytes received so far: the ``.part`` file and the running hash of its content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset()

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.received = 0
        # Resumed pieces, or a response without Content-Length: a checksum mismatch may
        # then come from the transfer rather than the file.
        self.suspect = False


def _transfer(
    session: requests.Session,
    url: str,
    state: _PartialDownload,
    *,
    timeout_s: float,
    chunk_bytes: int,
    label: str,
) -> None:
    """One HTTP attempt, appending to ``state``; raises :class:`_TransferError` if cut."""
    import requests
    import urllib3

    # identity: a server that gzips on the fly would change the bytes we hash.
    headers = {"Accept-Encoding": "identity"}
    if state.received:
        headers["Range"] = f"bytes={state.received}-"
    try:
        with session.get(
            url, stream=True, timeout=(timeout_s, timeout_s), headers=headers
        ) as response:
            _accept_status(response, url, state)
            length_header = response.headers.get("Content-Length")
            expected = int(length_header) if length_header and length_header.isdigit() else None
            state.suspect = state.suspect or expected is None
            got = _receive(response, state, expected, chunk_bytes=chunk_bytes, label=label)
            if expected is not None and got < expected:
                raise _TransferError(f"short read: {got} of {expected} bytes")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise _TransferError(one_line(error)) from None


def _accept_status(response: requests.Response, url: str, state: _PartialDownload) -> None:
    """Decide from the HTTP status whether the body extends ``state``, replaces it (reset
    first) or is no use: a passing failure raises :class:`_TransferError` (retried), any
    other error status :class:`AcquireError` (final)."""
    status = response.status_code
    if status == 206:
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {state.received}-"):
            state.reset()
            raise _TransferError(f"unexpected Content-Range {content_range!r}")
        state.suspect = state.suspect or state.received > 0
    elif status == 200:
        if state.received:  # the server ignored Range: start over
            state.reset()
    elif status == 416:
        state.reset()
        raise _TransferError("HTTP 416 on resume")
    elif status in RETRYABLE_STATUSES:
        raise _TransferError(f"HTTP {status}")
    else:
        raise AcquireError(f"download of {url} failed: HTTP {status} {response.reason}")


def _receive(
    response: requests.Response,
    state: _PartialDownload,
    expected: int | None,
    *,
    chunk_bytes: int,
    label: str,
) -> int:
    """Append the response body to ``state`` (file and hash), with a progress bar sized
    from ``expected`` (the Content-Length, if any); return the bytes received."""
    from tqdm import tqdm

    total = state.received + expected if expected is not None else None
    got = 0
    with (
        open(state.path, "ab") as writer,
        tqdm(
            total=total,
            initial=state.received,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label or None,
            disable=None,  # no bar when stderr is not a terminal (CI logs)
            leave=False,
        ) as progress,
    ):
        # raw, undecoded bytes: exactly what Content-Length counts and sha256 covers.
        for chunk in response.raw.stream(chunk_bytes, decode_content=False):
            writer.write(chunk)
            state.digest.update(chunk)
            state.received += len(chunk)
            got += len(chunk)
            progress.update(len(chunk))
    return got


def kaggle_download(handle: str) -> Path:
    """Download a Kaggle dataset with ``kagglehub`` (into its own cache) and return it.

    ``kagglehub`` is imported here, not at module level, so the stage runs without it
    when the mirror has every source. Its many exception types are folded into one
    :class:`AcquireError` line.
    """
    try:
        import kagglehub
    except ImportError:
        raise AcquireError(
            "kaggle:// needs the kagglehub package (pip install kagglehub)"
        ) from None
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub raises requests, credential and backend errors
        raise AcquireError(
            f"Kaggle download of {handle!r} failed ({type(error).__name__}: {one_line(error)})"
        ) from None


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may expand to (``acquire.max_*`` in params).

    A 1 MB zip can expand to a gigabyte, and a few MB of zip to tens of thousands of files;
    without caps that fills the disk or the inode table before anything looks wrong. The
    caps are read from the archive's headers before a byte is written, and the bytes
    actually written are counted against them again while streaming.
    """

    max_bytes: int
    max_members: int
    max_ratio: float

    @classmethod
    def from_params(cls, settings: AcquireParams) -> ArchiveLimits:
        return cls(
            settings.max_extracted_bytes, settings.max_members, settings.max_compression_ratio
        )


def extract_archive(archive: Path, destination: Path, limits: ArchiveLimits) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz) archive into ``destination``, safely.

    The kind is sniffed from the content, not the name, because URLs often lack a telling
    suffix. Only regular files and folders are extracted: a symlink, hard link, device or
    fifo member is refused (a link that stays inside the archive's tree may point outside
    once the root folder is moved into ``data/raw``), as is an absolute or ``..`` name.
    ``limits`` are checked from the headers first, then enforced while writing. Raises
    :class:`AcquireError` naming the archive (and the member, where one is at fault).
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, destination, limits)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, destination, limits)
        else:
            raise AcquireError(f"{archive.name} is neither a zip nor a tar archive")
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        OSError,
        zlib.error,
        NotImplementedError,  # a zip compression method zipfile lacks
        RuntimeError,  # an encrypted zip member
    ) as error:
        raise AcquireError(f"cannot extract {archive.name}: {one_line(error)}") from None
    _walk_files(destination)  # defence in depth: nothing but plain files and folders


def _extract_zip(archive: Path, destination: Path, limits: ArchiveLimits) -> None:
    """Check every zip header against ``limits``, then stream each member out."""
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        if len(infos) > limits.max_members:
            raise _cap_error(
                archive, f"has {len(infos)} members", "max_members", limits.max_members
            )
        total = 0
        for info in infos:
            kind = _mode_kind(info.external_attr >> 16)
            if kind:
                raise _member_error(archive, info.filename, f"is a {kind}")
            _member_parts(archive, info.filename, info.is_dir())
            _check_ratio(archive, info.filename, info.file_size, info.compress_size, limits)
            total += info.file_size
        if total > limits.max_bytes:
            what = f"expands to {total} bytes"
            raise _cap_error(archive, what, "max_extracted_bytes", limits.max_bytes)
        # The whole archive too: many members each under the ratio floor add up.
        _check_ratio(archive, "", total, archive.stat().st_size, limits)
        budget = _Budget(archive, limits.max_bytes)
        for info in infos:
            target = destination.joinpath(*_member_parts(archive, info.filename, info.is_dir()))
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with bundle.open(info) as reader:
                budget.write(reader, target, info.filename, info.file_size)


def _extract_tar(archive: Path, destination: Path, limits: ArchiveLimits) -> None:
    """Check every tar header against ``limits`` (stopping at the first breach, before
    decompressing past it), then stream each regular member out."""
    packed = max(archive.stat().st_size, 1)
    with tarfile.open(archive, "r:*") as bundle:
        members, total = [], 0
        for member in bundle:
            members.append(member)
            if len(members) > limits.max_members:
                what = f"has over {limits.max_members} members"
                raise _cap_error(archive, what, "max_members", limits.max_members)
            kind = _tar_kind(member)
            if kind:
                raise _member_error(archive, member.name, f"is a {kind}")
            _member_parts(archive, member.name, member.isdir())
            total += member.size if member.isreg() else 0
            if total > limits.max_bytes:
                what = f"expands to at least {total} bytes"
                raise _cap_error(archive, what, "max_extracted_bytes", limits.max_bytes)
            _check_ratio(archive, "", total, packed, limits)
        budget = _Budget(archive, limits.max_bytes)
        for member in members:
            target = destination.joinpath(*_member_parts(archive, member.name, member.isdir()))
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            reader = bundle.extractfile(member)
            if reader is None:  # not reachable for a regular member; refuse rather than skip
                raise _member_error(archive, member.name, "cannot be read")
            with reader:
                budget.write(reader, target, member.name, member.size)


class _Budget:
    """Bytes actually written from one archive, against its cap: headers can lie."""

    def __init__(self, archive: Path, max_bytes: int, chunk_bytes: int = 1 << 20) -> None:
        self.archive = archive
        self.max_bytes = max_bytes
        self.left = max_bytes
        self.chunk_bytes = chunk_bytes

    def write(self, reader: BinaryIO, target: Path, name: str, stated: int) -> None:
        """Copy ``reader`` to ``target``, refusing more than ``stated`` or the budget."""
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(target, "wb") as writer:
            while chunk := reader.read(self.chunk_bytes):
                written += len(chunk)
                self.left -= len(chunk)
                if written > stated:
                    raise _member_error(self.archive, name, f"holds more than its stated {stated}")
                if self.left < 0:
                    what = f"wrote over {self.max_bytes} bytes"
                    raise _cap_error(self.archive, what, "max_extracted_bytes", self.max_bytes)
                writer.write(chunk)


# Below this many expanded bytes a compression ratio is not checked: a small file of
# repeated bytes honestly compresses a hundredfold, and cannot fill a disk.
RATIO_FLOOR_BYTES = 1 << 20


def _check_ratio(
    archive: Path, name: str, expanded: int, packed: int, limits: ArchiveLimits
) -> None:
    """Refuse ``expanded / packed`` above the cap (``name`` empty: the whole archive)."""
    if expanded > RATIO_FLOOR_BYTES and expanded > limits.max_ratio * max(packed, 1):
        what = f"member {name!r} expands" if name else "expands"
        ratio = expanded / max(packed, 1)
        raise _cap_error(
            archive, f"{what} {ratio:.0f}-fold", "max_compression_ratio", limits.max_ratio
        )


def _member_parts(archive: Path, name: str, is_dir: bool) -> tuple[str, ...]:
    """The relative path parts of a member's name; absolute or ``..`` names are refused."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise _member_error(archive, name, "has an absolute or parent ('..') path")
    if not parts and not is_dir:
        raise _member_error(archive, name, "has an empty path")
    return parts


def _mode_kind(mode: int) -> str:
    """What a file mode says the entry is, when it is neither a regular file nor a folder
    (an empty string otherwise; 0, as many zips store, counts as a regular file)."""
    kind = stat.S_IFMT(mode)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return ""
    names = {stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
    return names.get(kind, "device")


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg() or member.isdir():
        return ""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    return "fifo" if member.isfifo() else "special member"


def _member_error(archive: Path, name: str, problem: str) -> AcquireError:
    return AcquireError(
        f"{archive.name}: member {name!r} {problem}; only regular files and folders "
        "with relative paths are extracted"
    )


def _cap_error(archive: Path, what: str, param: str, limit: float) -> AcquireError:
    return AcquireError(
        f"{archive.name} {what}, over acquire.{param} ({limit:g}); raise it if the archive "
        "is trusted"
    )


# --------------------------------------------------------------------------- root


def find_root(
    base: Path, split_names: Iterable[str], root: str = "", *, rooted_fallback: bool = False
) -> Path:
    """The folder inside ``base`` that directly contains the split folders.

    With ``root`` set it must exist and hold a split folder (with ``rooted_fallback``, a
    mirror that stores the source already rooted is accepted too). With ``root`` empty the
    shallowest folder holding at least one split folder wins, so an archive that wraps
    everything in one top folder needs no configuration; two candidates at the same depth
    are ambiguous and must be settled with ``root`` rather than guessed.
    """
    names = tuple(split_names)
    wanted = ", ".join(names)
    if root:
        candidate = (base / root).resolve()
        if not candidate.is_relative_to(base.resolve()):
            raise AcquireError(f"root {root!r} points outside the source")
        if candidate.is_dir() and _holds_split(candidate, names):
            return candidate
        if rooted_fallback and _holds_split(base, names):
            return base
        raise AcquireError(f"root {root!r} is not a folder holding any of the splits ({wanted})")
    level = [base]
    while level:
        hits = [folder for folder in level if _holds_split(folder, names)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            found = ", ".join(str(hit.relative_to(base)) for hit in hits)
            raise AcquireError(f"several folders hold split folders ({found}); set root in params")
        level = [
            child
            for folder in level
            for child in sorted(folder.iterdir())
            if child.is_dir()
            and not child.is_symlink()
            and not child.name.startswith(".")
            and child.name not in IGNORED_ROOT_CANDIDATES
        ]
    raise AcquireError(f"no folder holds any of the split folders ({wanted})")


def _holds_split(folder: Path, names: Sequence[str]) -> bool:
    return any((folder / name).is_dir() for name in names)


# --------------------------------------------------------------------------- copying


def copy_tree(
    source: Path, destination: Path, chunk_bytes: int = 1 << 20
) -> list[tuple[str, int, str]]:
    """Copy every regular file under ``source`` to ``destination``, hashing while copying.

    Hidden folders and stray files are copied too (raw data is kept as found); a link or
    special file inside is refused (see :func:`_walk_files`). Each file is read once,
    without following a link; the sha256 comes from the same bytes that were written.
    Returns ``(relative posix path, bytes, sha256)`` per file.
    """
    pairs = []
    for relative in _walk_files(source):
        target = destination / relative
        pairs.append((source / relative, target))
    for folder in {target.parent for _, target in pairs} | {destination}:
        folder.mkdir(parents=True, exist_ok=True)

    def copy_one(pair: tuple[Path, Path]) -> tuple[str, int, str]:
        origin, target = pair
        digest = hashlib.sha256()
        size = 0
        with _open_no_follow(origin) as reader, open(target, "wb") as writer:
            while chunk := reader.read(chunk_bytes):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        return target.relative_to(destination).as_posix(), size, digest.hexdigest()

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return list(pool.map(copy_one, pairs))


def hash_tree(folder: Path, chunk_bytes: int = 1 << 20) -> list[tuple[str, int, str]]:
    """``(relative posix path, bytes, sha256)`` of every regular file under ``folder``;
    a link or special file inside is refused, never followed."""

    def hash_one(relative: Path) -> tuple[str, int, str]:
        with _open_no_follow(folder / relative) as reader:
            digest, size = stream_sha256(reader, chunk_bytes)
        return relative.as_posix(), size, digest

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return list(pool.map(hash_one, _walk_files(folder)))


def file_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 of an archive. Its path may be a link: it is the mirror's or the user's
    choice of where the archive lives, and the sum checks the bytes wherever they are."""
    try:
        return file_sha256(path, chunk_bytes)
    except OSError as error:
        raise AcquireError(f"cannot read {path}: {one_line(error)}") from None


def _open_no_follow(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing a symlink swapped in after the walk checked it."""
    try:
        return open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW))
    except OSError as error:
        raise AcquireError(f"cannot read {path}: {one_line(error)}") from None


def _walk_files(folder: Path) -> list[Path]:
    """Relative paths of the regular files under ``folder``, none reached through a link.

    Raw data must be the files themselves: a symlink (to a file or a folder), a fifo, a
    socket or a device inside ``folder`` is refused with :class:`AcquireError` naming it,
    rather than followed (it may point outside, or nowhere, and crash ``clean`` later) or
    skipped (``data/raw`` would no longer match its source). Since the walk only descends
    into real folders, every path it returns resolves inside ``folder``. ``folder`` itself
    may be a link: that is the mirror's or the user's choice of where the source lives.
    The entry types come from the directory listing (no extra system call per file).
    """
    files = []
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(Path(entry.path).relative_to(folder))
                else:
                    kind = _mode_kind(entry.stat(follow_symlinks=False).st_mode) or "special file"
                    raise AcquireError(
                        f"{entry.path} is a {kind}; links and special files are refused"
                    )
    return files


# --------------------------------------------------------------------------- the stage


def acquire_source(
    source: SourceParams,
    settings: AcquireParams,
    destination: Path,
    workspace: Path,
    *,
    mirror: Path | None = None,
    base_dir: Path | None = None,
    backoff_s: float = 1.0,
) -> tuple[str, list[tuple[str, int, str]]]:
    """Put ``source``'s root folder at ``destination``; return its origin and files.

    ``workspace`` is a scratch folder (inside the stage's temporary output) for downloads
    and extraction; content we extracted ourselves is moved into place rather than
    copied, content owned by someone else (a local folder, the mirror, kagglehub's
    cache) is copied.

    A pinned ``sha256`` is the sum of the source's archive, and it is checked wherever
    that archive comes from: the download, a local path or the mirror. A folder (in the
    mirror, at a local path, or kagglehub's unpacked download) has no archive bytes to
    check, so a pinned source refuses one rather than take it on trust.
    """
    location = locate_source(source, mirror, base_dir)
    split_names = tuple(source.splits)
    logger.info("%s: from %s", source.name, location.describe())
    if source.sha256 is not None and location.kind in ("folder", "kaggle"):
        where = f"{mirror if mirror is not None else '$' + MIRROR_ENV_VAR}/{source.name}"
        raise AcquireError(
            f"sha256 is pinned but {location.describe()} gives a folder, which cannot be "
            f"checked against it (the sum is the archive's); put the archive itself at "
            f"{where} (or point uri at it), or remove sha256 from params"
        )
    if location.kind == "folder":
        root = find_root(
            Path(location.value), split_names, source.root, rooted_fallback=location.from_mirror
        )
        return location.describe(), copy_tree(root, destination, settings.chunk_bytes)
    if location.kind == "kaggle":
        try:
            cached = kaggle_download(location.value)
        except AcquireError as error:
            raise AcquireError(f"{error}; {how_to_provide(source)}") from None
        root = find_root(cached, split_names, source.root)
        return location.describe(), copy_tree(root, destination, settings.chunk_bytes)
    archive = _fetch_archive(location, source, settings, workspace, backoff_s)
    extracted = workspace / "extracted"
    extract_archive(archive, extracted, ArchiveLimits.from_params(settings))
    root = find_root(extracted, split_names, source.root, rooted_fallback=location.from_mirror)
    os.replace(root, destination)
    return location.describe(), hash_tree(destination, settings.chunk_bytes)


def _fetch_archive(
    location: _Location,
    source: SourceParams,
    settings: AcquireParams,
    workspace: Path,
    backoff_s: float,
) -> Path:
    """The archive behind ``location``, downloaded if need be, its pinned sum verified."""
    if location.kind != "url":
        archive = Path(location.value)
        if source.sha256 is not None:
            actual = file_digest(archive, settings.chunk_bytes)
            if actual != source.sha256.lower():
                raise ChecksumError(
                    f"sha256 mismatch for {archive}: expected {source.sha256.lower()}, "
                    f"got {actual} (if the new file is trusted, update sha256 in params)"
                )
        return archive
    if source.sha256 is None:  # config already refuses this; say so rather than crash
        raise AcquireError("a URL source needs sha256")
    archive = workspace / "download"
    try:
        download(
            location.value,
            archive,
            source.sha256,
            retries=settings.retries,
            timeout_s=settings.timeout_s,
            chunk_bytes=settings.chunk_bytes,
            backoff_s=backoff_s,
            label=source.name,
        )
    except ChecksumError:
        raise
    except AcquireError as error:
        raise AcquireError(f"{error}; {how_to_provide(source)}") from None
    return archive


def acquire(
    settings: AcquireParams,
    out: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    backoff_s: float = 1.0,
) -> AcquireReport:
    """Build ``out`` (``data/raw``) from every source, atomically, with its manifest.

    Everything is assembled in a temporary folder beside ``out`` and swapped in at the
    end, so on any error ``out`` keeps what it had before and no temporary is left. A run
    killed outright (SIGKILL, a power cut) cannot clean up after itself; the next run
    removes what it left (:func:`remove_stale_temporaries`).
    """
    out = Path(out)
    mirror = mirror_folder(settings.mirror, environ, base_dir)
    if mirror is not None and not mirror.is_dir():
        logger.warning("mirror %s is not a folder; using the sources' uris", mirror)
    remove_stale_temporaries(out)
    lock: LockedFolder | None = None
    try:
        with atomic_path(out, directory=True) as temporary:
            lock = _claim(temporary)
            report = _acquire_into(
                settings, temporary, mirror=mirror, base_dir=base_dir, backoff_s=backoff_s
            )
    finally:
        if lock is not None:
            lock.release()  # held through the swap, so no other run takes it for stale
    return report


def _acquire_into(
    settings: AcquireParams,
    temporary: Path,
    *,
    mirror: Path | None,
    base_dir: Path | None,
    backoff_s: float,
) -> AcquireReport:
    """Acquire every source into ``temporary`` and write its manifest there."""
    reports: list[SourceReport] = []
    records: list[FileRecord] = []
    for source in settings.sources:
        workspace = temporary / f".work-{source.name}"
        workspace.mkdir()
        try:
            origin, files = acquire_source(
                source,
                settings,
                temporary / source.name,
                workspace,
                mirror=mirror,
                base_dir=base_dir,
                backoff_s=backoff_s,
            )
        except AcquireError as error:
            raise type(error)(f"source {source.name!r}: {error}") from None
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        source_records = [
            FileRecord(source.name, f"{source.name}/{path}", size, digest)
            for path, size, digest in files
        ]
        records.extend(source_records)
        size = sum(record.bytes for record in source_records)
        reports.append(SourceReport(source.name, origin, len(source_records), size))
    records.sort(key=lambda record: (record.source, record.path))
    write_manifest(records, temporary / MANIFEST_NAME)
    return AcquireReport(tuple(reports), tuple(records))


# --------------------------------------------------------------------------- leftovers


def _temporary_prefix(out: Path) -> str:
    """How ``io_utils.atomic_path`` names the temporary folders it makes for ``out``."""
    return f".{out.name}.tmp-"


def _claim(temporary: Path) -> LockedFolder:
    """Hold an exclusive lock on our temporary folder (``core.tempdirs``); release it once
    the folder has been swapped into place.

    The kernel drops the lock however the process ends, SIGKILL included, so another
    run can tell a live run's temporary (locked) from a dead run's (lockable).
    """
    try:
        return lock_folder(temporary)
    except FolderInUse as error:
        raise AcquireError(f"temporary folder {error}") from None


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary folders that killed runs left beside ``out``; return them.

    Only folders named as ``atomic_path`` names ours (``.raw.tmp-*`` for ``data/raw``)
    are candidates, and one is removed only if its lock can be taken, i.e. no live run
    owns it (see :func:`_claim`); a lock we cannot take is left alone. Anything else
    beside ``out`` (another stage's temporaries, files) is never touched.
    """
    out = Path(out)
    removed = remove_stale_folders(out.parent, _temporary_prefix(out))
    for folder in removed:
        logger.warning("removed %s, left by a run that was killed", folder)
    return removed


def write_manifest(records: Iterable[FileRecord], path: Path) -> None:
    """Write the manifest CSV (``source, path, bytes, sha256``) in the given order."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for record in records:
            writer.writerow([record.source, record.path, record.bytes, record.sha256])


def format_summary(report: AcquireReport, out: Path) -> str:
    """The human summary printed at the end of a run."""
    lines = [
        f"acquired {len(report.sources)} source(s), {report.files} files, "
        f"{_megabytes(report.bytes)} into {out}"
    ]
    for source in report.sources:
        size = _megabytes(source.bytes)
        lines.append(f"  {source.name}: {source.files} files, {size} from {source.origin}")
    return "\n".join(lines)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
