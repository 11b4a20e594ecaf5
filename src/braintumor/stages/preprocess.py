"""DVC stage ``preprocess``: the grouped validation split and the cached uint8 arrays.

The work is :mod:`braintumor.data.preprocessing`; this entry point reads the clean
stage's index, runs it and writes the detail and headline metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from braintumor.core.config import load_params
from braintumor.core.files import write_json
from braintumor.core.schema import ConfigError
from braintumor.data.preprocessing import PreprocessError, preprocess
from braintumor.reports.headline import preprocess_headline


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.stages.preprocess``: every path comes from ``dvc.yaml``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="data/raw from acquire")
    parser.add_argument("--index", required=True, type=Path, help="index from clean")
    parser.add_argument("--out", required=True, type=Path, help="folder for the arrays")
    parser.add_argument("--figures", type=Path, help="folder for the example figures")
    parser.add_argument("--metrics", type=Path, help="metrics JSON (detail)")
    parser.add_argument("--headline", type=Path, help="the stage's DVC metric (a few numbers)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if not args.index.is_file():
            raise PreprocessError(f"{args.index}: index not found; run the clean stage")
        index = pd.read_parquet(args.index)
        metrics = preprocess(
            args.raw, index, params, args.out, args.figures, progress=not args.no_progress
        )
    except (PreprocessError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.metrics is not None:
        write_json(args.metrics, metrics)
    if args.headline is not None:
        write_json(args.headline, preprocess_headline(metrics))
    print(
        f"preprocess: {metrics['counts']} at {params.common.image_size} px, "
        f"{metrics['images_per_second']} img/s with {metrics['workers']} workers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
