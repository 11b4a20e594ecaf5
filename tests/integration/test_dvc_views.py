"""DVC's views of the pipeline read well in a terminal and render offline.

Code tier: the headline (``braintumor.reports.headline``) of a detail dict, including one made by
the evaluate stage's own functions. Integration: a temporary git + DVC repository whose
one stage writes small generated metrics and plot tables under this project's real
declarations (each stage's ``metrics`` and ``plots`` of ``dvc.yaml``, its top-level plots,
``params.yaml``, the profiles and ``.dvc/config``); real ``dvc repro`` and ``dvc exp run``;
``dvc metrics diff`` and the README's ``dvc exp show`` line must fit 120 columns; ``dvc plots
show`` must render every plot in headless Chromium with every non-file request aborted,
while DVC's own page (the control) renders none. The screenshot goes to
``test-artifacts/dvc-views/plots.png``.

Run as a script (``python tests/integration/test_dvc_views.py``), the module is that
stage's command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from braintumor.reports.headline import (
    HeadlineError,
    count_keys,
    data_headline,
    detail_tables,
    evaluation_headline,
    evaluation_run_metrics,
    flat_headline,
    phase_headline,
    preprocess_headline,
)

from conftest import committed_params_text, params_file

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
TERMINAL_COLUMNS = 120
MAX_HEADLINE_KEYS = 36
LEARNING_RATES = (1.0e-5, 3.0e-5)  # the baseline's (params.yaml) and the experiment's
SCREENSHOTS = REPO / "test-artifacts" / "dvc-views"
TIMEOUT_MS = 60_000


# --------------------------------------------------------------------------- code tier


def _flat_view(view: str, accuracy: float) -> dict[str, Any]:
    numbers = {
        f"{view}.accuracy": accuracy,
        f"{view}.macro_f1": accuracy - 0.01,
        f"{view}.ece_after": 0.05,
        f"{view}.ece_before": 0.09,
        f"{view}.macro_roc_auc": 0.97,
        f"{view}.count": 40,
    }
    numbers.update({f"{view}.{name}_recall": 0.5 + i / 10 for i, name in enumerate(CLASSES)})
    numbers.update({f"{view}.{name}_precision": 0.6 for name in CLASSES})
    return numbers


def test_headline_keeps_the_served_model_s_few_numbers() -> None:
    finetuned = {
        **_flat_view("sartaj_test", 0.5),
        **_flat_view("test", 0.812345),
        **_flat_view("leakage_free", 0.7),
        "temperature": 1.2,
        "robustness.clean": 0.55,
        "robustness.noise_5": 0.61,
        "robustness.jpeg_30": 0.66,
        "calibration_at_bound": False,
        "ood.threshold": 31.5,
        "ood.test.false_alarms": 0.012,
    }
    detail = {"base": _flat_view("test", 0.1), "finetuned": finetuned, "seconds": 12.0}
    headline = evaluation_headline(detail, CLASSES)
    assert list(headline) == ["test", "leakage_free", "sartaj_test", "robustness", "ood"]
    assert headline["test"] == {
        "accuracy": 0.8123,
        "macro_f1": 0.8023,
        "ece": 0.05,
        "recall": {"glioma": 0.5, "meningioma": 0.6, "notumor": 0.7, "pituitary": 0.8},
        "min_recall": 0.5,  # the weakest class, what the registry gate checks
    }
    assert headline["sartaj_test"] == {"accuracy": 0.5, "macro_f1": 0.49, "ece": 0.05}
    # the worst perturbation, not the unperturbed accuracy below it
    assert headline["robustness"] == {"worst_accuracy": 0.61}
    assert headline["ood"] == {"test.false_alarms": 0.012}  # not the fitted threshold
    assert count_keys(headline) == 8 + 8 + 3 + 1 + 1
    # the pipeline run's metrics in MLflow: the same numbers under DVC's column names
    flat = flat_headline(headline)
    assert len(flat) == count_keys(headline)
    assert flat["test.recall.glioma"] == 0.5 and flat["leakage_free.min_recall"] == 0.5
    assert flat["ood.test.false_alarms"] == 0.012


def test_headline_leaves_out_what_the_detail_does_not_define() -> None:
    finetuned = _flat_view("test", 0.9)
    del finetuned["test.notumor_recall"]  # no notumor image in this view: recall undefined
    headline = evaluation_headline({"finetuned": finetuned}, CLASSES)
    assert set(headline["test"]["recall"]) == {"glioma", "meningioma", "pituitary"}
    assert headline["test"]["min_recall"] == 0.5  # of the classes it has
    assert "robustness" not in headline and "ood" not in headline


@pytest.mark.parametrize(
    "detail",
    [{}, {"base": _flat_view("test", 0.9)}, {"finetuned": {"test.accuracy": "n/a"}}],
)
def test_headline_refuses_a_detail_without_the_served_model_s_test_view(detail) -> None:
    with pytest.raises(HeadlineError, match="finetuned"):
        evaluation_headline(detail, CLASSES)


def _probabilities(labels: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += skill
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def stage_detail(skill: float, seed: int) -> dict[str, Any]:
    """An ``eval.json`` detail made by the evaluate stage's own functions (calibration,
    every view with its report, both models, robustness) on generated probabilities."""
    from braintumor.core.config import load_params
    from braintumor.stages.evaluate import detail_metrics, evaluate_probabilities

    params = load_params(params_file())
    params = dataclasses.replace(
        params, evaluate=dataclasses.replace(params.evaluate, bootstrap_resamples=50)
    )
    rng = np.random.default_rng(seed)
    test_labels, val_labels = np.tile(np.arange(4), 20), np.tile(np.arange(4), 10)
    source, leakage_free = np.arange(80) % 2 == 0, np.arange(80) % 3 == 0
    views = {
        "test": np.ones(80, dtype=bool),
        "leakage_free": leakage_free,
        "msoud_test": source,
        "sartaj_test": ~source,
        "msoud_leakage_free": source & leakage_free,
        "sartaj_leakage_free": ~source & leakage_free,
    }
    results = {
        model: evaluate_probabilities(
            val_labels,
            _probabilities(val_labels, 2.0, rng),
            np.ones(40, dtype=bool),
            test_labels,
            _probabilities(test_labels, model_skill, rng),
            views,
            params,
            val_flagged=np.zeros(40, dtype=bool),
        )
        for model, model_skill in (("base", skill - 1.0), ("finetuned", skill))
    }
    robustness = [
        {"perturbation": name, "accuracy": float(rng.uniform(0.5, 0.9))}
        for name in ("clean", "noise_5", "jpeg_30", "rotate_10")
    ]
    metrics = detail_metrics(results, robustness)
    # what evaluate.run adds from fit_ood_detector (its real path: the tiny-project test)
    metrics["finetuned"].update(
        {
            "ood.threshold": 30.2,
            "ood.test.false_alarms": 0.0125,
            "ood.leakage_free.false_alarms": 0.0,
        }
    )
    return metrics


def test_headline_of_the_stage_s_detail_is_a_few_dozen_numbers() -> None:
    detail = stage_detail(2.5, seed=0)
    headline = evaluation_headline(detail, CLASSES)
    assert count_keys(detail) > 300  # what made `dvc metrics show` unreadable
    assert count_keys(headline) <= MAX_HEADLINE_KEYS
    assert headline["test"]["accuracy"] == round(detail["finetuned"]["test.accuracy"], 4)
    views = {
        "test",
        "leakage_free",
        "msoud_test",
        "sartaj_test",
        "msoud_leakage_free",
        "sartaj_leakage_free",
    }
    assert set(headline) == views | {"robustness", "ood"}


def test_the_evaluate_run_gets_tens_of_numbers_and_every_one_as_a_table() -> None:
    """MLflow's evaluate run: a few dozen metrics (the 400-odd of the detail cannot be
    charted), including everything the registry gate reads on either view it may use; the
    tables hold every number of the detail exactly once."""
    from braintumor.tracking.registry import gate_metrics

    detail = stage_detail(2.5, seed=0)
    picked = evaluation_run_metrics(detail, CLASSES)
    assert set(picked) == {"base", "finetuned"}
    assert 15 <= count_keys(picked) <= 40 < count_keys(detail)
    for model, numbers in picked.items():
        for key, value in numbers.items():
            assert value == round(detail[model][key], 4), key
    for view in ("test", "leakage_free"):  # registry.gate.view's choices
        assert gate_metrics(picked, view, tuple(CLASSES)) == gate_metrics(
            {"finetuned": {k: round(v, 4) for k, v in detail["finetuned"].items()}},
            view,
            tuple(CLASSES),
        )
    assert "finetuned.ood.test.false_alarms" not in picked  # nested like eval.json
    assert picked["finetuned"]["ood.test.false_alarms"] == 0.0125

    tables = detail_tables(detail)
    views = tables["views"]
    assert len(views) == 2 * 6  # one row per model and test view
    cells = [
        (row["model"], f"{row['view']}.{column}", value)
        for row in views
        for column, value in row.items()
        if column not in ("model", "view")
    ]
    cells += [(row["model"], row["name"], row["value"]) for row in tables["model"]]
    every = [(model, key, value) for model in picked for key, value in detail[model].items()]
    assert sorted(cells, key=str) == sorted(every, key=str)


@pytest.mark.integration
def test_evaluate_stage_writes_the_headline_of_its_own_detail(tiny_project, tmp_path) -> None:
    """The stage's writer (``--headline``) on two small trained models and real slices."""
    from braintumor.core.config import deep_merge
    from braintumor.stages.evaluate import main

    from conftest import TINY_OVERRIDES, evaluate_args, write_params

    overrides = deep_merge(TINY_OVERRIDES, {"evaluate": {"calibration": {"min_samples": 5}}})
    params = write_params(tmp_path / "params", overrides)
    headline_path = tmp_path / "metrics" / "evaluate.json"
    arguments = evaluate_args(tiny_project, tmp_path, params=params)
    assert main([*arguments, "--headline", str(headline_path), "--no-tracking"]) == 0
    detail = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    headline = json.loads(headline_path.read_text())
    assert headline == evaluation_headline(detail, CLASSES)
    assert count_keys(headline) <= MAX_HEADLINE_KEYS < count_keys(detail)


