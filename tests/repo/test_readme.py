"""The README's annotated repository layout stays true."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO


def _layout_paths() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Repository layout\n\n```text\n(.*?)```", text, re.S)
    assert block, "README has no Repository layout block"
    # Lines starting with "#" head the groups (the package's layers), not paths.
    lines = block.group(1).splitlines()
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


def _tracked() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in out.splitlines() if line and (REPO / line).exists()}


def test_every_listed_path_exists() -> None:
    missing = [path for path in _layout_paths() if not (REPO / path).exists()]
    assert not missing, f"README lists paths that do not exist: {missing}"


def test_every_source_test_and_top_level_file_is_listed() -> None:
    listed = set(_layout_paths())
    expected = {
        path
        for path in _tracked()
        if path.startswith(("src/", "tests/", "bench/", "profiles/", ".ci/")) or "/" not in path
    }
    expected -= {".dvc/.gitignore"}
    # A subpackage's __init__.py is its folder, kept empty (tests/integration/test_pipeline.py).
    expected -= {
        p for p in expected if p.endswith("/__init__.py") and p != "src/braintumor/__init__.py"
    }
    unlisted = sorted(
        path
        for path in expected
        if path.endswith(
            (".py", ".yaml", ".lock", ".toml", ".md", "Makefile", "run", ".gitignore", ".dvcignore")
        )
        and path not in listed
    )
    assert not unlisted, f"README layout misses: {unlisted}"
