"""The app's per-client limits as plain objects: the login throttle (on a clock the test
moves), the upload quota and the shared-upload bookkeeping (on real files), the password
check and the malloc arena cap. The same objects behind a real server:
``test_app.py`` (a burst of 300 wrong passwords, uploads beyond the quota, a refused
analysis's upload)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from braintumor.serving.app.login import Logins, LoginThrottle
from braintumor.serving.app.memory import limit_malloc_arenas
from braintumor.serving.app.uploads import UploadQuota, UploadRefs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(throttle: LoginThrottle, client: str, times: int) -> None:
    for _ in range(times):
        assert throttle.admit(client) is None
        throttle.settle(client, False)


def test_the_throttle_refuses_after_n_failures_until_the_oldest_ages_out() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window_s=60.0, clock=clock)
    fail(throttle, "10.0.0.1", 1)
    clock.now += 20
    fail(throttle, "10.0.0.1", 2)
    assert throttle.admit("10.0.0.1") == pytest.approx(40.0)  # the first failure ages out
    assert throttle.admit("10.0.0.2") is None, "another client is not affected"
    clock.now += 40
    assert throttle.admit("10.0.0.1") is None  # one place came free, only one
    throttle.settle("10.0.0.1", False)
    assert throttle.admit("10.0.0.1") == pytest.approx(20.0)


def test_logins_under_way_count_against_the_allowance() -> None:
    """A parallel burst gets no more checks than a sequence: admitted, unanswered logins
    hold their place."""
    throttle = LoginThrottle(max_failures=5, window_s=60.0, clock=Clock())
    admitted = [throttle.admit("10.0.0.1") for _ in range(300)]
    assert admitted.count(None) == 5
    for _ in range(5):
        throttle.settle("10.0.0.1", None)  # malformed requests: neither outcome
    assert throttle.admit("10.0.0.1") is None


def test_a_success_clears_the_failures() -> None:
    throttle = LoginThrottle(max_failures=2, window_s=60.0, clock=Clock())
    fail(throttle, "10.0.0.1", 1)
    assert throttle.admit("10.0.0.1") is None
    throttle.settle("10.0.0.1", True)
    fail(throttle, "10.0.0.1", 2)
    assert throttle.admit("10.0.0.1") is not None
    with pytest.raises(ValueError, match="login throttle"):
        LoginThrottle(max_failures=0)


def test_logins_match_user_and_password_exactly() -> None:
    check = Logins([("alice", "correct horse"), ("bob", "s3cret:with:colons")])
    assert check("alice", "correct horse")
    assert check("bob", "s3cret:with:colons")
    assert not check("alice", "correct horse ")
    assert not check("alice", "s3cret:with:colons")
    assert not check("carol", "correct horse")
    assert not check("", "")


def store(folder: Path, name: str, size: int) -> str:
    """A file as gradio's upload route leaves it (written, then renamed into place)."""
    path = folder / name
    incoming = folder / f".incoming-{name}"
    incoming.write_bytes(b"x" * size)
    os.replace(incoming, path)
    return str(path)


def test_the_upload_quota_counts_files_on_disk_per_client(tmp_path) -> None:
    quota = UploadQuota(max_files=2, max_bytes=10_000)
    assert quota.reserve("a", 1_000) is None
    first = store(tmp_path, "one.jpg", 900)
    quota.settle("a", 1_000, [first])
    assert quota.reserve("a", 1_000) is None
    second = store(tmp_path, "two.jpg", 900)
    quota.settle("a", 1_000, [second])
    assert quota.in_flight("a") == (2, 1_800)
    assert "2 uploads from your address are waiting" in quota.reserve("a", 10)
    assert quota.reserve("b", 1_000) is None, "another client has its own quota"
    Path(first).unlink()  # analysed: deleted
    assert quota.in_flight("a") == (1, 900)
    store(tmp_path, "two.jpg", 900)  # the same bytes sent again: a new file, not "a"'s
    assert quota.in_flight("a") == (0, 0) and quota.inode("a", second) is None
    assert "would hold 10001 bytes (the limit is 10000)" in quota.reserve("a", 10_001)
    assert quota.reserve("a", 6_000) is None
    assert "would hold 12000 bytes" in quota.reserve("a", 6_000), "reservations count"
    quota.settle("a", 6_000, [])  # the upload failed: nothing stored, bytes released
    assert quota.reserve("a", 6_000) is None


def test_a_shared_upload_is_busy_until_every_upload_of_it_is_named(tmp_path) -> None:
    refs = UploadRefs()
    path = store(tmp_path, "slice.jpg", 10)
    refs.uploaded([path])
    refs.uploaded([path])  # a second client, the same bytes: gradio's same path
    assert refs.busy(path)
    first = refs.joining([path])
    assert refs.busy(path)  # the request is under way, and one upload is unnamed
    refs.joined(first)
    assert refs.busy(path)  # the second upload still waits for its request
    second = refs.joining([str(tmp_path / "." / "slice.jpg")])  # the same file, spelt otherwise
    refs.joined(second)
    assert not refs.busy(path)
    refs.joined(refs.joining([path]))  # an example's path, never uploaded: no underflow
    assert not refs.busy(path)


def test_malloc_arenas_are_capped_unless_the_environment_sets_them(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True  # glibc's mallopt accepted it
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
