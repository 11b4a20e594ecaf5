"""The web app: upload a brain MRI slice, see the calibrated class probabilities and why.

    python -m braintumor.app                                  # the registry's champion
    python -m braintumor.app --model models/bundle --port 7860

The page takes a JPEG, PNG (or any format the pipeline reads) or a DICOM ``.dcm`` slice
and shows the calibrated probability of each class, the predicted class, the Grad-CAM
overlay of that class with an opacity slider (moving it only re-blends; the model is not
run again), the preprocessed image exactly as the model saw it, and which model answered.
Test-set images are offered as examples to click.

A bad upload (not an image, corrupt, truncated, empty, too large, a colour photograph,
blank, or far from the training images) gets a one-line message in the page, never a
stack trace; an image moderately far from the training images is classified with a
warning. Uploads live only in the app's private temporary folder (gradio's cache, set to a
fresh ``mkdtemp`` removed at exit), and the handler reads a file only after checking that
it lies in that folder: no path a client sends is opened.

Nothing is fetched from the internet: analytics and the version check are off, the theme's
fonts are served by the app itself, and no share link is made.

Serving layer: imports ``serving`` and the core, never a stage.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import Params
from braintumor.serving import (
    InputError,
    Predictor,
    ServingConfig,
    SetupError,
    format_bytes,
    open_model,
    overlay_image,
)

LOGGER = logging.getLogger("braintumor.app")

TITLE = "Brain tumour MRI classifier"
FILE_TYPES = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"]
INTRO = (
    "Upload one axial brain MRI slice (JPEG, PNG or DICOM). The model gives a calibrated "
    "probability for each class and a Grad-CAM map of the image regions that drove its "
    "answer. A research demonstration, not a medical device."
)


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


# --------------------------------------------------------------------------- handlers


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


class Handlers:
    """The app's event handlers, as plain methods (testable without a browser).

    ``analyse`` reads the uploaded file from gradio's upload folder, runs the checks, the
    model and Grad-CAM, and returns the page's outputs; ``blend`` re-blends the overlay
    from the stored slice and heatmap when the opacity slider moves.
    """

    def __init__(self, predictor: Predictor, upload_folder: Path) -> None:
        self.predictor = predictor
        self.upload_folder = upload_folder

    def empty(self, message: str) -> tuple[Any, ...]:
        return None, "", None, None, message, None

    def analyse(self, file_path: str | None, alpha: float) -> tuple[Any, ...]:
        """(probabilities by class, predicted class, overlay, preprocessed image, message,
        state for the slider)."""
        if not file_path:
            return self.empty("Upload a brain MRI slice (JPEG, PNG or DICOM).")
        started = time.perf_counter()
        path = Path(file_path)
        name = path.name
        try:
            if not _is_inside(path, self.upload_folder) or not path.is_file():
                LOGGER.warning("refused a file outside the upload folder: %r", file_path)
                raise InputError("not_uploaded", "only uploaded files can be analysed")
            limit = self.predictor.settings.max_upload_bytes
            size = path.stat().st_size
            if size > limit:
                raise InputError(
                    "too_large",
                    f"{name}: file too large ({format_bytes(size)}; the limit is "
                    f"{format_bytes(limit)})",
                )
            prepared = self.predictor.prepare(path.read_bytes(), name)
            probabilities, heatmaps = self.predictor.explain(prepared.image[None])
        except InputError as error:
            LOGGER.info("refused %s: %s", error.reason, error)
            return self.empty(f"Cannot analyse this file: {error}")
        except Exception:  # noqa: BLE001 - the page gets a message, the log the trace
            LOGGER.exception("analysis of %r failed", name)
            return self.empty(
                "Sorry, the analysis failed because of an internal error (logged on the server)."
            )
        classes = self.predictor.classes
        row = probabilities[0]
        best = int(np.argmax(row))
        confidences = {name_: float(p) for name_, p in zip(classes, row, strict=True)}
        predicted = f"{classes[best]} ({row[best]:.1%})"
        overlay = overlay_image(prepared.image, heatmaps[0], alpha)
        message = f"Analysed {name}: predicted {predicted}."
        if prepared.warning:
            message += f" Warning: {prepared.warning}."
        LOGGER.info("%s -> %s in %.0f ms", name, predicted, 1000 * (time.perf_counter() - started))
        state = {"image": prepared.image, "heatmap": heatmaps[0]}
        return confidences, predicted, overlay, prepared.image, message, state

    def blend(self, state: dict[str, np.ndarray] | None, alpha: float) -> Any:
        if not state:
            return None
        return overlay_image(state["image"], state["heatmap"], alpha)


# --------------------------------------------------------------------------- the page


def build_app(
    predictor: Predictor,
    *,
    examples: Sequence[Path] = (),
    upload_folder: Path | None = None,
) -> Any:
    """The gradio ``Blocks`` of the app (not launched).

    API: ``/predict`` takes a file and the overlay opacity and returns the probabilities
    (a label), the predicted class, the overlay, the preprocessed image and the message.
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    folder = upload_folder or Path(get_upload_folder())
    handlers = Handlers(predictor, folder)
    alpha = predictor.settings.overlay_alpha
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="MRI slice (JPEG, PNG or DICOM .dcm)",
                    file_types=FILE_TYPES,
                    type="filepath",
                    elem_id="upload",
                )
                message = gr.Textbox(label="Message", interactive=False, elem_id="message", lines=2)
                probabilities = gr.Label(
                    label="Calibrated probability", num_top_classes=len(predictor.classes),
                    elem_id="probabilities",
                )  # fmt: skip
                predicted = gr.Textbox(
                    label="Predicted class", interactive=False, elem_id="predicted"
                )
                gr.Textbox(
                    value=predictor.describe(), label="Model", interactive=False, elem_id="model"
                )
            with gr.Column(scale=1):
                overlay = gr.Image(
                    label="Grad-CAM overlay (predicted class)", type="numpy", format="png",
                    interactive=False, height=360, elem_id="overlay",
                )  # fmt: skip
                opacity = gr.Slider(
                    0.0, 1.0, value=alpha, step=0.05, label="Overlay opacity", elem_id="opacity"
                )
                preprocessed = gr.Image(
                    label="What the model saw (after preprocessing)", type="numpy",
                    format="png", interactive=False, image_mode="L", height=360,
                    elem_id="preprocessed",
                )  # fmt: skip
        state = gr.State(None)
        if examples:
            gr.Examples(
                examples=[[str(path)] for path in examples],
                inputs=[upload],
                label="Examples from the test set (click one)",
            )
        upload.change(
            handlers.analyse,
            inputs=[upload, opacity],
            outputs=[probabilities, predicted, overlay, preprocessed, message, state],
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
    return app


def build_parser(config: ServingConfig | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m braintumor.app", description="Serve the classifier as a web app."
    )
    parser.add_argument(
        "--model",
        help="a bundle folder or models:/<name>@<alias> (default: the registry's champion)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--examples", type=Path, nargs="*", help="example images (default: test images)"
    )
    parser.add_argument("--no-warm-up", action="store_true", help="skip tracing at start")
    return parser


def _private_upload_folder() -> Path:
    """A fresh private folder for gradio's uploads and outputs, removed at exit; must be
    set before gradio is imported."""
    configured = os.environ.get("GRADIO_TEMP_DIR")
    if configured:
        return Path(configured)
    folder = Path(tempfile.mkdtemp(prefix="braintumor-app-"))
    atexit.register(shutil.rmtree, folder, True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Offline: no analytics, no version check, no Hugging Face telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    upload_folder = _private_upload_folder()
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
    app = build_app(predictor, examples=examples, upload_folder=upload_folder)
    app.queue(default_concurrency_limit=1)
    _, local_url, _ = app.launch(
        server_name=args.host,
        server_port=args.port,
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
        max_file_size=2 * config.settings.max_upload_bytes,
    )
    LOGGER.info("model: %s; uploads kept in %s", predictor.describe(), upload_folder)
    print(f"Running on local URL: {local_url}", flush=True)
    # SIGTERM ends the app like Ctrl-C, so the upload folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
