"""DVC stage ``audit``: suspected label errors of every source, and the external view.

Between ``preprocess``/``weights`` and ``train``. One pass of the frozen ImageNet backbone
gives pooled features of every train, validation and test image; then

- the label audit (:mod:`braintumor.evaluation.label_audit`): out-of-fold probabilities
  by neighbour groups, training images (train + validation, the Training folders) and
  test images each audited on their own, cleanlab's suspects; the CSV of all suspects,
  counts per split x source x class, a figure of the top suspects of each;
- the external-validation view (``audit.external``): for each source with a Testing
  folder, phase 1's head (:mod:`braintumor.training.probe`) trained on the other sources
  only and scored on that source's kept test images (none has a twin in training, clean
  dropped them), beside the same head trained on every source (``external_reference``),
  both with the evaluate stage's metrics; evaluate copies them into ``metrics/eval.json``.

It changes no label; ``train.label_issues`` decides what training does with the suspects.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from braintumor.core.config import load_params
from braintumor.core.files import atomic_path, write_json
from braintumor.core.schema import ConfigError, Params
from braintumor.evaluation.label_audit import (
    AuditError,
    audit_headline,
    find_issues,
    flat_counts,
    issue_counts,
    out_of_fold_probabilities,
    suggested_matrix,
    suspects_figure,
    suspects_table,
)
from braintumor.model.backend import configure_backend, seed_and_precision

AUDITED = {"training": ("train", "val"), "test": ("test",)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--data", required=True, type=Path, help="data/processed")
    parser.add_argument("--index", required=True, type=Path, help="clean's index.parquet")
    parser.add_argument("--pretrained", type=Path, help="the weights stage's folder")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics/audit.json")
    parser.add_argument("--headline", type=Path, help="the stage's DVC metric")
    parser.add_argument("--suspects", required=True, type=Path, help="CSV of every suspect")
    parser.add_argument("--figures", required=True, type=Path, help="figures folder")
    parser.add_argument("--features", type=Path, help="train/val pooled features for phase 1")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.stages.audit``: every path comes from ``dvc.yaml``."""
    args = _parser().parse_args(argv)
    try:
        params = load_params(args.params)
        configure_backend(params.train, Path(args.params).resolve().parent)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from braintumor.model.weights.files import PretrainedError
    from braintumor.training.inputs import DataError  # imports keras

    try:
        metrics, suspects = run_audit(params, args)
    except (AuditError, DataError, PretrainedError, ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with atomic_path(args.suspects) as temporary:
        suspects.to_csv(temporary, index=False)
    write_json(args.metrics, metrics)
    if args.headline is not None:
        write_json(args.headline, audit_headline(metrics["label_issues"], metrics["external"]))
    for split, sources in metrics["label_issues"].items():
        for source, labels in sources.items():
            found = ", ".join(f"{name} {v['suspects']}/{v['images']}" for name, v in labels.items())
            print(f"audit: {split} {source}: {found}")
    for key, value in metrics["external"].items():
        if key.endswith(".accuracy"):
            print(f"audit: external {key} {value:.4f}")
    return 0


def training_rows(folder: Path, index_path: Path, sources: list[str]) -> dict[str, pd.DataFrame]:
    """Each split's index rows (``<split>_index.csv``) with clean's neighbour groups;
    refuses a declared source without training images (nothing to audit it against)."""
    from braintumor.training.inputs import DataError

    if not index_path.is_file():
        raise DataError(f"{index_path}: not found; run the clean stage")
    groups = pd.read_parquet(index_path, columns=["path", "neighbour_group"])
    frames = {}
    for split in ("train", "val", "test"):
        csv = folder / f"{split}_index.csv"
        if not csv.is_file():
            raise DataError(f"{csv}: not found; run the preprocess stage")
        frame = pd.read_csv(csv).assign(split=split).merge(groups, on="path", how="left")
        if frame["neighbour_group"].isna().any():
            raise DataError(f"{csv}: rows missing from {index_path}; rerun clean and preprocess")
        frames[split] = frame
    trained = set(frames["train"]["source"]) | set(frames["val"]["source"])
    for source in sources:
        if source not in trained:
            raise AuditError(
                f"acquire.sources.{source}: no training images (a source needs a train split "
                "to be audited and to leave out of the external view)"
            )
    return frames


def run_audit(params: Params, args: argparse.Namespace) -> tuple[dict[str, Any], pd.DataFrame]:
    """Features, the audit of each part, the figures and the external view."""
    from braintumor.model.classifier import build_model
    from braintumor.model.weights.files import weights_file
    from braintumor.training.features import backbone_features, features_key, save_features
    from braintumor.training.inputs import load_processed

    started = time.perf_counter()
    classes = params.common.classes
    sources = [source.name for source in params.acquire.sources]
    frames = training_rows(args.data, args.index, sources)
    data = load_processed(args.data, classes, params.common.image_size, ("train", "val", "test"))
    pretrained = weights_file(args.pretrained, params.model.backbone) if args.pretrained else None
    # Seeded and in the precision phase 1 builds its model with, so that the features are
    # the ones phase 1 would compute (training.features), weights file or not.
    seed_and_precision(params.common.seed, params.train.mixed_precision)
    model = build_model(params.model, params.common.image_size, len(classes), pretrained=pretrained)
    batch = params.evaluate.batch_size
    features = {
        split: backbone_features(model, data.splits[split].images, None, batch)
        for split in ("train", "val", "test")
    }
    feature_seconds = time.perf_counter() - started
    if args.features is not None:  # phase 1 reuses them (training.features.load_features)
        key = features_key(params, data.digest, pretrained)
        save_features(args.features, {s: features[s] for s in ("train", "val")}, key)
    tables, counts, matrices, accuracy = [], {}, {}, {}
    args.figures.mkdir(parents=True, exist_ok=True)
    for part, splits in AUDITED.items():
        rows = pd.concat([frames[s] for s in splits], ignore_index=True)
        labels = rows["label_index"].to_numpy()
        probabilities = out_of_fold_probabilities(
            np.concatenate([features[s] for s in splits]),
            labels,
            rows["neighbour_group"].to_numpy(),
            classes,
            folds=params.audit.folds,
            seed=params.common.seed,
            where=f"audit {part} images",
        )
        mask, scores = find_issues(labels, probabilities)
        table = suspects_table(rows, probabilities, mask, scores, classes)
        tables.append(table)
        counts.update(issue_counts(rows, mask, classes))
        matrices[part] = suggested_matrix(rows, probabilities, mask, classes)
        accuracy[part] = round(float((probabilities.argmax(axis=1) == labels).mean()), 4)
        top = table.head(params.audit.figure_suspects)
        images = [data.splits[row.split].images[int(row.id)] for row in top.itertuples()]
        suspects_figure(np.asarray(images), top, args.figures / f"top_suspects_{part}.png")
    external, reference = (
        ({}, {}) if not params.audit.external else external_views(params, model, features, frames)
    )
    metrics = {
        "folds": params.audit.folds,
        "label_issues": counts,
        **flat_counts(counts),
        "suggested": matrices,
        "out_of_fold_accuracy": accuracy,
        "external": external,
        "external_reference": reference,
        "feature_seconds": round(feature_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return metrics, pd.concat(tables, ignore_index=True)


def external_views(
    params: Params, model: Any, features: dict[str, np.ndarray], frames: dict[str, pd.DataFrame]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """For each source with test images: phase 1's head trained without it, and with every
    source, scored on its test images; flat ``<source>_test.<metric>`` like eval.json."""
    from braintumor.evaluation.metrics import classification_report, summary_metrics
    from braintumor.training.probe import fit_head, predict_head

    classes = list(params.common.classes)
    seed = params.common.seed
    labels = {split: frames[split]["label_index"].to_numpy() for split in frames}
    external: dict[str, Any] = {}
    reference: dict[str, Any] = {}

    def head_without(source: str | None) -> Any:
        keep = {s: (frames[s]["source"] != source).to_numpy() for s in ("train", "val")}
        return fit_head(
            params,
            model,
            features["train"][keep["train"]],
            labels["train"][keep["train"]],
            features["val"][keep["val"]],
            labels["val"][keep["val"]],
            seed=seed,
        )

    every_source = head_without(None)
    for source in sorted(set(frames["test"]["source"])):
        rows = (frames["test"]["source"] == source).to_numpy()
        others = (frames["train"]["source"] != source).to_numpy()
        present = np.unique(labels["train"][others])
        if len(present) < len(classes):
            continue  # the other sources cannot teach every class: no external view
        for target, head in ((external, head_without(source)), (reference, every_source)):
            report = classification_report(
                labels["test"][rows],
                predict_head(head, features["test"][rows]),
                classes,
                resamples=params.evaluate.bootstrap_resamples,
                confidence=params.evaluate.confidence,
                seed=seed,
            )
            for key, value in summary_metrics(report).items():
                target[f"{source}_test.{key}"] = value
            target[f"{source}_test.count"] = int(rows.sum())
    return external, reference


if __name__ == "__main__":
    sys.exit(main())
