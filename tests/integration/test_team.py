"""Integration: two runners share one team stack (services/team_services.py).

The services run for real on loopback in a temporary folder: PostgreSQL (MLflow's backend
store), SeaweedFS (S3: MLflow's proxied artifacts and the DVC remote) and an MLflow server
with basic auth. A bare git repository holds this project on a tiny profile; runner A (a
clone) runs the pipeline, which logs to the server and registers the model, then pushes
data and run cache; runner B (another clone) pulls and finds nothing to rerun, sees A's runs
and model, and loads the model. The fault tests stop and restart services under them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mask_helpers import copy_masks, copy_matching_slices

from conftest import REPO, TINY_OVERRIDES, copy_project, copy_sample, write_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
SERVICES_SCRIPT = REPO / "services" / "team_services.py"
# Not the repository's .gitignore: it ignores all of /models/, and so would keep
# models/evaluate_run.json (a git-tracked `cache: false` output) from the other runner.
ONE_EPOCH = {"epochs": 1, "batch_size": 16, "early_stopping": {"patience": 1}}
TEAM_OVERRIDES = {
    **TINY_OVERRIDES,
    "train": {"frozen": ONE_EPOCH, "finetune": ONE_EPOCH},
    "tracking": {"experiment": "team-test"},
    # tinycnn has no stride-16 block of the backbones' names: the last map only.
    "localise": {"layers": ["auto"], "occlusion_slices": 3},
    # A one-epoch model on 32 images: the gate's absolute floors are not what is tested
    # here (test_registry does that), the path through it from another runner is.
    "registry": {"gate": {"min_class_recall": 0.0, "max_ece": 1.0}},
}
MODEL_NAME = "brain-tumor-classifier"


@dataclass
class Team:
    """The running services and everything the tests print, to search for secrets."""

    root: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def services(self, *args: str) -> subprocess.CompletedProcess:
        result = run([str(BIN / "python"), str(SERVICES_SCRIPT), *args], REPO, self.env)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def credentials(self) -> dict[str, str]:
        lines = (self.root / "secrets" / "runner.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def secret_values(self) -> dict[str, str]:
        """Each generated secret by its file name (the name is safe to print, the value not)."""
        folder = self.root / "secrets"
        return {
            path.name: path.read_text().strip()
            for path in folder.iterdir()
            if path.is_file() and "." not in path.name
        }

    def port(self, offset: int) -> int:
        return json.loads((self.root / "config.json").read_text())["port_base"] + offset


def run(command: list[str], cwd: Path, env: dict[str, str], check: bool = True):
    """Run a command to completion; with ``check``, fail the test with its output."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result


