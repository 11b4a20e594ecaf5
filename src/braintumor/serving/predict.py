"""Batch prediction: classify a file or a folder of MRI slices into a CSV or JSON table.

    python -m braintumor.serving.predict --model models/bundle data/new_scans --output out.csv
    python -m braintumor.serving.predict --model models:/brain-tumor-classifier@champion scan.dcm \\
        --output out.json --overlays overlays/

A folder is searched recursively for the supported formats (JPEG, PNG, BMP, TIFF, GIF,
WebP and DICOM ``.dcm``; hidden files and folders are skipped). Every file gets a row:
its predicted class and each class's calibrated probability, or ``status=error`` with a
machine-readable ``reason`` and a message; a bad file never stops the run. Files are read,
checked and preprocessed exactly as the web app does (``serving.Predictor``), and classified
in batches; ``--overlays`` also writes each file's Grad-CAM overlay as a PNG.

Exit status: 0 when the run completed (even if some files were refused), 1 when the model
cannot be loaded or there is no input, 2 on a usage error.

Serving layer: imports ``serving`` and the core, never a stage.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.core.files import atomic_path, write_text
from braintumor.serving.bundle import RUNTIME_CHOICES
from braintumor.serving.predictor import (
    SUPPORTED_EXTENSIONS,
    InputError,
    Predictor,
    PreparedImage,
    SetupError,
    open_model,
    overlay_image,
)

LOGGER = logging.getLogger("braintumor.serving.predict")
OK = "ok"
ERROR = "error"


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: a prediction, or the reason there is none."""

    file: str
    status: str  # "ok" or "error"
    reason: str = ""  # machine-readable, for errors (see serving and imaging)
    error: str = ""  # one-line message for a person
    warning: str = ""  # e.g. an unusual image that was still classified
    predicted_class: str = ""
    probabilities: dict[str, float] | None = None
    overlay: str = ""

    @property
    def confidence(self) -> float | None:
        if not self.probabilities:
            return None
        return self.probabilities[self.predicted_class]


def find_inputs(path: Path, *, all_files: bool = False) -> list[Path]:
    """The files to classify: ``path`` itself, or the supported files under the folder
    (recursively, sorted, hidden entries and symlinked folders skipped)."""
    if not path.is_dir():
        # A FIFO or device is listed too: it gets a ``not_a_file`` row, not silence.
        return [path] if path.exists() else []
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if all_files or Path(name).suffix.lower() in SUPPORTED_EXTENSIONS:
                found.append(Path(folder) / name)
    return found


