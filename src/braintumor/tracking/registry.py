"""The MLflow model registry: log the evaluation, register the bundle, promote by a gate.

The registered model is a pyfunc (``BundleModel``) whose artifact is the model bundle
(``bundle.py``): it takes raw images (file bytes, base64 text, or gray / RGB arrays) and
applies the whole preprocessing itself, so ``models:/<name>@champion`` works in
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` with nothing else to know.

Promotion uses aliases, not the deprecated stages: evaluate points ``challenger`` at each
new version; ``promote`` moves ``champion`` only when the version passes the gate in
``params.yaml`` (registry.gate), records the decision and its reasons as version tags, and
keeps the list of earlier champions in a registered-model tag so ``--rollback`` can
return to the previous one.

The gate reads each version's numbers from its evaluation run (the version's ``run_id``;
the run's parameters and metrics), never from editable version tags, compares candidate
and champion on the gate's view only when both were measured on the same data and classes,
and refuses the champion's own weights. Promote and rollback hold a file lock beside the
tracking store and re-check the champion before moving the alias, so two at once cannot
both pass against the old champion. The store is the project's (found from
``params.yaml``), whatever the current folder; every error is one line, credentials
stripped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from braintumor.core.config import load_params
from braintumor.core.paths import resolve_tracking_uri
from braintumor.core.redaction import one_line, redact_uri
from braintumor.core.schema import ConfigError, GateParams, Params
from braintumor.serving.bundle import BundleMeta
from braintumor.serving.pyfunc import (
    BundleModel,
    model_config,
    served_requirements,
    signature,
)
from braintumor.tracking.runs import phase_run, pip_requirements

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion.history"
# Parameters of the evaluate run the gate reads: logged once, they cannot be changed.
EVIDENCE_PARAMS = ("evaluation.data_digest", "evaluation.classes", "evaluation.model_sha256")
LOCK_TIMEOUT_S = 120.0
# How MLflow says "no such model, version, run or alias"; any other error (an unreachable
# server) must stop the command, not read as "no champion yet".
MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
PACKAGE_DIR = Path(__file__).resolve().parent
# Test hook only (see ``_test_hook``): unset, as everywhere but the race test, it does nothing.
TEST_PAUSE_ENV = "BRAINTUMOR_REGISTRY_TEST_PAUSE"
TEST_RELEASE_FILE = "release"


class RegistryError(ValueError):
    """The registry is not in a state the command can act on (no such model or alias)."""


def _client(params: Params, project_root: Path) -> MlflowClient:
    """A client of the project's store; a local SQLite store must already exist (MLflow
    would otherwise create an empty one and report "no registered model")."""
    uri = resolve_tracking_uri(params.tracking.tracking_uri, project_root)
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///") :])
        if not database.is_file():
            raise RegistryError(
                f"{database}: no MLflow tracking store there; run the evaluate stage of "
                "this project first, or set MLFLOW_TRACKING_URI"
            )
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


def gate_metrics(metrics: dict[str, Any], view: str, classes: tuple[str, ...]) -> dict[str, float]:
    """What the gate reads from the fine-tuned model's ``eval.json`` numbers."""
    finetuned = metrics["finetuned"]
    values = {
        "macro_f1": float(finetuned[f"{view}.macro_f1"]),
        "accuracy": float(finetuned[f"{view}.accuracy"]),
        "ece": float(finetuned[f"{view}.ece_after"]),
    }
    for name in classes:
        values[f"recall.{name}"] = float(finetuned[f"{view}.{name}_recall"])
    return values


def _version_tags(
    params: Params, bundle_meta: BundleMeta, metrics: dict[str, Any], run_id: str
) -> dict[str, str]:
    """Tags shown beside a version in the UI. For people only: the gate reads the run."""
    view = params.registry.gate.view
    tags = {
        "profile": params.profile,
        "data.digest": bundle_meta.source.get("data_digest", ""),
        "model.sha256": bundle_meta.model_sha256,
        "gate.view": view,
        "metrics": json.dumps(gate_metrics(metrics, view, bundle_meta.classes), sort_keys=True),
        "run_id": run_id,
    }
    git = mlflow.get_run(run_id).data.tags.get("git_commit")
    if git:
        tags["git_commit"] = git
    return tags


