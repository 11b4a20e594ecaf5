"""The ``audit`` stage on a tiny real two-source project (msoud and SARTAJ, a few images
per class, the tiny network): suspects CSV, counts per split x source x class, figures,
the external views; and its bad inputs as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import QUICKSTART_SOURCES, TINY_OVERRIDES, copy_sample, write_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mirror")]
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


@pytest.fixture(scope="module")
def project(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from braintumor.core.config import load_params
    from braintumor.data.cleaning import clean
    from braintumor.data.preprocessing import preprocess

    root = tmp_path_factory.mktemp("audit-project")
    raw = root / "data" / "raw"
    for source, offset in (("msoud", 300), ("sartaj", 100)):
        copy_sample(mirror, raw / source, source, 12, ("Training",), offset=offset)
        copy_sample(mirror, raw / source, source, 6, ("Testing",), offset=offset // 10)
    overrides = {
        **TINY_OVERRIDES,
        "acquire": {"sources": QUICKSTART_SOURCES},
        "train": {"frozen": {"epochs": 2, "batch_size": 16}},
    }
    params_path = write_params(root, overrides)
    params = load_params(params_path)
    frame = clean(raw, params, progress=False).frame
    interim = root / "data" / "interim"
    interim.mkdir(parents=True)
    frame.to_parquet(interim / "index.parquet")
    preprocess(raw, frame, params, root / "data" / "processed", progress=False)
    return root


def run_audit(root: Path, params: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.stages.audit",
            "--params",
            str(params or root / "params.yaml"),
            "--data",
            str(root / "data" / "processed"),
            "--index",
            str(root / "data" / "interim" / "index.parquet"),
            "--metrics",
            str(root / "metrics" / "audit.json"),
            "--headline",
            str(root / "metrics" / "audit_headline.json"),
            "--suspects",
            str(root / "metrics" / "label_issues.csv"),
            "--figures",
            str(root / "figures" / "audit"),
            "--features",
            str(root / "data" / "features"),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=900,
    )


def test_the_stage_writes_suspects_counts_figures_and_external_views(project: Path) -> None:
    result = run_audit(project)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "audit.json").read_text())
    processed = project / "data" / "processed"
    for part, splits in (("training", ("train", "val")), ("test", ("test",))):
        index = pd.concat([pd.read_csv(processed / f"{s}_index.csv") for s in splits])
        for source in ("msoud", "sartaj"):
            counted = sum(
                values["images"]
                for split in splits
                for values in metrics["label_issues"].get(split, {}).get(source, {}).values()
            )
            assert counted == int((index["source"] == source).sum()), (part, source)
    suspects = pd.read_csv(project / "metrics" / "label_issues.csv")
    assert {"path", "split", "label", "suggested", "label_quality"} <= set(suspects.columns)
    total = sum(
        values["suspects"]
        for sources in metrics["label_issues"].values()
        for labels in sources.values()
        for values in labels.values()
    )
    assert len(suspects) == total
    # Every suggestion differs from the given label or has a low score; never a relabel.
    assert set(suspects["label"]) <= set(CLASSES) and set(suspects["suggested"]) <= set(CLASSES)
    for part in ("training", "test"):
        assert (project / "figures" / "audit" / f"top_suspects_{part}.png").stat().st_size > 0
    test_index = pd.read_csv(processed / "test_index.csv")
    for source in ("msoud", "sartaj"):
        count = int((test_index["source"] == source).sum())
        assert metrics["external"][f"{source}_test.count"] == count
        assert 0 <= metrics["external"][f"{source}_test.accuracy"] <= 1
        assert metrics["external_reference"][f"{source}_test.count"] == count
    # Phase 1's features (training.features): train and val rows, keyed to what made them.
    from braintumor.training.features import FEATURES_META

    saved = json.loads((project / "data" / "features" / FEATURES_META).read_text())
    for split in ("train", "val"):
        rows = len(pd.read_csv(processed / f"{split}_index.csv"))
        assert saved["rows"][split] == rows
        assert np.load(project / "data" / "features" / f"{split}.npy").shape[0] == rows
    headline = json.loads((project / "metrics" / "audit_headline.json").read_text())
    assert "external.sartaj_test.accuracy" in headline
    # The evaluate stage puts them into eval.json as they are.
    from braintumor.stages.evaluate import EvaluateError, external_views

    views = external_views(project / "metrics" / "audit.json")
    assert views == {key: metrics[key] for key in ("external", "external_reference")}
    with pytest.raises(EvaluateError, match="run the audit stage"):
        external_views(project / "metrics" / "missing.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"audit": {"folds": 20}}, "fewer than audit.folds=20"),
        ("extra source", "acquire.sources.extra: no training images"),
    ],
)
def test_bad_input_is_one_line(project: Path, tmp_path: Path, change, message: str) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    if change == "extra source":
        extra = {**QUICKSTART_SOURCES[0], "name": "extra", "uri": "kaggle://someone/extra"}
        raw["acquire"]["sources"] = [*raw["acquire"]["sources"], extra]
    else:
        raw.update(change)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_audit(project, params)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
