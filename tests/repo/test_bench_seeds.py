"""``bench/seeds.py``, the seed sweep behind every quality number of docs/training.md: a
failed seed is reported and not averaged, a work folder holds one recipe, and the
robustness view is summarised per seed (clean, worst drop, how many beyond 0.05)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "seeds.py"


def load_seeds_module():
    spec = importlib.util.spec_from_file_location("bench_seeds_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_seed(folder: Path, robustness: dict[str, float]) -> None:
    fine = {
        "msoud_leakage_free.accuracy": 0.93,
        "msoud_leakage_free.ece_after": 0.02,
        **{
            f"msoud_leakage_free.{c}_recall": r
            for c, r in zip(
                ("glioma", "meningioma", "notumor", "pituitary"),
                (0.9, 0.95, 1.0, 0.97),
                strict=True,
            )
        },
        **{f"robustness.{name}": value for name, value in robustness.items()},
    }
    (folder / "metrics").mkdir(parents=True)
    (folder / "metrics" / "eval.json").write_text(
        json.dumps({"base": {"msoud_test.accuracy": 0.9}, "finetuned": fine})
    )
    (folder / "metrics" / "finetune.json").write_text(json.dumps({"kept_starting_weights": False}))


def test_a_seed_row_summarises_the_robustness_view(tmp_path: Path) -> None:
    seeds = load_seeds_module()
    write_seed(tmp_path, {"clean": 0.80, "noise_10": 0.78, "downscale_0.25": 0.72, "jpeg_30": 0.74})
    row = seeds.seed_row(tmp_path)
    assert row["finetuned.robustness.clean"] == 0.80
    assert row["finetuned.robustness.worst_drop"] == pytest.approx(0.08)
    assert row["finetuned.robustness.outside_0.05"] == 2.0  # downscale (0.08), jpeg (0.06)
    assert row["finetuned.msoud_leakage_free.min_recall"] == 0.9
    assert row["base.msoud_test.accuracy"] == 0.9


def run_sweep(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(work), "--seeds", "1,2", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_a_failed_seed_is_reported_and_not_averaged_and_a_folder_keeps_its_recipe(
    tmp_path: Path,
) -> None:
    work = tmp_path / "sweep"
    # The shared part counts as done; seed 2 already finished (its metrics are there).
    (work / "shared" / "data" / "interim").mkdir(parents=True)
    (work / "shared" / "data" / "interim" / "index.parquet").write_bytes(b"")
    bad = "common.image_size=5"  # refused by the parameters: seed 1's preprocess fails
    (work / "seed-2").mkdir()
    (work / "seed-2" / "settings.json").write_text(
        json.dumps({"profile": "quickstart", "overrides": [bad]})
    )
    write_seed(work / "seed-2", {"clean": 0.8, "noise_10": 0.79})
    done = run_sweep(work, "--set", bad)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "seed 1 FAILED, not averaged" in done.stdout
    summary = json.loads((work / "seeds.json").read_text())
    assert list(summary["failed"]) == ["1"] and list(summary["seeds"]) == ["2"]
    assert summary["spread"]["finetuned.robustness.worst_drop"]["mean"] == pytest.approx(0.01)
    assert "1 seeds (2)" in done.stdout

    other = run_sweep(work, "--set", "augment.noise=5")
    assert other.returncode != 0
    message = other.stderr.strip().splitlines()[-1]
    assert "seed-1 holds a run of" in message and "use another --work" in message


def test_bad_seed_lists_stop_in_one_line(tmp_path: Path) -> None:
    for text in ("1,x", "2,2", "-1"):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--work", str(tmp_path), f"--seeds={text}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert done.stderr.strip().splitlines()[-1].startswith("seeds: --seeds")