# --------------------------------------------------------------------------- declarations


def _dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _paths(entries: list) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


@pytest.mark.parametrize(
    ("stage", "headline", "detail"),
    [
        ("clean", "metrics/data_headline.json", "metrics/data.json"),
        ("preprocess", "metrics/preprocess_headline.json", "metrics/preprocess.json"),
        ("train", "metrics/frozen_headline.json", "metrics/frozen.json"),
        ("finetune", "metrics/finetune_headline.json", "metrics/finetune.json"),
        ("evaluate", "metrics/evaluate.json", "metrics/eval.json"),
    ],
)
def test_dvc_yaml_tracks_the_headline_as_the_metric_and_the_detail_as_an_output(
    stage: str, headline: str, detail: str
) -> None:
    declared = _dvc_yaml()["stages"][stage]
    command = declared["cmd"].split()
    assert command[command.index("--headline") + 1] == headline
    assert command[command.index("--metrics") + 1] == detail
    assert _paths(declared["metrics"]) == [headline]
    assert detail in _paths(declared["outs"])
    assert "src/braintumor/reports/headline.py" in declared["deps"]


def test_a_phase_headline_drops_timings_and_names() -> None:
    detail = _training_summary("finetune", 1e-4, time.perf_counter() - 5)
    detail["kept_starting_weights"] = True
    headline = phase_headline(detail)
    assert headline == {
        "best_epoch": 3,
        "best_val_accuracy": 0.8,
        "best_val_loss": 0.25,
        "epochs_run": 4,
        "kept_starting_weights": 1,
    }


