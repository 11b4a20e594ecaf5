"""core.paths: the stores resolve to the repository, even from DVC's temporary workspaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumor.core.paths import real_project_root, resolve_tracking_uri


def test_a_dvc_temporary_workspace_maps_to_its_repository() -> None:
    repo = Path("/work/clone")
    assert real_project_root(repo / ".dvc" / "tmp" / "exps" / "tmpab12") == repo
    assert real_project_root(repo / ".dvc" / "tmp" / "exps" / "run" / "x") == repo
    assert real_project_root(repo) == repo
    assert real_project_root(repo / ".dvc" / "tmp") == repo / ".dvc" / "tmp"


def test_relative_sqlite_is_anchored_at_the_real_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Path("/work/clone/.dvc/tmp/exps/tmp1")
    assert (
        resolve_tracking_uri("sqlite:///mlflow.db", workspace) == "sqlite:////work/clone/mlflow.db"
    )
    assert resolve_tracking_uri("sqlite:////abs/m.db", workspace) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("sqlite:///:memory:", workspace) == "sqlite:///:memory:"
    assert resolve_tracking_uri("http://127.0.0.1:5000", workspace) == "http://127.0.0.1:5000"


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert resolve_tracking_uri("sqlite:///mlflow.db", Path("/p")) == "sqlite:////p/team.db"
