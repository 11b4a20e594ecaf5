"""Temporary folders that say whether their owner is alive: the package's one way to make,
lock and clean up a working folder that a killed process may leave behind.

A folder is held with ``flock`` on the folder itself (its own descriptor is the lock
file): the kernel drops the lock however the process ends, ``kill -9`` included, so at
its next start a program removes the folders whose lock it can take (their owner is
gone) and never one whose lock is held (a live run, perhaps of another copy of the same
program sharing the folder). The folder and its lock are one directory entry, so there
is no lock file without a folder, or folder without a lock file, to reason about.

Used by the ``acquire`` stage (its temporary copy of ``data/raw``) and by the web app (its
folder of uploads, which may hold a DICOM with a patient's name). Linux and macOS: both
support ``flock`` on a folder's descriptor on local file systems.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger(__name__)


class FolderInUse(RuntimeError):
    """The folder's lock is held by another process (or it vanished while being locked)."""


@dataclass
class LockedFolder:
    """A folder and the open descriptor whose ``flock`` marks it as in use. Keep the object
    (and so the descriptor) for as long as the folder is in use."""

    path: Path
    descriptor: int
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Drop the lock (the folder stays: e.g. ``acquire``'s, swapped into place)."""
        if not self._released:
            self._released = True
            os.close(self.descriptor)

    def remove(self) -> None:
        """Delete the folder while still holding its lock (no cleaner can race us), then
        drop the lock."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.release()


def _open_folder(path: Path) -> int:
    """A read-only descriptor of the folder ``path`` itself, never of a link's target."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _still_named(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the folder that ``descriptor`` has open (a cleaner may
    have removed it between its creation and our lock)."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def lock_folder(path: str | Path) -> LockedFolder:
    """Lock the existing folder ``path`` (one this process just made, e.g. with
    ``core.files.atomic_path``). Raises :class:`FolderInUse` when another process holds it
    or when it was removed before the lock was taken; ``OSError`` when it cannot be
    opened."""
    path = Path(path)
    descriptor = _open_folder(path)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FolderInUse(f"{path}: locked by another process") from None
    if not _still_named(path, descriptor):
        os.close(descriptor)
        raise FolderInUse(f"{path}: removed by another process before it could be locked")
    return LockedFolder(path, descriptor)


def claim_folder(parent: str | Path, prefix: str) -> LockedFolder:
    """A new private (0700) folder ``<parent>/<prefix>XXXX``, locked. ``parent`` must exist.

    Between making the folder and locking it, another process's
    :func:`remove_stale_folders` may take it for a dead run's and remove it; the lock is
    then taken on a folder that no longer has a name, which is detected, and a new folder
    is made.
    """
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            descriptor = _open_folder(path)
        except FileNotFoundError:
            continue
        # Blocking: only a cleaner probing the folder can hold it, and only briefly.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if _still_named(path, descriptor):
            return LockedFolder(path, descriptor)
        os.close(descriptor)


def remove_stale_folders(parent: str | Path, prefix: str) -> list[Path]:
    """Delete the folders ``<parent>/<prefix>*`` whose lock no process holds (left by a run
    that was killed) and return them. Folders whose lock is held, links, files and every
    entry not starting with ``prefix`` are left alone."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for candidate in sorted(parent.iterdir()):
        if not candidate.name.startswith(prefix):
            continue
        try:
            descriptor = _open_folder(candidate)
        except OSError:
            continue  # a file, a link, gone already, or not ours to read
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOGGER.debug("keeping %s: a live process holds it", candidate)
            os.close(descriptor)
            continue
        try:
            if _still_named(candidate, descriptor):
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
        finally:
            os.close(descriptor)
    return removed
