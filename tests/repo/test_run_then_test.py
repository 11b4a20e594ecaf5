"""The README's two commands in the order a newcomer types them: ``make run``, then the
tests. ``make run`` is ``dvc exp run -S profile=quickstart``, which leaves ``profile:
quickstart`` in the working tree's params.yaml (DVC applies an experiment's parameters
there); the tests must read the committed parameters, whatever the working tree holds.

The test builds a copy of this checkout as ``make run`` leaves it and runs, inside it, the
unit tests that read the parameters (they failed in that state before: 31 of 311)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# Unit tests that read params.yaml through conftest's helpers; no mirror, no slow ones.
PARAMETER_TESTS = (
    "tests/unit/core/test_config.py",
    "tests/unit/evaluation/test_robustness.py",
    "tests/unit/data/test_workers.py",
    "tests/unit/data/test_acquire_hardening.py",
)


def _git(folder: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )


def _as_make_run_leaves_it(folder: Path) -> None:
    """What ``dvc exp run -S profile=quickstart -S common.seed=7`` writes into params.yaml."""
    path = folder / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["profile"] = "quickstart"
    params["common"]["seed"] = 7
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def checkout_after_make_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("after-make-run")
    for name in ("params.yaml", "profiles", "pyproject.toml", "dvc.yaml", "tests", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    (folder / "params.yaml").write_text(
        subprocess.run(
            ["git", "show", "HEAD:params.yaml"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    _git(folder, "init", "-q")
    _git(folder, "add", "params.yaml", "profiles")
    _git(folder, "commit", "-q", "-m", "as cloned")
    _as_make_run_leaves_it(folder)
    return folder


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_tests_pass_after_make_run(checkout_after_make_run: Path) -> None:
    folder = checkout_after_make_run
    assert "profile: quickstart" in (folder / "params.yaml").read_text()
    result = _pytest(folder, "-m", "not slow and not data", *PARAMETER_TESTS)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_the_check_sees_the_working_tree_when_tests_read_it(
    checkout_after_make_run: Path,
) -> None:
    """The test can fail: a test that reads the working tree's params.yaml, as they all
    did, sees the quickstart profile and the changed seed in this copy."""
    probe = checkout_after_make_run / "tests" / "unit" / "core" / "test_probe_working_tree.py"
    probe.write_text(
        "from conftest import REPO, committed_params_text\n"
        "import yaml\n\n"
        "def test_reads_the_working_tree():\n"
        "    assert yaml.safe_load((REPO / 'params.yaml').read_text())['profile'] == 'paper'\n\n"
        "def test_reads_the_commit():\n"
        "    assert yaml.safe_load(committed_params_text())['profile'] == 'paper'\n"
    )
    try:
        result = _pytest(checkout_after_make_run, str(probe.relative_to(checkout_after_make_run)))
    finally:
        probe.unlink()
    assert "1 failed, 1 passed" in result.stdout, result.stdout[-3000:]
