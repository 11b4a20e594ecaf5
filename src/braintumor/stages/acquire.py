"""DVC stage ``acquire``: every raw data source, as found, into ``data/raw``.

The work (mirror, download, extraction limits, the atomic swap) is
:mod:`braintumor.data.sources`; this entry point reads the parameters, runs it and turns
its one-line errors into exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from braintumor.core.config import load_params
from braintumor.core.redaction import redact_text
from braintumor.core.schema import ConfigError
from braintumor.data.sources import AcquireError, acquire, format_summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m braintumor.stages.acquire --params params.yaml --out data/raw``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        report = acquire(params.acquire, args.out, base_dir=args.params.resolve().parent)
    except (AcquireError, ConfigError) as error:
        print(f"error: {redact_text(str(error))}", file=sys.stderr)
        return 1
    print(format_summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
