"""Registry and promotion against a real MLflow server; the pyfunc and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from braintumor.bundle import Bundle
from braintumor.config import GateParams
from braintumor.registry import check_gate

from conftest import evaluate_args, free_port, running_mlflow_server

pytestmark = pytest.mark.integration

NAME = "brain-tumor-classifier"


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def _with_gate(project: dict[str, Path], folder: Path, **gate: float) -> Path:
    """A copy of the project's params with the given gate settings."""
    raw = yaml.safe_load(project["params"].read_text())
    raw.setdefault("registry", {}).setdefault("gate", {}).update(gate)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def registry(tiny_project, tmp_path_factory):
    """A real server holding two evaluated versions (both runs of the evaluate stage)."""
    folder = tmp_path_factory.mktemp("registry")
    with running_mlflow_server(folder) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
        for run in ("first", "second"):
            out = folder / run
            result = _run("braintumor.evaluate", evaluate_args(tiny_project, out), env)
            assert result.returncode == 0, result.stderr[-3000:]
        yield {"url": url, "env": env, "folder": folder, "project": tiny_project}


def _api(url: str, path: str, **query: str) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{path}", params=query, timeout=30)
    response.raise_for_status()
    return response.json()


def _alias(url: str, alias: str) -> str | None:
    response = requests.get(
        f"{url}/api/2.0/mlflow/registered-models/alias",
        params={"name": NAME, "alias": alias}, timeout=30,
    )  # fmt: skip
    if response.status_code != 200:
        return None
    return response.json()["model_version"]["version"]


def test_each_evaluation_registers_a_challenger_with_its_evidence(registry) -> None:
    url = registry["url"]
    versions = _api(url, "model-versions/search", filter=f"name='{NAME}'")["model_versions"]
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    assert _alias(url, "challenger") == "2"
    for version in versions:
        tags = {t["key"]: t["value"] for t in version.get("tags", [])}
        metrics = json.loads(tags["metrics"])
        assert {"macro_f1", "accuracy", "ece", "recall.glioma"} <= set(metrics)
        assert len(tags["data.digest"]) == 64 and len(tags["model.sha256"]) == 64
        assert tags["profile"] == "paper" and tags["git_commit"]
        run = _api(url, "runs/get", run_id=tags["run_id"])["run"]
        assert run["data"]["tags"]  # the evaluate child run exists
        run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert run_tags["phase"] == "evaluate" and "mlflow.parentRunId" in run_tags
        names = {m["key"] for m in run["data"]["metrics"]}
        assert "finetuned.leakage_free.macro_f1" in names and "base.test.accuracy" in names


def test_promotion_gate_rollback_and_bad_requests(registry, tmp_path: Path) -> None:
    url, env, project = registry["url"], registry["env"], registry["project"]
    lenient = _with_gate(project, tmp_path / "lenient", min_class_recall=0.0, max_ece=1.0,
                         min_macro_f1_gain=-1.0)  # fmt: skip
    strict = _with_gate(project, tmp_path / "strict", max_ece=1e-6)

    # no champion yet: rollback is refused, the registry is unchanged
    result = _run("braintumor.registry", ["rollback", "--params", str(lenient)], env)
    assert result.returncode == 1 and "no previous champion" in result.stderr
    assert _alias(url, "champion") is None

    # a gate that fails: exit 2, reasons printed, champion unchanged, decision recorded
    result = _run("braintumor.registry", ["promote", "--params", str(strict), "--version", "1"],
                  env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "FAIL: ECE" in result.stdout and "champion unchanged" in result.stderr
    assert _alias(url, "champion") is None
    version = _api(url, "model-versions/get", name=NAME, version="1")["model_version"]
    assert {t["key"]: t["value"] for t in version["tags"]}["gate.result"] == "failed"

    # promote v1, then the challenger (v2): champion moves, history remembers v1
    for args in (["--version", "1"], []):
        result = _run("braintumor.registry", ["promote", "--params", str(lenient), *args], env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert _alias(url, "champion") == "2"
    model = _api(url, "registered-models/get", name=NAME)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion": "2", "challenger": "2",
    }  # fmt: skip
    # promoting the champion again is refused
    result = _run("braintumor.registry", ["promote", "--params", str(lenient)], env)
    assert result.returncode == 1 and "already the champion" in result.stderr

    # roll back to v1
    result = _run("braintumor.registry", ["rollback", "--params", str(lenient)], env)
    assert result.returncode == 0 and _alias(url, "champion") == "1"

    # an unknown model name is a clear error
    unknown = yaml.safe_load(lenient.read_text())
    unknown["tracking"]["registered_model"] = "no-such-model"
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "params.yaml").write_text(yaml.safe_dump(unknown))
    result = _run(
        "braintumor.registry",
        ["promote", "--params", str(tmp_path / "unknown" / "params.yaml")],
        env,
    )
    assert result.returncode == 1 and "no registered model 'no-such-model'" in result.stderr


def test_champion_pyfunc_takes_raw_images(registry) -> None:
    import mlflow

    url, project = registry["url"], registry["project"]
    if _alias(url, "champion") is None:
        pytest.skip("runs after the promotion test")
    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    test = pd.read_csv(project["data"] / "test_index.csv")
    files = [project["raw"] / path for path in test["path"][:3]]
    frame = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert list(frame.columns) == ["predicted", *classes]
    np.testing.assert_allclose(frame[classes].sum(axis=1), 1.0, atol=1e-6)
    champion = _alias(url, "champion")
    bundle_dir = registry["folder"] / ("first" if champion == "1" else "second") / "bundle"
    bundle = Bundle.load(bundle_dir)
    expected = bundle.predict(np.stack([bundle.preprocess_bytes(f.read_bytes()) for f in files]))
    np.testing.assert_allclose(frame[classes].to_numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_served_champion_answers_a_real_image_like_the_stage(registry, tmp_path: Path) -> None:
    url, project = registry["url"], registry["project"]
    assert _alias(url, "champion") is not None, "needs the promotion test first"
    port = free_port()
    env = {**registry["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         f"models:/{NAME}@champion", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail((tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        test = pd.read_csv(project["data"] / "test_index.csv")
        image = (project["raw"] / test.loc[0, "path"]).read_bytes()
        import base64

        payload = {"dataframe_split": {"columns": ["image"],
                                       "data": [[base64.b64encode(image).decode()]]}}  # fmt: skip
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        classes = ["glioma", "meningioma", "notumor", "pituitary"]
        served = np.array([[predictions[0][c] for c in classes]])
        champion = _alias(url, "champion")
        bundle = Bundle.load(
            registry["folder"] / ("first" if champion == "1" else "second") / "bundle"
        )
        expected = bundle.predict(bundle.preprocess_bytes(image)[None])
        np.testing.assert_allclose(served, expected, atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_gate_logic_is_pure_and_explains_itself() -> None:
    gate = GateParams(min_macro_f1_gain=0.01, min_class_recall=0.6, max_ece=0.05)
    champion = {"macro_f1": 0.80, "ece": 0.02, "recall.a": 0.9}
    better = {"macro_f1": 0.82, "ece": 0.03, "recall.a": 0.7, "recall.b": 0.65}
    decision = check_gate(better, champion, gate)
    assert decision.passed and all(r.startswith("ok") for r in decision.reasons)
    worse = {"macro_f1": 0.805, "ece": 0.08, "recall.a": 0.5}
    decision = check_gate(worse, champion, gate)
    assert not decision.passed
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert len(failed) == 3  # macro-F1 gain, recall floor, ECE ceiling
    assert check_gate(better, None, gate).passed
