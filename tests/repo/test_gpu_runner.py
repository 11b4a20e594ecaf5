"""The GPU runner's workflow (.github/workflows/gpu-experiment.yml) and install.

The workflow runs only on a self-hosted GPU runner, so CI cannot run it; what CI can do
is read it: a self-hosted GPU job that installs with the GPU lock, pulls before the
experiment, pushes after it, reports `dvc metrics diff`, and takes every credential from
secrets. The GPU lock itself is resolved against the package index by
``test_the_gpu_lock_resolves`` (a dry run: metadata only, nothing installed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_locks import RUNTIME, canonical, pins

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "gpu-experiment.yml"
GPU_LOCK = REPO / "requirements-gpu.lock"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def job_steps() -> list[dict]:
    (job,) = workflow()["jobs"].values()
    return job["steps"]


def step_index(pattern: str) -> int:
    """The first step whose command matches ``pattern``; fails naming it otherwise."""
    for index, step in enumerate(job_steps()):
        if re.search(pattern, step.get("run", "")):
            return index
    raise AssertionError(f"no step runs {pattern!r}")


def test_the_job_runs_on_a_self_hosted_gpu_runner_with_jax() -> None:
    (job,) = workflow()["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    assert job["env"]["KERAS_BACKEND"] == "jax"


def test_pull_then_experiment_then_push_then_report() -> None:
    order = [
        step_index(r"make install GPU=1"),
        step_index(r"dvc remote add --local"),
        step_index(r"dvc pull --run-cache"),
        step_index(r"dvc exp run"),
        step_index(r"dvc push --run-cache"),
        step_index(r"dvc metrics diff"),
    ]
    assert order == sorted(order) and len(set(order)) == len(order), order
    assert "cml comment create" in job_steps()[order[-1]]["run"]


def test_credentials_come_from_secrets_only() -> None:
    text = WORKFLOW.read_text()
    for name in ("MLFLOW_TRACKING_PASSWORD", "S3_SECRET", "S3_KEY"):
        assignments = re.findall(rf"^\s*{name}:\s*(.+)$", text, re.M)
        assert assignments and all(a.startswith("${{ secrets.") for a in assignments), name
    # Keys reach DVC through --local (config.local, ignored by git), never the tracked config.
    for line in text.splitlines():
        if "dvc remote" in line:
            assert "--local" in line, line


def test_the_make_target_the_workflow_uses_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^ifeq \(\$\(GPU\),1\)", makefile, re.M), "make install GPU=1 is gone"
    assert "requirements-gpu.lock" in makefile


def test_the_gpu_lock_adds_cuda_jax_to_the_runtime() -> None:
    gpu = pins(GPU_LOCK)
    assert not set(gpu) & set(RUNTIME), "the GPU lock repeats a runtime pin"
    assert {"jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"} <= set(gpu)
    dev = pins(REPO / "requirements-dev.lock")
    assert gpu["jax"] == dev["jax"] and gpu["jaxlib"] == dev["jaxlib"]  # CPU tests = GPU code


@pytest.mark.integration
def test_the_gpu_lock_resolves() -> None:
    """pip resolves runtime + GPU lock with dependencies (metadata only, nothing installed)
    and wants exactly the pinned set: nothing missing, nothing else."""
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
            "-",
            "-r",
            str(REPO / "requirements.lock"),
            "-r",
            str(GPU_LOCK),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    resolved = {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.stdout)["install"]
    }
    wanted = {**RUNTIME, **pins(GPU_LOCK)}
    assert resolved == wanted, {
        "not pinned": sorted(set(resolved) - set(wanted)),
        "not needed": sorted(set(wanted) - set(resolved)),
        "other version": sorted(
            k for k in resolved.keys() & wanted.keys() if resolved[k] != wanted[k]
        ),
    }
