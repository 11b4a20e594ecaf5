"""The two lock files are installed with ``pip install --no-deps``: nothing resolves a
dependency at install time, so these tests are what keeps each file closed (every
requirement of a listed package is listed too), disjoint and in step with pyproject.toml
and with the environment the tests run in."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version of one lock file."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: {line!r} is not pinned with =="
        assert canonical(name) not in found, f"{path.name}: {name} pinned twice"
        found[canonical(name)] = version
    return found


RUNTIME = pins(ROOT / "requirements.lock")
DEV = pins(ROOT / "requirements-dev.lock")


def missing_requirements(names: set[str]) -> list[tuple[str, str]]:
    """(package, requirement) pairs where an installed package of ``names`` needs one not in it."""
    missing = []
    for name in sorted(names):
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if canonical(requirement.name) not in names:
                missing.append((name, canonical(requirement.name)))
    return missing


def test_the_locks_do_not_overlap() -> None:
    assert not set(RUNTIME) & set(DEV)


def test_the_environment_matches_the_locks() -> None:
    for name, version in {**RUNTIME, **DEV}.items():
        assert metadata.version(name) == version, name


def test_the_runtime_lock_is_closed() -> None:
    assert missing_requirements(set(RUNTIME)) == []


def test_both_locks_together_are_closed() -> None:
    assert missing_requirements(set(RUNTIME) | set(DEV)) == []


@pytest.mark.parametrize("group", ["dependencies", "test", "backends", "services"])
def test_every_declared_dependency_is_pinned_where_it_belongs(group: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = (
        project["dependencies"]
        if group == "dependencies"
        else project["optional-dependencies"][group]
    )
    lock = RUNTIME if group == "dependencies" else {**RUNTIME, **DEV}
    for text in declared:
        requirement = Requirement(text)
        name = canonical(requirement.name)
        assert name in lock, f"{requirement.name} ({group}) is in no lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), (name, lock[name])
