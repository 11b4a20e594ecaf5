"""DVC stage ``acquire``: gather every raw data source, as found, into ``data/raw``.

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

The whole output is built in a temporary folder beside ``data/raw`` and swapped in only
once complete, so a failure (a wrong checksum, a missing source, a transfer cut for good)
leaves ``data/raw`` exactly as it was. Failures raise :class:`AcquireError` with a
one-line message; :func:`main` prints it and exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from braintumor.config import AcquireParams, ConfigError, SourceParams, load_params
from braintumor.io_utils import atomic_path

if TYPE_CHECKING:
    import requests

logger = logging.getLogger("braintumor.acquire")  # not "__main__" under python -m

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
        return f"mirror {self.value}" if self.from_mirror else f"{self.kind} {self.value}"


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
    if mirror is not None:
        candidate = mirror / source.name
        if candidate.is_dir():
            return _Location("folder", str(candidate), from_mirror=True)
        if candidate.is_file():
            return _Location("archive", str(candidate), from_mirror=True)
    if mirror is None:
        mirror_note = "no mirror set"
    elif mirror.is_dir():
        mirror_note = f"not in mirror {mirror}"
    else:
        mirror_note = f"mirror {mirror} is not a folder"
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
    path = Path(uri.removeprefix("file://")).expanduser()
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
                if failures > retries:
                    raise AcquireError(
                        f"download of {url} failed after {failures} attempts ({error})"
                    ) from None
                delay = min(backoff_s * 2 ** (failures - 1), 30.0)
                logger.warning(
                    "%s: %s; retry %d of %d in %.1f s", label, error, failures, retries, delay
                )
                time.sleep(delay)
                continue
            actual = state.digest.hexdigest()
            if actual == expected_sha256.lower():
                break
            if state.suspect and not restarted:
                logger.warning("%s: sha256 mismatch; downloading once more from scratch", label)
                state.reset()
                restarted = True
                continue
            partial.unlink(missing_ok=True)
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {expected_sha256.lower()}, got {actual} "
                "(if the new file is trusted, update sha256 in params)"
            )
    os.replace(partial, destination)


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
    from tqdm import tqdm

    # identity: a server that gzips on the fly would change the bytes we hash.
    headers = {"Accept-Encoding": "identity"}
    if state.received:
        headers["Range"] = f"bytes={state.received}-"
    try:
        with session.get(
            url, stream=True, timeout=(timeout_s, timeout_s), headers=headers
        ) as response:
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
            length_header = response.headers.get("Content-Length")
            expected = int(length_header) if length_header and length_header.isdigit() else None
            total = state.received + expected if expected is not None else None
            state.suspect = state.suspect or expected is None
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
            if expected is not None and got < expected:
                raise _TransferError(f"short read: {got} of {expected} bytes")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise _TransferError(_one_line(error)) from None


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
            f"Kaggle download of {handle!r} failed ({type(error).__name__}: {_one_line(error)})"
        ) from None


def extract_archive(archive: Path, destination: Path) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz) archive into ``destination``.

    The kind is sniffed from the content, not the name, because URLs often lack a
    telling suffix. Tar members go through the ``data`` filter and zip member names are
    sanitised by ``zipfile``, so no member can land outside ``destination``.
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(destination)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as bundle:
                bundle.extractall(destination, filter="data")
        else:
            raise AcquireError(f"{archive.name} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise AcquireError(f"cannot extract {archive.name}: {_one_line(error)}") from None


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

    Hidden folders and stray files are copied too (raw data is kept as found). Each file
    is read once; the sha256 comes from the same bytes that were written. Returns
    ``(relative posix path, bytes, sha256)`` per file.
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
        with open(origin, "rb") as reader, open(target, "wb") as writer:
            while chunk := reader.read(chunk_bytes):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
        return target.relative_to(destination).as_posix(), size, digest.hexdigest()

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return list(pool.map(copy_one, pairs))


def hash_tree(folder: Path, chunk_bytes: int = 1 << 20) -> list[tuple[str, int, str]]:
    """``(relative posix path, bytes, sha256)`` of every regular file under ``folder``."""

    def hash_one(relative: Path) -> tuple[str, int, str]:
        digest = hashlib.sha256()
        size = 0
        with open(folder / relative, "rb") as reader:
            while chunk := reader.read(chunk_bytes):
                digest.update(chunk)
                size += len(chunk)
        return relative.as_posix(), size, digest.hexdigest()

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        return list(pool.map(hash_one, _walk_files(folder)))


def _walk_files(folder: Path) -> list[Path]:
    """Relative paths of the regular files under ``folder`` (symlinked folders not followed)."""
    files = []
    for current, _, names in os.walk(folder):
        for name in names:
            path = Path(current, name)
            if path.is_file():
                files.append(path.relative_to(folder))
            else:
                logger.warning("skipping %s: not a regular file", path)
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
    """
    location = locate_source(source, mirror, base_dir)
    split_names = tuple(source.splits)
    logger.info("%s: from %s", source.name, location.describe())
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
    if location.kind == "url":
        archive = workspace / "download"
        if source.sha256 is None:  # config already refuses this; say so rather than crash
            raise AcquireError("a URL source needs sha256")
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
    else:
        archive = Path(location.value)
    extracted = workspace / "extracted"
    extract_archive(archive, extracted)
    root = find_root(extracted, split_names, source.root, rooted_fallback=location.from_mirror)
    os.replace(root, destination)
    return location.describe(), hash_tree(destination, settings.chunk_bytes)


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
    end, so on any error ``out`` keeps what it had before and no temporary is left.
    """
    out = Path(out)
    mirror = mirror_folder(settings.mirror, environ, base_dir)
    if mirror is not None and not mirror.is_dir():
        logger.warning("mirror %s is not a folder; using the sources' uris", mirror)
    reports: list[SourceReport] = []
    records: list[FileRecord] = []
    with atomic_path(out, directory=True) as temporary:
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
            reports.append(
                SourceReport(
                    source.name, origin, len(source_records), sum(r.bytes for r in source_records)
                )
            )
        records.sort(key=lambda record: (record.source, record.path))
        write_manifest(records, temporary / MANIFEST_NAME)
    return AcquireReport(tuple(reports), tuple(records))


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


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line (library messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m braintumor.acquire --params params.yaml --out data/raw``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        report = acquire(params.acquire, args.out, base_dir=args.params.resolve().parent)
    except (AcquireError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