def test_the_preprocess_headline_drops_the_digest_workers_and_timing() -> None:
    detail = {
        "counts": {"train": 4098, "val": 723, "test": 1234},
        "digest": "b926",
        "images": 6055,
        "images_per_second": 427.9,
        "seconds": 14.15,
        "workers": 2,
        "test_leakage_free": 452,
        "val_with_train_neighbour": 0,
        "neighbour_groups": 3639,
        "largest_neighbour_group": 47,
    }
    assert preprocess_headline(detail) == {
        "images": 6055,
        "test_leakage_free": 452,
        "val_with_train_neighbour": 0,
        "neighbour_groups": 3639,
        "counts": {"train": 4098, "val": 723, "test": 1234},
    }


def test_the_data_headline_keeps_counts_per_source_duplicates_and_leakage() -> None:
    detail = {
        "kept": 9000,
        "images_in": 9500,
        "files_in": 9501,
        "kept_by_source_split": {
            "msoud": {"train": 5000, "test": 1000},
            "sartaj": {"train": 2500, "test": 500},
        },
        "duplicates": {
            "groups": 600,
            "cross_source_groups": 1900,
            "cross_split_groups": 350,
            "near_pairs": 12000,
            "extra_copies": 800,
        },
        "leakage": {
            "test_with_train_twin": 700,
            "kept_test_leakage_free": 800,
            "by_source": {"msoud": {"in": 1311}},
        },
    }
    headline = data_headline(detail)
    assert headline == {
        "kept": 9000,
        "kept_by_source": {
            "msoud.train": 5000,
            "msoud.test": 1000,
            "sartaj.train": 2500,
            "sartaj.test": 500,
        },
        "duplicates": {"groups": 600, "cross_source_groups": 1900, "cross_split_groups": 350},
        "leakage": {"test_with_train_twin": 700, "kept_test_leakage_free": 800},
    }
    assert count_keys(headline) == 10 < count_keys(detail)


