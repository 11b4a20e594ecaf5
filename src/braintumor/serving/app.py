"""The web app: upload a brain MRI slice, see the calibrated class probabilities and why.

    python -m braintumor.serving.app                                  # the registry's champion
    python -m braintumor.serving.app --model models/bundle --port 7860
    python -m braintumor.serving.app --host 0.0.0.0 --auth-file /etc/braintumor/users

The page takes a JPEG, PNG (or any format the pipeline reads) or a DICOM ``.dcm`` slice
and shows the uploaded slice and the Grad-CAM overlay of the predicted class side by side
(both scaled to ``DISPLAY_SIZE`` pixels, so a 64 px model input is readable), the
calibrated probability of each class beside them, and an opacity slider that only
re-blends the overlay (the model is not run again). Test-set images are offered as
examples to click. The page names the model by its registered version or file hash,
never by a server path.

A bad upload (not an image, corrupt, truncated, empty, too large, a colour photograph,
blank, or far from the training images) gets a one-line message in the page, never a
stack trace; an image moderately far from the training images is classified with a
warning.

Hardening:

- **One analysis at a time, through a bounded queue.** The direct REST route
  (``/gradio_api/run/predict``), which would skip the queue and decode uploads in
  parallel, is closed (``api_open=False``: it answers 404); the page and ``gradio_client``
  use the queue, which runs ``concurrency_limit=1`` analysis per process and refuses
  events beyond ``--max-queue`` waiting ones ("Queue is full").
- **Uploads do not stay on disk.** The app keeps every upload and output in its own
  folder, ``<temp root>/run-XXXX`` (temp root: ``--temp-dir``, ``$BRAINTUMOR_APP_TEMP``
  or ``<tmp>/braintumor-app-<uid>``), set as gradio's ``GRADIO_TEMP_DIR`` and locked
  (``flock``) while the app runs. An uploaded file is deleted as soon as it has been read
  for analysis; display images and uploads never analysed are swept after
  ``CACHE_AGE_S``; the folder goes at exit; and at start the app deletes the folders of
  earlier runs whose lock is free (a run killed with ``kill -9`` leaves its uploads, with
  any DICOM's patient name, until the next start). Nothing outside the temp root is
  deleted. The handler reads a file only after checking that it lies in that folder: no
  path a client sends is opened.
- **A login beyond loopback.** Binding any address that is not loopback is refused
  unless ``--auth-file`` (or ``$BRAINTUMOR_APP_AUTH_FILE``) names a file of
  ``user:password`` lines; every route then needs a login (gradio's ``auth``). Plain
  HTTP: put a TLS proxy in front when the network is not trusted.

Nothing is fetched from the internet: analytics and the version check are off, the theme's
fonts are served by the app itself, and no share link is made.

Serving layer: imports ``serving`` and the core, never a stage.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from braintumor.core.config import Params
from braintumor.serving.predictor import (
    InputError,
    Predictor,
    ServingConfig,
    SetupError,
    decode_upload,
    format_bytes,
    open_model,
    overlay_image,
)

LOGGER = logging.getLogger("braintumor.serving.app")

TITLE = "Brain tumour MRI classifier"
FILE_TYPES = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"]
INTRO = (
    "Upload one axial brain MRI slice (JPEG, PNG or DICOM). The model gives a calibrated "
    "probability for each class and a Grad-CAM map of the image regions that drove its "
    "answer. A research demonstration, not a medical device."
)
# The slice and the overlay are shown this many pixels on their longer side: the model's
# input (64 to 224 px) at its own size is a stamp in an empty box.
DISPLAY_SIZE = 448
DEFAULT_MAX_QUEUE = 32
# Display images and uploads never analysed are deleted this long after they were made
# (checked every CACHE_SWEEP_S); analysed uploads go at once.
CACHE_AGE_S = 300
CACHE_SWEEP_S = 60
AUTH_ENV = "BRAINTUMOR_APP_AUTH_FILE"
TEMP_ENV = "BRAINTUMOR_APP_TEMP"
RUN_PREFIX = "run-"
LOCK_SUFFIX = ".lock"


# --------------------------------------------------------------------------- examples


def find_examples(
    count: int,
    classes: Sequence[str],
    *,
    params: Params | None,
    data_dir: Path = Path("data"),
    mirror: Path | None = None,
) -> list[Path]:
    """Up to ``count`` test images, one class after another: from the processed test index
    (leakage-free rows first) when the pipeline has run, else from the test split of the
    data mirror (``BRAINTUMOR_MIRROR``, ``acquire.mirror`` or ``../shared/datasets``)."""
    if count <= 0:
        return []
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    index = data_dir / "processed" / "test_index.csv"
    if index.is_file():
        import pandas as pd

        try:
            table = pd.read_csv(index)
            if "leakage_free" in table:
                table = table.sort_values("leakage_free", ascending=False, kind="stable")
            for label, path in zip(table["label"], table["path"], strict=True):
                candidate = data_dir / "raw" / str(path)
                if label in per_class and candidate.is_file():
                    per_class[label].append(candidate)
        except (KeyError, ValueError, OSError) as error:
            LOGGER.warning("examples: cannot read %s (%s)", index, error)
    if not any(per_class.values()):
        root = _mirror_root(params, mirror)
        if root is not None and params is not None:
            for source in params.acquire.sources:
                for split_folder, split in source.splits.items():
                    if split != "test":
                        continue
                    for label_folder, label in source.labels.items():
                        folder = root / source.name / split_folder / label_folder
                        if label in per_class and folder.is_dir():
                            per_class[label].extend(
                                sorted(
                                    p
                                    for p in folder.iterdir()
                                    if p.is_file() and not p.name.startswith(".")
                                )
                            )
    chosen: list[Path] = []
    depth = 0
    while len(chosen) < count and any(len(paths) > depth for paths in per_class.values()):
        for name in classes:
            if len(per_class[name]) > depth and len(chosen) < count:
                chosen.append(per_class[name][depth])
        depth += 1
    return chosen


def _mirror_root(params: Params | None, mirror: Path | None) -> Path | None:
    candidates = [
        mirror,
        Path(os.environ["BRAINTUMOR_MIRROR"]) if os.environ.get("BRAINTUMOR_MIRROR") else None,
        Path(params.acquire.mirror) if params is not None and params.acquire.mirror else None,
        Path.cwd().parent / "shared" / "datasets",
    ]
    for candidate in candidates:
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def usable_examples(predictor: Predictor, paths: Sequence[Path], count: int) -> list[Path]:
    """The first ``count`` of ``paths`` that the app accepts (a mirror may hold junk)."""
    usable = []
    for path in paths:
        if len(usable) >= count:
            break
        try:
            predictor.prepare(path.read_bytes(), path.name)
        except (InputError, OSError) as error:
            LOGGER.info("example %s skipped: %s", path, error)
            continue
        usable.append(path)
    return usable


# --------------------------------------------------------------------------- temp folder


@dataclass
class TempFolder:
    """The app's private folder for uploads and outputs, and the held lock that marks it
    as in use (a folder whose lock is free belongs to an app that is gone)."""

    path: Path
    lock_path: Path
    lock: IO[str]

    def remove(self) -> None:
        """Delete the folder, then its lock file (a folder without a lock is garbage)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()