def free_port_base() -> int:
    """Six consecutive free ports (and their +10000 gRPC twins SeaweedFS binds)."""
    for _ in range(50):
        base = random.randrange(20000, 29000)
        ports = [base + i for i in range(6)] + [base + i + 10000 for i in (1, 2, 3, 4)]
        if all(port_free(port) for port in ports):
            return base
    raise RuntimeError("no run of free loopback ports found for the team services")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    """The whole stack in a fresh folder (PostgreSQL, running as ``postgres`` under root,
    must be able to reach it, hence 0755), stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="braintumor-team-"))
    root.chmod(0o755)
    env = {
        **os.environ,
        "BRAINTUMOR_SERVICES_DIR": str(root / "services"),
        "BRAINTUMOR_SERVICES_PORT_BASE": str(free_port_base()),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    team = Team(root / "services", env)
    try:
        started = team.services("up")
        assert "services up in" in started.stdout
        yield team
    finally:
        team.services("down")
        shutil.rmtree(root, ignore_errors=True)


def runner_env(team: Team) -> dict[str, str]:
    """A runner's environment: the tracking URI and credentials, git identity, no server
    secrets (the DVC keys live in the clone's .dvc/config.local)."""
    credentials = team.credentials()
    return {
        **team.env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **{key: value for key, value in credentials.items() if key.startswith("MLFLOW_")},
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
    }


@pytest.fixture(scope="module")
def origin(team: Team, mirror: Path) -> Path:
    """A bare git repository with this project on the tiny profile, DVC initialised."""
    work = team.root.parent / "origin-work"
    work.mkdir()
    copy_project(work)
    params = yaml.safe_load(write_params(team.root.parent, TEAM_OVERRIDES).read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = runner_env(team)
    run(["git", "init", "-q", "-b", "main"], work, env)
    run([str(BIN / "dvc"), "init", "-q"], work, env)
    run([str(BIN / "dvc"), "config", "core.check_update", "false"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "tiny team project"], work, env)
    bare = team.root.parent / "origin.git"
    run(["git", "clone", "-q", "--bare", str(work), str(bare)], team.root.parent, env)
    return bare


def clone(team: Team, origin: Path, name: str) -> Path:
    """A runner's checkout, its DVC remote configured by the services script."""
    path = team.root.parent / name
    run(["git", "clone", "-q", str(origin), str(path)], team.root.parent, runner_env(team))
    team.services("configure-runner", str(path))
    return path


def tiny_mirror(team: Team, mirror: Path) -> Path:
    """A few real images per class (msoud: 8 train, 3 test), plus the test slices that
    nine real figshare tumour masks belong to, and those masks (the localise stage)."""
    root = team.root.parent / "mirror"
    if not root.is_dir():
        copy_sample(mirror, root / "msoud", "msoud", 8, ("Training",))
        copy_sample(mirror, root / "msoud", "msoud", 3, ("Testing",))
        copy_matching_slices(mirror, root / "msoud")
        copy_masks(mirror, root / "figshare-masks")
    return root


def dvc(team: Team, project: Path, *args: str, check: bool = True, **extra: str):
    env = {**runner_env(team), **extra}
    result = run([str(BIN / "dvc"), *args], project, env, check=check)
    team.outputs.append(result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def runner_a(team: Team, origin: Path, mirror: Path) -> Path:
    """Runner A: the pipeline end to end against the team stack, then push everything."""
    project = clone(team, origin, "runner-a")
    repro = dvc(
        team,
        project,
        "repro",
        BRAINTUMOR_MIRROR=str(tiny_mirror(team, mirror)),
        BRAINTUMOR_RUNNER="runner-a",
    )
    assert "Running stage 'evaluate'" in repro.stdout
    env = runner_env(team)
    run(["git", "add", "-A"], project, env)  # dvc.lock and the outputs git keeps (cache: false)
    run(["git", "commit", "-qm", "runner A: pipeline results"], project, env)
    run(["git", "push", "-q", "origin", "main"], project, env)
    dvc(team, project, "push", "--run-cache")
    return project


@pytest.fixture(scope="module", autouse=True)
def as_a_runner(team: Team) -> Iterator[None]:
    """This process talks to the team server as a runner would (URI, user, proxied
    transfers) for this module only; the URI and variables are restored afterwards so
    that later tests keep their own stores."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    credentials = team.credentials()
    with (
        pytest.MonkeyPatch.context() as patch,
        _use_tracking_uri(credentials["MLFLOW_TRACKING_URI"]),
    ):
        for key, value in credentials.items():
            if key.startswith("MLFLOW_"):
                patch.setenv(key, value)
        yield


def client(team: Team):
    from mlflow.tracking import MlflowClient

    return MlflowClient(team.credentials()["MLFLOW_TRACKING_URI"])


def bucket_keys(team: Team, prefix: str) -> list[str]:
    import boto3

    credentials = team.credentials()
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{team.port(1)}",
        region_name="us-east-1",
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="braintumor", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_a_second_start_reports_what_already_runs(team: Team) -> None:
    again = team.services("up")
    for name in ("postgres", "s3", "mlflow"):
        assert f"{name}: already running" in again.stdout
    assert team.services("status").returncode == 0


@pytest.fixture(scope="module")
def runner_b(team: Team, origin: Path, runner_a: Path) -> Path:
    """Runner B: a clone that pulls data, outputs and run cache; `dvc repro` reruns nothing."""
    project = clone(team, origin, "runner-b")
    dvc(team, project, "pull", "--run-cache")
    repro = dvc(team, project, "repro", BRAINTUMOR_RUNNER="runner-b")
    assert "Running stage" not in repro.stdout, repro.stdout
    return project


def test_runner_b_pulls_reruns_nothing_and_loads_runner_a_model(team: Team, runner_b: Path) -> None:
    tracking = client(team)
    experiment = tracking.get_experiment_by_name("team-test")
    runs = tracking.search_runs([experiment.experiment_id])
    assert {"frozen", "finetune"} <= {run.info.run_name for run in runs}
    version = max(
        tracking.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version)
    )
    assert version.run_id in {run.info.run_id for run in runs}

    keys = bucket_keys(team, "mlflow-artifacts/")
    assert any(key.startswith(f"mlflow-artifacts/{experiment.experiment_id}/") for key in keys)
    assert any(key.endswith("MLmodel") for key in keys)
    assert bucket_keys(team, "dvc/files/md5/")

    import mlflow

    server_log = team.root / "logs" / "mlflow.log"
    presigned_before = server_log.read_text().count("/presigned/")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version.version}")
    # every byte came through the tracking server, none from a presigned S3 URL
    assert server_log.read_text().count("/presigned/") == presigned_before
    image = next((runner_b / "data" / "raw").rglob("*.jpg")).read_bytes()
    import pandas as pd

    predictions = model.predict(pd.DataFrame({"image": [image]}))
    assert len(predictions) == 1


def test_runner_b_promotes_a_model_then_runs_an_experiment_beside_a(
    team: Team, runner_b: Path
) -> None:
    """B promotes A's challenger through the gate (the registry CLI, B's checkout and
    credentials), runs an experiment of its own that registers the next challenger, and
    loads the champion by alias; the shared UI, in headless Chromium, lists both runners'
    runs and the model's aliases (screenshots in the test artifacts)."""
    tracking = client(team)
    a_version = tracking.get_registered_model(MODEL_NAME).aliases["challenger"]
    env = runner_env(team)
    promoted = run(
        [str(BIN / "python"), "-m", "braintumor.tracking.registry", "promote"], runner_b, env
    )
    assert f"champion is now v{a_version}" in promoted.stdout, promoted.stdout + promoted.stderr
    assert "ok: ECE" in promoted.stdout  # the gate's reasons, printed

    change = "train.finetune.learning_rate=0.002"
    experiment_run = dvc(
        team, runner_b, "exp", "run", "-n", "b-lr", "-S", change, BRAINTUMOR_RUNNER="runner-b"
    )
    assert "Running stage 'finetune'" in experiment_run.stdout
    assert "Running stage 'train'" not in experiment_run.stdout  # phase 1 unchanged: cached

    experiment = tracking.get_experiment_by_name("team-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = tracking.search_runs([experiment.experiment_id])
    by_runner = {run.data.tags.get("runner") for run in runs}
    assert {"runner-a", "runner-b"} <= by_runner, by_runner
    model = tracking.get_registered_model(MODEL_NAME)
    assert model.aliases["champion"] == a_version
    assert int(model.aliases["challenger"]) > int(a_version)  # B's, registered by its evaluate

    import mlflow
    import pandas as pd

    champion = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    image = next((runner_b / "data" / "raw").rglob("*.jpg")).read_bytes()
    assert len(champion.predict(pd.DataFrame({"image": [image]}))) == 1

    texts = screenshot_mlflow_ui(team, experiment.experiment_id)
    # The experiment opens on its runs (the parents: A's `dvc repro`, B's experiment).
    assert "pipeline" in texts["runs"] and "b-lr" in texts["runs"], texts["runs"][:2000]
    assert "champion" in texts["model"] and "challenger" in texts["model"], texts["model"][:2000]


def screenshot_mlflow_ui(team: Team, experiment_id: str) -> dict[str, str]:
    """The experiment's runs and the registered model's versions in the real MLflow UI
    (basic auth as the team user); returns each page's text, saves PNGs under
    ``$BRAINTUMOR_TEST_ARTIFACTS/team/``."""
    from braintumor.tracking.runs import ui_url

    from conftest import launch_chromium

    credentials = team.credentials()
    base = credentials["MLFLOW_TRACKING_URI"].rstrip("/")
    folder = Path(os.environ.get("BRAINTUMOR_TEST_ARTIFACTS", team.root.parent)) / "team"
    folder.mkdir(parents=True, exist_ok=True)
    pages = {
        "runs": (ui_url(base, experiment_id), "b-lr"),  # the "Model training" view
        "model": (f"{base}/#/models/{MODEL_NAME}", "challenger"),
    }
    texts = {}
    with launch_chromium() as browser:
        context = browser.new_context(
            viewport={"width": 1600, "height": 1000},
            http_credentials={
                "username": credentials["MLFLOW_TRACKING_USERNAME"],
                "password": credentials["MLFLOW_TRACKING_PASSWORD"],
            },
        )
        page = context.new_page()
        for name, (url, wanted) in pages.items():
            page.goto(url)
            try:
                page.get_by_text(wanted).first.wait_for(timeout=60_000)
            finally:
                page.screenshot(path=str(folder / f"mlflow_{name}.png"), full_page=True)
            texts[name] = page.inner_text("body")
    return texts


def test_wrong_credentials_are_refused_with_a_clear_message(
    team: Team, origin: Path, runner_a: Path
) -> None:
    import requests

    project = clone(team, origin, "runner-wrong-keys")
    dvc(team, project, "remote", "modify", "--local", "team", "secret_access_key", "not-the-key")
    pulled = dvc(team, project, "pull", check=False)
    assert pulled.returncode != 0
    # S3 answers a HEAD without a body, so DVC can say no more than this:
    assert "failed to connect to s3 (braintumor/dvc/files/md5) - Forbidden" in pulled.stderr

    s3_url = f"http://127.0.0.1:{team.port(1)}/braintumor"
    assert requests.get(s3_url, timeout=10).status_code == 403  # anonymous
    search = f"{team.credentials()['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    for auth in (None, ("team", "not-the-password")):
        refused = requests.post(search, json={"max_results": 1}, auth=auth, timeout=30)
        assert refused.status_code == 401


def test_push_while_s3_is_down_fails_clearly_then_succeeds_after_restart(
    team: Team, runner_a: Path
) -> None:
    note = runner_a / "team-note.txt"
    note.write_text(f"pushed while the store was down {random.random()}\n")
    dvc(team, runner_a, "add", "team-note.txt")
    md5 = yaml.safe_load((runner_a / "team-note.txt.dvc").read_text())["outs"][0]["md5"]

    team.services("down", "s3")
    failed = dvc(team, runner_a, "push", check=False)
    team.services("up", "s3")
    assert failed.returncode != 0
    print("observed, S3 down:", failed.stderr.strip()[-600:])
    assert "Could not connect to the endpoint URL" in failed.stderr, failed.stderr[-2000:]

    dvc(team, runner_a, "push")
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in bucket_keys(team, "dvc/files/md5/")


def search_runs_over_rest(team: Team, experiment: str):
    """One plain request (MlflowClient would retry a 5xx for minutes)."""
    import requests

    credentials = team.credentials()
    return requests.post(
        f"{credentials['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment], "max_results": 5},
        timeout=60,
        auth=(credentials["MLFLOW_TRACKING_USERNAME"], credentials["MLFLOW_TRACKING_PASSWORD"]),
    )


def test_mlflow_serves_again_after_postgres_restarts_without_data_loss(
    team: Team, runner_a: Path
) -> None:
    """``services up postgres`` returns once PostgreSQL accepts connections (``pg_ctl -w``),
    so the very next request is served: SQLAlchemy's pre-ping replaces the dead pooled
    connections. One plain request, no retries, is what is tested."""
    tracking = client(team)
    experiment = tracking.get_experiment_by_name("team-test").experiment_id
    before = sorted(run.info.run_id for run in tracking.search_runs([experiment]))
    versions = len(tracking.search_model_versions(f"name='{MODEL_NAME}'"))

    team.services("down", "postgres")
    down = search_runs_over_rest(team, experiment)
    print("observed, PostgreSQL down:", down.status_code, down.text[:300])
    assert down.status_code >= 500
    team.services("up", "postgres")
    again = search_runs_over_rest(team, experiment)
    print("observed, PostgreSQL back: first request", again.status_code)
    assert again.status_code == 200, again.text[:500]
    after = sorted(run.info.run_id for run in tracking.search_runs([experiment]))
    assert after == before
    assert len(tracking.search_model_versions(f"name='{MODEL_NAME}'")) == versions
    new = tracking.create_run(experiment, run_name="after-postgres-restart")
    assert tracking.get_run(new.info.run_id).info.run_name == "after-postgres-restart"


def test_no_secret_in_any_log_output_param_or_tag(team: Team, runner_a: Path) -> None:
    secrets = team.secret_values()
    assert len(secrets) >= 6
    logs = [path.read_text(errors="replace") for path in (team.root / "logs").iterdir()]
    tracking = client(team)
    experiment = tracking.get_experiment_by_name("team-test").experiment_id
    runs = [
        json.dumps([run.data.params, run.data.tags]) for run in tracking.search_runs([experiment])
    ]
    versions = [json.dumps(v.tags) for v in tracking.search_model_versions(f"name='{MODEL_NAME}'")]
    committed = run(["git", "log", "-p", "--all"], runner_a, runner_env(team)).stdout
    texts = [*team.outputs, *logs, *runs, *versions, committed]
    # names only: a failure message must not print the secret it found
    leaked = sorted(name for name, value in secrets.items() if any(value in t for t in texts))
    assert leaked == [], "found in an output, a log, a run or a commit"


def test_every_file_holding_a_secret_is_owner_only(team: Team, runner_b: Path) -> None:
    """Secrets, the runners' DVC keys, MLflow's password hashes and the stored data: 0600
    files in 0700 folders, as left after the whole flow (restarts included)."""
    secrets = team.root / "secrets"
    owner_only = {secrets: 0o700}
    for path in secrets.rglob("*"):
        owner_only[path] = 0o700 if path.is_dir() else 0o600
    names = {path.name for path in owner_only}
    assert {"pgpass", "s3.json", "basic_auth.ini", "runner.env", "security.toml"} <= names
    assert {"grpc.key", "seaweedfs_volume_read_key", "seaweedfs_filer_write_key"} <= names
    for clone in sorted(team.root.parent.glob("runner-*")):
        owner_only[clone / ".dvc" / "config.local"] = 0o600
    for path in (team.root / "mlflow").glob("basic_auth.db*"):
        owner_only[path] = 0o600
    for folder in ("mlflow", "seaweedfs", "run"):
        owner_only[team.root / folder] = 0o700
    for path in (team.root / "logs").iterdir():
        owner_only[path] = 0o600
    modes = {str(path): oct(path.stat().st_mode & 0o777) for path in owner_only}
    wrong = {name: found for name, found in modes.items() if found != oct(owner_only[Path(name)])}
    assert wrong == {}
    assert len([path for path in owner_only if path.name == "config.local"]) >= 2