def log_evaluation(
    params: Params,
    *,
    project_root: Path,
    parent_file: Path | None,
    run_file: Path | None,
    metrics: dict[str, Any],
    figures: Path,
    reports: list[Path],
    bundle: Path,
    bundle_meta: BundleMeta,
) -> str | None:
    """Log the evaluation as a child run of the pipeline's run; register the bundle as a
    new version with the alias ``challenger``. Returns the new version (or None)."""
    run_file = run_file or bundle.parent / "evaluate_run.json"
    with phase_run(
        params, "evaluate", run_file=run_file, parent_file=parent_file, project_root=project_root
    ) as run:
        flat = {
            f"{model}.{key}": value
            for model, values in metrics.items()
            if isinstance(values, dict)
            for key, value in values.items()
        }
        run.log_metrics(flat)
        for path in sorted(figures.glob("*.png")):
            run.log_artifact(path, "figures")
        for path in reports:
            run.log_artifact(path, "reports")
        if not params.registry.register:
            return None
        # What the gate compares, as parameters of this run before the version exists.
        data_digest = bundle_meta.source.get("data_digest", "")
        evidence = (data_digest, json.dumps(list(bundle_meta.classes)), bundle_meta.model_sha256)
        mlflow.log_params(dict(zip(EVIDENCE_PARAMS, evidence, strict=True)))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BundleModel(),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(bundle_meta.classes),
            model_config=model_config(params.serving, params.clean),
            pip_requirements=served_requirements(
                bool(bundle_meta.exported), pip_requirements(params.train.backend)
            ),
            registered_model_name=params.tracking.registered_model,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        name = params.tracking.registered_model
        for key, value in _version_tags(params, bundle_meta, metrics, run.run_id).items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        return version


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    candidate: dict[str, float]
    champion: dict[str, float] | None
    version: str | None = None  # the candidate, once ``promote`` knows it


@dataclass(frozen=True)
class Evidence:
    """What the gate knows of one version. It is read from the version's evaluation run
    (``ModelVersion.run_id``, set by MLflow at registration; the run's parameters, which
    cannot be changed once logged, and its metrics), never from the version's tags, which
    anyone can edit to claim numbers of an easier view."""

    version: str
    run_id: str
    data_digest: str
    classes: tuple[str, ...]
    model_sha256: str
    metrics: dict[str, float]


def check_gate(
    candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams
) -> GateDecision:
    """Pure: does ``candidate`` pass against the current ``champion`` (None: first one)?"""
    gain = require_gain(gate)
    reasons = []
    if champion is not None:
        needed = champion["macro_f1"] + gain
        verdict = "ok" if candidate["macro_f1"] >= needed else "FAIL"
        reasons.append(
            f"{verdict}: macro-F1 {candidate['macro_f1']:.4f} vs champion's "
            f"{champion['macro_f1']:.4f} + {gain}"
        )
    else:
        reasons.append("ok: no champion yet, macro-F1 not compared")
    for key, value in sorted(candidate.items()):
        if key.startswith("recall."):
            verdict = "ok" if value >= gate.min_class_recall else "FAIL"
            reasons.append(f"{verdict}: {key} {value:.4f} >= {gate.min_class_recall}")
    verdict = "ok" if candidate["ece"] <= gate.max_ece else "FAIL"
    reasons.append(f"{verdict}: ECE {candidate['ece']:.4f} <= {gate.max_ece}")
    passed = not any(reason.startswith("FAIL") for reason in reasons)
    return GateDecision(passed, tuple(reasons), candidate, champion)


def require_gain(gate: GateParams) -> float:
    """The required macro-F1 gain; a negative or non-finite one would let a worse model
    (or any model, for NaN) replace the champion, so it is refused where it is used."""
    gain = float(gate.min_macro_f1_gain)
    if not math.isfinite(gain) or gain < 0:
        raise RegistryError(f"registry.gate.min_macro_f1_gain: must be finite and >= 0, got {gain}")
    return gain


def comparability(candidate: Evidence, champion: Evidence) -> list[str]:
    """Pure: reasons (``ok``/``FAIL``) why the two evaluations do or do not measure the
    same thing: the same weights, data and classes (the view is the gate's, for both)."""
    reasons = []
    if candidate.model_sha256 == champion.model_sha256:
        reasons.append(
            f"FAIL: same weights as the champion v{champion.version} "
            f"(model sha256 {candidate.model_sha256[:12]})"
        )
    if not candidate.data_digest or candidate.data_digest != champion.data_digest:
        reasons.append(
            f"FAIL: evaluated on data {candidate.data_digest[:12] or '?'}, the champion "
            f"v{champion.version} on {champion.data_digest[:12] or '?'}; evaluate both on "
            "the same data"
        )
    if candidate.classes != champion.classes:
        reasons.append(
            f"FAIL: classes {list(candidate.classes)} differ from the champion's "
            f"{list(champion.classes)}"
        )
    if not reasons:
        reasons.append(
            f"ok: same data {candidate.data_digest[:12]} and classes as the champion "
            f"v{champion.version}, different weights"
        )
    return reasons


