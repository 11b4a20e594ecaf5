"""MLflow for the training stages: the only module of the package that imports mlflow.

One parent run per pipeline invocation (``dvc repro`` / ``dvc exp run``) holds one child
run per training phase. The frozen phase starts the parent; it writes
``{"parent_run_id", "run_id", ...}`` to its run file (a stage output), and the fine-tuning
stage, which reads that file, adds its child to the same parent when the file comes from
the same invocation (same DVC process and experiment name), or starts a new parent when
the frozen stage was skipped as up to date. A phase resumed after a kill continues its own
interrupted child run.

Logged per phase: every parameter (flattened; secret-named keys and credentials in URIs
redacted by ``redact_params``, as every URI shown or written goes through ``redact_uri``),
tags (git commit, DVC experiment and stage, profile, backend), the datasets (digest and
counts of the processed data), per-epoch metrics with the epoch as step, system metrics,
the history, the figures and the model (``mlflow.keras`` flavour with a signature).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.tracking_uri``;
a relative ``sqlite:///`` path is made absolute against the project root, because
``dvc exp run --temp`` / ``--queue`` run stages in a temporary copy
(``<repo>/.dvc/tmp/exps/...``) that is deleted afterwards, and the runs with it; the root of
such a copy is mapped back to the repository. For the same reason a local store keeps its
artifacts in ``<repo>/mlartifacts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from braintumor.core.config import flatten
from braintumor.core.files import write_json
from braintumor.core.paths import real_project_root, resolve_tracking_uri
from braintumor.core.redaction import redact_params, redact_uri
from braintumor.core.schema import Params

if TYPE_CHECKING:
    import keras

    from braintumor.training.inputs import ProcessedData

PARAMS_PER_CALL = 100  # MLflow's batch limit for parameters


def pipeline_invocation() -> str:
    """Identifies the pipeline invocation this process belongs to.

    DVC starts every stage from the same ``dvc`` process, so that process (pid and start
    time) plus ``DVC_EXP_NAME`` tells two stages of one ``dvc repro`` from stages of two.
    Outside DVC it is ``<experiment>:no-dvc``.
    """
    experiment = os.environ.get("DVC_EXP_NAME", "")
    found = _dvc_process()
    if found is None:
        return f"{experiment}:no-dvc"
    pid, started, _ = found
    return f"{experiment}:{pid}:{started:.3f}"


def _dvc_process() -> tuple[int, float, list[str]] | None:
    """The DVC process this one runs under: pid, start time and command line."""
    try:
        import psutil

        for process in psutil.Process().parents():
            command = process.cmdline()
            if _is_dvc(command):
                return process.pid, process.create_time(), command
    except Exception:  # noqa: BLE001 - psutil missing or a process vanished: no DVC parent
        pass
    return None


def pipeline_source() -> str:
    """What ran the pipeline, for MLflow's Source column: the DVC command's words without
    its options and values (``dvc exp run``, ``dvc repro``), else this program's name."""
    found = _dvc_process()
    if found is None:
        return Path(sys.argv[0]).name or "python"
    command = found[2]  # dvc ..., python .../dvc ... or python -m dvc ...
    if command[1:3] == ["-m", "dvc"]:
        arguments = command[3:]
    else:
        arguments = command[1:] if Path(command[0]).name == "dvc" else command[2:]
    words = ["dvc"]
    for part in arguments:
        if part.startswith("-"):
            break
        words.append(part)
    return " ".join(words)


def _is_dvc(command: list[str]) -> bool:
    heads = command[:2]
    return any(Path(part).name == "dvc" for part in heads) or command[1:3] == ["-m", "dvc"]


