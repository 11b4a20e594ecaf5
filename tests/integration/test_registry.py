"""Registry and promotion against a real MLflow server; the pyfunc and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from braintumor.core.schema import GateParams
from braintumor.serving.bundle import Bundle
from braintumor.tracking.registry import TEST_PAUSE_ENV, TEST_RELEASE_FILE, check_gate

from conftest import evaluate_args, free_port, running_mlflow_server, write_params

pytestmark = pytest.mark.integration

NAME = "brain-tumor-classifier"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
Found = TypeVar("Found")


def _wait_for(condition: Callable[[], Found], what: str, timeout: float) -> Found:
    """Wait for an event (a file appears, a server answers), checked every 50 ms, and
    return what ``condition`` found; fail naming ``what`` after ``timeout`` seconds. The
    condition may itself fail the test early (a process that died will never answer)."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
    return found


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _with_gate(project: dict[str, Path], folder: Path, **gate: float) -> Path:
    """A copy of the project's params with the given gate settings."""
    raw = yaml.safe_load(project["params"].read_text())
    raw.setdefault("registry", {}).setdefault("gate", {}).update(gate)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow server on loopback for this module's tests."""
    folder = tmp_path_factory.mktemp("registry")
    with running_mlflow_server(folder) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
        yield {"url": url, "env": env, "folder": folder}


@pytest.fixture(scope="module")
def registry(server, tiny_project):
    """Two evaluated versions (both real runs of the evaluate stage) of two different
    models on the same data: v1 registers the 4-epoch ``finetuned`` weights, v2 the 1-epoch
    ``base`` weights as its fine-tuned model (on this tiny data v2 scores the higher
    macro-F1, which the promotion test checks first)."""
    for run, finetuned in (("first", tiny_project["finetuned"]), ("second", tiny_project["base"])):
        out = server["folder"] / run
        args = evaluate_args(tiny_project, out, finetuned=finetuned)
        result = _run("braintumor.stages.evaluate", args, server["env"])
        assert result.returncode == 0, result.stderr[-3000:]
    return {**server, "project": tiny_project}


@pytest.fixture
def evaluated(registry):
    """The module's two versions as the evaluate stage left them: no champion, no history,
    no gate decisions. Promote and rollback change those, so every test that reads them
    starts here, whichever tests ran before it and in whatever order."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registry["url"], registry_uri=registry["url"])
    try:
        client.delete_registered_model_alias(NAME, "champion")
    except MlflowException as error:  # no champion: already as the stage left it
        assert error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
    if "champion.history" in client.get_registered_model(NAME).tags:
        client.delete_registered_model_tag(NAME, "champion.history")
    for version in ("1", "2"):
        for key in client.get_model_version(NAME, version).tags:
            if key.startswith("gate."):
                client.delete_model_version_tag(NAME, version, key)
    return registry


@pytest.fixture
def champion(evaluated) -> dict:
    """``champion`` pointed at v2 by hand (what promoting it does to the alias; promotion
    itself has its own tests), with v2's bundle folder to compare the served answers to."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=evaluated["url"], registry_uri=evaluated["url"])
    client.set_registered_model_alias(NAME, "champion", "2")
    return {**evaluated, "bundle": evaluated["folder"] / "second" / "bundle"}


def _api(url: str, path: str, **query: str) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{path}", params=query, timeout=30)
    response.raise_for_status()
    return response.json()


def _alias(url: str, alias: str) -> str | None:
    response = requests.get(
        f"{url}/api/2.0/mlflow/registered-models/alias",
        params={"name": NAME, "alias": alias},
        timeout=30,
    )
    if response.status_code != 200:
        return None
    return response.json()["model_version"]["version"]


def test_each_evaluation_registers_a_challenger_with_its_evidence(evaluated) -> None:
    url = evaluated["url"]
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
        # the gate's evidence: parameters of the run, which cannot be edited later
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["evaluation.data_digest"] == tags["data.digest"]
        assert params["evaluation.model_sha256"] == tags["model.sha256"]
        assert json.loads(params["evaluation.classes"]) == list(CLASSES)
        assert version["run_id"] == tags["run_id"]


