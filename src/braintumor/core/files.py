"""Files as every stage writes and checks them: atomically, and by their SHA-256.

Atomic writes, so a failed stage never leaves half-written outputs:
Everything is written under a temporary name in the destination's own folder (same file
system, so ``os.replace`` is atomic) and renamed into place only once complete. A folder
that already exists is swapped out only after the new one is complete; on failure the
temporary is removed and the old output is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_path(
    destination: str | Path, *, directory: bool = False, suffix: str = ""
) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; move it into place on success.

    With ``directory=True`` the yielded path is an empty folder. If the body raises, the
    temporary is deleted and ``destination`` keeps whatever it held before. ``suffix`` ends
    the temporary's name, for writers that insist on one (Keras: ``.keras``).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}.tmp-"
    # mkdtemp/mkstemp create private (0700/0600) entries; outputs get the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=destination.parent))
        os.chmod(temporary, 0o777 & ~umask)
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=destination.parent)
        os.close(handle)
        temporary = Path(name)
        os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        if directory:
            _replace_directory(temporary, destination)
        else:
            os.replace(temporary, destination)
    except BaseException:
        _remove(temporary)
        raise


def _replace_directory(new: Path, destination: Path) -> None:
    """Swap ``new`` in for ``destination``; the old folder is removed only after the swap."""
    if destination.exists() or destination.is_symlink():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(destination, old)
        try:
            os.replace(new, destination)
        except BaseException:
            os.replace(old, destination)
            raise
        _remove(old)
    else:
        os.replace(new, destination)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON atomically (stable diffs, DVC metrics)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    """Make NumPy scalars and paths JSON-serialisable."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_arrays(path: str | Path, arrays: dict[str, Any], *, compressed: bool = False) -> None:
    """Named arrays as an ``.npz`` of plain arrays, atomically: the format of the bundle's
    small numeric files (the head, the tail, the OOD detector), readable without pickle."""
    import numpy as np

    with atomic_path(Path(path)) as temporary, open(temporary, "wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)


def read_arrays(path: str | Path) -> dict[str, Any]:
    """Every array of an ``.npz``, read with pickle refused (an object array raises
    ``ValueError``, as a missing or corrupt file raises ``OSError`` or ``ValueError``)."""
    import numpy as np

    with np.load(Path(path), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def stream_sha256(reader: BinaryIO, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 (hex) and size of what ``reader`` holds from where it stands, read in chunks:
    the package's one way of hashing a file's bytes (bundles, weights, archives, the raw
    data's manifest), whoever opened it and however (``acquire`` opens without following
    links)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := reader.read(chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as handle:
        return stream_sha256(handle, chunk_bytes)[0]


def optional_sha256(path: Path | None) -> str | None:
    """SHA-256 of ``path`` when it is a file, else None: what a key records for an input
    that may be absent (a backbone without a weights file)."""
    return file_sha256(path) if path is not None and Path(path).is_file() else None


def worker_count(requested: int) -> int:
    """``requested`` workers, or every core this process may use when it is 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
