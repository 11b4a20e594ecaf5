"""DVC stage ``clean``: one vocabulary, valid files, duplicates and leakage marked.

The science is :mod:`braintumor.data.cleaning` (pure steps on the files found); this entry
point reads the parameters and writes the index, the detail and headline metrics, the
composition table and the figures, each atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from braintumor.core.config import load_params
from braintumor.core.files import atomic_path, write_json
from braintumor.core.schema import ConfigError
from braintumor.data.cleaning import INDEX_COLUMNS, CleanError, clean, composition_table
from braintumor.data.imaging import ImageDecodeError, decode_image
from braintumor.reports import figures
from braintumor.reports.headline import data_headline


def _thumbnail(raw_dir: Path, relative: str) -> np.ndarray:
    """A raw file's grayscale pixels for the duplicate sheet; a blank tile if unreadable."""
    try:
        return decode_image((raw_dir / relative).read_bytes()).gray
    except (OSError, ImageDecodeError):
        return np.zeros((8, 8), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.stages.clean``: every path comes from ``dvc.yaml``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="data/raw from acquire")
    parser.add_argument("--index", required=True, type=Path, help="index table (.parquet)")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON (detail)")
    parser.add_argument("--headline", type=Path, help="the stage's DVC metric (a few numbers)")
    parser.add_argument("--composition", required=True, type=Path, help="composition CSV")
    parser.add_argument("--figures", required=True, type=Path, help="folder for figures")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        result = clean(args.raw, params, progress=not args.no_progress)
    except (CleanError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    frame, metrics, near_pairs = result.frame, result.metrics, result.near_pairs
    composition = composition_table(frame)
    with atomic_path(args.figures, directory=True) as folder:
        figures.composition_chart(composition, folder / "composition.png")
        figures.duplicate_sheet(
            frame,
            near_pairs,
            params.clean.example_pairs,
            folder / "duplicates.png",
            thumbnail=lambda relative: _thumbnail(args.raw, relative),
        )
    with atomic_path(args.index) as temporary:
        frame.drop(columns=["signature"]).reindex(columns=INDEX_COLUMNS).to_parquet(
            temporary, index=False
        )
    with atomic_path(args.composition) as temporary:
        composition.to_csv(temporary, index=False)
    write_json(args.metrics, metrics)
    if args.headline is not None:
        write_json(args.headline, data_headline(metrics))
    dropped = ", ".join(f"{k} {v}" for k, v in metrics["dropped"].items()) or "none"
    print(
        f"clean: {metrics['images_in']} images in, {metrics['kept']} kept; dropped: {dropped}; "
        f"{metrics['duplicates']['groups']} duplicate groups; "
        f"{metrics['leakage']['test_with_train_twin']} test images with a training twin"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