def git_state(project_root: Path) -> dict[str, str]:
    """The commit and whether tracked files differ from it (empty outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def run_tags(params: Params, phase: str | None, project_root: Path) -> dict[str, str]:
    tags = {
        "profile": params.profile,
        "backend": params.train.backend,
        "backbone": params.model.backbone,
        # Which machine ran it, for a team's shared server: BRAINTUMOR_RUNNER (a CI
        # runner's name), else the host name.
        "runner": os.environ.get("BRAINTUMOR_RUNNER") or socket.gethostname(),
        **git_state(project_root),
    }
    for variable, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    if phase is not None:
        tags["phase"] = phase
        tags["dvc.stage"] = os.environ.get("DVC_STAGE") or phase
    return tags


def parent_tags(params: Params, project_root: Path) -> dict[str, str]:
    """The pipeline run's tags: ``run_tags`` plus what fills MLflow's own columns and its
    description (Source: the DVC command, its type and the git commit; the user)."""
    tags = run_tags(params, None, project_root)
    tags[MLFLOW_SOURCE_NAME] = pipeline_source()
    tags[MLFLOW_SOURCE_TYPE] = "LOCAL"
    if "git_commit" in tags:
        tags[MLFLOW_GIT_COMMIT] = tags["git_commit"]
    if user := resolve_tags().get(MLFLOW_USER):  # as MLflow sets it on the runs it starts
        tags[MLFLOW_USER] = user
    tags[MLFLOW_RUN_NOTE] = describe_pipeline(tags)
    return tags


def describe_pipeline(tags: dict[str, str], sizes: dict[str, int] | None = None) -> str:
    """The pipeline run's description (Markdown, on its page): which DVC experiment,
    commit and data it is, and where the rest of it is."""
    experiment = tags.get("dvc.exp_name")
    commit = f"- commit `{tags.get('git_commit', 'unknown')[:12]}`"
    if experiment:
        commit += " (the experiment's baseline: DVC commits the experiment after the run)"
    if tags.get("git_dirty") == "true":
        commit += ", with uncommitted changes"
    lines = [
        f"DVC experiment `{experiment}`" if experiment else "Pipeline run outside `dvc exp run`",
        commit,
        f"- profile `{tags.get('profile', '?')}`, backbone `{tags.get('backbone', '?')}`, "
        f"started by `{tags.get(MLFLOW_SOURCE_NAME, '?')}`",
    ]
    if tags.get("data.digest"):
        data = f"- data digest `{tags['data.digest'][:16]}`"
        if sizes:
            data += "; images " + ", ".join(f"{split} {count}" for split, count in sizes.items())
        lines.append(data)
    lines.append(
        "- metrics: the headline of `metrics/evaluate.json`; every parameter, the training "
        "curves and the evaluation detail are on the child runs (frozen, finetune, evaluate)"
    )
    return "\n".join(lines)


# The experiment's kind for MLflow 3 (tools, and UIs that read it). MLflow 3.17's UI
# chooses between its GenAI and "Model training" views with a toggle instead: the
# `workflowType` URL parameter, remembered per browser, GenAI by default. `ui_url` gives
# the link that opens an experiment on its training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(tracking_uri: str, experiment_id: str) -> str | None:
    """The MLflow UI link that opens ``experiment_id`` on its training runs (MLflow 3.17
    would open the GenAI overview); None for a store without a server (SQLite, files)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = redact_uri(tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def _experiment_id(name: str, uri: str, project_root: Path) -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):  # no server: keep artifacts beside the project
            location = (real_project_root(project_root) / "mlartifacts").resolve().as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a concurrent stage
            pass
        experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


# The parameters that tell one experiment from another, on the pipeline (parent) run: the
# runs table and the compare page show them side by side. Every parameter (about 150) is
# on each stage's child run.
IDENTITY_PARAMS = (
    "profile",
    "common.seed",
    "common.image_size",
    "model.backbone",
    "train.frozen.epochs",
    "train.frozen.learning_rate",
    "train.finetune.epochs",
    "train.finetune.learning_rate",
)


def identity_params(params: Params) -> dict[str, Any]:
    flat = flatten(params)
    return {key: flat[key] for key in IDENTITY_PARAMS if key in flat}


def _log_params(client: MlflowClient, run_id: str, flat: dict[str, Any]) -> None:
    """Flattened parameters, redacted, in MLflow's batches."""
    items = sorted(redact_params(flat).items())
    for start in range(0, len(items), PARAMS_PER_CALL):
        batch = [Param(k, v) for k, v in items[start : start + PARAMS_PER_CALL]]
        client.log_batch(run_id, params=batch)


