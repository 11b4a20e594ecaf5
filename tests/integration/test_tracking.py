"""MLflow tracking: URI resolution, and both training phases against a real MLflow server.

The integration test starts ``mlflow server`` on loopback (sqlite in tmp_path, one worker,
no job runner), trains the tiny two-phase model against it through the stage's ``main``,
then checks through the REST API what a reviewer would look at: one parent run with a
child per phase, their parameters, one ``val_loss`` point per epoch, and the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import requests
import yaml

from conftest import running_mlflow_server
from train_helpers import make_processed, tiny_raw_params


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_relative_sqlite_uri_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    from braintumor.core.paths import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path("/work/project")
    assert resolve_tracking_uri("sqlite:///mlflow.db", root) == "sqlite:////work/project/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", root) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://h:5000", root) == "http://h:5000"
    temporary = root / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"  # dvc exp run --temp
    assert resolve_tracking_uri("sqlite:///mlflow.db", temporary) == (
        "sqlite:////work/project/mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("sqlite:///mlflow.db", root) == "http://127.0.0.1:1"


def test_the_ui_link_opens_the_training_view_without_credentials() -> None:
    from braintumor.tracking.runs import ui_url

    link = ui_url("http://team:s3cret@127.0.0.1:5000/", "7")
    assert link is not None and link.endswith("/#/experiments/7?workflowType=machine_learning")
    assert "s3cret" not in link
    assert ui_url("sqlite:////tmp/mlflow.db", "7") is None


def test_invocation_outside_dvc(monkeypatch: pytest.MonkeyPatch) -> None:
    from braintumor.tracking.runs import _is_dvc, pipeline_invocation

    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert pipeline_invocation().startswith("exp-1:")
    assert _is_dvc(["/venv/bin/python", "/venv/bin/dvc", "repro"])
    assert _is_dvc(["dvc", "exp", "run"]) and _is_dvc(["python", "-m", "dvc", "repro"])
    assert not _is_dvc(["/venv/bin/python", "-m", "pytest", "tests/dvc_test.py"])


@pytest.mark.parametrize(
    ("command", "source"),
    [
        (["/venv/bin/python", "/venv/bin/dvc", "exp", "run", "-S", "common.seed=7"], "dvc exp run"),
        (["dvc", "repro", "train"], "dvc repro train"),
        (["python", "-m", "dvc", "exp", "run", "--queue"], "dvc exp run"),
    ],
)
def test_the_pipeline_run_s_source_is_the_dvc_command_without_its_options(
    command: list[str], source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's Source column of the pipeline run: which DVC command ran it; no option
    values (a `-S` value could be anything)."""
    from braintumor.tracking import runs

    monkeypatch.setattr(runs, "_dvc_process", lambda: (1, 0.0, command))
    assert runs.pipeline_source() == source
    monkeypatch.setattr(runs, "_dvc_process", lambda: None)
    assert runs.pipeline_source() == Path(sys.argv[0]).name


@pytest.fixture
def mlflow_server(tmp_path: Path):
    with running_mlflow_server(tmp_path) as url:
        yield url


