"""Shared fixtures: the real-data mirror and small trees of real images built from it."""

from __future__ import annotations

import ast
import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "braintumor"
# Debian's Chromium, driven by Playwright (never `playwright install`: no downloads here).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def committed_params_text() -> str:
    """The repository's ``params.yaml`` as committed (the paper profile), not as the working
    tree holds it now: ``make run`` is ``dvc exp run -S profile=quickstart``, which leaves
    ``profile: quickstart`` there (as ``-S common.seed=...`` leaves its seed), and no test
    may depend on which command ran before it. Outside a git checkout (an unpacked
    archive) the file itself is all there is."""
    try:
        shown = subprocess.run(
            ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        shown = None
    if shown is not None and shown.returncode == 0:
        return shown.stdout
    return (REPO / "params.yaml").read_text(encoding="utf-8")


@functools.cache
def params_file() -> Path:
    """A ``params.yaml`` with the committed text and the working tree's ``profiles/`` beside
    it, for ``load_params``; one per test session, removed when it ends."""
    folder = Path(tempfile.mkdtemp(prefix="braintumor-params-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "params.yaml").write_text(committed_params_text(), encoding="utf-8")
    shutil.copytree(REPO / "profiles", folder / "profiles")
    return folder / "params.yaml"


@contextlib.contextmanager
def launch_chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, headless, with ``CHROMIUM_ARGS``; a missing
    browser or playwright fails the test saying how ``make test`` installs it."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: `make test` installs it "
            "(apt-get install -y chromium); the browser tests need it"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make test` installs it with the test extras")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module (``launch_chromium``)."""
    with launch_chromium() as launched:
        yield launched


def mirror_dir() -> Path:
    """The team's read-only mirror of the data sets (../shared/datasets beside the repo)."""
    configured = os.environ.get("BRAINTUMOR_MIRROR")
    return Path(configured) if configured else REPO.parent / "shared" / "datasets"


MIRROR_SOURCES = ("msoud", "sartaj")


def require_mirror() -> Path:
    """The mirror, or the calling test fails saying where it was looked for.

    One rule for every test that reads real images: a missing mirror is a failure with
    this message, never a skip (a skipped data tier would pass CI without testing)."""
    path = mirror_dir()
    missing = [name for name in MIRROR_SOURCES if not (path / name).is_dir()]
    if missing:
        pytest.fail(
            f"data mirror not found at {path} (missing {', '.join(missing)}): set BRAINTUMOR_MIRROR"
        )
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reads the mirror (directly or through a fixture) ``data``, so
    that ``make test-fast`` can leave out the data and model tiers."""
    for item in items:
        if "mirror" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The data mirror; a module whose helpers read it uses
    ``pytestmark = pytest.mark.usefixtures("mirror")``."""
    return require_mirror()


def copy_sample(
    mirror: Path,
    destination: Path,
    source: str,
    per_class: int,
    splits: tuple[str, ...] = ("Training", "Testing"),
    offset: int = 0,
) -> list[Path]:
    """Copy ``per_class`` real images of every class folder of ``source`` (sorted names,
    starting at ``offset``) into ``destination/<split>/<class>/``; returns the copies."""
    copies = []
    for split in splits:
        for class_dir in sorted((mirror / source / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            files = sorted(p for p in class_dir.iterdir() if p.is_file())[offset:]
            target = destination / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in files[:per_class]:
                copies.append(Path(shutil.copy2(path, target / path.name)))
    return copies


@pytest.fixture
def small_mirror(mirror: Path, tmp_path: Path) -> Path:
    """A mirror of a few real images per class: msoud (6 train / 3 test per class) and
    sartaj (2 / 1 per class)."""
    root = tmp_path / "mirror"
    copy_sample(mirror, root / "msoud", "msoud", 6, ("Training",))
    copy_sample(mirror, root / "msoud", "msoud", 3, ("Testing",))
    copy_sample(mirror, root / "sartaj", "sartaj", 2, ("Training",))
    copy_sample(mirror, root / "sartaj", "sartaj", 1, ("Testing",))
    return root


QUICKSTART_SOURCES = [
    {
        "name": "msoud",
        "uri": "kaggle://masoudnickparvar/brain-tumor-mri-dataset",
        "labels": {c: c for c in ("glioma", "meningioma", "notumor", "pituitary")},
    },
    {
        "name": "sartaj",
        "uri": "kaggle://sartajbhuvaji/brain-tumor-classification-mri",
        "labels": {
            "glioma_tumor": "glioma",
            "meningioma_tumor": "meningioma",
            "no_tumor": "notumor",
            "pituitary_tumor": "pituitary",
        },
    },
]


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """Write the repository's params.yaml (paper profile) with ``overrides`` deep-merged
    into ``directory``; returns its path."""
    import yaml

    from braintumor.core.config import deep_merge

    raw = yaml.safe_load(committed_params_text())
    merged = deep_merge(raw, overrides or {})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def write_acquire_params(
    folder: Path, sources: list[dict[str, object]], **acquire_extra: object
) -> Path:
    """A params.yaml with the project's ``common`` and ``acquire`` sections, sources replaced.

    Only the sections the acquire stage reads are kept (every other one takes its
    defaults), so its tests do not break while another stage's parameters are changed.
    """
    import yaml

    raw = yaml.safe_load(committed_params_text())
    settings = {**raw["acquire"], "mirror": None, "retries": 2, "timeout_s": 5.0}
    settings.update(chunk_bytes=4096, **acquire_extra, sources=sources)
    params = {"profile": "paper", "common": raw["common"], "acquire": settings}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


# What a pipeline project needs of this repository (tests build throwaway git + DVC copies).
PROJECT_FILES = ["dvc.yaml", "params.yaml", "profiles", "src", ".dvcignore"]


def copy_project(destination: Path) -> None:
    """Copy the pipeline's files (``PROJECT_FILES``) of this repository into ``destination``,
    ``params.yaml`` as committed (``committed_params_text``)."""
    for name in PROJECT_FILES:
        source = REPO / name
        if name == "params.yaml":
            (destination / name).write_text(committed_params_text(), encoding="utf-8")
        elif source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(source, destination / name)


@pytest.fixture
def acquire_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No machine setting leaks into acquire: `make run` exports BRAINTUMOR_MIRROR, CI may
    set proxies (the loopback test servers must be reached directly)."""
    monkeypatch.delenv("BRAINTUMOR_MIRROR", raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@contextlib.contextmanager
def http_server(handler: type) -> Iterator[Any]:
    """A real threaded HTTP server with ``handler`` on 127.0.0.1 and a free port, serving
    from a thread until the block ends; yields the server (``server_address[1]``: port)."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for a server the test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(folder: Path):
    """A real `mlflow server` on loopback (SQLite store, proxied artifacts in ``folder``);
    yields its URL and stops the whole process group afterwards."""
    import signal
    import subprocess
    import sys
    import time

    import requests

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(folder / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=2).text.strip() == "OK":
                        break
                except requests.RequestException:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


TINY_SIZE = 48
TINY_OVERRIDES = {
    "acquire": {"sources": QUICKSTART_SOURCES[:1]},
    "common": {"image_size": TINY_SIZE},
    "preprocess": {"val_fraction": 0.3, "workers": 1},
    # A few images per class: the label audit's out-of-fold probabilities need a group of
    # images per class in each fold.
    "audit": {"folds": 2},
    "model": {"backbone": "tinycnn", "weights": "none", "gradcam_layer": "auto"},
    # tinycnn has no stride-16 block of the backbones' names: HiResCAM at its second
    # block (a strided conv, BN and ReLU before the pooled map) is served instead.
    "serving": {"explanation": {"method": "hirescam", "layer": "tiny_relu2"}},
    "evaluate": {
        "bootstrap_resamples": 50,
        "gradcam_examples": 1,
        "occlusion_patch": 16,
        "occlusion_stride": 16,
    },
}


def _train_tiny_model(data: Path, params, seed: int, epochs: int):
    import keras
    import numpy as np

    from braintumor.model.classifier import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(params.model, TINY_SIZE, len(params.common.classes))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    images = np.load(data / "train_images.npy").astype("float32")
    labels = np.load(data / "train_labels.npy")
    model.fit(images, labels, epochs=epochs, batch_size=16, verbose=0)
    return model


@pytest.fixture(scope="session")
def tiny_project(mirror: Path, tmp_path_factory) -> dict[str, Path]:
    """Processed tiny real data (10 train / 5 test images per class, 48 px) and two small
    trained tinycnn models saved as ``base`` and ``finetuned``."""
    from braintumor.core.config import load_params
    from braintumor.data.cleaning import clean
    from braintumor.data.preprocessing import preprocess

    root = tmp_path_factory.mktemp("tiny-project")
    raw = root / "raw"
    copy_sample(mirror, raw / "msoud", "msoud", 10, ("Training",), offset=200)
    copy_sample(mirror, raw / "msoud", "msoud", 5, ("Testing",), offset=200)
    params_path = write_params(root, TINY_OVERRIDES)
    params = load_params(params_path)
    frame = clean(raw, params, progress=False).frame
    preprocess(raw, frame, params, root / "processed", progress=False)
    paths = {"params": params_path, "data": root / "processed", "root": root, "raw": raw}
    paths["label_issues"] = write_label_issues(root / "label_issues.csv", root / "processed")
    for name, seed, epochs in (("base", 1, 1), ("finetuned", 2, 4)):
        paths[name] = root / f"{name}.keras"
        _train_tiny_model(root / "processed", params, seed, epochs).save(paths[name])
    return paths


# Validation rows of ``tiny_project`` written as the label audit's suspects: the evaluate
# stage leaves them out of its temperature fit (``fit_view: val_unflagged``).
TINY_FLAGGED_VAL_ROWS = (0, 3)


def write_label_issues(path: Path, processed: Path) -> Path:
    """A ``metrics/label_issues.csv`` in the audit's columns flagging ``TINY_FLAGGED_VAL_ROWS``
    of the processed validation split (the tiny project does not run the audit)."""
    import pandas as pd

    val = pd.read_csv(processed / "val_index.csv").iloc[list(TINY_FLAGGED_VAL_ROWS)]
    table = pd.DataFrame(
        {
            "id": val["id"],
            "split": "val",
            "source": val["source"],
            "path": val["path"],
            "label": val["label"],
            "suggested": val["label"],
            "label_quality": 0.0,
            "label_probability": 0.0,
            "suggested_probability": 1.0,
        }
    )
    table.to_csv(path, index=False)
    return path


def evaluate_args(project: dict[str, Path], out: Path, **replace: Path) -> list[str]:
    """Command-line arguments of the evaluate stage over ``tiny_project``, into ``out``."""
    paths = {**project, **replace}
    return [
        "--params",
        str(paths["params"]),
        "--data",
        str(paths["data"]),
        "--raw",
        str(paths["raw"]),
        "--base-model",
        str(paths["base"]),
        "--finetuned-model",
        str(paths["finetuned"]),
        "--metrics",
        str(out / "metrics" / "eval.json"),
        "--report",
        str(out / "eval.md"),
        "--plots",
        str(out / "plots"),
        "--figures",
        str(out / "figures"),
        "--bundle",
        str(out / "bundle"),
        "--run-file",
        str(out / "evaluate_run.json"),
        "--label-issues",
        str(paths["label_issues"]),
    ]


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name under ``braintumor``
    (``"serving.bundle"``), and every subpackage by its folder's (``"serving"``, whose file is
    its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def braintumor_imports(source: str, importer: str = "") -> set[str]:
    """The ``braintumor`` modules a module's source imports, by dotted name under the
    package, read from its syntax tree: at module level, under ``if TYPE_CHECKING`` and
    inside functions alike (a function's import runs when the function does).

    ``importer`` is the module's own dotted name (``"explain.gradcam"``), which resolves
    its relative imports. ``from braintumor.a import b`` gives ``a`` and ``a.b``, since ``b``
    may be a module or a name; callers keep the ones ``package_modules`` knows."""
    package = importer.split(".")[:-1] if importer else []
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = [*base, *(node.module.split(".") if node.module else [])]
                module = ".".join(["braintumor", *parts])
            else:
                module = node.module or ""
            if module != "braintumor" and not module.startswith("braintumor."):
                continue
            prefix = module.removeprefix("braintumor").lstrip(".")
            if prefix:
                found.add(prefix)
            found.update(f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("braintumor.")
                for alias in node.names
                if alias.name.startswith("braintumor.")
            )
    return found


# The app's session fixtures (one real server per session), shared by the serving unit
# tier and the browser tier; imported here so that pytest registers them for both.
from app_helpers import app_server, reference_predictor, served_bundle  # noqa: E402, F401
