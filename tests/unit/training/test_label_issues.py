"""``train.label_issues``: the audit's suspects are reported, or left out of the train split
(never relabelled), on a processed folder of real mirror images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import params_from_mapping

from train_helpers import CLASSES, SIZE, make_processed, tiny_raw_params

pytestmark = pytest.mark.usefixtures("mirror")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"), counts={"train": 4, "val": 2})


def open_data(folder: Path):
    from braintumor.training.inputs import load_processed

    return load_processed(folder, CLASSES, SIZE)


def suspects_csv(folder: Path, out: Path, rows: list[int], split: str = "train") -> Path:
    index = pd.read_csv(folder / f"{split}_index.csv")
    table = index.iloc[rows].assign(split=split, suggested="notumor")
    table[["id", "split", "path", "label", "suggested"]].to_csv(out, index=False)
    return out


def test_drop_leaves_the_suspects_out_and_keeps_every_other_row(data_dir: Path) -> None:
    from braintumor.training.inputs import without_training_rows

    data = open_data(data_dir)
    paths = set(pd.read_csv(data_dir / "train_index.csv")["path"].iloc[[1, 6, 13]])
    reduced, dropped = without_training_rows(data, paths)
    assert dropped == 3
    keep = np.setdiff1d(np.arange(len(data.splits["train"])), [1, 6, 13])
    assert np.array_equal(reduced.splits["train"].labels, data.splits["train"].labels[keep])
    assert np.array_equal(reduced.splits["train"].images, data.splits["train"].images[keep])
    assert reduced.splits["val"] is data.splits["val"]
    assert reduced.digest != data.digest
    unchanged, none = without_training_rows(data, {"msoud/Training/glioma/not-a-file.jpg"})
    assert none == 0 and unchanged is data


@pytest.mark.parametrize("mode", ["report", "drop"])
def test_the_train_stage_says_how_many(
    data_dir: Path, tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from braintumor.stages.train import _label_issues

    raw = tiny_raw_params()
    raw["train"]["label_issues"] = mode
    params = params_from_mapping(raw)
    data = open_data(data_dir)
    csv = suspects_csv(data_dir, tmp_path / "suspects.csv", [0, 5])
    # Suspects of other splits never leave training.
    extra = suspects_csv(data_dir, tmp_path / "val.csv", [0], split="val")
    pd.concat([pd.read_csv(csv), pd.read_csv(extra)]).to_csv(csv, index=False)
    result = _label_issues(params, data, csv)
    said = capsys.readouterr().out
    if mode == "drop":
        assert len(result.splits["train"]) == len(data.splits["train"]) - 2
        assert "2 suspected train images left out (drop)" in said
    else:
        assert result is data
        assert "2 suspected train images kept (report)" in said


def test_a_missing_suspects_file_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    from braintumor.stages.train import _label_issues
    from braintumor.training.inputs import DataError

    params = params_from_mapping(tiny_raw_params())
    with pytest.raises(DataError, match="run the audit stage") as error:
        _label_issues(params, open_data(data_dir), tmp_path / "missing.csv")
    assert "\n" not in str(error.value)


def test_an_unknown_mode_is_one_line() -> None:
    from braintumor.core.schema import ConfigError

    raw = tiny_raw_params()
    raw["train"]["label_issues"] = "relabel"
    with pytest.raises(ConfigError, match="train.label_issues: 'relabel' is not one of"):
        params_from_mapping(raw)