def default_temp_root() -> Path:
    """``$BRAINTUMOR_APP_TEMP``, else a per-user folder in the system's temp folder."""
    configured = os.environ.get(TEMP_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"braintumor-app-{os.getuid()}"


def _folder_of(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name[: -len(LOCK_SUFFIX)])


def remove_stale_folders(root: Path) -> list[Path]:
    """Delete the run folders in ``root`` whose lock no process holds (their app exited
    without cleaning up, e.g. ``kill -9``), and run folders without a lock file; only
    ``run-*`` entries of ``root`` are touched. Returns the folders removed."""
    removed = []
    for lock_path in sorted(root.glob(f"{RUN_PREFIX}*{LOCK_SUFFIX}")):
        try:
            handle = lock_path.open("a")
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running app
            shutil.rmtree(_folder_of(lock_path), ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        removed.append(_folder_of(lock_path))
    # A lock file is made before its folder, so a folder without one is left-over.
    for folder in sorted(root.glob(f"{RUN_PREFIX}*")):
        lock_path = folder.with_name(folder.name + LOCK_SUFFIX)
        if folder.is_dir() and not folder.is_symlink() and not lock_path.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def claim_temp_folder(root: Path) -> TempFolder:
    """A fresh, locked run folder in ``root`` (made private), after removing stale ones."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid != os.getuid():
            raise SetupError(f"temp folder {root}: owned by another user (pass --temp-dir)")
        for stale in remove_stale_folders(root):
            LOGGER.info("removed the upload folder of an earlier run: %s", stale)
        while True:
            descriptor, name = tempfile.mkstemp(prefix=RUN_PREFIX, suffix=LOCK_SUFFIX, dir=root)
            handle = os.fdopen(descriptor, "w")
            fcntl.flock(handle, fcntl.LOCK_EX)  # only a cleaner probing it holds it, briefly
            lock_path = Path(name)
            # A cleaner may have removed the file between mkstemp and flock: retry then.
            if lock_path.exists() and lock_path.stat().st_ino == os.fstat(descriptor).st_ino:
                break
            handle.close()
        folder = _folder_of(lock_path)
        folder.mkdir(mode=0o700)
    except OSError as error:
        raise SetupError(f"temp folder {root}: {error.strerror or error}") from None
    return TempFolder(folder, lock_path, handle)


# --------------------------------------------------------------------------- login


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """The ``user:password`` lines of ``path`` (blank and ``#`` lines skipped). A file,
    not an argument: command lines are visible to every user of the machine."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SetupError(f"auth file {path}: cannot read it ({error})") from None
    users = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, separator, password = line.partition(":")
        if not separator or not user.strip() or not password:
            raise SetupError(f"auth file {path}: line {number}: expected user:password")
        users.append((user.strip(), password))
    if not users:
        raise SetupError(f"auth file {path}: no user:password line")
    return users


def resolve_auth(host: str, auth_file: Path | None) -> list[tuple[str, str]] | None:
    """The logins to require: those of ``auth_file``; none on loopback without one; a
    refusal for any other address without one (a page of medical images on a network)."""
    if auth_file is not None:
        return read_auth_file(auth_file)
    if is_loopback(host):
        return None
    raise SetupError(
        f"--host {host}: not a loopback address and no login set: pass --auth-file FILE "
        f"(lines user:password) or set {AUTH_ENV}"
    )


# --------------------------------------------------------------------------- handlers


def _is_inside(path: Path, folder: Path) -> bool:
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
    """The app's event handlers, as plain methods (testable without a browser).

    ``analyse`` reads the uploaded file from gradio's upload folder and deletes it, runs
    the checks, the model and Grad-CAM, and returns the page's outputs; ``blend``
    re-blends the overlay from the stored slice and heatmap when the slider moves.
    ``keep``: resolved paths never deleted (files gradio keeps in its cache).
    ``waiting``: resolved paths that events still in the queue name. Gradio stores an
    upload under its content hash, so two clients sending the same file (or clicking the
    same example) share one path: it is deleted after the last of them is analysed.
    """

    def __init__(
        self,
        predictor: Predictor,
        upload_folder: Path,
        keep: frozenset[str] = frozenset(),
        waiting: Callable[[], set[str]] = set,
    ) -> None:
        self.predictor = predictor
        self.upload_folder = upload_folder
        self.keep = keep
        self.waiting = waiting

    def empty(self, message: str) -> tuple[Any, ...]:
        return None, "", None, None, message, None

    def read_upload(self, path: Path) -> tuple[bytes, os.stat_result]:
        """The bytes of an upload in the upload folder and its status when read (which
        ``discard`` compares to tell a later identical upload from this one)."""
        if not _is_inside(path, self.upload_folder):
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

    @property
    def limit(self) -> int:
        return self.predictor.settings.max_upload_bytes

    def discard(self, path: Path, read: os.stat_result) -> None:
        """Delete an analysed upload (and its per-upload folder once empty): an upload (a
        DICOM carries the patient's name) stays on disk only until it is analysed. Kept:
        files gradio keeps, files a waiting event names, and a file uploaded again since
        it was read (a new inode: that upload's own analysis deletes it)."""
        resolved = path.resolve()
        if str(resolved) in self.keep or str(resolved) in self.waiting():
            return
        try:
            now = resolved.stat()
        except FileNotFoundError:
            return
        if (now.st_ino, now.st_ctime_ns) != (read.st_ino, read.st_ctime_ns):
            return
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
        try:
            data, read = self.read_upload(path)
            return self._outputs(path.name, data, alpha, started)
        except InputError as error:
            LOGGER.info("refused %s: %s", error.reason, error)
            return self.empty(f"Cannot analyse this file: {error}")
        except Exception:  # noqa: BLE001 - the page gets a message, the log the trace
            LOGGER.exception("analysis of %r failed", path.name)
            return self.empty(
                "Sorry, the analysis failed because of an internal error (logged on the server)."
            )
        finally:
            if read is not None:
                self.discard(path, read)

    def _outputs(self, name: str, data: bytes, alpha: float, started: float) -> tuple[Any, ...]:
        prepared = self.predictor.prepare(data, name)
        probabilities, heatmaps = self.predictor.explain(prepared.image[None])
        # Decoded again for display only once accepted (prepare keeps no copy).
        shown = fit_for_display(decode_upload(data, name, self.predictor.settings))
        classes = self.predictor.classes
        row = probabilities[0]
        best = int(np.argmax(row))
        confidences = {class_: float(p) for class_, p in zip(classes, row, strict=True)}
        predicted = f"{classes[best]} ({row[best]:.1%})"
        state = {"image": fit_for_display(prepared.image), "heatmap": heatmaps[0]}
        message = f"Analysed {name}: predicted {predicted}."
        if prepared.warning:
            message += f" Warning: {prepared.warning}."
        LOGGER.info("%s -> %s in %.0f ms", name, predicted, 1000 * (time.perf_counter() - started))
        return confidences, predicted, self.blend(state, alpha), shown, message, state

    def blend(self, state: dict[str, np.ndarray] | None, alpha: float) -> Any:
        if not state:
            return None
        return overlay_image(state["image"], state["heatmap"], alpha)


# --------------------------------------------------------------------------- the page


def _cached_examples(app: Any) -> frozenset[str]:
    """Resolved paths of the files gradio copied into its cache to keep (the examples)."""
    kept: set[str] = set()
    for block in app.blocks.values():
        kept.update(str(Path(path).resolve()) for path in getattr(block, "keep_in_cache", ()))
    return frozenset(kept)


def _queued_files(app: Any) -> set[str]:
    """Resolved paths of the files that events waiting in ``app``'s queue name (gradio
    keeps no public view of its queue: this reads its event lists defensively)."""
    waiting: set[str] = set()
    queues = getattr(getattr(app, "_queue", None), "event_queue_per_concurrency_id", {})
    for event_queue in list(queues.values()):
        for event in list(getattr(event_queue, "queue", ())):
            for value in getattr(getattr(event, "data", None), "data", None) or ():
                if isinstance(value, dict) and isinstance(value.get("path"), str):
                    waiting.add(str(Path(value["path"]).resolve()))
    return waiting


def build_app(
    predictor: Predictor,
    *,
    examples: Sequence[Path] = (),
    upload_folder: Path | None = None,
) -> Any:
    """The gradio ``Blocks`` of the app (not launched; ``serve`` launches it).

    API (through the queue only): ``/predict`` takes a file and the overlay opacity and
    returns the probabilities (a label), the predicted class, the overlay, the uploaded
    slice (both scaled to ``DISPLAY_SIZE``) and the message.
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    handlers = Handlers(predictor, upload_folder or Path(get_upload_folder()))
    blocks_options = {"title": TITLE, "analytics_enabled": False}
    with gr.Blocks(**blocks_options, delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S)) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            upload = gr.File(
                label="MRI slice (JPEG, PNG or DICOM .dcm)",
                file_types=FILE_TYPES,
                type="filepath",
                elem_id="upload",
                scale=2,
            )
            message = gr.Textbox(
                label="Message", interactive=False, elem_id="message", lines=3, scale=3
            )
        outputs = _result_row(gr, predictor)
        state = gr.State(None)
        if examples:
            gr.Examples(
                examples=[[str(path)] for path in examples],
                inputs=[upload],
                label="Examples from the test set (click one)",
            )
        gr.Markdown(f"**Model:** {model_label(predictor)}", elem_id="model")
        probabilities, predicted, overlay, shown, opacity = outputs
        upload.change(
            handlers.analyse,
            inputs=[upload, opacity],
            outputs=[probabilities, predicted, overlay, shown, message, state],
            api_name="predict",
            concurrency_limit=1,
        )
        opacity.change(
            handlers.blend,
            inputs=[state, opacity],
            outputs=[overlay],
            api_visibility="private",
            show_progress="hidden",
            trigger_mode="always_last",
            queue=False,
        )
    handlers.keep = _cached_examples(app)
    handlers.waiting = lambda: _queued_files(app)
    return app


def _result_row(gr: Any, predictor: Predictor) -> tuple[Any, ...]:
    """The slice and its overlay side by side at display size, the probabilities beside
    them; returns (probabilities, predicted, overlay, slice, opacity)."""
    image_options = {
        "type": "numpy",
        "format": "png",
        "interactive": False,
        "height": DISPLAY_SIZE,
        "show_label": True,
        # No "share" button: it posts the image to Hugging Face discussions.
        "buttons": ["download", "fullscreen"],
    }
    with gr.Row(equal_height=False):
        shown = gr.Image(label="Uploaded slice", elem_id="slice", scale=3, **image_options)
        with gr.Column(scale=3):
            overlay = gr.Image(
                label="Grad-CAM overlay (predicted class)", elem_id="overlay", **image_options
            )
            opacity = gr.Slider(
                0.0,
                1.0,
                value=predictor.settings.overlay_alpha,
                step=0.05,
                label="Overlay opacity (0: the slice as the model saw it)",
                elem_id="opacity",
            )
        with gr.Column(scale=2, min_width=260):
            predicted = gr.Textbox(label="Predicted class", interactive=False, elem_id="predicted")
            probabilities = gr.Label(
                label="Calibrated probability",
                num_top_classes=len(predictor.classes),
                elem_id="probabilities",
            )
    return probabilities, predicted, overlay, shown, opacity


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    auth: list[tuple[str, str]] | None,
    max_queue: int,
    max_file_size: int,
) -> str:
    """Queue and launch ``app`` in a server thread; returns its local URL.

    The direct REST route is closed (``api_open=False``), so every analysis goes through
    the queue: one at a time (``concurrency_limit=1``), at most ``max_queue`` waiting.
    """
    app.queue(api_open=False, max_size=max_queue, default_concurrency_limit=1)
    _, local_url, _ = app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        auth_message="Log in to use the brain tumour MRI classifier." if auth else None,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        show_error=False,
        mcp_server=False,
        # Gradio 6 keeps every run (inputs and outputs) in the browser by default and
        # offers to sync them to a Hugging Face bucket: not for medical images.
        run_history=False,
        footer_links=["api", "settings"],
        # The transport limit; files between the two limits get the app's own message.
        max_file_size=max_file_size,
    )
    return local_url


# --------------------------------------------------------------------------- command


def build_parser(config: ServingConfig | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m braintumor.serving.app", description="Serve the classifier as a web app."
    )
    parser.add_argument(
        "--model",
        help="a bundle folder or models:/<name>@<alias> (default: the registry's champion)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any but loopback needs --auth-file",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--examples", type=Path, nargs="*", help="example images (default: test images)"
    )
    parser.add_argument("--no-warm-up", action="store_true", help="skip tracing at start")
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=Path(os.environ[AUTH_ENV]) if os.environ.get(AUTH_ENV) else None,
        help=f"require a login: a file of user:password lines (default: ${AUTH_ENV})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="analyses that may wait in the queue; more are refused (queue full)",
    )
    parser.add_argument(
        "--temp-dir",
        type=Path,
        help=f"folder for the runs' upload folders (default: ${TEMP_ENV} or "
        "<tmp>/braintumor-app-<uid>)",
    )
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.max_queue < 1:
            raise SetupError(f"--max-queue {args.max_queue}: must be at least 1")
        auth = resolve_auth(args.host, args.auth_file)
        folder = claim_temp_folder(args.temp_dir or default_temp_root())
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # SIGTERM ends the app like Ctrl-C, so the upload folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _serve_until_stopped(args, auth, folder.path)
    except KeyboardInterrupt:
        return 0
    finally:
        folder.remove()


def _serve_until_stopped(
    args: argparse.Namespace, auth: list[tuple[str, str]] | None, folder: Path
) -> int:
    """Load the model, build and launch the app with ``folder`` as gradio's temp folder,
    and block until interrupted."""
    # Gradio reads these when it makes components: set before building the app.
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    # Offline: no analytics, no version check, no Hugging Face telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config, bundle = open_model(args.params, args.model)
    except SetupError as error:
        LOGGER.error("error: %s", error)
        return 1
    predictor = Predictor(bundle, config.settings)
    if not args.no_warm_up:
        predictor.warm_up()
    if args.examples is not None:
        candidates = list(args.examples)
    else:
        candidates = find_examples(
            4 * config.settings.examples + 8, predictor.classes, params=config.params
        )
    examples = usable_examples(predictor, candidates, config.settings.examples)
    app = build_app(predictor, examples=examples, upload_folder=folder)
    local_url = serve(
        app,
        host=args.host,
        port=args.port,
        auth=auth,
        max_queue=args.max_queue,
        max_file_size=2 * config.settings.max_upload_bytes,
    )
    LOGGER.info("model: %s; uploads kept in %s", predictor.describe(), folder)
    LOGGER.info(
        "login %s; queue: 1 analysis at a time, at most %d waiting",
        "required" if auth else "not required (loopback)",
        args.max_queue,
    )
    print(f"Running on local URL: {local_url}", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