def _read_run_file(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _existing_run(client: MlflowClient, run_id: str | None) -> Any | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def pip_requirements(backend: str) -> list[str]:
    """Exact versions of what loading the model needs (skips MLflow's slow inference)."""
    packages = ["mlflow", "keras", "numpy"]
    packages += {
        "tensorflow": ["tensorflow-cpu", "tensorflow"],
        "jax": ["jax", "jaxlib"],
        "torch": ["torch"],
    }[backend]
    requirements = []
    for package in packages:
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return requirements


@dataclasses.dataclass
class PhaseRun:
    """The child run of one phase; ``train.run_phase`` calls these methods."""

    run_id: str
    parent_run_id: str
    backend: str

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=epoch)

    def log_metrics(self, values: dict[str, Any]) -> None:
        """The phase's summary, under the same names as its metrics JSON."""
        mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None})

    def log_dataset(self, data: ProcessedData, indices: np.ndarray) -> None:
        """The processed splits as MLflow datasets: the preprocess digest identifies them
        (hashing the images again would read them all)."""
        digest = data.digest
        for name, context in (("train", "training"), ("val", "validation")):
            split = data.splits[name]
            with warnings.catch_warnings():
                # "can be interpreted in multiple ways": a local path always is; harmless.
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_numpy(
                    split.images,
                    targets=split.labels,
                    source=str(data.folder.resolve() / f"{name}_images.npy"),
                    name=f"processed-{name}",
                    digest=digest[:16] if digest else None,
                )
            mlflow.log_input(dataset, context=context)
        counts = data.meta.get("counts", {})
        mlflow.set_tags(
            {
                "data.digest": digest,
                "data.counts": json.dumps(counts, sort_keys=True),
                "data.train_images_used": str(len(indices)),
            }
        )
        log_pipeline_dataset(MlflowClient(), self.parent_run_id, data)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, model: keras.Model, examples: np.ndarray) -> None:
        # No input_example: mlflow.keras.log_model then fails (mlflow#16183); the signature
        # still records the input and output tensors.
        signature = mlflow.models.infer_signature(examples, model.predict(examples, verbose=0))
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            pip_requirements=pip_requirements(self.backend),
        )


PIPELINE_DATASET = "processed"


