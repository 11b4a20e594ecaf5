"""Credentials in URIs never leave the process: not in MLflow params or tags, not in the
files a stage writes, not in what a command prints.

The integration tests run against a real ``mlflow server`` on loopback, reached through a
tracking URI that carries a user and password (the server has no authentication, so it
accepts and ignores them), then read back through the REST API everything the run logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import QUICKSTART_SOURCES, running_mlflow_server, write_params

PASSWORD = "hunter2-s3cret"


def test_redact_uri_strips_userinfo_and_secret_query_values() -> None:
    from braintumor.core.redaction import redact_text, redact_uri

    assert redact_uri(f"http://alice:{PASSWORD}@host:5000/x") == "http://***@host:5000/x"
    assert redact_uri(f"https://{PASSWORD}@host/a") == "https://***@host/a"
    assert redact_uri(f"https://host/a?x=1&token={PASSWORD}") == "https://host/a?x=1&token=***"
    assert redact_uri(f"postgresql://u:{PASSWORD}@db/mlflow") == "postgresql://***@db/mlflow"
    for plain in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "kaggle://o/d", "data"):
        assert redact_uri(plain) == plain
    text = f"request to http://alice:{PASSWORD}@127.0.0.1:1/api failed ('https://b:{PASSWORD}@x')"
    redacted = redact_text(text)
    assert PASSWORD not in redacted and "http://***@127.0.0.1:1/api" in redacted


def test_redact_params_hides_secret_keys_and_uri_credentials() -> None:
    from braintumor.core.redaction import is_secret_key, redact_params

    flat = {
        "db.password": "plain-secret",
        "service.api_key": "abc",
        "auth_token": "xyz",
        "tracking.tracking_uri": f"http://alice:{PASSWORD}@host:5000",
        "model.tokenizer": "bpe",  # "token" only inside a word: not a secret
        "train.epochs": 3,
    }
    logged = redact_params(flat)
    assert logged["db.password"] == logged["service.api_key"] == logged["auth_token"] == "***"
    assert logged["tracking.tracking_uri"] == "http://***@host:5000"
    assert logged["model.tokenizer"] == "bpe" and logged["train.epochs"] == "3"
    assert not is_secret_key("monkey.keyframe") and is_secret_key("aws.secret_access_key")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with running_mlflow_server(tmp_path_factory.mktemp("secrets")) as url:
        yield url


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://alice:{PASSWORD}@", 1)


def _all_runs(url: str, experiment: str) -> list[dict]:
    api = f"{url}/api/2.0/mlflow"
    found = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=30
    ).json()["experiment"]
    return requests.post(
        f"{api}/runs/search", json={"experiment_ids": [found["experiment_id"]]}, timeout=30
    ).json()["runs"]


@pytest.mark.integration
def test_logged_params_and_tags_never_hold_the_password(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from braintumor.core.config import load_params
    from braintumor.tracking.runs import phase_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the params' URI is used
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    source = {
        **QUICKSTART_SOURCES[0],
        "uri": f"https://bob:{PASSWORD}@example.org/d.zip",
        "sha256": "0" * 64,
    }
    params_path = write_params(
        tmp_path,
        {"tracking": {"tracking_uri": _with_password(server)}, "acquire": {"sources": [source]}},
    )
    params = load_params(params_path)
    run_file = tmp_path / "run.json"
    with phase_run(params, "frozen", run_file=run_file, project_root=tmp_path) as run:
        run.log_metrics({"val_loss": 0.5})
    assert PASSWORD not in run_file.read_text()
    runs = _all_runs(server, params.tracking.experiment)
    assert len(runs) == 2  # the pipeline's parent run and the phase's child
    for logged in runs:
        items = logged["data"].get("params", []) + logged["data"].get("tags", [])
        leaks = [item["key"] for item in items if PASSWORD in item["key"] + item["value"]]
        assert not leaks, leaks
    # The child run holds every parameter, the URI redacted; the pipeline (parent) run
    # holds only the few that identify an experiment.
    child = [r for r in runs if "mlflow.parentRunId" in {t["key"] for t in r["data"]["tags"]}]
    assert len(child) == 1
    values = {p["key"]: p["value"] for p in child[0]["data"]["params"]}
    assert values["tracking.tracking_uri"] == server.replace("http://", "http://***@")
    assert values["acquire.sources.msoud.uri"] == "https://***@example.org/d.zip"


@pytest.mark.integration
@pytest.mark.slow
def test_predict_with_a_password_in_the_tracking_uri_does_not_print_it(
    server: str, tmp_path: Path
) -> None:
    import numpy as np
    from PIL import Image

    image = tmp_path / "scan.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": _with_password(server),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.serving.predict",
            "--model",
            "models:/no-such-model@champion",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the model does not exist: an error that names the URI
    assert "127.0.0.1" in result.stdout + result.stderr
    assert PASSWORD not in result.stdout + result.stderr
