"""Where uploads live and how many a client may have there.

- **One locked folder per app.** The app keeps every upload and output in its own folder,
  ``<temp root>/run-XXXX`` (temp root: ``--temp-dir``, ``$BRAINTUMOR_APP_TEMP`` or
  ``<tmp>/braintumor-app-<uid>``), set as gradio's ``GRADIO_TEMP_DIR`` and locked
  (``core.tempdirs``) while the app runs. At start the app deletes the folders of earlier
  runs whose lock is free (a run killed with ``kill -9`` leaves its uploads, with any
  DICOM's patient name, until the next start), never one a live app holds; at exit it
  deletes its own. Nothing outside the temp root is deleted.
- **Uploads in flight are bounded per client address.** An upload is in flight from the
  moment gradio stores it until it is deleted (analysed, refused, or swept after the
  cache age). A client with ``max_files`` uploads in flight, or whose next upload would
  take it past ``max_bytes`` (counted from ``Content-Length``, which is required), gets
  HTTP 429 before a byte of its body is read.
- **A refused analysis deletes its upload.** When the queue refuses an analysis (HTTP
  503: full, or stopped), the upload it named is deleted at once (``Handlers.forget``)
  rather than left for the cache sweep. An analysis that runs deletes its upload itself
  (``Handlers.analyse``), accepted or refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from braintumor.core.tempdirs import LockedFolder, claim_folder, remove_stale_folders
from braintumor.serving.app.asgi import (
    API_PREFIX,
    ASGIApp,
    Message,
    Receive,
    ResponseRecorder,
    Scope,
    Send,
    client_address,
    header,
    is_post,
    refuse,
)
from braintumor.serving.predictor import SetupError

LOGGER = logging.getLogger(__name__)

TEMP_ENV = "BRAINTUMOR_APP_TEMP"
RUN_PREFIX = "run-"
# Enough for several people behind one address (a proxy, a NAT) each with one upload in
# the queue; bytes are bounded too (``ClientLimits.upload_bytes``).
DEFAULT_MAX_FILES = 16
# A join request names files; it is small. Bodies beyond this are not kept for parsing.
MAX_JOIN_BODY = 1 << 20
MAX_CLIENTS = 10_000


def default_temp_root() -> Path:
    """``$BRAINTUMOR_APP_TEMP``, else a per-user folder in the system's temp folder."""
    configured = os.environ.get(TEMP_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"braintumor-app-{os.getuid()}"


def claim_upload_folder(root: Path) -> LockedFolder:
    """A fresh, private, locked run folder in ``root`` (made private if new), after
    deleting the run folders that dead apps left there."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid != os.getuid():
            raise SetupError(f"temp folder {root}: owned by another user (pass --temp-dir)")
        for stale in remove_stale_folders(root, RUN_PREFIX):
            LOGGER.info("removed the upload folder of an earlier run: %s", stale)
        return claim_folder(root, RUN_PREFIX)
    except OSError as error:
        raise SetupError(f"temp folder {root}: {error.strerror or error}") from None


@dataclass
class _Stored:
    size: int
    inode: int


@dataclass
class _Client:
    stored: dict[str, _Stored] = field(default_factory=dict)
    reserved: int = 0  # bytes of uploads being received


class UploadQuota:
    """Uploads in flight per client address: files gradio stored for it that are still on
    disk (the same file, by inode: a later upload of the same content is a new file), and
    bytes being received. Thread-safe."""

    def __init__(self, max_files: int, max_bytes: int) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError(f"upload quota: {max_files} files, {max_bytes} bytes")
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, client: str, length: int) -> str | None:
        """Reserve ``length`` incoming bytes for ``client``; ``None`` when allowed (call
        :meth:`settle` once the upload is answered), else why not."""
        with self._lock:
            state = self._clients.setdefault(client, _Client())
            self._clients.move_to_end(client)
            self._prune(state)
            files = len(state.stored)
            held = sum(item.size for item in state.stored.values()) + state.reserved
            if files >= self.max_files:
                return f"{files} uploads from your address are waiting for analysis"
            if held + length > self.max_bytes:
                return (
                    f"uploads from your address would hold {held + length} bytes "
                    f"(the limit is {self.max_bytes})"
                )
            state.reserved += length
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
            return None

    def settle(self, client: str, length: int, stored: list[str]) -> None:
        """The reserved upload is answered: ``stored`` are the files gradio kept."""
        with self._lock:
            state = self._clients.setdefault(client, _Client())
            state.reserved = max(state.reserved - length, 0)
            for path in map(os.path.realpath, stored):
                try:
                    status = os.stat(path)
                except OSError:
                    continue
                state.stored[path] = _Stored(status.st_size, status.st_ino)

    def inode(self, client: str, path: str) -> int | None:
        """The inode of the file ``client`` stored at ``path``, if it stored one there."""
        with self._lock:
            state = self._clients.get(client)
            stored = state.stored.get(os.path.realpath(path)) if state else None
            return stored.inode if stored else None

    def in_flight(self, client: str) -> tuple[int, int]:
        """(files, bytes) that ``client`` has stored and not yet seen deleted."""
        with self._lock:
            state = self._clients.get(client)
            if state is None:
                return 0, 0
            self._prune(state)
            return len(state.stored), sum(item.size for item in state.stored.values())

    @staticmethod
    def _prune(state: _Client) -> None:
        for path, item in list(state.stored.items()):
            try:
                alive = os.stat(path).st_ino == item.inode
            except OSError:
                alive = False
            if not alive:
                del state.stored[path]


class UploadRefs:
    """Per stored upload path: uploads of it that no analysis request has named yet, and
    analysis requests naming it that are under way. Thread-safe.

    Gradio stores an upload under its content's hash, so clients who send the same bytes
    share one path, and one of them may upload it just before another's analysis deletes
    it. A file is deleted only when no other upload of it still waits to be named and no
    request naming it is under way (:meth:`busy`; ``Handlers.discard`` and ``forget``).
    """

    # Every this many uploads, entries whose file is gone (swept unanalysed) are dropped.
    PRUNE_EVERY = 1024

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._joining: dict[str, int] = {}
        self._uploads = 0
        self._lock = threading.Lock()

    def uploaded(self, paths: list[str]) -> None:
        with self._lock:
            for key in map(os.path.realpath, paths):
                self._pending[key] = self._pending.get(key, 0) + 1
            self._uploads += 1
            if self._uploads % self.PRUNE_EVERY == 0:
                for key in [key for key in self._pending if not os.path.exists(key)]:
                    del self._pending[key]

    def joining(self, paths: list[str]) -> list[str]:
        """A request names ``paths``: one upload of each is accounted for; returns the
        keys to pass to :meth:`joined` once the request is answered."""
        keys = [os.path.realpath(path) for path in paths]
        with self._lock:
            for key in keys:
                _decrement(self._pending, key)
                self._joining[key] = self._joining.get(key, 0) + 1
        return keys

    def joined(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                _decrement(self._joining, key)

    def busy(self, path: str) -> bool:
        """Whether an upload of ``path`` waits for a request naming it, or such a request
        is under way."""
        key = os.path.realpath(path)
        with self._lock:
            return bool(self._pending.get(key) or self._joining.get(key))


def _decrement(counts: dict[str, int], key: str) -> None:
    if counts.get(key, 0) > 1:
        counts[key] -= 1
    else:
        counts.pop(key, None)


def _is_join(scope: Scope) -> bool:
    """Whether ``scope`` asks the queue to run an event (the page's ``queue/join``, the
    API's ``call/<name>``)."""
    if not is_post(scope, ""):
        return False
    path = str(scope.get("path", "")).rstrip("/")
    return path.endswith(f"{API_PREFIX}/queue/join") or f"{API_PREFIX}/call/" in path


def _stored_paths(body: bytes | bytearray) -> list[str]:
    """The paths in the upload route's answer (a JSON list of the stored files)."""
    try:
        parsed = json.loads(bytes(body) or b"[]")
    except ValueError:
        return []
    return [path for path in parsed if isinstance(path, str)] if isinstance(parsed, list) else []


def _named_files(body: bytes) -> list[str]:
    """The ``path`` of every file (gradio's ``FileData``) among a request's inputs."""
    try:
        values = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return []
    return [
        value["path"]
        for value in (values if isinstance(values, list) else ())
        if isinstance(value, dict) and isinstance(value.get("path"), str)
    ]


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The request's body messages, read up to ``limit`` bytes; and whether that was all
    of it (a larger body is left for the route to read on)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, True
        if size > limit:
            return messages, False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` again, then the rest of the stream."""
    waiting = list(messages)

    async def replayed() -> Message:
        return waiting.pop(0) if waiting else await receive()

    return replayed


class UploadGuard:
    """Applies the :class:`UploadQuota` to gradio's upload route, keeps :class:`UploadRefs`
    of uploads and the requests naming them, and deletes the uploads of analyses the queue
    refuses (``forget``: ``Handlers.forget``) when no one else still needs them: only the
    file the refused client itself stored (by inode)."""

    def __init__(
        self,
        app: ASGIApp,
        quota: UploadQuota,
        refs: UploadRefs,
        forget: Callable[[str, int], bool],
    ) -> None:
        self.app = app
        self.quota = quota
        self.refs = refs
        self.forget = forget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_post(scope, f"{API_PREFIX}/upload"):
            await self._upload(scope, receive, send)
        elif _is_join(scope):
            await self._join(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = client_address(scope)
        declared = header(scope, b"content-length")
        if declared is None or not declared.isdigit():
            await refuse(send, 411, "An upload needs a Content-Length.")
            return
        length = int(declared)
        refusal = self.quota.reserve(client, length)
        if refusal is not None:
            LOGGER.warning("upload from %s refused: %s", client, refusal)
            await refuse(send, 429, f"Upload refused: {refusal}; try again once analysed.", 5)
            return
        response = ResponseRecorder(send, keep_body=True)
        stored: list[str] = []
        try:
            await self.app(scope, receive, response)
            stored = _stored_paths(response.body) if response.status == 200 else []
            self.refs.uploaded(stored)
        finally:
            self.quota.settle(client, length, stored)

    async def _join(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read first: the uploads it names are accounted for before the queue can run it.
        messages, complete = await _read_body(receive, MAX_JOIN_BODY)
        named = _named_files(b"".join(bytes(m.get("body", b"")) for m in messages))
        keys = self.refs.joining(named) if complete else []
        response = ResponseRecorder(send)
        try:
            await self.app(scope, _replay(messages, receive), response)
        finally:
            self.refs.joined(keys)
        status = response.status
        # 503: the queue is full or stopped. Not 401: a client without a login must not
        # get files deleted by naming them.
        if status != 503 or not complete:
            return
        client = client_address(scope)
        deleted = [
            path
            for path in named
            if (inode := self.quota.inode(client, path)) is not None
            and not self.refs.busy(path)
            and self.forget(path, inode)
        ]
        if deleted:
            LOGGER.info(
                "analysis refused (HTTP %s) for %s: deleted %d upload(s)",
                status,
                client,
                len(deleted),
            )
