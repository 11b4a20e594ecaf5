"""The page: upload a brain MRI slice, see the calibrated class probabilities and why.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braintumor.serving.app.handlers import DISPLAY_SIZE, Handlers, model_label
from braintumor.serving.predictor import Predictor

TITLE = "Brain tumour MRI classifier"
FILE_TYPES = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"]
INTRO = (
    "Upload one brain MRI slice (axial, coronal or sagittal; JPEG, PNG or DICOM). The model "
    "gives a calibrated probability for each class and a heat map of the image regions "
    "that drove its answer. A research demonstration, not a medical device."
)
# Display images and uploads never analysed are deleted this long after they were made
# (checked every CACHE_SWEEP_S); analysed uploads go at once.
CACHE_AGE_S = 300
CACHE_SWEEP_S = 60


@dataclass
class Page:
    """The gradio ``Blocks`` (not launched; ``server.serve`` launches it) and the handlers
    behind its events."""

    blocks: Any
    handlers: Handlers


def _cached_examples(blocks: Any) -> frozenset[str]:
    """Resolved paths of the files gradio copied into its cache to keep (the examples)."""
    kept: set[str] = set()
    for block in blocks.blocks.values():
        kept.update(str(Path(path).resolve()) for path in getattr(block, "keep_in_cache", ()))
    return frozenset(kept)


def _event_files(events: Any) -> set[str]:
    """Resolved paths of the files that gradio ``Event``s name among their inputs."""
    paths: set[str] = set()
    for event in list(events or ()):
        for value in getattr(getattr(event, "data", None), "data", None) or ():
            if isinstance(value, dict) and isinstance(value.get("path"), str):
                paths.add(str(Path(value["path"]).resolve()))
    return paths


def _queued_files(blocks: Any) -> set[str]:
    """Files that events waiting in the queue name (gradio keeps no public view of its
    queue: this reads its event lists defensively)."""
    queues = getattr(getattr(blocks, "_queue", None), "event_queue_per_concurrency_id", {})
    waiting: set[str] = set()
    for event_queue in list(queues.values()):
        waiting |= _event_files(getattr(event_queue, "queue", ()))
    return waiting


def _running_files(blocks: Any) -> set[str]:
    """Files that events the queue has taken out to run name: from the moment gradio
    takes one (its preprocessing comes before the handler) until it is done."""
    running: set[str] = set()
    for job in list(getattr(getattr(blocks, "_queue", None), "active_jobs", ()) or ()):
        running |= _event_files(job)
    return running


def build_app(
    predictor: Predictor,
    *,
    examples: Sequence[Path] = (),
    upload_folder: Path | None = None,
) -> Page:
    """The page and its handlers.

    API (through the queue only): ``/predict`` takes a file and the overlay opacity and
    returns the probabilities (a label), the predicted class, the overlay, the uploaded
    slice (both scaled to ``DISPLAY_SIZE``) and the message.
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    handlers = Handlers(predictor, upload_folder or Path(get_upload_folder()))
    with gr.Blocks(
        title=TITLE, analytics_enabled=False, delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S)
    ) as blocks:
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
        probabilities, predicted, overlay, shown, opacity = _result_row(gr, predictor)
        state = gr.State(None)
        if examples:
            gr.Examples(
                examples=[[str(path)] for path in examples],
                inputs=[upload],
                label="Examples from the test set (click one)",
            )
        gr.Markdown(f"**Model:** {model_label(predictor)}", elem_id="model")
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
    handlers.keep = _cached_examples(blocks)
    handlers.waiting = lambda: _queued_files(blocks)
    handlers.running = lambda: _running_files(blocks)
    return Page(blocks, handlers)


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
            # Names the method and layer served (bundle.json's exported.explanation).
            overlay = gr.Image(
                label=f"{predictor.explanation_label} overlay (predicted class)",
                elem_id="overlay",
                **image_options,
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