def test_dvc_config_names_the_page_the_makefile_builds() -> None:
    config = (REPO / ".dvc" / "config").read_text()
    template = re.search(r"^\s*html_template\s*=\s*(\S+)", config, re.M)
    built = re.search(r"^PLOTS_TEMPLATE := (\S+)", (REPO / "Makefile").read_text(), re.M)
    assert template and built, "plots.html_template or the Makefile's PLOTS_TEMPLATE is gone"
    assert Path(".dvc", template.group(1)) == Path(built.group(1))


# --------------------------------------------------------------------------- the stage


def _write_csv(path: Path, header: str, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")


def _training_summary(phase: str, learning_rate: float, started: float) -> dict[str, Any]:
    """A training stage's metrics file as train.py writes it: its timings differ per run."""
    return {
        "phase": phase,
        "backbone": "efficientnet_lite0",
        "best_epoch": 3,
        "best_val_accuracy": round(0.9 - learning_rate * 1000, 4),
        "best_val_loss": 0.25,
        "epochs_run": 4,
        "stopped_early": False,
        "wall_seconds": round(time.perf_counter() - started, 6),
        "images_per_second": round(4000 / (time.perf_counter() - started), 3),
    }


def _detail_key(seed: int, learning_rate: float) -> str:
    return f"{seed}:{learning_rate:g}"


def _roc_rows(skill: float, seed: int) -> list[dict]:
    """Both models' ROC points per class, by the stage's own writer, on generated
    probabilities (the fine-tuned model's a bit better)."""
    from braintumor.stages.evaluate import roc_rows

    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), 30)
    rows = []
    for model, model_skill in (("finetuned", skill), ("base", skill - 1.0)):
        rows += roc_rows(labels, _probabilities(labels, model_skill, rng), CLASSES, model)
    return rows


def write_prepared(root: Path) -> None:
    """The ``prepare`` stage's command: a data folder whose content (its digest in ``dvc
    exp show``) depends on the seed, as the real split does."""
    from braintumor.core.config import load_params

    seed = load_params(root / "params.yaml").common.seed
    folder = root / "data" / "processed"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "split.txt").write_text(f"split drawn with seed {seed}\n")


