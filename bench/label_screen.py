"""Label screening: does leaving out SARTAJ's training gliomas, or the audit's suspects,
help on SARTAJ's Testing folder, on Msoud's and on the external view? Phase 1 on cached
features, so each model takes seconds.

Reads a work folder where the pipeline's data stages and the audit ran (``data/processed``,
``data/interim/index.parquet``, ``models/pretrained``, ``metrics/label_issues.csv``),
computes the frozen backbone's features once (cached in ``--features``), then for each
seed and each training set trains phase 1's head (``braintumor.training.probe``) and
reports accuracy on ``msoud_leakage_free``, ``sartaj_test`` (with its glioma and
meningioma recall) and the external view (trained on Msoud only, scored on SARTAJ's
test images). The seed moves the head's initialisation and batch order; the validation
split is the processed folder's.

Training sets: ``as_now`` (every train image), ``no_sartaj_glioma`` (SARTAJ's training
gliomas left out), ``no_suspects`` (the audit's train suspects left out). Also printed,
per seed: ``sartaj_test`` split by whether clean found (and dropped) a training twin of
the test image, and a head trained on SARTAJ alone.

    python bench/label_screen.py --work /tmp/s19w --params /tmp/s19w/params.yaml --seeds 1,2,3

Results go to ``--out`` (JSON) and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def features(params: Any, work: Path, cache: Path) -> dict[str, np.ndarray]:
    """Pooled frozen-backbone features of every split, computed once."""
    if cache.is_file():
        with np.load(cache) as stored:
            return {split: stored[split] for split in SPLITS}
    from braintumor.model.classifier import build_model
    from braintumor.model.weights.files import weights_file
    from braintumor.training.features import backbone_features
    from braintumor.training.inputs import load_processed

    data = load_processed(
        work / "data/processed", params.common.classes, params.common.image_size, SPLITS
    )
    model = build_model(
        params.model,
        params.common.image_size,
        len(params.common.classes),
        pretrained=weights_file(work / "models/pretrained", params.model.backbone),
    )
    found = {
        split: backbone_features(model, data.splits[split].images, None, 64) for split in SPLITS
    }
    np.savez(cache, **found)
    return found


def recall(labels: np.ndarray, predicted: np.ndarray, index: int) -> float:
    rows = labels == index
    return float((predicted[rows] == index).mean()) if rows.any() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--features", type=Path, help="feature cache (default: work/features.npz)")
    parser.add_argument("--out", type=Path, help="results JSON (default: work/label_screen.json)")
    args = parser.parse_args(argv)

    from braintumor.core.config import load_params
    from braintumor.model.backend import configure_backend

    params = load_params(args.params)
    configure_backend(params.train, args.params.resolve().parent)
    from braintumor.model.classifier import build_model
    from braintumor.training.probe import fit_head, predict_head

    work = args.work
    found = features(params, work, args.features or work / "features.npz")
    twins = pd.read_parquet(work / "data/interim/index.parquet", columns=["path", "has_train_twin"])
    frames = {
        split: pd.read_csv(work / f"data/processed/{split}_index.csv").merge(
            twins, on="path", how="left"
        )
        for split in SPLITS
    }
    labels = {split: frames[split]["label_index"].to_numpy() for split in SPLITS}
    suspects = pd.read_csv(work / "metrics/label_issues.csv")
    suspect_paths = set(suspects.loc[suspects["split"] == "train", "path"])
    train, test = frames["train"], frames["test"]
    glioma = params.common.classes.index("glioma")
    meningioma = params.common.classes.index("meningioma")
    training_sets = {
        "as_now": np.ones(len(train), bool),
        "no_sartaj_glioma": ~(
            (train["source"] == "sartaj") & (train["label"] == "glioma")
        ).to_numpy(),
        "no_suspects": ~train["path"].isin(suspect_paths).to_numpy(),
    }
    msoud_free = ((test["source"] == "msoud") & test["leakage_free"]).to_numpy()
    sartaj = (test["source"] == "sartaj").to_numpy()
    twin = test["has_train_twin"].fillna(False).to_numpy(bool)
    from braintumor.model.weights.files import weights_file

    model = build_model(
        params.model,
        params.common.image_size,
        len(params.common.classes),
        pretrained=weights_file(work / "models/pretrained", params.model.backbone),
    )

    def head(train_rows: np.ndarray, val_rows: np.ndarray, seed: int) -> np.ndarray:
        fitted = fit_head(
            params,
            model,
            found["train"][train_rows],
            labels["train"][train_rows],
            found["val"][val_rows],
            labels["val"][val_rows],
            seed=seed,
        )
        return predict_head(fitted, found["test"]).argmax(axis=1)

    all_val = np.ones(len(frames["val"]), bool)
    msoud_val = (frames["val"]["source"] == "msoud").to_numpy()
    sartaj_val = ~msoud_val
    results: dict[str, Any] = {"dropped": {k: int((~v).sum()) for k, v in training_sets.items()}}
    test_labels = labels["test"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, rows in training_sets.items():
            predicted = head(rows, all_val, seed)
            external = head(rows & (train["source"] == "msoud").to_numpy(), msoud_val, seed)
            right = predicted == test_labels
            results.setdefault(name, []).append(
                {
                    "seed": seed,
                    "msoud_leakage_free": float(right[msoud_free].mean()),
                    "sartaj_test": float(right[sartaj].mean()),
                    "sartaj_glioma_recall": recall(test_labels[sartaj], predicted[sartaj], glioma),
                    "sartaj_meningioma_recall": recall(
                        test_labels[sartaj], predicted[sartaj], meningioma
                    ),
                    "external_sartaj_test": float((external == test_labels)[sartaj].mean()),
                    "sartaj_test_twin_dropped": float(right[sartaj & twin].mean()),
                    "sartaj_test_no_twin": float(right[sartaj & ~twin].mean()),
                }
            )
        alone = head((train["source"] == "sartaj").to_numpy(), sartaj_val, seed)
        results.setdefault("sartaj_only", []).append(
            {"seed": seed, "sartaj_test": float((alone == test_labels)[sartaj].mean())}
        )
    out = args.out or work / "label_screen.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    """Mean +- sd [min, max] over seeds of every number of every training set."""
    print(f"train images left out: {results['dropped']}")
    for name, runs in results.items():
        if name == "dropped":
            continue
        for key in runs[0]:
            if key == "seed":
                continue
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(
                f"{name:17s} {key:26s} {statistics.mean(values):.3f} +- {spread:.3f} "
                f"[{min(values):.3f}, {max(values):.3f}]"
            )


if __name__ == "__main__":
    sys.exit(main())
