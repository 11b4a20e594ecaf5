"""Shared fixtures: the real-data mirror and small trees of real images built from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mirror_dir() -> Path:
    """The team's read-only mirror of the data sets (../shared/datasets beside the repo)."""
    configured = os.environ.get("BRAINTUMOR_MIRROR")
    return Path(configured) if configured else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = mirror_dir()
    if not (path / "msoud").is_dir():
        pytest.fail(f"data mirror not found at {path}: set BRAINTUMOR_MIRROR")
    return path


def copy_sample(
    mirror: Path,
    destination: Path,
    source: str,
    per_class: int,
    splits: tuple[str, ...] = ("Training", "Testing"),
    offset: int = 0,
) -> list[Path]:
    """Copy ``per_class`` real images of every class folder of ``source`` (sorted names,
    starting at ``offset``) into ``destination/<split>/<class>/``; returns the copies."""
    copies = []
    for split in splits:
        for class_dir in sorted((mirror / source / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            files = sorted(p for p in class_dir.iterdir() if p.is_file())[offset:]
            target = destination / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in files[:per_class]:
                copies.append(Path(shutil.copy2(path, target / path.name)))
    return copies


@pytest.fixture
def small_mirror(mirror: Path, tmp_path: Path) -> Path:
    """A mirror of a few real images per class: msoud (6 train / 3 test per class) and
    sartaj-subset (2 / 1 per class)."""
    root = tmp_path / "mirror"
    copy_sample(mirror, root / "msoud", "msoud", 6, ("Training",))
    copy_sample(mirror, root / "msoud", "msoud", 3, ("Testing",))
    copy_sample(mirror, root / "sartaj-subset", "sartaj-subset", 2, ("Training",))
    copy_sample(mirror, root / "sartaj-subset", "sartaj-subset", 1, ("Testing",))
    return root


QUICKSTART_SOURCES = [
    {
        "name": "msoud",
        "uri": "kaggle://masoudnickparvar/brain-tumor-mri-dataset",
        "labels": {c: c for c in ("glioma", "meningioma", "notumor", "pituitary")},
    },
    {
        "name": "sartaj-subset",
        "uri": "kaggle://sartajbhuvaji/brain-tumor-classification-mri",
        "labels": {
            "glioma_tumor": "glioma",
            "meningioma_tumor": "meningioma",
            "no_tumor": "notumor",
            "pituitary_tumor": "pituitary",
        },
    },
]


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """Write the repository's params.yaml (paper profile) with ``overrides`` deep-merged
    into ``directory``; returns its path."""
    import yaml

    from braintumor.config import deep_merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    merged = deep_merge(raw, overrides or {})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path