def write_views(root: Path) -> None:
    """The ``views`` stage's command: every metrics file and plot table the real stages
    declare, for the seed and fine-tuning learning rate of params.yaml with its profile
    (the detail was generated by the test beforehand)."""
    from braintumor.core.config import load_params

    started = time.perf_counter()
    params = load_params(root / "params.yaml")
    seed, learning_rate = params.common.seed, params.train.finetune.learning_rate
    detail = json.loads((root / "details.json").read_text())[_detail_key(seed, learning_rate)]
    metrics = root / "metrics"
    plots = metrics / "eval_plots"
    plots.mkdir(parents=True, exist_ok=True)
    (metrics / "eval.json").write_text(json.dumps(detail))
    (metrics / "evaluate.json").write_text(json.dumps(evaluation_headline(detail, CLASSES)))
    for phase in ("frozen", "finetune"):
        summary = _training_summary(phase, learning_rate, started)
        (metrics / f"{phase}.json").write_text(json.dumps(summary))
        (metrics / f"{phase}_headline.json").write_text(json.dumps(phase_headline(summary)))
        _write_csv(
            metrics / f"{phase}_history.csv",
            "epoch,loss,accuracy,val_loss,val_accuracy",
            [(e, 1 / e, 0.7 + e / 50, 1.2 / e, 0.65 + e / 40) for e in range(1, 6)],
        )
    processed = {
        "images": 120,
        "counts": {"train": 70 + seed % 7, "val": 10, "test": 40 - seed % 7},  # the split
        "seconds": time.perf_counter() - started,
    }
    (metrics / "preprocess.json").write_text(json.dumps(processed))
    headline = preprocess_headline(processed)
    (metrics / "preprocess_headline.json").write_text(json.dumps(headline))
    data = {"kept": 120, "dropped": {"duplicate": 7}, "duplicates": {"groups": 7, "pairs": 9}}
    (metrics / "data.json").write_text(json.dumps(data))
    (metrics / "data_headline.json").write_text(json.dumps(data_headline(data)))
    # The localise stage's metric (its own test: tests/unit/stages/test_localise.py).
    localisation = {"hirescam": {"block10_add": {"pointing": 0.41, "energy": 0.063}}}
    (metrics / "localisation.json").write_text(json.dumps(localisation))
    # The audit stage's metric (its own test: tests/integration/test_audit_stage.py).
    audit = {"label_issues": {"train": {"msoud": {"suspects": 3, "share": 0.05}}}}
    (metrics / "audit_headline.json").write_text(json.dumps(audit))
    _write_csv(
        metrics / "data_composition.csv",
        "split,source,label,count,group",
        [("train", "msoud", name, 10 + i, "train/msoud") for i, name in enumerate(CLASSES)],
    )
    _write_csv(
        plots / "confusion.csv",
        "model,actual,predicted",
        [("finetuned", a, p) for a in CLASSES for p in CLASSES[: 1 + len(a) % 3]],
    )
    roc = _roc_rows(1.2 + 5e3 * learning_rate, seed)
    _write_csv(plots / "roc.csv", "model,class,fpr,tpr", [tuple(row.values()) for row in roc])
    _write_csv(
        plots / "robustness.csv",
        "perturbation,accuracy,model",
        [("clean", 0.8, "finetuned"), ("noise_5", 0.7, "finetuned")],
    )


# --------------------------------------------------------------------------- integration


def _run(project: Path, *command: str, columns: int = TERMINAL_COLUMNS) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "COLUMNS": str(columns),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if command[0] == "dvc":
        command = (str(Path(sys.executable).parent / "dvc"), *command[1:])
    result = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{shlex.join(command)}: {result.stdout}{result.stderr}"
    return result.stdout


def _command(*arguments: str) -> str:
    """This module run as a stage's command (conftest sits in tests/, not beside it)."""
    script = shlex.join([sys.executable, str(Path(__file__).resolve()), *arguments])
    return f"PYTHONPATH={shlex.quote(str(REPO / 'tests'))} {script}"


