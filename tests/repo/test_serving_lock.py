"""Issue 22 item 2: a serving install without the training framework.

``requirements-serving.lock`` is installed with ``pip install --no-deps`` like the other
locks, so these tests keep it closed (every requirement of a listed package listed),
pinned as ``requirements.lock`` pins the same packages (one set of versions is tested),
and free of TensorFlow, Keras, JAX and torch; the slow one builds a virtual environment
from it alone and runs ``predict`` there on a bundle's exported model, with TensorFlow
not importable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_locks import RUNTIME, missing_requirements, pins

from serving_helpers import real_images, tiny_exported_bundle

ROOT = Path(__file__).resolve().parents[2]
SERVING = pins(ROOT / "requirements-serving.lock")
TRAINING_FRAMEWORKS = {
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "jax",
    "jaxlib",
    "torch",
    "tf-keras",
}


def test_the_serving_lock_holds_no_training_framework() -> None:
    assert not TRAINING_FRAMEWORKS & set(SERVING)
    assert "ai-edge-litert" in SERVING


def test_the_serving_lock_is_closed() -> None:
    assert missing_requirements(set(SERVING)) == []


def test_the_serving_lock_pins_what_the_runtime_lock_pins() -> None:
    differ = {
        name: (version, RUNTIME[name])
        for name, version in SERVING.items()
        if name in RUNTIME and RUNTIME[name] != version
    }
    assert not differ
    assert set(SERVING) <= set(RUNTIME), sorted(set(SERVING) - set(RUNTIME))


@pytest.mark.slow
def test_predict_runs_from_the_serving_install_alone(mirror: Path, tmp_path: Path) -> None:
    """About a minute: a fresh venv from requirements-serving.lock plus the package (not
    editable), then ``predict`` on real slices with the exported bundle."""
    bundle = tiny_exported_bundle(mirror, tmp_path / "bundle")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements-serving.lock")], check=True)
    # From a copy: pip builds in the source tree (a build/ folder), not in the checkout.
    package = tmp_path / "package"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", package / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, package / name)
    subprocess.run([*pip, str(package)], check=True, cwd=tmp_path)
    python = str(venv / "bin" / "python")
    blocked = subprocess.run(
        [python, "-c", "import tensorflow"], capture_output=True, text=True, cwd=tmp_path
    )
    assert blocked.returncode != 0 and "No module named 'tensorflow'" in blocked.stderr
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in real_images(mirror, 1, "Testing", offset=5):
        (scans / path.name).write_bytes(path.read_bytes())
    (scans / "broken.jpg").write_bytes(b"not an image")
    done = subprocess.run(
        [python, "-m", "braintumor.serving.predict", "--model", str(bundle), str(scans)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines()[1:] if line]
    assert len(rows) == 5 and sum(",ok," in row for row in rows) == 4, done.stdout
    assert "litert" in done.stderr  # the model line names the exported runtime
