"""Peak memory of ``python -m braintumor.serving.predict`` on hostile files, against a normal slice.

    .venv/bin/python bench/decode_memory.py                      # this tree
    .venv/bin/python bench/decode_memory.py --source /tmp/old/src  # e.g. `git archive` of HEAD

Each measurement is a fresh process that runs ``braintumor.serving.predict.main`` on one file with
a small untrained bundle (tinycnn, 64 px: the model's size does not matter here) and then
reports its peak resident set (``VmHWM``). The baseline is the same command on a real
224 x 224 MRI slice, so ``extra`` is what decoding the file cost beyond Python, TensorFlow
and the model. ``--source`` puts another ``src`` folder first on the import path, to
measure an older version of the package with the same files.

Files (written to a temporary folder): the attacker's 16-bit 6000 x 6000 PNG (about
90 kB), a Deflated DICOM that inflates to 400 MB, an RLE DICOM of 8 frames of 2048^2,
and a PNG whose header promises 60000 x 60000 pixels.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _child(argv: list[str]) -> None:
    """Run predict in this process, then print its outcome and peak RSS as JSON."""
    from contextlib import redirect_stdout

    from braintumor.serving.predict import main

    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer):
            code = main(argv)
        rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
        outcome = rows[0]["reason"] or rows[0]["status"] if rows else "no output"
    except BaseException as error:  # noqa: BLE001 - the bench reports what happened
        code, outcome = -1, f"crashed: {type(error).__name__}"
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"exit": code, "outcome": outcome, "peak_mb": peak_kb / 1024}))


def _bundle(folder: Path) -> Path:
    import keras

    from braintumor.core.schema import ModelParams, PreprocessParams
    from braintumor.model.classifier import build_model, feature_layer_name
    from braintumor.serving.bundle import BundleMeta, write_bundle

    classes = ("glioma", "meningioma", "notumor", "pituitary")
    model = build_model(ModelParams(backbone="tinycnn", weights="none", dense_units=(16,)), 64, 4)
    model.save(folder / "model.keras")
    meta = BundleMeta(classes, 64, PreprocessParams(), feature_layer_name("tinycnn"))
    write_bundle(folder / "bundle", folder / "model.keras", meta)
    _ = keras  # imported first so the model builds on the configured backend
    return folder / "bundle"


def _files(folder: Path) -> dict[str, Path]:
    import serving_helpers as helpers
    from conftest import mirror_dir

    files = {"normal MRI jpeg (baseline)": helpers.real_images(mirror_dir(), 1)[0]}
    png = folder / "ramp16.png"
    png.write_bytes(helpers.png16(6000))
    files[f"16-bit 6000x6000 PNG ({png.stat().st_size // 1000} kB)"] = png
    bomb = helpers.deflated_bomb(folder / "bomb.dcm", 400_000_000)
    files[f"Deflated DICOM -> 400 MB ({bomb.stat().st_size // 1000} kB)"] = bomb
    rle = helpers.rle_multiframe(folder / "rle.dcm", 2048, 8)
    files[f"RLE DICOM 8 x 2048^2 ({rle.stat().st_size // 1000} kB)"] = rle
    huge = folder / "huge.png"
    huge.write_bytes(helpers.png_header_only(60000, 60000))
    files["PNG header 60000x60000"] = huge
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="another src folder to import from")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if args.source is not None:
        env["PYTHONPATH"] = f"{args.source.resolve()}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        bundle = _bundle(folder)
        baseline = None
        print(f"{'file':45s} {'outcome':22s} {'peak MB':>8s} {'extra MB':>9s}")
        for label, path in _files(folder).items():
            command = [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--model",
                str(bundle),
                "--no-progress",
                "--params",
                str(folder / "none.yaml"),
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"outcome": "died", "peak_mb": 0.0}
            baseline = result["peak_mb"] if baseline is None else baseline
            extra = result["peak_mb"] - baseline
            print(f"{label:45s} {result['outcome']:22s} {result['peak_mb']:8.0f} {extra:9.0f}")


if __name__ == "__main__":
    main()
