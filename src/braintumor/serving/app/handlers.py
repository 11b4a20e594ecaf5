"""The page's event handlers as plain methods, testable without a browser or a server.

``analyse`` reads an upload from the app's upload folder (and only from there: no path a
client sends is opened elsewhere), deletes it whatever the outcome, runs the checks, the
model and Grad-CAM, and returns the page's outputs; ``blend`` re-blends the overlay when
the opacity slider moves (the model is not run again); ``forget`` deletes the upload of
an analysis the queue refused, which no handler will ever read.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.serving.predictor import (
    InputError,
    Predictor,
    decode_upload,
    format_bytes,
    overlay_image,
)

LOGGER = logging.getLogger(__name__)

# The slice and the overlay are shown this many pixels on their longer side: the model's
# input (64 to 224 px) at its own size is a stamp in an empty box.
DISPLAY_SIZE = 448


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, links resolved, lies in ``folder``."""
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def fit_for_display(gray: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """``gray`` scaled so its longer side is ``size`` pixels (area averaging down, cubic
    up): the browser would otherwise show a 64 px model input as a stamp."""
    import cv2

    height, width = gray.shape[:2]
    scale = size / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(gray, target, interpolation=interpolation)


def model_label(predictor: Predictor) -> str:
    """Which model answers, for the page: registered name and version, else the model
    file's hash; never the server's path to it."""
    meta = predictor.bundle.meta
    if meta.source.get("registered_model"):
        return predictor.describe()
    digest = meta.model_sha256[:12] or "unknown"
    return f"model sha256 {digest} ({len(predictor.classes)} classes, {meta.image_size} px input)"


class Handlers:
    """The app's event handlers.

    ``keep``: resolved paths never deleted (files gradio keeps in its cache: the examples).
    ``waiting``: resolved paths that events still in the queue name; ``running``: those
    that events the queue has started name (gradio's preprocessing included, before the
    handler is called). ``busy``: whether
    another upload of a path, or a request to analyse it, is under way
    (``uploads.UploadRefs``).
    Gradio stores an upload under its content hash, so two clients sending the same file
    (or clicking the same example) share one path: it is deleted after the last of them
    is analysed.
    """

    def __init__(
        self,
        predictor: Predictor,
        upload_folder: Path,
        keep: frozenset[str] = frozenset(),
        waiting: Callable[[], set[str]] = set,
        running: Callable[[], set[str]] = set,
    ) -> None:
        self.predictor = predictor
        self.upload_folder = upload_folder
        self.keep = keep
        self.waiting = waiting
        self.running = running
        self.busy: Callable[[str], bool] = lambda path: False
        # Uploads an analysis is reading now (a refused twin must not delete them).
        self._in_use: set[str] = set()
        self._in_use_lock = threading.Lock()

    def empty(self, message: str) -> tuple[Any, ...]:
        return None, "", None, None, message, None

    @property
    def limit(self) -> int:
        return self.predictor.settings.max_upload_bytes

    @contextmanager
    def _using(self, path: Path) -> Iterator[None]:
        key = str(path.resolve())
        with self._in_use_lock:
            self._in_use.add(key)
        try:
            yield
        finally:
            with self._in_use_lock:
                self._in_use.discard(key)

    def _is_needed(self, resolved: Path) -> bool:
        """Whether any user of the same upload path still needs the file (for an upload
        no running analysis owns: its own analysis would be among ``running``)."""
        key = str(resolved)
        with self._in_use_lock:
            in_use = key in self._in_use
        if in_use or key in self.keep or self.busy(key):
            return True
        return key in self.waiting() or key in self.running()

    def read_upload(self, path: Path) -> tuple[bytes, os.stat_result]:
        """The bytes of an upload in the upload folder and its status when read (which
        ``discard`` compares to tell a later identical upload from this one)."""
        if not is_inside(path, self.upload_folder):
            LOGGER.warning("refused a file outside the upload folder: %r", str(path))
            raise InputError("not_uploaded", "only uploaded files can be analysed")
        try:
            status = path.stat()
            if not stat.S_ISREG(status.st_mode):
                raise InputError("not_uploaded", "only uploaded files can be analysed")
            data = path.read_bytes() if status.st_size <= self.limit else b""
        except FileNotFoundError:
            raise InputError(
                "expired", f"{path.name}: the upload is no longer on the server; upload it again"
            ) from None
        if status.st_size > self.limit:
            self.discard(path, status)
            raise InputError(
                "too_large",
                f"{path.name}: file too large ({format_bytes(status.st_size)}; the limit is "
                f"{format_bytes(self.limit)})",
            )
        return data, status

    def discard(self, path: Path, read: os.stat_result) -> None:
        """Delete an analysed upload (and its per-upload folder once empty): an upload (a
        DICOM carries the patient's name) stays on disk only until it is analysed. Kept:
        files gradio keeps, files a waiting event names, and a file uploaded again since
        it was read (a new inode: that upload's own analysis deletes it)."""
        resolved = path.resolve()
        key = str(resolved)
        if key in self.keep or key in self.waiting() or self.busy(key):
            return
        try:
            now = resolved.stat()
        except FileNotFoundError:
            return
        if (now.st_ino, now.st_ctime_ns) != (read.st_ino, read.st_ctime_ns):
            return
        self._delete(resolved)

    def forget(self, file_path: str, inode: int) -> bool:
        """Delete the upload ``file_path`` of an analysis the queue refused (full, or
        stopped): no handler will read it. Only a regular file in the upload folder, still
        the one that was uploaded (``inode``: not a later upload of the same bytes), that
        no other waiting, running, kept or incoming use needs. Returns whether it was
        deleted."""
        path = Path(file_path)
        if not is_inside(path, self.upload_folder):
            return False
        resolved = path.resolve()
        try:
            now = resolved.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(now.st_mode) or now.st_ino != inode or self._is_needed(resolved):
            return False
        self._delete(resolved)
        return True

    def _delete(self, resolved: Path) -> None:
        resolved.unlink(missing_ok=True)
        if resolved.parent != self.upload_folder.resolve():
            try:
                resolved.parent.rmdir()
            except OSError:
                pass  # not empty: another upload of the same content

    def analyse(self, file_path: str | None, alpha: float) -> tuple[Any, ...]:
        """(probabilities by class, predicted class, overlay, the uploaded slice, message,
        state for the slider); the images are scaled for display. The upload is deleted
        once analysed, whatever the outcome."""
        if not file_path:
            return self.empty("Upload a brain MRI slice (JPEG, PNG or DICOM).")
        started = time.perf_counter()
        path = Path(file_path)
        read = None
        with self._using(path):
            try:
                data, read = self.read_upload(path)
                return self._outputs(path.name, data, alpha, started)
            except InputError as error:
                LOGGER.info("refused %s: %s", error.reason, error)
                return self.empty(f"Cannot analyse this file: {error}")
            except Exception:  # noqa: BLE001 - the page gets a message, the log the trace
                LOGGER.exception("analysis of %r failed", path.name)
                return self.empty(
                    "Sorry, the analysis failed because of an internal error (logged on the "
                    "server)."
                )
            finally:
                if read is not None:
                    self.discard(path, read)

    def _outputs(self, name: str, data: bytes, alpha: float, started: float) -> tuple[Any, ...]:
        prepared = self.predictor.prepare(data, name)
        probabilities, heatmaps = self.predictor.explain_prepared([prepared])
        # Decoded again for display only once accepted (prepare keeps no copy).
        shown = fit_for_display(decode_upload(data, name, self.predictor.settings))
        classes = self.predictor.classes
        row = probabilities[0]
        best = int(np.argmax(row))
        confidences = {class_: float(p) for class_, p in zip(classes, row, strict=True)}
        predicted = f"{classes[best]} ({row[best]:.1%})"
        # Kept per browser session for the slider, so kept small: the model's input (uint8)
        # and the map (float16), scaled for display only when blended.
        state = {"image": prepared.image, "heatmap": heatmaps[0].astype(np.float16)}
        message = f"Analysed {name}: predicted {predicted}."
        if prepared.warning:
            message += f" Warning: {prepared.warning}."
        LOGGER.info("%s -> %s in %.0f ms", name, predicted, 1000 * (time.perf_counter() - started))
        return confidences, predicted, self.blend(state, alpha), shown, message, state

    def blend(self, state: dict[str, np.ndarray] | None, alpha: float) -> Any:
        """The overlay at display size from the slider's state (``None`` without one: no
        analysis yet, or its session was evicted, see ``server.STATE_SESSIONS``)."""
        if not state:
            return None
        shown = fit_for_display(state["image"])
        return overlay_image(shown, state["heatmap"].astype(np.float32), alpha)
