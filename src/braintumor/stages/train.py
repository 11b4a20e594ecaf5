"""DVC stages ``train`` and ``finetune``: one training phase from the command line.

``--phase frozen`` trains the head on the frozen ImageNet backbone, ``--phase finetune``
everything but BatchNormalization from the frozen phase's best model; the phase itself is
:func:`braintumor.training.phase.run_phase`. This entry point sets the Keras backend from
``train.backend`` before anything imports keras, loads the cached arrays, opens the
phase's MLflow run and turns the phase's own errors into one line and exit status 1
(3 when interrupted, so that a rerun resumes).

    python -m braintumor.stages.train --phase frozen ...     # dvc.yaml passes every path
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from braintumor.core.config import load_params
from braintumor.core.schema import ConfigError, Params
from braintumor.model.backend import configure_backend
from braintumor.training.checkpointing import PHASES, PhaseError, TrainingInterrupted
from braintumor.training.phase import NullRun, PhasePaths, find_checkpoint, run_phase


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, choices=PHASES)
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--data", required=True, type=Path, help="data/processed")
    parser.add_argument("--model-dir", required=True, type=Path, help="model.keras and run id")
    parser.add_argument("--checkpoints", required=True, type=Path, help="resumable state")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON (detail)")
    parser.add_argument("--headline", type=Path, help="the phase's DVC metric (a few numbers)")
    parser.add_argument("--history", required=True, type=Path, help="per-epoch CSV")
    parser.add_argument("--figures", required=True, type=Path, help="figures folder")
    parser.add_argument("--tensorboard", type=Path, help="TensorBoard log folder")
    parser.add_argument("--init", type=Path, help="finetune: the frozen phase's model.keras")
    parser.add_argument("--pretrained", type=Path, help="the weights stage's folder")
    parser.add_argument("--label-issues", type=Path, help="the audit stage's suspects CSV")
    parser.add_argument("--features", type=Path, help="frozen: the audit's pooled features")
    # The same names as evaluate's.
    parser.add_argument(
        "--parent-run-file", type=Path, help="finetune: the frozen phase's run file"
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # test hook
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.stages.train``: one phase, every path from ``dvc.yaml``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.phase == "finetune" and args.init is None:
        parser.error("--phase finetune needs --init (the frozen phase's model.keras)")

    try:
        params = load_params(args.params)
        configure_backend(params.train, Path(args.params).resolve().parent)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from braintumor.model.weights.files import PretrainedError, weights_file
    from braintumor.training.inputs import DataError, load_processed  # imports keras

    try:
        data = load_processed(args.data, params.common.classes, params.common.image_size)
        data = _label_issues(params, data, args.label_issues)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    paths = PhasePaths(
        model_dir=args.model_dir,
        checkpoint_dir=args.checkpoints,
        metrics=args.metrics,
        history=args.history,
        figures=args.figures,
        tensorboard=args.tensorboard,
        headline=args.headline,
        init_model=args.init,
        pretrained=(
            weights_file(args.pretrained, params.model.backbone) if args.pretrained else None
        ),
        features=args.features,
    )
    try:
        checkpoint = find_checkpoint(params, args.phase, data, paths)
        with _tracked(params, args, paths, checkpoint[1]) as run:
            result = run_phase(
                params,
                args.phase,
                data,
                paths,
                run,
                checkpoint=checkpoint,
                verbose=args.verbose,
                stop_after_epochs=args.stop_after_epochs,
            )
    except TrainingInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, PretrainedError, PhaseError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_summary(args.phase, result.metrics)
    return 0


def _label_issues(params: Params, data: Any, suspects: Path | None) -> Any:
    """``train.label_issues``: say how many of the audit's suspects are train images, and
    under ``drop`` leave them out of the train split (labels are never changed)."""
    if suspects is None:
        return data
    from braintumor.training.inputs import suspected_paths, without_training_rows

    paths = suspected_paths(suspects, "train")
    mode = params.train.label_issues
    if mode == "drop":
        data, dropped = without_training_rows(data, paths)
        print(f"label issues: {dropped} suspected train images left out ({mode})")
    else:
        print(f"label issues: {len(paths)} suspected train images kept ({mode})")
    return data


def _print_summary(phase: str, metrics: dict[str, Any]) -> None:
    print(
        f"{phase}: {metrics['epochs_run']} epochs, best val_loss "
        f"{metrics['best_val_loss']:.4f} (accuracy {metrics['best_val_accuracy']:.4f}) at "
        f"epoch {metrics['best_epoch']}, {metrics['images_per_second']} img/s, "
        f"{metrics['wall_seconds']:.0f} s"
    )


@contextmanager
def _tracked(
    params: Params, args: argparse.Namespace, paths: PhasePaths, resume: dict[str, Any] | None
) -> Iterator[Any]:
    if args.no_tracking:
        yield NullRun()
        return
    from braintumor.tracking.runs import phase_run  # imports keras: after configure_backend

    with phase_run(
        params,
        args.phase,
        run_file=paths.run_file,
        parent_file=args.parent_run_file,
        resume_run_id=(resume or {}).get("run_id"),
        project_root=Path(args.params).resolve().parent,
    ) as run:
        yield run


if __name__ == "__main__":
    sys.exit(main())
