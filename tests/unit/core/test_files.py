"""core.files: outputs appear whole or not at all, and one way to hash a file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from braintumor.core.files import (
    atomic_path,
    file_sha256,
    stream_sha256,
    worker_count,
    write_json,
    write_text,
)


def _siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_file_appears_only_when_the_block_ends(tmp_path: Path) -> None:
    destination = tmp_path / "out" / "metrics.json"
    with atomic_path(destination) as temporary:
        temporary.write_text("{}")
        assert not destination.exists()  # nothing at the final name while writing
        assert temporary.parent == destination.parent  # same file system: rename is atomic
    assert destination.read_text() == "{}"
    assert _siblings(destination.parent) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    destination = tmp_path / "model.keras"
    destination.write_text("last good")
    with pytest.raises(RuntimeError), atomic_path(destination) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the stage failed")
    assert destination.read_text() == "last good"
    assert _siblings(tmp_path) == ["model.keras"]


def test_an_interrupt_cleans_up_too(tmp_path: Path) -> None:
    """BaseException, not Exception: Ctrl-C during a write leaves nothing behind."""
    destination = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt), atomic_path(destination, directory=True) as folder:
        (folder / "a.npy").write_bytes(b"x")
        raise KeyboardInterrupt
    assert _siblings(tmp_path) == []


def test_a_folder_is_swapped_whole(tmp_path: Path) -> None:
    destination = tmp_path / "processed"
    destination.mkdir()
    (destination / "old.npy").write_bytes(b"old")
    with atomic_path(destination, directory=True) as folder:
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "new.npy").write_bytes(b"new")
        assert (destination / "old.npy").exists()  # the old output serves until the swap
    assert _siblings(destination) == ["new.npy"]
    assert _siblings(tmp_path) == ["processed"]


def test_a_failed_folder_keeps_the_old_one(tmp_path: Path) -> None:
    destination = tmp_path / "figures"
    destination.mkdir()
    (destination / "a.png").write_bytes(b"png")
    with pytest.raises(ValueError), atomic_path(destination, directory=True) as folder:
        (folder / "b.png").write_bytes(b"half")
        raise ValueError
    assert _siblings(destination) == ["a.png"]
    assert _siblings(tmp_path) == ["figures"]


def test_outputs_get_the_umask_modes_not_the_private_temporary_ones(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.txt") as temporary:
            temporary.write_text("x")
        with atomic_path(tmp_path / "d", directory=True):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """A process killed mid-write (kill -9: no cleanup runs) cannot corrupt the output;
    at worst a hidden temporary is left beside it."""
    destination = tmp_path / "eval.json"
    destination.write_text('{"accuracy": 0.9}')
    script = (
        "import sys, time\n"
        "from braintumor.core.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as t:\n"
        "    t.write_text('{\"accuracy\": ')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(destination)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert json.loads(destination.read_text()) == {"accuracy": 0.9}


def test_write_json_is_stable_and_takes_numpy_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"b": np.float32(0.5), "a": np.int64(3), "p": Path("x/y")})
    assert path.read_text() == '{\n  "a": 3,\n  "b": 0.5,\n  "p": "x/y"\n}\n'
    with pytest.raises(TypeError, match="not JSON-serialisable: object"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 5])
def test_one_hash_for_every_file(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert file_sha256(path, chunk_bytes=7) == expected
    assert stream_sha256(io.BytesIO(data), 4096) == (expected, size)


def test_stream_sha256_hashes_from_where_the_reader_stands() -> None:
    reader = io.BytesIO(b"headerbody")
    reader.read(6)
    assert stream_sha256(reader) == (hashlib.sha256(b"body").hexdigest(), 4)


def test_worker_count() -> None:
    assert worker_count(3) == 3
    assert 1 <= worker_count(0) <= (os.cpu_count() or 1)