def _evaluation_run(client: MlflowClient, name: str, version: str) -> Any:
    """The finished evaluate run that registered ``version``."""
    label = f"{name} v{version}"
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as error:
        if not _missing(error):
            raise
        raise RegistryError(f"{label}: no such version") from None
    run_id = model_version.run_id
    if not run_id:
        raise RegistryError(f"{label}: not registered by an evaluation run; cannot gate it")
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if not _missing(error):
            raise
        raise RegistryError(f"{label}: its evaluation run {run_id} no longer exists") from None
    if run.info.status != "FINISHED":
        raise RegistryError(f"{label}: its evaluation run {run_id} is {run.info.status}")
    return run


def read_evidence(client: MlflowClient, name: str, version: str, view: str) -> Evidence:
    """The gate's view of ``version``: its numbers on ``view`` and what they were measured
    on, from its evaluation run; a ``RegistryError`` names what is missing."""
    run = _evaluation_run(client, name, version)
    where = f"{name} v{version}: its evaluation run {run.info.run_id}"
    params = run.data.params
    missing = [key for key in EVIDENCE_PARAMS if key not in params]
    if missing:
        raise RegistryError(f"{where} has no {missing[0]!r} param; evaluate it again")
    try:
        classes = tuple(json.loads(params[EVIDENCE_PARAMS[1]]))
    except (json.JSONDecodeError, TypeError):
        raise RegistryError(f"{where}: {EVIDENCE_PARAMS[1]!r} is not a JSON list") from None
    finetuned = {
        key.removeprefix("finetuned."): value
        for key, value in run.data.metrics.items()
        if key.startswith("finetuned.")
    }
    try:
        metrics = gate_metrics({"finetuned": finetuned}, view, classes)
    except KeyError as error:
        raise RegistryError(f"{where} has no metric 'finetuned.{error.args[0]}'") from None
    return Evidence(
        version,
        run.info.run_id,
        params[EVIDENCE_PARAMS[0]],
        classes,
        params[EVIDENCE_PARAMS[2]],
        metrics,
    )


def lock_path(tracking_uri: str) -> Path:
    """Where promote and rollback serialise: beside a SQLite store, else one file per
    server in the temporary folder (one machine; see ``_move_champion`` for more)."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])
        return database.with_name(f"{database.name}.registry.lock")
    digest = hashlib.sha256(redact_uri(tracking_uri).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"braintumor-registry-{digest}.lock"


@contextlib.contextmanager
def registry_lock(tracking_uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry lock: a promote reads the champion, gates and moves the alias as
    one step, so two at once cannot both pass against the old champion."""
    path = lock_path(tracking_uri)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        found_held = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not found_held:
                    found_held = True
                    _test_hook("blocked", wait=False)
                if time.monotonic() > deadline:
                    raise RegistryError(f"{path}: held by another promote or rollback") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _test_hook(point: str, *, wait: bool) -> None:
    """A test hook, not behaviour: it returns at once unless ``BRAINTUMOR_REGISTRY_TEST_PAUSE``
    names a folder, which only tests/integration/test_registry.py sets. Then it creates
    ``<point>.<pid>`` there, so the race test knows this process reached ``point`` (``blocked``:
    found the lock held; ``moving``: about to move the champion), and with ``wait`` blocks
    until the test creates ``release`` there. That is how the test holds two promotes at the
    critical section at the same moment, instead of starting them at a clock time."""
    folder = os.environ.get(TEST_PAUSE_ENV)
    if not folder:
        return
    (Path(folder) / f"{point}.{os.getpid()}").touch()
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while wait and not (Path(folder) / TEST_RELEASE_FILE).exists():
        if time.monotonic() > deadline:
            raise RegistryError(f"{folder}: the test never released the pause at {point!r}")
        time.sleep(0.05)


def _missing(error: MlflowException) -> bool:
    return error.error_code in MISSING_CODES


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if not _missing(error):
            raise
        return None


def _history(client: MlflowClient, name: str) -> list[str]:
    model = client.get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def _require_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if not _missing(error):
            raise
        raise RegistryError(f"no registered model {name!r}; run the evaluate stage") from None


