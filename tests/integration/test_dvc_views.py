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
    evaluation_headline,
    phase_headline,
    preprocess_headline,
)

from conftest import CHROMIUM, CHROMIUM_ARGS, committed_params_text, params_file

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
    }
    assert headline["sartaj_test"] == {"accuracy": 0.5, "macro_f1": 0.49, "ece": 0.05}
    # the worst perturbation, not the unperturbed accuracy below it
    assert headline["robustness"] == {"worst_accuracy": 0.61}
    assert headline["ood"] == {"test.false_alarms": 0.012}  # not the fitted threshold
    assert count_keys(headline) == 7 + 7 + 3 + 1 + 1


def test_headline_leaves_out_what_the_detail_does_not_define() -> None:
    finetuned = _flat_view("test", 0.9)
    del finetuned["test.notumor_recall"]  # no notumor image in this view: recall undefined
    headline = evaluation_headline({"finetuned": finetuned}, CLASSES)
    assert set(headline["test"]["recall"]) == {"glioma", "meningioma", "pituitary"}
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
    from braintumor.stages.evaluate import evaluate_probabilities, headline_metrics

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
        )
        for model, model_skill in (("base", skill - 1.0), ("finetuned", skill))
    }
    robustness = [
        {"perturbation": name, "accuracy": float(rng.uniform(0.5, 0.9))}
        for name in ("clean", "noise_5", "jpeg_30", "rotate_10")
    ]
    metrics = headline_metrics(results, robustness)
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


def write_views(root: Path) -> None:
    """The stage's command: every metrics file and plot table the real stages declare, for
    the learning rate in params.yaml (the detail was generated by the test beforehand)."""
    started = time.perf_counter()
    finetune = yaml.safe_load((root / "params.yaml").read_text())["train"]["finetune"]
    learning_rate = float(finetune["learning_rate"])  # PyYAML reads `3e-05` as a string
    detail = json.loads((root / "details.json").read_text())[f"{learning_rate:g}"]
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
    processed = {"images": 120, "counts": {"test": 80}, "seconds": time.perf_counter() - started}
    (metrics / "preprocess.json").write_text(json.dumps(processed))
    headline = preprocess_headline(processed)
    (metrics / "preprocess_headline.json").write_text(json.dumps(headline))
    data = {"kept": 120, "dropped": {"duplicate": 7}, "duplicates": {"groups": 7, "pairs": 9}}
    (metrics / "data.json").write_text(json.dumps(data))
    (metrics / "data_headline.json").write_text(json.dumps(data_headline(data)))
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
    _write_csv(
        plots / "roc.csv",
        "model,class,fpr,tpr",
        [("finetuned", name, f, min(1.0, f * 3)) for name in CLASSES for f in (0, 0.2, 1)],
    )
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
    }
    if command[0] == "dvc":
        command = (str(Path(sys.executable).parent / "dvc"), *command[1:])
    result = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{shlex.join(command)}: {result.stdout}{result.stderr}"
    return result.stdout


def _views_stage() -> dict[str, Any]:
    """One stage with the real stages' metrics and plots declarations, the evaluate
    stage's detail output, and the finetune stage's parameters (profiles included)."""
    stages = _dvc_yaml()["stages"]
    stage: dict[str, Any] = {
        "cmd": f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}",
        "params": stages["finetune"]["params"],
        "outs": [{"metrics/eval.json": {"cache": False}}],
        "metrics": [entry for stage in stages.values() for entry in stage.get("metrics", [])],
        "plots": [entry for stage in stages.values() for entry in stage.get("plots", [])],
    }
    assert "metrics/eval.json" in _paths(stages["evaluate"]["outs"])
    return stage


@pytest.fixture(scope="module")
def views_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary repository after `dvc repro` (committed) and one `dvc exp run`
    changing the fine-tuning learning rate (applied to the workspace)."""
    template = REPO / ".dvc" / "offline-plots.html"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make install` (or `make plots-template`) builds it")
    project = tmp_path_factory.mktemp("views")
    _run(project, "git", "init", "-q")
    _run(project, "dvc", "init", "-q")
    shutil.copy2(REPO / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copy2(template, project / ".dvc" / template.name)
    (project / "params.yaml").write_text(committed_params_text())
    shutil.copytree(REPO / "profiles", project / "profiles")
    details = {
        f"{rate:g}": stage_detail(2.0 + 100 * rate, seed=i) for i, rate in enumerate(LEARNING_RATES)
    }
    (project / "details.json").write_text(json.dumps(details))
    dvc_yaml = {"stages": {"views": _views_stage()}, "plots": _dvc_yaml()["plots"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    _run(project, "dvc", "repro", "-q")
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-qm", "baseline")
    _run(
        project,
        "dvc",
        "exp",
        "run",
        "-q",
        "-n",
        "lr-3e-5",
        "-S",
        f"train.finetune.learning_rate={LEARNING_RATES[1]}",
    )
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


def _readme_exp_show() -> list[str]:
    """The `dvc exp show ... --drop` line of the README's "Comparing runs"."""
    text = (REPO / "README.md").read_text()
    line = re.search(r"^dvc exp show .*--drop .*$", text, re.M)
    assert line, "README no longer has the `dvc exp show ... --drop` line"
    return shlex.split(line.group(0))


@pytest.mark.integration
def test_readme_exp_show_line_fits_120_columns_with_the_team_s_columns(
    views_project: Path,
) -> None:
    table = _run(views_project, *_readme_exp_show())
    assert "…" not in table, f"columns collapsed at {TERMINAL_COLUMNS} columns:\n{table}"
    assert _widest(table) <= TERMINAL_COLUMNS, table
    for column in ("test.accuracy", "leakage_free.accuracy", "learning_rate"):
        assert column in table, f"{column} missing:\n{table}"
    assert "lr-3e-5" in table and "3e-05" in table, table  # the experiment and its change
    everything = _run(
        views_project, "dvc", "exp", "show", "--no-pager", "--only-changed", columns=100_000
    )
    assert _widest(everything) > TERMINAL_COLUMNS  # the pattern is what makes it fit


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


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


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


if __name__ == "__main__":
    write_views(Path.cwd())
