"""The pipeline's stages run in order without DVC or MLflow, timed, with a per-phase report.

For machines that have neither (the GPU machines here: JAX and PyTorch, no TensorFlow, no
DVC, no network). It runs ``dvc.yaml``'s stage commands (read from it) less their MLflow
options, in a work folder that gets ``params.yaml`` (``profile`` set to ``--profile``)
and a copy of ``profiles/``; ``--set`` overrides are written into the copied profile, so
they win over both files. Then it prints, per training phase: epochs run, the first
epoch's seconds (it holds the compilations) against the median later epoch, images/s,
seconds spent compiling, and the compilations per Keras step function (JAX only).

    python bench/paper_run.py --profile paper-jax --mirror ../shared/datasets --work /tmp/w
    # the layout before the compile-time fixes, for comparison:
    python bench/paper_run.py ... --set train.drop_remainder=false \\
        --set train.compilation_cache=null
    # CPU smoke test (a minute): small images, a subset, one epoch per phase
    python bench/paper_run.py --profile paper-jax --mirror ../shared/datasets --work /tmp/w \\
        --set common.image_size=32 --set train.subset_per_class=16 \\
        --set train.frozen.epochs=1 --set train.finetune.epochs=1 --set model.backbone=tinycnn \\
        --set model.gradcam_layer=auto

Stage outputs stay in the work folder; ``--out`` gets ``summary.json`` and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC_FILE = ROOT / "dvc.yaml"
# Options of the stage commands that name MLflow run files, with the flag that turns
# tracking off instead, per module.
TRACKING_OPTIONS = ("--parent-run-file", "--run-file")
UNTRACKED = {
    "braintumor.stages.train": ["--no-tracking"],
    "braintumor.stages.evaluate": ["--no-tracking"],
}
PHASE_METRICS = {"train": "frozen", "finetune": "finetune"}  # stage -> metrics/<name>.json


def pipeline_stages() -> dict[str, str]:
    """``dvc.yaml``'s stages in order, each with its command."""
    stages = yaml.safe_load(DVC_FILE.read_text())["stages"]
    return {name: " ".join(stage["cmd"].split()) for name, stage in stages.items()}


def stage_command(cmd: str) -> list[str]:
    """A ``dvc.yaml`` command (``python -m braintumor.stages.<stage> ...``) run by this Python,
    without its MLflow run-file options and with tracking turned off."""
    words = shlex.split(cmd)
    if words[:2] != ["python", "-m"]:
        raise ValueError(f"dvc.yaml: expected 'python -m ...', got {cmd!r}")
    kept: list[str] = []
    skip_value = False
    for word in words[1:]:
        if skip_value:
            skip_value = False
        elif word in TRACKING_OPTIONS:
            skip_value = True
        else:
            kept.append(word)
    return [sys.executable, *kept, *UNTRACKED.get(words[2], [])]


def parse_value(text: str) -> Any:
    """A ``--set`` value read as YAML: ``false`` -> False, ``null`` -> None, ``32`` -> 32."""
    return yaml.safe_load(text)


def set_dotted(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    """``mapping['a']['b'] = value`` for ``a.b``, creating the inner mappings."""
    *parents, last = dotted.split(".")
    for key in parents:
        mapping = mapping.setdefault(key, {})
        if not isinstance(mapping, dict):
            raise ValueError(f"--set {dotted}: {key} is not a mapping")
    mapping[last] = value


def prepare_work(work: Path, profile: str, overrides: list[str]) -> None:
    """``params.yaml`` with ``profile``, and ``profiles/`` with the overrides applied."""
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = profile
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if (work / "profiles").exists():
        shutil.rmtree(work / "profiles")
    shutil.copytree(ROOT / "profiles", work / "profiles")
    profile_file = work / "profiles" / f"{profile}.yaml"
    content = yaml.safe_load(profile_file.read_text()) if profile_file.is_file() else {}
    for item in overrides:
        key, separator, text = item.partition("=")
        if not separator:
            raise ValueError(f"--set {item}: expected key=value")
        set_dotted(content, key, parse_value(text))
    profile_file.write_text(yaml.safe_dump(content, sort_keys=False))


def run_stage(stage: str, cmd: str, work: Path, env: dict[str, str], log: Path) -> float:
    """Run one stage in ``work``; its output goes to ``log`` and, at the end, its tail to
    stdout. Raises ``RuntimeError`` naming the stage when it fails."""
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            stage_command(cmd), cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - started
    tail = log.read_text(errors="replace").splitlines()[-4:]
    print(f"[{stage}] exit {done.returncode} in {seconds:.1f} s: " + " | ".join(tail), flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}); see {log}")
    return seconds


