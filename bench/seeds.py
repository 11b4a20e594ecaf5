"""Run-to-run spread: the quickstart trained with several seeds, mean and spread reported.

One number from one run says little: the seed moves the validation split, the head's
initialisation, the batch order, the augmentation and dropout. This runs the pipeline's
stages (``bench/paper_run.py``, without DVC or MLflow) once for the seed-independent part
(acquire, clean, weights) and then, per seed, the rest (preprocess, train, finetune,
evaluate) in a work folder of its own that links the shared data, and prints per seed and
as mean, sample standard deviation and range: test and leakage-free accuracy of the base
and fine-tuned models, the per-source views, the leakage-free ECE after calibration and
the minimum leakage-free class recall.

    python bench/seeds.py --mirror ../shared/datasets --work /tmp/seeds --seeds 1,2,3
    python bench/seeds.py ... --set train.finetune.epochs=2     # any paper_run override

Results go to ``--work``/seeds.json and the table to stdout. Rerunning the same command
resumes an interrupted sweep (finished seeds are read back, an interrupted one resumes from
its checkpoints); a seed that fails is reported and not averaged (exit status 1); a work
folder holds one recipe (``settings.json``), another ``--set`` there stops in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_STAGES = "acquire,clean,weights"
SEED_STAGES = "preprocess,audit,train,finetune,evaluate"
SHARED_OUTPUTS = ("data/raw", "data/interim", "models/pretrained")
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def paper_run(work: Path, stages: str, profile: str, overrides: list[str], mirror: Path | None):
    command = [
        sys.executable,
        str(ROOT / "bench" / "paper_run.py"),
        "--profile",
        profile,
        "--work",
        str(work),
        "--stages",
        stages,
    ]
    if mirror is not None:
        command += ["--mirror", str(mirror)]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, text=True)
    if done.returncode != 0:
        raise SeedFailed(f"seeds: {stages} failed in {work} (exit {done.returncode})")


class SeedFailed(RuntimeError):
    """A stage of one seed (or of the shared part) exited non-zero."""


def check_settings(folder: Path, profile: str, overrides: list[str]) -> None:
    """A seed folder belongs to one profile and set of overrides: a rerun with others
    (which would resume or reuse results of another recipe) stops in one line."""
    record = folder / "settings.json"
    wanted = {"profile": profile, "overrides": sorted(overrides)}
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise SystemExit(
                f"seeds: {folder} holds a run of {found}, not {wanted}: use another --work"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted))


def link_shared(shared: Path, work: Path) -> None:
    """The seed's work folder sees the shared stages' outputs (symlinks, nothing copied)."""
    for relative in SHARED_OUTPUTS:
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(shared / relative, target, target_is_directory=True)


def seed_row(work: Path) -> dict[str, Any]:
    """The headline numbers of one seed's evaluation."""
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    row: dict[str, Any] = {}
    for model in ("base", "finetuned"):
        values = metrics[model]
        for key, value in values.items():
            if key.endswith(".accuracy") and not key.startswith("robustness"):
                row[f"{model}.{key}"] = value
    fine = metrics["finetuned"]
    for view in ("leakage_free", "msoud_test", "msoud_leakage_free"):
        if f"{view}.accuracy" not in fine:
            continue
        row[f"finetuned.{view}.ece_before"] = fine.get(f"{view}.ece_before")
        row[f"finetuned.{view}.ece_after"] = fine.get(f"{view}.ece_after")
        row[f"finetuned.{view}.ece_floor"] = fine.get(f"{view}.ece_floor")
        row[f"finetuned.{view}.min_recall"] = min(
            fine.get(f"{view}.{name}_recall", float("nan")) for name in CLASSES
        )
    robustness = {
        key.removeprefix("robustness."): value
        for key, value in fine.items()
        if key.startswith("robustness.") and isinstance(value, int | float)
    }
    if "clean" in robustness:
        clean = robustness.pop("clean")
        worst = min(robustness, key=lambda name: robustness[name])
        row["finetuned.robustness.clean"] = clean
        row["finetuned.robustness.worst_drop"] = round(clean - robustness[worst], 4)
        row["finetuned.robustness.outside_0.05"] = float(
            sum(clean - value > 0.05 for value in robustness.values())
        )
        for name, value in robustness.items():
            row[f"finetuned.robustness.{name}"] = value
    row["finetuned.kept_starting_weights"] = float(
        json.loads((work / "metrics" / "finetune.json").read_text())["kept_starting_weights"]
    )
    return row


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, minimum and maximum of every key across seeds."""
    keys = sorted({key for row in rows for key in row})
    result = {}
    for key in keys:
        values = [float(row[key]) for row in rows if row.get(key) is not None]
        if not values:
            continue
        result[key] = {
            "mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument("--mirror", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    try:
        seeds = [int(text) for text in args.seeds.split(",") if text]
    except ValueError:
        raise SystemExit(
            f"seeds: --seeds {args.seeds!r} is not a comma-separated list of integers"
        ) from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"seeds: --seeds {args.seeds!r} needs distinct non-negative integers")
    work = args.work.resolve()
    shared = work / "shared"
    if not (shared / "data" / "interim" / "index.parquet").is_file():
        try:
            paper_run(shared, SHARED_STAGES, args.profile, args.overrides, args.mirror)
        except SeedFailed as error:
            raise SystemExit(str(error)) from None
    rows: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    for seed in seeds:
        # A finished seed is read back; an interrupted one resumes (its stages pick up
        # their checkpoints); a failed one is reported and left out of the averages.
        folder = work / f"seed-{seed}"
        check_settings(folder, args.profile, args.overrides)
        if not (folder / "metrics" / "eval.json").is_file():
            link_shared(shared, folder)
            overrides = [*args.overrides, f"common.seed={seed}"]
            try:
                paper_run(folder, SEED_STAGES, args.profile, overrides, None)
            except SeedFailed as error:
                failed[seed] = str(error)
                print(error, file=sys.stderr)
                continue
        rows[seed] = seed_row(folder)
    seeds = [seed for seed in seeds if seed in rows]
    summary = {
        "profile": args.profile,
        "overrides": args.overrides,
        "seeds": rows,
        "failed": failed,
        "spread": spread(list(rows.values())),
    }
    (work / "seeds.json").write_text(json.dumps(summary, indent=2))
    for seed, reason in failed.items():
        print(f"seed {seed} FAILED, not averaged: {reason}")
    print(f"\n{len(seeds)} seeds ({','.join(map(str, seeds))}), profile {args.profile}")
    print("| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | range |")
    print("|---" * (len(seeds) + 4) + "|")
    for key, stats in summary["spread"].items():
        cells = " | ".join(f"{rows[s].get(key, float('nan')):.4f}" for s in seeds)
        print(
            f"| {key} | {cells} | {stats['mean']:.4f} | {stats['sd']:.4f} | "
            f"{stats['min']:.4f}-{stats['max']:.4f} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
