"""The test images the page offers as examples to click.

From the processed test index (leakage-free rows first) once the pipeline has run, else
from the test split of the data mirror; each is checked with the app's own
decode-and-check path, since a mirror may hold files the app refuses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from braintumor.core.schema import Params
from braintumor.serving.predictor import InputError, Predictor

LOGGER = logging.getLogger(__name__)


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
    per_class = _from_test_index(data_dir, classes)
    if not any(per_class.values()):
        per_class = _from_mirror(_mirror_root(params, mirror), params, classes)
    return _round_robin(per_class, classes, count)


def _from_test_index(data_dir: Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    """The raw files of ``data/processed/test_index.csv`` by class (leakage-free first);
    empty lists when the pipeline has not run or the index cannot be read."""
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    index = data_dir / "processed" / "test_index.csv"
    if not index.is_file():
        return per_class
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
    return per_class


def _from_mirror(
    root: Path | None, params: Params | None, classes: Sequence[str]
) -> dict[str, list[Path]]:
    """The files of every source's test split in the mirror ``root``, by class."""
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    if root is None or params is None:
        return per_class
    for source in params.acquire.sources:
        test_folders = [name for name, split in source.splits.items() if split == "test"]
        for split_folder in test_folders:
            for label_folder, label in source.labels.items():
                folder = root / source.name / split_folder / label_folder
                if label in per_class and folder.is_dir():
                    per_class[label].extend(_visible_files(folder))
    return per_class


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _round_robin(
    per_class: dict[str, list[Path]], classes: Sequence[str], count: int
) -> list[Path]:
    """Up to ``count`` paths taken one class after another, so every class shows early."""
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
    usable: list[Path] = []
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
