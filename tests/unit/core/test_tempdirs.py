"""``core.tempdirs``: a folder's flock says whether its owner lives, across real processes.

The owners are real ``python`` processes that claim a folder, report it on stdout and
hold it until their stdin closes; "killed" means SIGKILL, so nothing of the owner's own
clean-up runs and only the kernel drops the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from braintumor.core.tempdirs import (
    FolderInUse,
    claim_folder,
    lock_folder,
    remove_stale_folders,
)

# Claims <parent>/<prefix>XXXX, writes a file in it, prints its path, holds it until stdin
# closes, then exits without removing it (as if its clean-up never ran).
HOLDER = (
    "import sys; from braintumor.core.tempdirs import claim_folder;"
    "held = claim_folder(sys.argv[1], sys.argv[2]);"
    "(held.path / 'patient.dcm').write_bytes(b'DICM');"
    "print(held.path, flush=True); sys.stdin.read()"
)


class Holder:
    """A real process holding a claimed folder."""

    def __init__(self, parent: Path, prefix: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(parent), prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip()
        if not line:
            self.process.kill()
            raise AssertionError("the holder process reported no folder")
        self.folder = Path(line)

    def kill_9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def exit(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield lambda parent, prefix="run-": started.append(Holder(parent, prefix)) or started[-1]
    for holder in started:
        holder.stop()


def test_a_killed_owners_folder_is_removed_and_a_live_owners_kept(tmp_path, holders) -> None:
    killed = holders(tmp_path)
    alive = holders(tmp_path)
    killed.kill_9()
    assert (killed.folder / "patient.dcm").is_file()  # what kill -9 leaves behind

    assert remove_stale_folders(tmp_path, "run-") == [killed.folder]

    assert not killed.folder.exists()
    assert (alive.folder / "patient.dcm").read_bytes() == b"DICM"
    with pytest.raises(FolderInUse, match="locked by another process"):
        lock_folder(alive.folder)
    alive.exit()  # ended without removing its folder: now it is stale too
    assert remove_stale_folders(tmp_path, "run-") == [alive.folder]
    assert list(tmp_path.iterdir()) == []


def test_a_claimed_folder_is_private_and_locked_against_another_process(tmp_path) -> None:
    held = claim_folder(tmp_path, "run-")
    assert held.path.parent == tmp_path and held.path.name.startswith("run-")
    assert oct(held.path.stat().st_mode & 0o777) == "0o700"
    probe = (
        "import sys; from braintumor.core.tempdirs import FolderInUse, lock_folder\n"
        "try:\n    lock_folder(sys.argv[1])\nexcept FolderInUse as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", probe, str(held.path)], capture_output=True, text=True, timeout=60
    )
    assert other.returncode == 3, other.stderr
    assert other.stdout.strip() == f"{held.path}: locked by another process"
    assert remove_stale_folders(tmp_path, "run-") == [], "a live folder must never go"
    held.remove()
    assert not held.path.exists()
    held.release()  # idempotent after remove


def test_only_unlocked_folders_with_the_prefix_go(tmp_path, holders) -> None:
    """Files, links (to a folder: the target must survive) and other names stay."""
    dead = tmp_path / "run-dead"
    (dead / "nested").mkdir(parents=True)
    (dead / "nested" / "upload.jpg").write_bytes(b"jpeg")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    (tmp_path / "run-link").symlink_to(target)
    (tmp_path / "run-file").write_text("a file named like a folder")
    (tmp_path / "other-dead").mkdir()

    assert remove_stale_folders(tmp_path, "run-") == [dead]

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere",
        "other-dead",
        "run-file",
        "run-link",
    ]
    assert (target / "keep.txt").read_text() == "not ours"
    assert remove_stale_folders(tmp_path / "missing", "run-") == []


def test_lock_folder_refuses_a_folder_removed_before_it_was_locked(tmp_path) -> None:
    """The race ``claim_folder`` retries on: a cleaner removed the new folder first."""
    folder = tmp_path / ".raw.tmp-x"
    folder.mkdir()
    first = lock_folder(folder)
    with pytest.raises(FolderInUse):
        lock_folder(folder)  # a second open file: flock holds across descriptors
    first.remove()
    with pytest.raises(FileNotFoundError):
        lock_folder(folder)
    folder.mkdir()
    lock_folder(folder).release()  # free again, and released


def test_claims_racing_a_cleaner_never_lose_a_live_folder(tmp_path) -> None:
    """A cleaner sweeping the same parent in a loop while folders are claimed: every
    claimed folder must exist, locked, until its owner lets it go."""
    stop = threading.Event()
    removed: list[Path] = []

    def clean() -> None:
        while not stop.is_set():
            removed.extend(remove_stale_folders(tmp_path, "run-"))

    cleaner = threading.Thread(target=clean)
    cleaner.start()
    try:
        held = [claim_folder(tmp_path, "run-") for _ in range(200)]
        for item in held:
            assert item.path.is_dir()
            (item.path / "upload.jpg").write_bytes(b"jpeg")  # usable, not unlinked
    finally:
        stop.set()
        cleaner.join(timeout=60)
    assert not set(removed) & {item.path for item in held}
    for item in held:
        item.remove()