def phase_row(metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    compiles = metrics.get("compiles") or {}
    return {
        "wall_s": round(wall, 1),
        "epochs": metrics["epochs_run"],
        "first_epoch_s": metrics.get("first_epoch_seconds"),
        "later_epoch_s": metrics.get("later_epoch_seconds"),
        "images_per_s": metrics.get("images_per_second"),
        "compile_s": metrics.get("compile_seconds"),
        "compiles": compiles,
        "cache_hits": metrics.get("compile_cache_hits"),
        "best_val_accuracy": round(metrics["best_val_accuracy"], 4),
        "train_images": metrics["train_images"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper-jax")
    parser.add_argument("--mirror", type=Path, help="BRAINTUMOR_MIRROR for the acquire stage")
    parser.add_argument("--work", type=Path, required=True, help="folder the stages run in")
    parser.add_argument("--stages", help="comma-separated dvc.yaml stages (default: all)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out", type=Path, help="folder for summary.json")
    args = parser.parse_args(argv)
    commands = pipeline_stages()
    stages = [s for s in (args.stages or ",".join(commands)).split(",") if s]
    unknown = sorted(set(stages) - set(commands))
    if unknown:
        parser.error(f"unknown stages {unknown} (known: {', '.join(commands)})")

    work = args.work.resolve()
    prepare_work(work, args.profile, args.overrides)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.pop("KERAS_BACKEND", None)  # the stages set it from train.backend
    if args.mirror is not None:
        env["BRAINTUMOR_MIRROR"] = str(args.mirror.resolve())
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"profile": args.profile, "overrides": args.overrides, "stages": {}}
    failed = None
    started = time.perf_counter()
    for stage in stages:
        try:
            wall = run_stage(stage, commands[stage], work, env, logs / f"{stage}.log")
        except RuntimeError as error:
            failed = str(error)
            break
        summary["stages"][stage] = {"wall_s": round(wall, 1)}
        if stage in PHASE_METRICS:
            metrics = json.loads((work / "metrics" / f"{PHASE_METRICS[stage]}.json").read_text())
            summary["stages"][stage] = phase_row(metrics, wall)
        if stage == "evaluate":
            view = json.loads((work / "metrics" / "eval.json").read_text())["finetuned"]
            summary["stages"][stage]["test_accuracy"] = round(view["test.accuracy"], 4)
    summary["total_s"] = round(time.perf_counter() - started, 1)
    summary["failed"] = failed

    print(f"\nprofile {args.profile}, overrides {args.overrides or 'none'}")
    print(
        "| stage | wall s | epochs | first epoch s | later epoch s | img/s | compile s "
        "| compiles | cache hits | best val acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage, row in summary["stages"].items():
        compiles = ", ".join(f"{k} {v}" for k, v in row.get("compiles", {}).items())
        cells = [
            row.get(key, "")
            for key in ("epochs", "first_epoch_s", "later_epoch_s", "images_per_s", "compile_s")
        ]
        print(
            f"| {stage} | {row['wall_s']} | "
            + " | ".join(str(c) for c in cells)
            + f" | {compiles} | {row.get('cache_hits', '')} | "
            f"{row.get('best_val_accuracy', row.get('test_accuracy', ''))} |"
        )
    print(f"total {summary['total_s']} s" + (f"; FAILED: {failed}" if failed else ""))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
