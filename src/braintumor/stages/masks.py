"""DVC stage ``masks``: the figshare tumour masks, as found, into ``data/masks``.

The masks are not a classification source (no split or class folders), so ``acquire``
does not take them; this stage copies ``localise.masks`` (a folder in the data mirror, as
a source is found there, or a path) byte for byte with a manifest of sha256 sums, links
refused (``sources.copy_tree``), swapped in atomically. Like ``acquire`` it depends only
on its code and parameters, so a changed mirror is picked up with ``dvc repro -f masks``.
The ``localise`` stage depends on its output, so DVC tracks the masks it measured with.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from braintumor.core.config import load_params
from braintumor.core.files import atomic_path
from braintumor.core.redaction import redact_text
from braintumor.core.schema import ConfigError, LocaliseParams
from braintumor.data.masks import MaskError, read_meta
from braintumor.data.sources import AcquireError, copy_tree, mirror_folder


def masks_folder(localise: LocaliseParams, mirror: str | None, base_dir: Path) -> Path:
    """Where ``localise.masks`` is: an existing path (relative to the params file's
    folder), else that name in the mirror; one line saying where it looked otherwise."""
    path = Path(localise.masks).expanduser()
    direct = path if path.is_absolute() else base_dir / path
    if direct.is_dir():
        return direct
    root = mirror_folder(mirror, base_dir=base_dir)
    if root is not None and (root / localise.masks).is_dir():
        return root / localise.masks
    raise MaskError(
        f"localise.masks: {localise.masks!r} is neither a folder nor in the data mirror "
        f"({root if root is not None else 'no mirror: set BRAINTUMOR_MIRROR'})"
    )


def copy_masks(origin: Path, out: Path) -> int:
    """Copy ``origin`` to ``out`` atomically with ``manifest.csv``; returns the file count.
    ``meta.csv`` is checked first, so a wrong folder fails before anything is written."""
    read_meta(origin)
    with atomic_path(out, directory=True) as temporary:
        records = sorted(copy_tree(origin, temporary))
        with open(temporary / "manifest.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "bytes", "sha256"])
            writer.writerows(records)
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m braintumor.stages.masks --params params.yaml --out data/masks``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/masks"))
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        base_dir = args.params.resolve().parent
        origin = masks_folder(params.localise, params.acquire.mirror, base_dir)
        count = copy_masks(origin, args.out)
    except (AcquireError, ConfigError, MaskError, OSError) as error:
        print(f"error: {redact_text(str(error))}", file=sys.stderr)
        return 1
    print(f"masks: {count} files from {origin} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