@pytest.mark.integration
@pytest.mark.usefixtures("mirror")
def test_two_phases_logged_to_a_real_server(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from braintumor.stages.train import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DVC_EXP_NAME", "tracking-test")
    monkeypatch.setenv("BRAINTUMOR_RUNNER", "gpu-runner-7")
    data = make_processed(tmp_path / "processed")
    raw = tiny_raw_params(frozen__epochs=2, finetune__epochs=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    common = ["--params", str(tmp_path / "params.yaml"), "--data", str(data), "--verbose", "0"]
    for phase in ("frozen", "finetune"):
        extra = (
            [
                "--init",
                str(tmp_path / "models/frozen/model.keras"),
                "--parent-run-file",
                str(tmp_path / "models/frozen/mlflow_run.json"),
            ]
            if phase == "finetune"
            else []
        )
        code = main(
            [
                "--phase",
                phase,
                *common,
                "--model-dir",
                str(tmp_path / "models" / phase),
                "--checkpoints",
                str(tmp_path / "models/checkpoints" / phase),
                "--metrics",
                str(tmp_path / "metrics" / f"{phase}.json"),
                "--history",
                str(tmp_path / "metrics" / f"{phase}_history.csv"),
                "--figures",
                str(tmp_path / "figures" / phase),
                *extra,
            ]
        )
        assert code == 0

    runs = {
        phase: json.loads((tmp_path / "models" / phase / "mlflow_run.json").read_text())
        for phase in ("frozen", "finetune")
    }
    assert runs["frozen"]["parent_run_id"] == runs["finetune"]["parent_run_id"]
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": raw["tracking"]["experiment"]}
    ).json()["experiment"]
    # The UI opens it on the training runs, not MLflow 3's GenAI overview.
    experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    found = requests.post(
        f"{api}/runs/search",
        json={
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.mlflow.parentRunId = '{runs['frozen']['parent_run_id']}'",
        },
    ).json()["runs"]
    children = {run["info"]["run_name"]: run for run in found}
    assert set(children) == {"frozen", "finetune"}
    for phase, run in children.items():
        assert run["info"]["run_id"] == runs[phase]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["model.backbone"] == "tinycnn"
        assert params["train.finetune.epochs"] == "3"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["dvc.exp_name"] == "tracking-test" and tags["backend"] == "tensorflow"
        assert tags["phase"] == phase and tags["profile"] == "paper"
        assert tags["runner"] == "gpu-runner-7"
        metrics = json.loads((tmp_path / "metrics" / f"{phase}.json").read_text())
        history = requests.get(
            f"{api}/metrics/get-history",
            params={"run_id": run["info"]["run_id"], "metric_key": "val_loss"},
        ).json()["metrics"]
        assert sorted(point["step"] for point in history) == list(
            range(1, metrics["epochs_run"] + 1)
        )
        artifacts = requests.get(
            f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"], "path": "figures"}
        ).json()
        assert {"figures/augmentation.png", "figures/history.png"} <= {
            f["path"] for f in artifacts["files"]
        }
    _check_pipeline_run(api, runs["frozen"]["parent_run_id"], data)
    models = requests.post(
        f"{api}/logged-models/search", json={"experiment_ids": [experiment["experiment_id"]]}
    ).json()["models"]
    sources = {model["info"]["source_run_id"] for model in models}
    assert sources == {runs["frozen"]["run_id"], runs["finetune"]["run_id"]}


def _check_pipeline_run(api: str, run_id: str, data: Path) -> None:
    """The pipeline (parent) run: the parameters that identify the experiment (each child
    has all of them), MLflow's Source and commit, a description, the processed data as its
    dataset (logged once, by the first phase; the children log their splits)."""
    from braintumor.tracking.runs import IDENTITY_PARAMS

    parent = requests.get(f"{api}/runs/get", params={"run_id": run_id}).json()["run"]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert sorted(params) == sorted(IDENTITY_PARAMS)
    assert params["model.backbone"] == "tinycnn" and params["train.finetune.epochs"] == "3"
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["mlflow.runName"] == "tracking-test" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] and tags["mlflow.user"]
    # the commit of the project folder (none here: tmp_path is no git checkout)
    assert tags.get("mlflow.source.git.commit") == tags.get("git_commit")
    data_meta = json.loads((data / "meta.json").read_text())
    assert tags["data.digest"] == data_meta["digest"]
    note = tags["mlflow.note.content"]
    assert "DVC experiment `tracking-test`" in note and data_meta["digest"][:16] in note
    (dataset,) = parent["inputs"]["dataset_inputs"]
    assert dataset["dataset"]["name"] == "processed"
    assert dataset["dataset"]["digest"] == data_meta["digest"][:16]
    assert {"key": "mlflow.data.context", "value": "pipeline"} in dataset["tags"]
