"""Integration: real `dvc repro` of the data stages in a temporary copy of the project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PACKAGE, REPO, braintumor_imports, copy_project, package_modules

pytestmark = pytest.mark.integration


def _dvc(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def project(tmp_path: Path, small_mirror: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC project holding this repository's pipeline, on the quickstart profile,
    with images shrunk to 64 px and the small real-data mirror."""
    project = tmp_path / "project"
    project.mkdir()
    copy_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "quickstart"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    profile = yaml.safe_load((project / "profiles" / "quickstart.yaml").read_text())
    profile["common"] = {**(profile.get("common") or {}), "image_size": 64}
    (project / "profiles" / "quickstart.yaml").write_text(yaml.safe_dump(profile))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "BRAINTUMOR_MIRROR": str(small_mirror),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q", env=env)
    _dvc(project, "config", "core.check_update", "false", env=env)
    return project, env


def test_dvc_repro_of_the_data_stages_then_a_noop_rerun(project) -> None:
    project, env = project
    first = _dvc(project, "repro", "preprocess", env=env)
    for stage in ("acquire", "clean", "preprocess"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "metrics" / "data.json").read_text())
    assert "colour" not in metrics["dropped"]  # both sources are real MRI
    by_source = metrics["leakage"]["by_source"]
    assert set(by_source) == {"msoud", "sartaj"}
    assert metrics["kept"] == sum(
        count for split in metrics["kept_by_source_split"].values() for count in split.values()
    )
    images = np.load(project / "data" / "processed" / "train_images.npy", mmap_mode="r")
    assert images.shape[1:] == (64, 64, 1)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"acquire", "clean", "preprocess"}

    second = _dvc(project, "repro", "preprocess", env=env)
    assert "Running stage" not in second.stdout
    for stage in ("acquire", "clean", "preprocess"):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout
    status = _dvc(project, "status", "preprocess", env=env)
    assert "up to date" in status.stdout

    # a clean parameter reruns clean and preprocess, not acquire
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["clean"]["near_similarity"] = 0.97
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(project, "repro", "preprocess", env=env)
    assert "Stage 'acquire' didn't change" in third.stdout
    assert "Running stage 'clean'" in third.stdout


def test_a_failing_stage_keeps_the_last_good_outputs(project) -> None:
    project, env = project
    _dvc(project, "repro", "preprocess", env=env)
    processed = project / "data" / "processed"
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["preprocess"]["val_fraction"] = 0.99  # leaves a class without training images
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro", "preprocess"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "error: preprocess.val_fraction=0.99" in result.stderr
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before


def _imported_modules(module: str) -> set[str]:
    """``braintumor`` modules ``module`` imports, at any depth and inside functions too
    (those run when the stage runs), found by reading the sources; by their files, relative
    to the repository (an imported subpackage is its ``__init__.py``)."""
    modules = package_modules()
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        todo.extend(braintumor_imports(modules[name].read_text(), name))
    return {modules[name].relative_to(REPO).as_posix() for name in seen}


def test_every_stage_depends_on_every_module_it_runs() -> None:
    """A module a stage imports but does not list would not rerun the stage when it
    changes: DVC would report stale outputs as up to date. The subpackages' ``__init__``
    files are empty, and a test below keeps them so."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split("-m braintumor.", 1)[1].split()[0]
        listed = {dep for dep in stage["deps"] if dep.startswith("src/braintumor/")}
        missing = {
            path for path in _imported_modules(module) - listed if not path.endswith("__init__.py")
        }
        assert not missing, f"stage {name}: dvc.yaml deps lack {sorted(missing)}"


def test_the_subpackages_init_files_are_empty() -> None:
    """An ``__init__`` that ran code would run for every stage importing its subpackage,
    unlisted in ``dvc.yaml``; empty, a package is only a folder."""
    filled = [
        str(path)
        for path in PACKAGE.rglob("__init__.py")
        if path.read_text().strip() and path.parent != PACKAGE
    ]
    assert not filled, f"non-empty subpackage __init__ files: {filled}"