def _record(
    client: MlflowClient, name: str, version: str, decision: GateDecision, view: str
) -> None:
    """The decision and its reasons, as tags of the candidate, pass or fail."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        "gate.result": "passed" if decision.passed else "failed",
        "gate.reasons": json.dumps(decision.reasons),
        "gate.view": view,
        "gate.checked_at": stamp,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _move_champion(client: MlflowClient, name: str, version: str, expected: str | None) -> None:
    """Point ``champion`` at ``version`` and push the old one on the history, unless the
    champion moved since the gate read it (a promote on another machine, which the file
    lock does not see): then nothing changes and the caller is told to promote again."""
    now = _alias_version(client, name, CHAMPION)
    now_version = str(now.version) if now is not None else None
    if now_version != expected:
        raise RegistryError(
            f"{name}: the champion moved to v{now_version} while v{version} was being "
            "checked; promote again"
        )
    _test_hook("moving", wait=True)
    history = _history(client, name)
    if expected is not None:
        history.append(expected)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, version)


def _champion_evidence(
    client: MlflowClient, name: str, version: str | None, view: str
) -> Evidence | None:
    if version is None:
        return None
    try:
        return read_evidence(client, name, version, view)
    except RegistryError as error:
        raise RegistryError(
            f"champion {error} (remove the champion alias to start the history over)"
        ) from None


def promote(
    client: MlflowClient, name: str, gate: GateParams, version: str | None = None
) -> GateDecision:
    """Move ``champion`` to ``version`` (default: the ``challenger``) if it passes the gate.

    Candidate and champion are compared on the gate's view, from their evaluation runs, and
    only when they were measured on the same data and classes. The decision and its reasons
    are recorded as tags of the candidate either way; aliases change only on a pass. The
    whole step holds the registry lock.
    """
    require_gain(gate)
    _require_model(client, name)
    with registry_lock(client.tracking_uri):
        if version is None:
            challenger = _alias_version(client, name, CHALLENGER)
            if challenger is None:
                raise RegistryError(f"{name}: no version has the alias {CHALLENGER!r}")
            version = str(challenger.version)
        candidate = read_evidence(client, name, version, gate.view)
        current = _alias_version(client, name, CHAMPION)
        expected = str(current.version) if current is not None else None
        if expected == version:
            raise RegistryError(f"{name} v{version} is already the champion")
        champion = _champion_evidence(client, name, expected, gate.view)
        decision = check_gate(candidate.metrics, champion and champion.metrics, gate)
        if champion is not None:
            reasons = (*comparability(candidate, champion), *decision.reasons)
            passed = not any(reason.startswith("FAIL") for reason in reasons)
            decision = GateDecision(passed, reasons, decision.candidate, decision.champion)
        decision = dataclasses.replace(decision, version=version)
        _record(client, name, version, decision, gate.view)
        if decision.passed:
            _move_champion(client, name, version, expected)
    return decision


def rollback(client: MlflowClient, name: str) -> str:
    """Point ``champion`` back at the previous champion; returns that version.

    The previous version is checked to exist before anything changes, and the alias moves
    before the history is shortened, so a failure leaves the history whole."""
    with registry_lock(client.tracking_uri):
        try:
            history = _history(client, name)
        except MlflowException as error:
            if not _missing(error):
                raise
            raise RegistryError(f"no registered model {name!r}") from None
        if not history:
            raise RegistryError(f"{name}: no previous champion to roll back to")
        previous = history[-1]
        try:
            client.get_model_version(name, previous)
        except MlflowException as error:
            if not _missing(error):
                raise
            raise RegistryError(
                f"{name}: the previous champion v{previous} no longer exists; history "
                "unchanged (promote a version with --version)"
            ) from None
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    return previous


def find_project_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` with ``dvc.yaml`` or ``params.yaml``: the
    project whose store the command acts on, whatever the current folder."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "params.yaml").is_file():
            return folder
    raise RegistryError(f"{start}: no params.yaml or dvc.yaml here or above; pass --params")


def _act(args: argparse.Namespace) -> tuple[str, GateDecision | str]:
    """Resolve the project, its parameters and its store, then promote or roll back."""
    if args.params is None:
        params_path = find_project_root(Path.cwd()) / "params.yaml"
    else:
        params_path = Path(args.params).resolve()
    params = load_params(params_path)
    client = _client(params, params_path.parent)
    name = params.tracking.registered_model
    if args.action == "rollback":
        return name, rollback(client, name)
    return name, promote(client, name, params.registry.gate, args.version)


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.tracking.registry promote|rollback``: 0 done, 1 error, 2 gate
    failed."""
    parser = argparse.ArgumentParser(description="Promote or roll back the champion model.")
    parser.add_argument("action", choices=["promote", "rollback"])
    parser.add_argument(
        "--params", help="the project's params.yaml (default: found from the current folder)"
    )
    parser.add_argument("--version", help="version to promote (default: the challenger)")
    args = parser.parse_args(argv)
    try:
        name, outcome = _act(args)
    except (RegistryError, ConfigError, MlflowException, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    if isinstance(outcome, str):
        print(f"rollback: {name} champion is now v{outcome}")
        return 0
    for reason in outcome.reasons:
        print(f"  {reason}")
    if not outcome.passed:
        print(f"promote: gate failed; {name} champion unchanged", file=sys.stderr)
        return 2
    print(f"promote: {name} champion is now v{outcome.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
