"""Two experiments compared in the real MLflow UI (headless Chromium, Playwright).

Two small experiments that differ in one parameter (``common.seed``) are logged through
the project's tracking code (``tracking.runs``: the frozen, finetune and evaluate runs
under one pipeline run each, the dataset, then ``log_pipeline_results`` as the evaluate
stage calls it) to a real ``mlflow server`` on loopback. No model is trained: what is
tested is what the runs carry and how the UI shows them, and the numbers are generated.
The UI is then checked as a reviewer uses it: the runs table lists both pipeline runs
with their headline accuracy, Source and Dataset filled; the chart view draws the headline
metrics for both; the compare page shows the parameter that differs.

Screenshots go to ``$BRAINTUMOR_TEST_ARTIFACTS/mlflow-compare/`` (default
``test-artifacts/mlflow-compare/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from conftest import REPO, running_mlflow_server, write_params

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ARTIFACTS_ENV = "BRAINTUMOR_TEST_ARTIFACTS"
TIMEOUT_MS = 60_000
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# Two experiments, one parameter apart; the second is the better one.
EXPERIMENTS = {"seed-42": (42, 0.81), "seed-2027": (2027, 0.87)}
HEADLINE = "test.accuracy"  # the column and chart the test looks for
SIZE = 16


def screenshots() -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV, REPO / "test-artifacts")) / "mlflow-compare"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def generated_detail(accuracy: float) -> dict[str, Any]:
    """An ``eval.json`` detail: both models, three test views with the statistics the
    evaluate stage reports per view and class, calibration, robustness, OOD."""
    detail: dict[str, Any] = {}
    for model, shift in (("finetuned", 0.0), ("base", -0.1)):
        flat: dict[str, Any] = {"temperature": 1.1, "calibration_at_bound": False}
        for view_shift, view in ((0.0, "test"), (-0.03, "leakage_free"), (0.01, "msoud_test")):
            value = accuracy + shift + view_shift
            flat.update(
                {
                    f"{view}.accuracy": value,
                    f"{view}.macro_f1": value - 0.01,
                    f"{view}.ece_before": 0.08,
                    f"{view}.ece_after": 0.04,
                    f"{view}.count": 40,
                }
            )
            for index, name in enumerate(CLASSES):
                for statistic in ("precision", "recall", "specificity", "f1", "roc_auc"):
                    flat[f"{view}.{name}_{statistic}"] = value - 0.02 * index
        if model == "finetuned":
            flat.update({"robustness.clean": accuracy, "robustness.noise_10": accuracy - 0.1})
            flat.update({"ood.threshold": 30.0, "ood.test.false_alarms": 0.01})
        detail[model] = flat
    return detail


def tiny_data(folder: Path, seed: int) -> Any:
    """A processed-data look-alike (its split depends on the seed, as the real one's does)."""
    from braintumor.training.inputs import ProcessedData, Split

    rng = np.random.default_rng(seed)
    splits, counts = {}, {}
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        images = rng.integers(0, 255, (len(labels), SIZE, SIZE, 1), dtype=np.uint8)
        splits[split] = Split(split, images, labels)
        counts[split] = {name: per_class for name in CLASSES}
    digest = hashlib.sha256(f"split {seed}".encode()).hexdigest()
    meta = {"digest": digest, "counts": counts, "classes": list(CLASSES)}
    return ProcessedData(folder, meta, splits)


def log_experiment(
    folder: Path, name: str, seed: int, accuracy: float, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """One `dvc exp run` as the tracking code records it: the frozen and finetune phases
    (per-epoch metrics, the datasets), the evaluate run and the pipeline results. Returns
    the run ids by name."""
    from braintumor.core.config import load_params
    from braintumor.reports.headline import (
        detail_tables,
        evaluation_headline,
        evaluation_run_metrics,
        flat_headline,
    )
    from braintumor.tracking.runs import log_pipeline_results, phase_run

    monkeypatch.setenv("DVC_EXP_NAME", name)
    folder.mkdir(parents=True)
    params = load_params(write_params(folder, {"common": {"seed": seed}}))
    data = tiny_data(folder, seed)
    previous = None
    for phase, epochs in (("frozen", 3), ("finetune", 2)):
        run_file = folder / f"{phase}_run.json"
        with phase_run(
            params, phase, run_file=run_file, parent_file=previous, project_root=REPO
        ) as run:
            for epoch in range(1, epochs + 1):
                run.log_epoch(epoch, {"val_loss": 1.0 / epoch, "val_accuracy": 0.5 + epoch / 10})
            run.log_dataset(data, np.arange(len(data.splits["train"])))
        previous = run_file
    detail = generated_detail(accuracy)
    detail_file = folder / "eval.json"
    detail_file.write_text(json.dumps(detail))
    evaluate_file = folder / "evaluate_run.json"
    with phase_run(
        params, "evaluate", run_file=evaluate_file, parent_file=previous, project_root=REPO
    ) as run:
        picked = evaluation_run_metrics(detail, CLASSES)
        run.log_metrics({f"{m}.{k}": v for m, values in picked.items() for k, v in values.items()})
    log_pipeline_results(
        params,
        project_root=REPO,
        run_file=evaluate_file,
        metrics=flat_headline(evaluation_headline(detail, CLASSES)),
        tables=detail_tables(detail),
        detail_file=detail_file,
        data=data,
    )
    runs = json.loads(evaluate_file.read_text())
    return {"pipeline": runs["parent_run_id"], "evaluate": runs["run_id"]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("mlflow-compare")
    with running_mlflow_server(folder) as url, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        runs = {
            name: log_experiment(folder / name, name, seed, accuracy, monkeypatch)
            for name, (seed, accuracy) in EXPERIMENTS.items()
        }
        experiment = requests.get(
            f"{url}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "brain-tumor-mri"},
            timeout=30,
        ).json()["experiment"]
        yield {"url": url, "runs": runs, "experiment_id": experiment["experiment_id"]}


def _api(url: str, endpoint: str, **query: str) -> dict[str, Any]:
    response = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    response.raise_for_status()
    return response.json()


def _pipeline_run(logged: dict[str, Any], name: str) -> dict[str, Any]:
    return _api(logged["url"], "runs/get", run_id=logged["runs"][name]["pipeline"])["run"]


def test_pipeline_runs_carry_the_headline_identity_source_and_dataset(logged) -> None:
    """Over REST: each pipeline run has the headline metrics, the identifying parameters
    only, Source and commit, a description, and the processed data as its dataset; its
    evaluate run a few dozen metrics and the detail as tables and the file."""
    from braintumor.reports.headline import evaluation_headline, flat_headline
    from braintumor.tracking.runs import IDENTITY_PARAMS

    for name, (seed, accuracy) in EXPERIMENTS.items():
        run = _pipeline_run(logged, name)
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        expected = flat_headline(evaluation_headline(generated_detail(accuracy), CLASSES))
        assert metrics == pytest.approx(expected)
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert sorted(params) == sorted(IDENTITY_PARAMS) and params["common.seed"] == str(seed)
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.runName"] == tags["dvc.exp_name"] == name
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
        assert tags["mlflow.source.git.commit"] == tags["git_commit"]
        digest = tags["data.digest"]
        assert f"DVC experiment `{name}`" in tags["mlflow.note.content"]
        assert digest[:16] in tags["mlflow.note.content"]
        (dataset,) = run["inputs"]["dataset_inputs"]
        assert dataset["dataset"]["name"] == "processed"
        assert dataset["dataset"]["digest"] == digest[:16]
        evaluate = _api(logged["url"], "runs/get", run_id=logged["runs"][name]["evaluate"])["run"]
        assert 15 <= len(evaluate["data"]["metrics"]) <= 40
        files = _api(logged["url"], "artifacts/list", run_id=evaluate["info"]["run_id"])
        folders = {item["path"] for item in files["files"]}
        assert {"tables", "metrics"} <= folders, folders
        listed = _api(
            logged["url"], "artifacts/list", run_id=evaluate["info"]["run_id"], path="tables"
        )
        assert {item["path"] for item in listed["files"]} == {
            "tables/views.json",
            "tables/model.json",
        }


@pytest.fixture
def page(browser, logged):
    """A page on the experiment's training view (the link the pipeline prints), the
    assistant panel closed; a fresh browser context, so no column choice is remembered."""
    from braintumor.tracking.runs import ui_url

    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(ui_url(logged["url"], logged["experiment_id"]))
    for name in EXPERIMENTS:
        page.get_by_text(name, exact=True).first.wait_for()
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    yield page
    context.close()


def _table_rows(page) -> dict[str, str]:
    """The runs table's rows by run name: the grid draws a row in pieces (the pinned name
    column and the scrolled columns), joined here by row index."""
    pieces = page.locator("[role=row][row-index]").evaluate_all(
        "rows => rows.map(row => [row.getAttribute('row-index'), row.innerText])"
    )
    joined: dict[str, str] = {}
    for index, text in pieces:
        joined[index] = joined.get(index, "") + "\n" + text
    return {name: text for text in joined.values() for name in EXPERIMENTS if f"\n{name}\n" in text}


def test_runs_table_lists_both_with_their_headline_source_and_dataset(logged, page) -> None:
    page.get_by_role("button", name="Columns").click()
    page.keyboard.type(HEADLINE)  # the column chooser's search box has the focus
    page.locator("span[title]").filter(has_text=re.compile(f"^{re.escape(HEADLINE)}$")).click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name=HEADLINE).first.wait_for()
    page.screenshot(path=str(screenshots() / "runs.png"), full_page=True)
    rows = _table_rows(page)
    assert set(rows) == set(EXPERIMENTS), rows
    for name, (_, accuracy) in EXPERIMENTS.items():
        tags = {t["key"]: t["value"] for t in _pipeline_run(logged, name)["data"]["tags"]}
        row = rows[name]
        assert f"processed ({tags['data.digest'][:16]})" in row, row  # Dataset
        assert tags["mlflow.source.name"] in row, row  # Source
        assert f"\n{accuracy:g}" in row, row  # the headline column, filled


def test_chart_view_draws_the_headline_for_both(logged, page) -> None:
    page.locator("label:has(input[value=CHART])").click()
    count = len(_pipeline_run(logged, "seed-42")["data"]["metrics"])
    page.get_by_text("Model metrics").first.wait_for()
    body = page.inner_text("body")
    assert re.search(rf"Model metrics\s*\({count}\)", body), body[:3000]  # not (0)
    page.get_by_placeholder("Search metric charts").fill("accuracy")
    for metric, shift in ((HEADLINE, 0.0), ("leakage_free.accuracy", -0.03)):
        card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=page.get_by_role("heading", name=metric, exact=True)
        )
        card.locator("svg").first.wait_for()
        text = card.inner_text()
        for name, (_, accuracy) in EXPERIMENTS.items():
            assert name in text and f"{accuracy + shift:.2f}" in text, (metric, text)
    page.screenshot(path=str(screenshots() / "charts.png"), full_page=True)


def test_compare_page_shows_the_parameter_that_differs(logged, page) -> None:
    ids = [runs["pipeline"] for runs in logged["runs"].values()]
    compare = (
        f"{logged['url']}/#/compare-runs?runs={json.dumps(ids)}"
        f"&experiments={json.dumps([logged['experiment_id']])}"
    )
    page.goto(compare)
    page.get_by_text("common.seed", exact=True).first.wait_for()
    seeds = "\t".join(str(seed) for seed, _ in EXPERIMENTS.values())
    assert f"common.seed\t{seeds}" in page.inner_text("body")
    page.get_by_role("switch").first.click()  # the parameters' "Show diff only"
    page.screenshot(path=str(screenshots() / "compare.png"), full_page=True)
    shown = page.inner_text("body")
    assert f"common.seed\t{seeds}" in shown
    assert "common.image_size" not in shown and "model.backbone\t" not in shown, shown[:3000]
