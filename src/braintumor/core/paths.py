"""Where the project's stores are, derived from the project root and the environment.

Pure functions (no MLflow import), shared by the tracking module of the stages and by the
serving layer, so both resolve the same tracking URI from the same parameters.
"""

from __future__ import annotations

import os
from pathlib import Path


def real_project_root(project_root: Path) -> Path:
    """The repository itself when ``project_root`` is one of DVC's temporary experiment
    workspaces (``<repo>/.dvc/tmp/exps/...``), which are deleted after the run."""
    parts = project_root.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    return project_root


def resolve_tracking_uri(configured: str, project_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``configured``; relative sqlite paths made
    absolute against the (real) project root."""
    project_root = real_project_root(project_root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        relative = uri[len(prefix) :]
        if relative and relative != ":memory:":
            uri = prefix + str((project_root / relative).resolve())
    return uri