def _prepare(predictor: Predictor, path: Path) -> PreparedImage | FileResult:
    """One file through the serving path (``Predictor.prepare_file``, as the app): a
    refusal of any kind becomes this file's row, never a stopped batch."""
    try:
        return predictor.prepare_file(path, path.name)
    except InputError as error:
        return FileResult(str(path), ERROR, error.reason, str(error))


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _overlay_path(overlays_dir: Path, path: Path, root: Path | None) -> Path:
    try:
        relative = path.relative_to(root) if root is not None else Path(path.name)
    except ValueError:
        relative = Path(path.name)
    # Keep the original extension in the name: a.jpg and a.png must not collide.
    return overlays_dir / relative.parent / f"{relative.name}.png"


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 RGB array
        raise OSError(f"{path}: PNG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_bytes(encoded.tobytes())


def predict_files(
    predictor: Predictor,
    paths: Sequence[Path],
    *,
    overlays_dir: Path | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> list[FileResult]:
    """Classify ``paths`` in batches; one ``FileResult`` per path, in order.

    The next batch is read and preprocessed in a background thread while the model runs
    on the current one. With ``overlays_dir`` the Grad-CAM overlay of each classified file
    is written there (folder structure below ``root`` kept).
    """
    from tqdm import tqdm

    results: list[FileResult] = []
    batches = list(_chunks(paths, predictor.settings.batch_size))
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        tqdm(total=len(paths), unit="file", disable=not progress, file=sys.stderr) as bar,
    ):
        for batch, prepared in _read_ahead(reader, predictor, batches):
            results.extend(_classify_batch(predictor, batch, prepared, overlays_dir, root))
            bar.update(len(batch))
    return results


def _read_ahead(
    reader: ThreadPoolExecutor, predictor: Predictor, batches: Sequence[Sequence[Path]]
) -> Iterator[tuple[Sequence[Path], list[PreparedImage | FileResult]]]:
    """Each batch with its files prepared, the next batch already being read and
    preprocessed in ``reader`` while the caller runs the model on this one."""

    def read(batch: Sequence[Path]) -> list[PreparedImage | FileResult]:
        return [_prepare(predictor, path) for path in batch]

    pending = reader.submit(read, batches[0]) if batches else None
    for index, batch in enumerate(batches):
        prepared = pending.result() if pending is not None else []
        pending = reader.submit(read, batches[index + 1]) if index + 1 < len(batches) else None
        yield batch, prepared


def _classify_batch(
    predictor: Predictor,
    batch: Sequence[Path],
    prepared: Sequence[PreparedImage | FileResult],
    overlays_dir: Path | None,
    root: Path | None,
) -> list[FileResult]:
    """One row per file of ``batch``, in order: the refusals as they are, the readable
    files classified together in one model call (with Grad-CAM when overlays are wanted)."""
    good = [item for item in prepared if isinstance(item, PreparedImage)]
    if not good:
        return [item for item in prepared if isinstance(item, FileResult)]
    heatmaps = None
    if overlays_dir is not None:
        probabilities, heatmaps = predictor.explain_prepared(good)
    else:
        probabilities = predictor.classify(good)
    results: list[FileResult] = []
    position = 0
    for path, item in zip(batch, prepared, strict=True):
        if isinstance(item, FileResult):
            results.append(item)
            continue
        overlay = ""
        if heatmaps is not None and overlays_dir is not None:
            target = _overlay_path(overlays_dir, path, root)
            alpha = predictor.settings.overlay_alpha
            _write_png(target, overlay_image(item.image, heatmaps[position], alpha))
            overlay = str(target)
        results.append(_prediction(path, item, probabilities[position], predictor.classes, overlay))
        position += 1
    return results


def _prediction(
    path: Path, item: PreparedImage, row: np.ndarray, classes: Sequence[str], overlay: str
) -> FileResult:
    """The row of a classified file: its most probable class and every probability."""
    return FileResult(
        file=str(path),
        status=OK,
        warning=item.warning or "",
        predicted_class=classes[int(np.argmax(row))],
        probabilities={c: float(p) for c, p in zip(classes, row, strict=True)},
        overlay=overlay,
    )


def result_columns(classes: Sequence[str]) -> list[str]:
    """The CSV header: fixed columns, then one ``p_<class>`` per class."""
    return [
        "file",
        "status",
        "reason",
        "error",
        "warning",
        "predicted_class",
        "confidence",
        *(f"p_{name}" for name in classes),
        "overlay",
    ]


def to_csv(results: Sequence[FileResult], classes: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=result_columns(classes), lineterminator="\n")
    writer.writeheader()
    for result in results:
        row: dict[str, Any] = {
            "file": result.file,
            "status": result.status,
            "reason": result.reason,
            "error": result.error,
            "warning": result.warning,
            "predicted_class": result.predicted_class,
            "confidence": "" if result.confidence is None else f"{result.confidence:.6f}",
            "overlay": result.overlay,
        }
        for name in classes:
            value = (result.probabilities or {}).get(name)
            row[f"p_{name}"] = "" if value is None else f"{value:.6f}"
        writer.writerow(row)
    return buffer.getvalue()


def to_json(results: Sequence[FileResult], classes: Sequence[str], model: str) -> str:
    document = {
        "model": model,
        "classes": list(classes),
        "results": [
            {
                "file": result.file,
                "status": result.status,
                "reason": result.reason or None,
                "error": result.error or None,
                "warning": result.warning or None,
                "predicted_class": result.predicted_class or None,
                "confidence": result.confidence,
                "probabilities": result.probabilities,
                "overlay": result.overlay or None,
            }
            for result in results
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def summary(results: Sequence[FileResult]) -> str:
    errors = Counter(result.reason for result in results if result.status == ERROR)
    classified = len(results) - sum(errors.values())
    text = f"{len(results)} files: {classified} classified, {sum(errors.values())} refused"
    if errors:
        text += " (" + ", ".join(f"{reason}: {count}" for reason, count in errors.items()) + ")"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m braintumor.serving.predict",
        description="Classify brain MRI slices (a file or a folder) into a CSV or JSON table.",
    )
    parser.add_argument("input", type=Path, help="an image or DICOM file, or a folder")
    parser.add_argument(
        "--model",
        help="a bundle folder or models:/<name>@<alias> (default: the registry's champion)",
    )
    parser.add_argument(
        "--output", type=Path, help="out.csv or out.json (default: CSV on standard output)"
    )
    parser.add_argument(
        "--overlays", type=Path, help="folder for overlay PNGs of the bundle's served map"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batch-size", type=int, help="images per model call")
    parser.add_argument(
        "--all-files", action="store_true", help="in a folder, try every file, not only known"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="auto",
        help="auto: the bundle's exported model (LiteRT) when it has one, else Keras",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not args.input.exists():
        LOGGER.error("error: %s: no such file or folder", args.input)
        return 1
    paths = find_inputs(args.input, all_files=args.all_files)
    if not paths:
        LOGGER.error("error: %s: no supported image files (%s)", args.input, SUPPORTED_EXTENSIONS)
        return 1
    try:
        config, bundle = open_model(args.params, args.model, args.runtime)
    except SetupError as error:
        LOGGER.error("error: %s", error)
        return 1
    settings = config.settings
    if args.batch_size is not None:
        import dataclasses

        settings = dataclasses.replace(settings, batch_size=args.batch_size)
    predictor = Predictor(bundle, settings)
    LOGGER.info("model: %s", predictor.describe())
    root = args.input if args.input.is_dir() else None
    results = predict_files(
        predictor,
        paths,
        overlays_dir=args.overlays,
        root=root,
        progress=not args.no_progress,
    )
    if args.output is None:
        sys.stdout.write(to_csv(results, predictor.classes))
    elif args.output.suffix.lower() == ".json":
        write_text(args.output, to_json(results, predictor.classes, predictor.describe()))
    else:
        write_text(args.output, to_csv(results, predictor.classes))
    LOGGER.info("%s%s", summary(results), f"; wrote {args.output}" if args.output else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