def split_counts(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split of ``meta.json``'s counts: its images, and per class when the
    counts are per class (``{"train": {"glioma": 1321, ...}}``)."""
    rows = []
    for split, counts in meta.get("counts", {}).items():
        if isinstance(counts, dict):
            rows.append({"split": split, "images": sum(counts.values()), **counts})
        else:
            rows.append({"split": split, "images": counts})
    return rows


def log_pipeline_dataset(client: MlflowClient, run_id: str, data: ProcessedData) -> None:
    """The processed data as the pipeline run's dataset (MLflow's Dataset column): its
    preprocess digest and its images per split and class; and its digest in the
    description. Logged once per run, by whichever stage comes first."""
    import pandas as pd

    digest = data.digest[:16]
    run = client.get_run(run_id)
    logged = {(item.dataset.name, item.dataset.digest) for item in run.inputs.dataset_inputs}
    if (PIPELINE_DATASET, digest) in logged:
        return
    rows = split_counts(data.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a local path "can be interpreted..."
        dataset = mlflow.data.from_pandas(
            pd.DataFrame(rows),
            source=str(data.folder.resolve()),
            name=PIPELINE_DATASET,
            digest=digest or None,
        )
    context = InputTag(MLFLOW_DATASET_CONTEXT, "pipeline")
    # No public constructor takes a Dataset object to a run other than the active one.
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [context])])
    tags = {**run.data.tags, "data.digest": data.digest}
    client.set_tag(run_id, "data.digest", data.digest)
    sizes = {row["split"]: row["images"] for row in rows}
    client.set_tag(run_id, MLFLOW_RUN_NOTE, describe_pipeline(tags, sizes))


def log_pipeline_results(
    params: Params,
    *,
    project_root: Path,
    run_file: Path,
    metrics: dict[str, float],
    tables: dict[str, list[dict[str, Any]]],
    detail_file: Path | None,
    data: ProcessedData,
) -> None:
    """After the evaluate run (``run_file``): ``metrics``, the headline, become the
    pipeline run's metrics, so its runs table and charts compare experiments; ``tables``
    and ``detail_file`` (every number of the evaluation) go to the evaluate run as tables
    the UI shows (``tables/<name>.json``) and as the file itself."""
    import pandas as pd

    record = _read_run_file(run_file)
    if record is None:
        raise FileNotFoundError(f"{run_file}: no MLflow run file; the evaluate run failed")
    mlflow.set_tracking_uri(resolve_tracking_uri(params.tracking.tracking_uri, project_root))
    client = MlflowClient()
    parent, run_id = record["parent_run_id"], record["run_id"]
    stamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), stamp, 0) for key, value in sorted(metrics.items())]
    client.log_batch(parent, metrics=batch)
    log_pipeline_dataset(client, parent, data)
    for name, rows in tables.items():
        client.log_table(run_id, pd.DataFrame(rows), f"tables/{name}.json")
    if detail_file is not None:
        client.log_artifact(run_id, str(detail_file), "metrics")


def _parent_run_id(
    client: MlflowClient,
    params: Params,
    resumed: Any | None,
    parent_file: Path | None,
    invocation: str,
    experiment_id: str,
    project_root: Path,
) -> str:
    """The resumed run's parent, else the parent of the same invocation's earlier phase,
    else a new parent run (with the parameters, credentials redacted)."""
    if resumed is not None and (known := resumed.data.tags.get("mlflow.parentRunId")):
        return known
    previous = _read_run_file(parent_file)
    if previous and previous.get("invocation") == invocation:
        if _existing_run(client, previous.get("parent_run_id")) is not None:
            return previous["parent_run_id"]
    name = os.environ.get("DVC_EXP_NAME") or "pipeline"
    parent = client.create_run(experiment_id, run_name=name, tags=parent_tags(params, project_root))
    _log_params(client, parent.info.run_id, identity_params(params))
    if previous_frozen := (previous or {}).get("run_id"):
        client.set_tag(parent.info.run_id, "reused_frozen_run", previous_frozen)
    return parent.info.run_id


@contextlib.contextmanager
def phase_run(
    params: Params,
    phase: str,
    *,
    run_file: Path,
    parent_file: Path | None = None,
    resume_run_id: str | None = None,
    project_root: Path,
) -> Iterator[PhaseRun]:
    """Start (or resume) the phase's child run under the invocation's parent run.

    On success the runs are ended FINISHED and ``run_file`` is written; on an exception
    they are ended FAILED (``KILLED`` for Ctrl-C) and the exception propagates.
    """
    project_root = project_root.resolve()
    uri = resolve_tracking_uri(params.tracking.tracking_uri, project_root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment_id = _experiment_id(params.tracking.experiment, uri, project_root)
    invocation = pipeline_invocation()

    resumed = _existing_run(client, resume_run_id)
    parent_run_id = _parent_run_id(
        client, params, resumed, parent_file, invocation, experiment_id, project_root
    )

    if resumed is not None:
        run = mlflow.start_run(run_id=resumed.info.run_id, log_system_metrics=True)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=phase,
            parent_run_id=parent_run_id,
            tags=run_tags(params, phase, project_root),
            log_system_metrics=True,
        )
        _log_params(client, run.info.run_id, flatten(params))
    tracked = PhaseRun(run.info.run_id, parent_run_id, params.train.backend)
    if (url := ui_url(uri, experiment_id)) is not None:
        print(f"MLflow: {url}", file=sys.stderr)  # opens on the training runs
    status = "FAILED"
    try:
        yield tracked
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        client.set_terminated(parent_run_id, status)
    write_json(
        run_file,
        {
            "experiment_id": experiment_id,
            "invocation": invocation,
            "parent_run_id": parent_run_id,
            "run_id": tracked.run_id,
            "tracking_uri": redact_uri(uri),
        },
    )