def _views_dvc_yaml() -> dict[str, Any]:
    """Two stages: ``prepare`` (a data folder that depends on the seed) and ``views``
    with the real stages' metrics and plots declarations, the evaluate stage's detail
    output, and the finetune stage's parameters (profiles included); the real top-level
    plots."""
    stages = _dvc_yaml()["stages"]
    views: dict[str, Any] = {
        "cmd": _command(),
        "deps": ["data/processed"],
        "params": stages["finetune"]["params"],
        "outs": [{"metrics/eval.json": {"cache": False}}],
        "metrics": [entry for stage in stages.values() for entry in stage.get("metrics", [])],
        "plots": [entry for stage in stages.values() for entry in stage.get("plots", [])],
    }
    assert "metrics/eval.json" in _paths(stages["evaluate"]["outs"])
    prepare = {"cmd": _command("prepare"), "params": ["common.seed"], "outs": ["data/processed"]}
    return {"stages": {"prepare": prepare, "views": views}, "plots": _dvc_yaml()["plots"]}


def _new_project(
    tmp_path_factory: pytest.TempPathFactory, name: str, runs: list[tuple[int, float]]
) -> Path:
    """A git + DVC repository with this project's .dvc/config, plot templates, committed
    params.yaml, profiles and the two stages; ``details.json`` holds the evaluation detail
    of each (seed, fine-tuning learning rate) that will run."""
    template = REPO / ".dvc" / "offline-plots.html"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make install` (or `make plots-template`) builds it")
    project = tmp_path_factory.mktemp(name)
    _run(project, "git", "init", "-q")
    _run(project, "dvc", "init", "-q")
    shutil.copy2(REPO / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copy2(template, project / ".dvc" / template.name)
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots")
    (project / "params.yaml").write_text(committed_params_text())
    shutil.copytree(REPO / "profiles", project / "profiles")
    details = {
        _detail_key(seed, rate): stage_detail(1.2 + 5e3 * rate + seed % 3 / 5, seed=seed)
        for seed, rate in runs
    }
    (project / "details.json").write_text(json.dumps(details))
    dvc_yaml = _views_dvc_yaml()
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    return project


@pytest.fixture(scope="module")
def views_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary repository after `dvc repro` (committed) and one `dvc exp run`
    changing the fine-tuning learning rate (applied to the workspace)."""
    project = _new_project(tmp_path_factory, "views", [(42, rate) for rate in LEARNING_RATES])
    _run(project, "dvc", "repro", "-q")
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-qm", "baseline")
    change = f"train.finetune.learning_rate={LEARNING_RATES[1]}"
    _run(project, "dvc", "exp", "run", "-q", "-n", "lr-3e-5", "-S", change)
    return project


# The user's case: a clone (the paper profile committed, no results), then `make run`
# (the quickstart profile) and the same with another seed. Every metric column is then
# "changed" (the baseline has none) and so is the data folder's digest.
QUICKSTART_LEARNING_RATE = 3.0e-4  # profiles/quickstart.yaml's train.finetune.learning_rate
COMPARED = {"quick-42": 42, "quick-2027": 2027}


@pytest.fixture(scope="module")
def compare_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = [(seed, QUICKSTART_LEARNING_RATE) for seed in COMPARED.values()]
    project = _new_project(tmp_path_factory, "compare", runs)
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-qm", "a clone: no results committed")
    for name, seed in COMPARED.items():
        changes = ["-S", "profile=quickstart", "-S", f"common.seed={seed}"]
        _run(project, "dvc", "exp", "run", "-q", "-n", name, *changes)
    return project


def _widest(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


@pytest.mark.integration
def test_metrics_are_the_headlines_and_their_diff_fits_a_terminal(views_project: Path) -> None:
    shown = json.loads(_run(views_project, "dvc", "metrics", "show", "--json"))
    files = shown[""]["data"]
    assert "metrics/eval.json" not in files
    assert count_keys(files["metrics/evaluate.json"]["data"]) <= MAX_HEADLINE_KEYS
    diff = _run(views_project, "dvc", "metrics", "diff")
    assert "test.accuracy" in diff and "metrics/evaluate.json" in diff
    assert _widest(diff) <= TERMINAL_COLUMNS, diff


def _compare_command() -> list[str]:
    """What `make compare` runs (the README's "Comparing runs" names it)."""
    assert "make compare" in (REPO / "README.md").read_text(), "README does not name it"
    shown = subprocess.run(
        ["make", "-n", "--no-print-directory", "-f", str(REPO / "Makefile"), "compare"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return shlex.split(shown.replace("\\\n", " "))


COMPARED_COLUMNS = ("test.accuracy", "leakage_free.accuracy", "test.min_recall")


def _header(table: str) -> str:
    """The header lines of a `dvc exp show` table (above its first rule), joined: a
    parameter's long name wraps over several lines."""
    lines = table.splitlines()
    rule = next(i for i, line in enumerate(lines) if i > 0 and set(line.strip()) == {"─"})
    return "".join(line.strip() for line in lines[1:rule])


@pytest.mark.integration
def test_compare_shows_the_headline_and_the_changed_params_in_120_columns(
    compare_project: Path,
) -> None:
    """`make compare` at 120 columns on the user's two experiments:
    the experiments, test and leakage-free accuracy and the lowest class recall with their
    values, and the parameters that differ; no data counts, digests or creation time."""
    command = _compare_command()
    assert command[:3] == ["dvc", "exp", "show"], command
    table = _run(compare_project, *command)
    assert "…" not in table, f"columns collapsed at {TERMINAL_COLUMNS} columns:\n{table}"
    assert _widest(table) <= TERMINAL_COLUMNS, table
    header = _header(table)
    for column in (*COMPARED_COLUMNS, "profile", "common.seed"):
        assert column in header, f"{column} missing:\n{table}"
    for hidden in ("Created", "data/processed", "counts", "kept", "duplicates", "msoud", "ood"):
        assert hidden not in header, f"{hidden} shown:\n{table}"
    # Each experiment's row: its name, the three numbers (in the header's order), the
    # profile and the seed, none of them cut.
    details = json.loads((compare_project / "details.json").read_text())
    order = sorted(COMPARED_COLUMNS, key=header.index)
    for name, seed in COMPARED.items():
        row = next(line for line in table.splitlines() if f"[{name}]" in line)
        cells = row.split("]", 1)[1].split()
        detail = details[_detail_key(seed, QUICKSTART_LEARNING_RATE)]
        expected = flat_headline(evaluation_headline(detail, CLASSES))
        shown = dict(zip(order, map(float, cells[: len(order)]), strict=True))
        assert shown == pytest.approx({key: expected[key] for key in order}, abs=1e-4), row
        assert cells[len(order) :] == ["quickstart", str(seed)], row
    everything = _run(
        compare_project, "dvc", "exp", "show", "--no-pager", "--only-changed", columns=100_000
    )
    assert _widest(everything) > 2 * TERMINAL_COLUMNS  # the patterns are what make it fit


def test_compare_drops_no_parameter_section() -> None:
    """The compare line hides every column that is not a parameter by naming the
    parameters' sections; a section of params.yaml missing from it would hide that
    section's changes."""
    arguments = _compare_command()
    drop = re.compile(arguments[arguments.index("--drop") + 1])
    sections = yaml.safe_load(committed_params_text())
    for section, values in sections.items():
        column = f"{section}.x" if isinstance(values, dict) else section
        for name in (column, f"params.yaml:{column}", f"profiles/quickstart.yaml:{column}"):
            assert not drop.match(name), f"--drop would hide the parameter {name}"
    for name in (
        "Created",
        "test.accuracy",
        "data/processed",
        "metrics/frozen_headline.json:best_epoch",
    ):
        assert drop.match(name), f"--drop keeps {name}"


def _render(
    browser: Any, page_path: Path, screenshot: Path | None, timeout_ms: int = TIMEOUT_MS
) -> tuple[int, int, list]:
    """Open a `dvc plots show` page with every non-file request aborted; returns the plots
    it embeds, the plots drawn (vega's canvas or SVG, class ``marks``, inside a vega-embed
    container; the container's menu icon is an SVG too), and the aborted requests plus
    page errors."""
    expected = page_path.read_text().count("vegaEmbed(")
    blocked: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda error: blocked.append(f"page error: {error}"))

    def route(request_route: Any) -> None:
        if request_route.request.url.startswith("file:"):
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    page.goto(page_path.as_uri(), wait_until="load")
    drawn = "document.querySelectorAll('.vega-embed .marks').length"  # vega's drawing
    try:
        page.wait_for_function(f"{drawn} >= {expected}", timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: counted below instead
        pass
    count = page.evaluate(drawn)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot, full_page=True)
    page.close()
    return expected, count, blocked


@pytest.mark.integration
@pytest.mark.browser
def test_plots_render_offline_and_dvc_s_own_page_does_not(views_project: Path, browser) -> None:
    _run(views_project, "dvc", "plots", "show", "-o", "offline")
    page = views_project / "offline" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text() and "<script src" not in page.read_text()
    expected, drawn, blocked = _render(browser, page, SCREENSHOTS / "plots.png")
    assert expected >= 8, f"only {expected} plots on the page"  # 6 stage plots, 2 top-level
    assert drawn == expected and not blocked, (expected, drawn, blocked)

    from dvc_render.html import PAGE_HTML  # the control: DVC's page, libraries from a CDN

    (views_project / "dvc_page.html").write_text(PAGE_HTML)
    _run(views_project, "dvc", "plots", "show", "-o", "cdn", "--html-template", "dvc_page.html")
    expected, drawn, blocked = _render(browser, views_project / "cdn" / "index.html", None, 5_000)
    assert drawn == 0 and any("cdn.jsdelivr.net" in url for url in blocked), (drawn, blocked)


ROC_TABLE = "metrics/eval_plots/roc.csv"


def _roc_drawing(browser: Any, page_path: Path) -> dict[str, Any]:
    """The ROC plot of a `dvc plots` page drawn again with vega's SVG renderer (the page
    draws on a canvas): its line paths (one per series), panel titles and legend labels."""
    div = re.sub(r"[^A-Za-z0-9]", "_", ROC_TABLE)
    found = re.search(rf"var spec = ([^\n]*);\s*vegaEmbed\('#{div}'", page_path.read_text())
    assert found, f"{page_path}: no ROC plot"
    page = browser.new_page()
    page.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
    )
    page.goto(page_path.as_uri(), wait_until="load")
    drawing = page.evaluate(
        """async spec => {
            const box = document.createElement('div');
            document.body.appendChild(box);
            await vegaEmbed(box, spec, {renderer: 'svg', actions: false});
            const texts = selector => [...box.querySelectorAll(selector)].map(e => e.textContent);
            return {
                lines: box.querySelectorAll('.mark-line path').length,
                panels: texts('.role-column-header text'),
                legend: texts('.role-legend-label text'),
            };
        }""",
        json.loads(found.group(1)),
    )
    page.close()
    return drawing


@pytest.mark.integration
@pytest.mark.browser
def test_roc_plot_draws_a_curve_per_class_model_and_experiment(
    views_project: Path, browser
) -> None:
    """`dvc plots show` (one revision) and `dvc plots diff HEAD` (the baseline and the
    experiment): a panel per model, one ROC curve per class in each, per revision; DVC's
    linear template drew the whole table as one zigzag line per revision."""
    _run(views_project, "dvc", "plots", "show", "-o", "roc_show", ROC_TABLE)
    shown = _roc_drawing(browser, views_project / "roc_show" / "index.html")
    assert shown["panels"] == ["finetuned", "base"], shown
    assert shown["lines"] == 2 * len(CLASSES), shown
    assert set(CLASSES) <= set(shown["legend"]), shown
    _run(views_project, "dvc", "plots", "diff", "HEAD", "-o", "roc_diff", "--targets", ROC_TABLE)
    compared = _roc_drawing(browser, views_project / "roc_diff" / "index.html")
    assert compared["lines"] == 2 * 2 * len(CLASSES), compared
    assert {"workspace", "HEAD"} <= set(compared["legend"]), compared


if __name__ == "__main__":
    (write_prepared if sys.argv[1:] == ["prepare"] else write_views)(Path.cwd())