def _gate_score(url: str, version: str) -> float:
    """The macro-F1 the gate reads for ``version``: from its evaluation run."""
    model_version = _api(url, "model-versions/get", name=NAME, version=version)["model_version"]
    run = _api(url, "runs/get", run_id=model_version["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    return metrics["finetuned.leakage_free.macro_f1"]


def test_promotion_gate_rollback_and_bad_requests(evaluated, tmp_path: Path) -> None:
    url, env, project = evaluated["url"], evaluated["env"], evaluated["project"]
    lenient = _with_gate(
        project, tmp_path / "lenient", min_class_recall=0.0, max_ece=1.0, min_macro_f1_gain=0.0
    )
    strict = _with_gate(project, tmp_path / "strict", max_ece=1e-6)

    # no champion yet: rollback is refused, the registry is unchanged
    result = _run("braintumor.tracking.registry", ["rollback", "--params", str(lenient)], env)
    assert result.returncode == 1 and "no previous champion" in result.stderr
    assert _alias(url, "champion") is None

    # a gate that fails: exit 2, reasons printed, champion unchanged, decision recorded
    result = _run(
        "braintumor.tracking.registry", ["promote", "--params", str(strict), "--version", "1"], env
    )
    assert result.returncode == 2, result.stderr
    assert "FAIL: ECE" in result.stdout and "champion unchanged" in result.stderr
    assert _alias(url, "champion") is None
    version = _api(url, "model-versions/get", name=NAME, version="1")["model_version"]
    assert {t["key"]: t["value"] for t in version["tags"]}["gate.result"] == "failed"

    # promote v1, then the challenger (v2): champion moves, history remembers v1
    scores = [_gate_score(url, version) for version in ("1", "2")]
    assert scores[1] >= scores[0], f"fixture: v2 must score at least v1's macro-F1: {scores}"
    for args in (["--version", "1"], []):
        result = _run(
            "braintumor.tracking.registry", ["promote", "--params", str(lenient), *args], env
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert _alias(url, "champion") == "2"
    model = _api(url, "registered-models/get", name=NAME)["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {
        "champion": "2",
        "challenger": "2",
    }
    # promoting the champion again is refused
    result = _run("braintumor.tracking.registry", ["promote", "--params", str(lenient)], env)
    assert result.returncode == 1 and "already the champion" in result.stderr

    # roll back to v1
    result = _run("braintumor.tracking.registry", ["rollback", "--params", str(lenient)], env)
    assert result.returncode == 0 and _alias(url, "champion") == "1"

    # an unknown model name is a clear error
    unknown = yaml.safe_load(lenient.read_text())
    unknown["tracking"]["registered_model"] = "no-such-model"
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "params.yaml").write_text(yaml.safe_dump(unknown))
    result = _run(
        "braintumor.tracking.registry",
        ["promote", "--params", str(tmp_path / "unknown" / "params.yaml")],
        env,
    )
    assert result.returncode == 1 and "no registered model 'no-such-model'" in result.stderr


def test_champion_pyfunc_takes_raw_images(champion) -> None:
    import mlflow

    url, project = champion["url"], champion["project"]
    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    test = pd.read_csv(project["data"] / "test_index.csv")
    files = [project["raw"] / path for path in test["path"][:3]]
    frame = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert list(frame.columns) == ["predicted", *classes, "status", "reason", "error", "warning"]
    assert list(frame["status"]) == ["ok"] * 3
    np.testing.assert_allclose(frame[classes].sum(axis=1), 1.0, atol=1e-6)
    bundle = Bundle.load(champion["bundle"])
    expected = bundle.predict(np.stack([bundle.preprocess_bytes(f.read_bytes()) for f in files]))
    np.testing.assert_allclose(frame[classes].to_numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_served_champion_answers_a_real_image_like_the_stage(champion, tmp_path: Path) -> None:
    project = champion["project"]
    port = free_port()
    env = {**champion["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )

    def answers() -> bool:
        if server.poll() is not None:
            pytest.fail((tmp_path / "serve.log").read_text()[-3000:])
        try:
            return requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        _wait_for(answers, "`mlflow models serve` to answer /ping", timeout=180)
        test = pd.read_csv(project["data"] / "test_index.csv")
        image = (project["raw"] / test.loc[0, "path"]).read_bytes()
        import base64

        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}
        }
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        classes = ["glioma", "meningioma", "notumor", "pituitary"]
        served = np.array([[predictions[0][c] for c in classes]])
        bundle = Bundle.load(champion["bundle"])
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


# --------------------------------------------------------------------------- the gate's
# findings, on versions registered straight through the client of the real server: each
# has an evaluation run shaped as the evaluate stage logs it (see the test above that
# checks the real stage's run), so no model needs training.

GOOD = {"recall": 0.9, "ece": 0.02}


def _evaluated_version(
    client,
    name: str,
    *,
    sha: str,
    f1: dict[str, float],
    digest: str = "d" * 64,
    tag_view: str = "leakage_free",
) -> str:
    """A new version of ``name`` whose evaluation run logged ``f1`` (view -> macro-F1),
    registered from that run, with the version tags the evaluate stage writes."""
    from mlflow.entities import Metric, Param

    from braintumor.tracking.registry import gate_metrics

    experiment = client.get_experiment_by_name("gate-tests")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("gate-tests")
    )
    run = client.create_run(experiment_id)
    flat = {}
    for view, value in f1.items():
        flat.update(
            {f"{view}.macro_f1": value, f"{view}.accuracy": value, f"{view}.ece_after": GOOD["ece"]}
        )
        flat.update({f"{view}.{c}_recall": GOOD["recall"] for c in CLASSES})
    stamp = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(f"finetuned.{k}", v, stamp, 0) for k, v in flat.items()],
        params=[
            Param("evaluation.data_digest", digest),
            Param("evaluation.classes", json.dumps(list(CLASSES))),
            Param("evaluation.model_sha256", sha),
        ],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    tags = {
        "metrics": json.dumps(gate_metrics({"finetuned": flat}, tag_view, CLASSES)),
        "gate.view": tag_view,
        "model.sha256": sha,
        "data.digest": digest,
        "run_id": run.info.run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return str(version)


@pytest.fixture
def client(server, monkeypatch: pytest.MonkeyPatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    mlflow.set_tracking_uri(server["url"])
    return MlflowClient()


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


def _history(url: str, name: str) -> list[str]:
    model = _api(url, "registered-models/get", name=name)["registered_model"]
    tags = {t["key"]: t["value"] for t in model.get("tags", [])}
    return json.loads(tags.get("champion.history", "[]"))


def _alias_of(url: str, name: str, alias: str = "champion") -> str | None:
    response = requests.get(
        f"{url}/api/2.0/mlflow/registered-models/alias",
        params={"name": name, "alias": alias},
        timeout=30,
    )
    return response.json()["model_version"]["version"] if response.ok else None


def _project(folder: Path, name: str, **gate: float) -> Path:
    """A params.yaml (the repository's, paper profile) for model ``name``."""
    return write_params(
        folder, {"tracking": {"registered_model": name}, "registry": {"gate": gate}}
    )


def test_champion_weights_with_easier_view_metrics_do_not_pass_against_itself(client) -> None:
    from braintumor.tracking.registry import promote

    name = _unique("easier-view")
    views = {"leakage_free": 0.70, "test": 0.95}
    champion = _evaluated_version(client, name, sha="a" * 64, f1=views)
    assert promote(client, name, GateParams(), champion).passed
    # the champion's own weights again, tagged with the easier view's numbers
    again = _evaluated_version(client, name, sha="a" * 64, f1=views, tag_view="test")
    decision = promote(client, name, GateParams(view="leakage_free"), again)
    assert not decision.passed
    assert decision.candidate["macro_f1"] == 0.70  # read on the gate's view, from the run
    assert any(r.startswith("FAIL: same weights") for r in decision.reasons)
    assert client.get_model_version_by_alias(name, "champion").version == champion


def test_candidate_evaluated_on_other_data_or_classes_is_not_compared(client) -> None:
    from braintumor.tracking.registry import promote

    name = _unique("other-data")
    champion = _evaluated_version(client, name, sha="a" * 64, f1={"leakage_free": 0.70})
    promote(client, name, GateParams(), champion)
    other = _evaluated_version(
        client, name, sha="b" * 64, f1={"leakage_free": 0.99}, digest="e" * 64
    )
    decision = promote(client, name, GateParams(), other)
    assert not decision.passed
    assert any("evaluate both on the same data" in r for r in decision.reasons)
    same = _evaluated_version(client, name, sha="c" * 64, f1={"leakage_free": 0.71})
    decision = promote(client, name, GateParams(), same)
    assert decision.passed and decision.reasons[0].startswith("ok: same data")
    # the version's metrics tag is not evidence: editing it changes nothing
    client.set_model_version_tag(name, other, "metrics", json.dumps({"macro_f1": 0.1}))
    assert client.get_model_version_by_alias(name, "champion").version == same


# ``registry promote`` in a process of its own; "unlocked" swaps the registry lock for a
# no-op first, to show what the lock prevents (the test must fail to see a race then).
PROMOTER = """
import contextlib, sys
from braintumor.tracking import registry
if sys.argv[1] == "unlocked":
    registry.registry_lock = lambda *args, **kwargs: contextlib.nullcontext()
sys.exit(registry.main(sys.argv[2:]))
"""


def _promoter(params: Path, version: str, env: dict, locked: bool, log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROMOTER,
                "locked" if locked else "unlocked",
                "promote",
                "--params",
                str(params),
                "--version",
                version,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )


def _reached(
    pause: Path, point: str, process: subprocess.Popen, log: Path, not_past: str = ""
) -> Callable:
    """A condition for ``_wait_for``: ``process`` reached the registry's test pause point
    ``point``; fails at once if it reached ``not_past`` instead, or exited (it never will
    reach ``point`` then)."""

    def condition() -> bool:
        if (pause / f"{point}.{process.pid}").exists():
            return True
        if not_past and (pause / f"{not_past}.{process.pid}").exists():
            pytest.fail(f"reached {not_past!r} before {point!r}: {log.read_text()[-3000:]}")
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before {point!r}: {log.read_text()[-3000:]}")
        return False

    return condition


def _lost_updates(
    client, name: str, better: str, worse: str, movers: int, codes: dict[str, int]
) -> list[str]:
    """How the registry differs from the one serial outcome of promoting ``better``, then
    ``worse``: only ``better`` moved the champion (from none, so no history), and ``worse``
    was gated against it and failed (exit 2). Empty when they match."""
    problems = []
    if movers != 1:
        problems.append(f"{movers} promotes moved the champion, not 1")
    current = client.get_model_version_by_alias(name, "champion").version
    if str(current) != better:
        problems.append(f"champion is v{current}, not the better v{better}")
    history = client.get_registered_model(name).tags.get("champion.history", "[]")
    if json.loads(history) != []:
        problems.append(f"history {history}, not []")
    tags = client.get_model_version(name, worse).tags
    reasons = json.loads(tags.get("gate.reasons", "[]"))
    if tags.get("gate.result") != "failed" or not any("champion's 0.8000" in r for r in reasons):
        problems.append(
            f"v{worse} was not gated against v{better}: {tags.get('gate.result')} {reasons}"
        )
    if codes != {better: 0, worse: 2}:
        problems.append(f"exit codes {codes}, not {{{better!r}: 0, {worse!r}: 2}}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("locked", [True, False], ids=["with-lock", "without-lock-loses-updates"])
def test_two_promotes_at_the_critical_section_at_once(
    client, server, tmp_path: Path, locked: bool
) -> None:
    """The better version's promote is held inside the lock, about to move the champion
    (the registry's test pause); the worse one is started then and the test waits until
    it found the lock held. So the test knows the two met at the critical section. Only
    then are both let go. Without the lock both get past the champion check at once
    (both hold at the pause), and the check below must see the lost update."""
    name = _unique("race")
    worse = _evaluated_version(client, name, sha="a" * 64, f1={"leakage_free": 0.70})
    better = _evaluated_version(client, name, sha="b" * 64, f1={"leakage_free": 0.80})
    params = _project(tmp_path, name, min_macro_f1_gain=0.0)
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**server["env"], TEST_PAUSE_ENV: str(pause)}
    logs = {version: tmp_path / f"promote-v{version}.log" for version in (better, worse)}
    processes = {better: _promoter(params, better, env, locked, logs[better])}
    try:
        _wait_for(
            _reached(pause, "moving", processes[better], logs[better]),
            f"v{better}'s promote to hold at the champion move",
            timeout=240,
        )
        processes[worse] = _promoter(params, worse, env, locked, logs[worse])
        # With the lock it must find the lock held, and never get past it while the other
        # holds it; without, it gets to the champion move too.
        point, not_past = ("blocked", "moving") if locked else ("moving", "")
        _wait_for(
            _reached(pause, point, processes[worse], logs[worse], not_past),
            f"v{worse}'s promote to reach {point!r} while v{better}'s holds",
            timeout=240,
        )
        (pause / TEST_RELEASE_FILE).touch()
        codes = {version: process.wait(timeout=300) for version, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    movers = len(list(pause.glob("moving.*")))
    problems = _lost_updates(client, name, better, worse, movers, codes)
    if locked:
        assert problems == [], {version: log.read_text()[-2000:] for version, log in logs.items()}
    else:  # the lost update: the worse one passed against "no champion" and moved it too
        assert "2 promotes moved the champion, not 1" in problems, problems
        assert any(problem.startswith(f"v{worse} was not gated") for problem in problems)


def test_rollback_to_a_deleted_version_keeps_history(client, server) -> None:
    from braintumor.tracking.registry import RegistryError, promote, rollback

    name = _unique("deleted")
    first = _evaluated_version(client, name, sha="a" * 64, f1={"leakage_free": 0.70})
    second = _evaluated_version(client, name, sha="b" * 64, f1={"leakage_free": 0.80})
    assert promote(client, name, GateParams(), first).passed
    assert promote(client, name, GateParams(), second).passed
    client.delete_model_version(name, first)
    with pytest.raises(RegistryError, match=f"v{first} no longer exists"):
        rollback(client, name)
    assert _history(server["url"], name) == [first]
    assert _alias_of(server["url"], name) == second


WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command's one error line; Python's warnings (a location line, then the indented
    source line) are not the command's output."""
    lines, skip = [], False
    for line in result.stderr.strip().splitlines():
        skip = bool(WARNING_LINE.match(line)) or (skip and line.startswith(" "))
        if not skip and line.strip():
            lines.append(line)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.slow
def test_champion_without_metrics_tag_is_a_one_line_error(client, server, tmp_path) -> None:
    name = _unique("no-evidence")
    client.create_registered_model(name)
    experiment = client.get_experiment_by_name("gate-tests") or client.get_experiment(
        client.create_experiment("gate-tests")
    )
    run = client.create_run(experiment.experiment_id)  # logged no evidence, no version tags
    client.set_terminated(run.info.run_id, "FINISHED")
    bare = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    client.set_registered_model_alias(name, "champion", bare)  # set by hand, no gate
    candidate = _evaluated_version(client, name, sha="b" * 64, f1={"leakage_free": 0.80})
    params = _project(tmp_path, name)
    result = _run(
        "braintumor.tracking.registry",
        ["promote", "--params", str(params), "--version", candidate],
        server["env"],
    )
    line = _one_line_error(result)
    assert f"v{bare}" in line and "evaluation run" in line
    assert _alias_of(server["url"], name) == str(bare)


@pytest.mark.slow
def test_negative_or_nan_gate_gain_is_refused(client, server, tmp_path: Path) -> None:
    name = _unique("gain")
    version = _evaluated_version(client, name, sha="a" * 64, f1={"leakage_free": 0.80})
    for gain in (-0.5, float("nan")):
        params = _project(tmp_path / str(gain), name, min_macro_f1_gain=gain)
        result = _run(
            "braintumor.tracking.registry",
            ["promote", "--params", str(params), "--version", version],
            server["env"],
        )
        assert "min_macro_f1_gain" in _one_line_error(result)
    assert _alias_of(server["url"], name) is None


@pytest.mark.slow
def test_registry_errors_are_one_line_without_credentials(tmp_path: Path) -> None:
    params = _project(tmp_path, "any-model")
    unreachable = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": unreachable,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    for action in ("promote", "rollback"):
        result = _run("braintumor.tracking.registry", [action, "--params", str(params)], env)
        line = _one_line_error(result)
        assert "hunter2" not in result.stdout + result.stderr
        assert "no registered model" not in line  # the server is down, not the model absent
        assert "127.0.0.1" in line


@pytest.mark.slow
def test_promote_from_another_folder_uses_the_project_store(tmp_path: Path) -> None:
    project = tmp_path / "project"
    params = _project(project, "any-model")  # tracking_uri: sqlite:///mlflow.db
    (project / "dvc.yaml").write_text("stages: {}\n")
    elsewhere = tmp_path / "elsewhere"
    inside = project / "notebooks"
    elsewhere.mkdir()
    inside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    runs = [
        (elsewhere, ["promote", "--params", str(params)]),
        (inside, ["rollback"]),  # params.yaml found above the current folder
    ]
    for folder, args in runs:
        result = subprocess.run(
            [sys.executable, "-m", "braintumor.tracking.registry", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=folder,
        )
        line = _one_line_error(result)
        assert str(project.resolve() / "mlflow.db") in line
    assert not list(tmp_path.rglob("mlflow.db")), "an empty store was created"


def test_gate_refuses_a_negative_or_nan_gain_however_it_was_built() -> None:
    """config.py refuses such a gain in params.yaml; the gate refuses it where it is used
    too, for a ``GateParams`` made any other way (here: past its own check)."""
    from braintumor.tracking.registry import RegistryError

    for gain in (-0.5, float("nan"), float("inf")):
        gate = GateParams()
        object.__setattr__(gate, "min_macro_f1_gain", gain)
        with pytest.raises(RegistryError, match="min_macro_f1_gain"):
            check_gate({"macro_f1": 0.5, "ece": 0.0}, {"macro_f1": 0.9, "ece": 0.0}, gate)
