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
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from braintumor.bundle import BundleMeta
from braintumor.config import ConfigError, GateParams, Params, load_params
from braintumor.tracking import phase_run, pip_requirements, resolve_tracking_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion.history"
PACKAGE_DIR = Path(__file__).resolve().parent


class RegistryError(ValueError):
    """The registry is not in a state the command can act on (no such model or alias)."""


class BundleModel(mlflow.pyfunc.PythonModel):
    """pyfunc over a model bundle: raw images in, calibrated class probabilities out."""

    def load_context(self, context: Any) -> None:
        from braintumor.bundle import Bundle

        self.bundle = Bundle.load(context.artifacts["bundle"])

    def _image(self, value: Any) -> np.ndarray:
        from braintumor.imaging import preprocess_gray

        if isinstance(value, str):
            value = base64.b64decode(value)
        if isinstance(value, bytes | bytearray):
            return self.bundle.preprocess_bytes(bytes(value))
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            import cv2

            array = cv2.cvtColor(array[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
        array = np.squeeze(array).astype(np.uint8)
        return preprocess_gray(array, self.bundle.meta.image_size, self.bundle.meta.preprocess)

    # No type hints here: MLflow 3 would try (and fail) to derive a schema from them.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            values = list(model_input.iloc[:, 0])
        elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
            values = list(model_input) if model_input.ndim >= 3 else [model_input]
        else:
            values = list(model_input)
        images = np.stack([self._image(value) for value in values])
        probabilities = self.bundle.predict(images)
        classes = list(self.bundle.meta.classes)
        frame = pd.DataFrame(probabilities, columns=classes)
        frame.insert(0, "predicted", [classes[i] for i in probabilities.argmax(axis=1)])
        return frame


def _client(params: Params, project_root: Path) -> MlflowClient:
    mlflow.set_tracking_uri(resolve_tracking_uri(params.tracking.tracking_uri, project_root))
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
        view = params.registry.gate.view
        signature = mlflow.models.ModelSignature(
            inputs=mlflow.types.Schema([mlflow.types.ColSpec("binary", "image")]),
            outputs=mlflow.types.Schema(
                [mlflow.types.ColSpec("string", "predicted")]
                + [mlflow.types.ColSpec("double", name) for name in bundle_meta.classes]
            ),
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BundleModel(),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            pip_requirements=pip_requirements(params.train.backend)
            + ["opencv-python-headless", "pillow", "pandas", "scipy"],
            registered_model_name=params.tracking.registered_model,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        name = params.tracking.registered_model
        tags = {
            "profile": params.profile,
            "data.digest": bundle_meta.source.get("data_digest", ""),
            "model.sha256": bundle_meta.model_sha256,
            "gate.view": view,
            "metrics": json.dumps(gate_metrics(metrics, view, bundle_meta.classes), sort_keys=True),
            "run_id": run.run_id,
        }
        git = mlflow.get_run(run.run_id).data.tags.get("git_commit")
        if git:
            tags["git_commit"] = git
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        return version


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    candidate: dict[str, float]
    champion: dict[str, float] | None


def check_gate(
    candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams
) -> GateDecision:
    """Pure: does ``candidate`` pass against the current ``champion`` (None: first one)?"""
    reasons = []
    if champion is not None:
        needed = champion["macro_f1"] + gate.min_macro_f1_gain
        verdict = "ok" if candidate["macro_f1"] >= needed else "FAIL"
        reasons.append(
            f"{verdict}: macro-F1 {candidate['macro_f1']:.4f} vs champion's "
            f"{champion['macro_f1']:.4f} + {gate.min_macro_f1_gain}"
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


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[str]:
    model = client.get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def promote(
    client: MlflowClient, name: str, gate: GateParams, version: str | None = None
) -> GateDecision:
    """Move ``champion`` to ``version`` (default: the ``challenger``) if it passes the gate.

    The decision and its reasons are recorded as tags of the candidate version either way;
    aliases change only on a pass.
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model {name!r}; run the evaluate stage") from None
    if version is None:
        challenger = _alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{name}: no version has the alias {CHALLENGER!r}")
        version = str(challenger.version)
    try:
        candidate_version = client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{name}: no version {version}") from None
    if "metrics" not in candidate_version.tags:
        raise RegistryError(f"{name} v{version}: has no evaluation metrics tag")
    candidate = json.loads(candidate_version.tags["metrics"])
    current = _alias_version(client, name, CHAMPION)
    if current is not None and str(current.version) == version:
        raise RegistryError(f"{name} v{version} is already the champion")
    champion = json.loads(current.tags["metrics"]) if current is not None else None
    decision = check_gate(candidate, champion, gate)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, version, "gate.result", "passed" if decision.passed
                                 else "failed")  # fmt: skip
    client.set_model_version_tag(name, version, "gate.reasons", json.dumps(decision.reasons))
    client.set_model_version_tag(name, version, "gate.checked_at", stamp)
    if decision.passed:
        history = _history(client, name)
        if current is not None:
            history.append(str(current.version))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision


def rollback(client: MlflowClient, name: str) -> str:
    """Point ``champion`` back at the previous champion; returns that version."""
    try:
        history = _history(client, name)
    except MlflowException:
        raise RegistryError(f"no registered model {name!r}") from None
    if not history:
        raise RegistryError(f"{name}: no previous champion to roll back to")
    previous = history.pop()
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, previous)
    return previous


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.registry promote|rollback``."""
    parser = argparse.ArgumentParser(description="Promote or roll back the champion model.")
    parser.add_argument("action", choices=["promote", "rollback"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--version", help="version to promote (default: the challenger)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        client = _client(params, Path.cwd())
        name = params.tracking.registered_model
        if args.action == "rollback":
            version = rollback(client, name)
            print(f"rollback: {name} champion is now v{version}")
            return 0
        decision = promote(client, name, params.registry.gate, args.version)
    except (RegistryError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for reason in decision.reasons:
        print(f"  {reason}")
    if not decision.passed:
        print(f"promote: gate failed; {name} champion unchanged", file=sys.stderr)
        return 2
    champion = _alias_version(client, name, CHAMPION)
    print(f"promote: {name} champion is now v{champion.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
