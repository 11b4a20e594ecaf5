"""The training stages on tiny real data: phases, resume, reproducibility, outputs, errors.

Fixtures are a few msoud JPEGs per class run through the real preprocessing at 32 px and
saved in the preprocess stage's layout; the backbone is ``tinycnn`` (traces in seconds)
except in the one slow test that trains a real Keras application.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from braintumor.core.config import params_from_mapping

from train_helpers import CLASSES, SIZE, make_processed, run_phase_cli, tiny_raw_params

pytestmark = pytest.mark.usefixtures("mirror")  # a missing mirror fails, with its path


# --------------------------------------------------------------------------- helpers


def tiny_params(**train: Any):
    """``tiny_raw_params`` as ``Params``; ``frozen__epochs=3`` sets train.frozen.epochs."""
    return params_from_mapping(tiny_raw_params(**train))


def phase_paths(root: Path, phase: str, init: Path | None = None):
    from braintumor.training.phase import PhasePaths

    return PhasePaths(
        model_dir=root / "models" / phase,
        checkpoint_dir=root / "models" / "checkpoints" / phase,
        metrics=root / "metrics" / f"{phase}.json",
        history=root / "metrics" / f"{phase}_history.csv",
        figures=root / "figures" / phase,
        init_model=init,
    )


def weights_by_path(model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v) for v in model.weights}


def run_frozen_phase_cli(params_file: Path, data_dir: Path, out: Path) -> dict[str, Any]:
    """``run_phase_cli`` that must succeed; returns its metrics JSON."""
    result = run_phase_cli(params_file, data_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "m.json").read_text())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="module")
def data(data_dir: Path):
    from braintumor.training.inputs import load_processed

    return load_processed(data_dir, CLASSES, SIZE)


@pytest.fixture(scope="module")
def two_phases(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, Any]:
    """Both phases with the recipe's trainable settings, plus the frozen phase's start."""
    import keras

    from braintumor.training.phase import build_phase_model, run_phase

    # must_improve off: on this tiny data fine-tuning may not beat its start, and these
    # tests look at what it trained (the guard has its own test).
    params = tiny_params(finetune__must_improve=False)
    root = tmp_path_factory.mktemp("two_phases")
    keras.utils.set_random_seed(params.common.seed)  # as run_phase does before building
    initial = weights_by_path(build_phase_model(params, "frozen", None))
    frozen = run_phase(params, "frozen", data, phase_paths(root, "frozen"))
    init = root / "models" / "frozen" / "model.keras"
    finetune = run_phase(params, "finetune", data, phase_paths(root, "finetune", init))
    return {"root": root, "initial": initial, "frozen": frozen, "finetune": finetune}


@pytest.fixture(scope="module")
def from_scratch(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, Any]:
    """Four epochs training everything: uninterrupted, and interrupted after one then
    rerun in the same checkpoint folder."""
    from braintumor.training.checkpointing import TrainingInterrupted
    from braintumor.training.phase import run_phase

    params = tiny_params(frozen__epochs=4, frozen__trainable="all", frozen__learning_rate=3e-3)
    root = tmp_path_factory.mktemp("from_scratch")
    whole = run_phase(params, "frozen", data, phase_paths(root / "whole", "frozen"))
    paths = phase_paths(root / "resumed", "frozen")
    with pytest.raises(TrainingInterrupted):
        run_phase(params, "frozen", data, paths, stop_after_epochs=1)
    interrupted_state = json.loads((paths.checkpoint_dir / "state.json").read_text())
    resumed = run_phase(params, "frozen", data, paths)
    return {
        "params": params,
        "whole": whole,
        "resumed": resumed,
        "interrupted_state": interrupted_state,
        "root": root,
    }


# --------------------------------------------------------------------------- input pipeline


def test_load_processed_memory_maps_and_checks(data_dir: Path) -> None:
    from braintumor.training.inputs import load_processed

    data = load_processed(data_dir, CLASSES, SIZE)
    train = data.splits["train"]
    assert isinstance(train.images, np.memmap)
    assert train.images.shape == (32, SIZE, SIZE, 1) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [8, 8, 8, 8]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": ["glioma", "meningioma", "pituitary", "notumor"]}, "differ from"),
        ({"image_size": 64}, "image_size 64 differs"),
    ],
)
def test_load_processed_rejects_other_parameters(
    tmp_path: Path, data_dir: Path, change: dict, message: str
) -> None:
    import shutil

    from braintumor.training.inputs import DataError, load_processed

    folder = tmp_path / "processed"
    shutil.copytree(data_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(DataError, match=message) as error:
        load_processed(folder, CLASSES, SIZE)
    assert "\n" not in str(error.value)


def test_cli_reports_mismatched_classes_in_one_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from braintumor.stages.train import main

    folder = tmp_path / "processed"
    shutil.copytree(data_dir, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "classes": ["a", "b", "c", "d"]}))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_raw_params()))
    code = main(
        [
            "--phase",
            "frozen",
            "--params",
            str(params_path),
            "--data",
            str(folder),
            "--model-dir",
            str(tmp_path / "m"),
            "--checkpoints",
            str(tmp_path / "c"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--history",
            str(tmp_path / "h.csv"),
            "--figures",
            str(tmp_path / "f"),
            "--no-tracking",
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 1
    assert error.startswith("error: ") and "\n" not in error
    assert "meta.json: classes ['a', 'b', 'c', 'd'] differ from common.classes" in error
    assert not (tmp_path / "m").exists()


def test_batches_are_seeded_per_epoch_and_cover_every_row() -> None:
    from braintumor.training.inputs import ArrayBatches

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10) % 4
    batches = ArrayBatches(images, labels, 4, shuffle=True, seed=7)
    epochs = []
    for _ in range(3):
        rows = np.concatenate([batches[i][0].ravel() for i in range(len(batches))])
        epochs.append(rows.tolist())
        batches.on_epoch_end()
    assert len(batches) == 3 and [len(batches[i][0]) for i in range(3)] == [4, 4, 2]
    assert all(sorted(rows) == list(range(10)) for rows in epochs)
    assert epochs[0] != epochs[1]
    # A dataset created at epoch 2 (a resumed run) serves what epoch 2 served.
    resumed = ArrayBatches(images, labels, 4, shuffle=True, seed=7, epoch=2)
    assert np.concatenate([resumed[i][0].ravel() for i in range(3)]).tolist() == epochs[2]
    assert batches[0][1].dtype == np.int32


def test_drop_remainder_serves_full_batches_that_rotate_through_every_row() -> None:
    from braintumor.training.inputs import ArrayBatches

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10) % 4
    batches = ArrayBatches(images, labels, 4, shuffle=True, seed=7, drop_remainder=True)
    seen: set[int] = set()
    for _ in range(6):
        assert len(batches) == 2 and batches.images_per_epoch == 8
        rows = np.concatenate([batches[i][0].ravel() for i in range(len(batches))])
        assert len(rows) == 8 and len(set(rows.tolist())) == 8
        seen |= set(rows.tolist())
        batches.on_epoch_end()
    assert seen == set(range(10))  # the two rows left out change from epoch to epoch
    with pytest.raises(ValueError, match="no full batch of 16"):
        ArrayBatches(images, labels, 16, drop_remainder=True)


def test_subset_and_balanced_class_weights() -> None:
    from braintumor.training.inputs import class_weights, subset_per_class

    labels = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3] * 2)
    chosen = subset_per_class(labels, 4, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 3, 2]
    assert np.all(np.diff(chosen) > 0)
    weights = class_weights(labels, 4, "balanced")
    assert weights == pytest.approx({0: 0.5, 1: 1.0, 2: 20 / 12, 3: 2.5})
    assert class_weights(labels, 4, "none") is None


# --------------------------------------------------------------------------- the phases


def test_frozen_phase_changes_no_backbone_weight(two_phases: dict[str, Any]) -> None:
    from braintumor.model.classifier import backbone_layers

    model = two_phases["frozen"].model
    initial = two_phases["initial"]
    after = weights_by_path(model)
    backbone = {v.path for layer in backbone_layers(model) for v in layer.weights}
    assert backbone, "the backbone has weights"
    assert set(after) == set(initial)
    for path in backbone:  # kernels, gamma/beta and moving statistics alike
        np.testing.assert_array_equal(after[path], initial[path], err_msg=path)
    head_changed = [
        p for p in after if p not in backbone and not np.array_equal(after[p], initial[p])
    ]
    assert any("head_dense1" in path for path in head_changed)


def test_cached_features_train_the_head_of_the_saved_model(tmp_path: Path, data) -> None:
    """With ``cache_features`` the head trains on backbone features computed once; the
    saved model is that head on the untouched backbone, so it predicts what the head
    predicts from the features, and fine-tuning starts from it as usual."""
    import keras

    from braintumor.model.classifier import backbone_layers
    from braintumor.training.features import backbone_features, head_model
    from braintumor.training.phase import build_phase_model, run_phase

    params = tiny_params(frozen__cache_features=True, frozen__epochs=3)
    keras.utils.set_random_seed(params.common.seed)
    initial = build_phase_model(params, "frozen", None)
    paths = phase_paths(tmp_path, "frozen")
    result = run_phase(params, "frozen", data, paths)
    assert result.metrics["cached_features"] is True and len(result.history) == 3
    saved = keras.saving.load_model(paths.model)
    for layer in backbone_layers(saved):
        for before, after in zip(
            initial.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True
        ):
            np.testing.assert_array_equal(before, after, err_msg=layer.name)
    head_weights = saved.get_layer("head_dense1").get_weights()[0]
    assert not np.array_equal(head_weights, initial.get_layer("head_dense1").get_weights()[0])
    images = np.asarray(data.splits["val"].images)
    # Features in a shuffled row order come back in that order.
    rows = np.random.default_rng(0).permutation(len(images))
    features = backbone_features(saved, images, rows, batch_size=5)
    via_head = head_model(saved).predict(features, verbose=0)
    whole = saved.predict(images[rows].astype(np.float32), verbose=0)
    np.testing.assert_allclose(via_head, whole, atol=1e-5)
    finetune = run_phase(
        tiny_params(frozen__cache_features=True, frozen__epochs=3),
        "finetune",
        data,
        phase_paths(tmp_path, "finetune", paths.model),
    )
    assert finetune.metrics["cached_features"] is False


def test_a_finetuning_that_only_hurts_keeps_the_starting_weights(
    two_phases: dict[str, Any], data, tmp_path: Path
) -> None:
    """Fine-tuning must beat its starting model on validation, or the phase keeps it: a
    destructive learning rate leaves the frozen phase's weights in place (and says so)."""
    import keras

    from braintumor.training.phase import run_phase

    init = two_phases["root"] / "models" / "frozen" / "model.keras"
    params = tiny_params(finetune__learning_rate=50.0, finetune__epochs=2)
    result = run_phase(params, "finetune", data, phase_paths(tmp_path, "finetune", init))
    start = keras.saving.load_model(init)
    assert result.metrics["kept_starting_weights"] is True
    assert result.metrics["start_val_loss"] < result.metrics["best_val_loss"]
    for before, after in zip(start.get_weights(), result.model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    unguarded = two_phases["finetune"].metrics
    assert unguarded["start_val_loss"] is None and unguarded["kept_starting_weights"] is False


def test_the_guard_can_judge_on_balanced_accuracy_of_leakage_free_validation(
    two_phases: dict[str, Any], data, tmp_path: Path
) -> None:
    """``guard_metric: balanced_accuracy``: the start and the best epoch are scored by mean
    class recall on the validation rows flagged leakage-free (only those), and the phase
    keeps its start unless the best epoch beats it there as well as on the loss."""
    import dataclasses
    import shutil

    import keras
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score

    from braintumor.training.phase import guard_rows, run_phase

    folder = tmp_path / "processed"
    shutil.copytree(data.folder, folder)
    index = pd.read_csv(folder / "val_index.csv")
    index["leakage_free"] = np.arange(len(index)) % 3 != 0
    index.to_csv(folder / "val_index.csv", index=False)
    flagged = dataclasses.replace(data, folder=folder)
    rows = guard_rows(flagged)
    assert rows.tolist() == index["leakage_free"].tolist() and 0 < rows.sum() < len(rows)

    def score(model: Any) -> float:
        val = data.splits["val"]
        predicted = model.predict(np.asarray(val.images[rows]), verbose=0).argmax(axis=1)
        return float(balanced_accuracy_score(val.labels[rows], predicted))

    init = two_phases["root"] / "models" / "frozen" / "model.keras"
    for rate in (1e-3, 50.0):  # an ordinary fine-tuning, and a destructive one
        params = tiny_params(
            finetune__guard_metric="balanced_accuracy", finetune__learning_rate=rate
        )
        paths = phase_paths(tmp_path / str(rate), "finetune", init)
        result = run_phase(params, "finetune", flagged, paths)
        metrics = result.metrics
        start = keras.saving.load_model(init)
        assert metrics["guard_start"] == pytest.approx(score(start), abs=1e-6)
        beat_loss = metrics["best_val_loss"] < metrics["start_val_loss"]
        if metrics["kept_starting_weights"]:
            assert not beat_loss or metrics["guard_best"] <= metrics["guard_start"]
            for before, after in zip(start.get_weights(), result.model.get_weights(), strict=True):
                np.testing.assert_array_equal(before, after)
        else:
            assert beat_loss and metrics["guard_best"] > metrics["guard_start"]
            assert score(result.model) == pytest.approx(metrics["guard_best"], abs=1e-6)
        if rate == 50.0:
            assert metrics["kept_starting_weights"] is True


def test_phase_one_reuses_the_audits_features_only_when_they_fit(tmp_path: Path, data) -> None:
    """The audit saves the frozen backbone's pooled features and phase 1 trains on them
    instead of computing its own: the same head as computing them, and it is the saved
    arrays that train it (zeros with the right key give another head). Features with
    another key or another row count are not used, and the reason is kept."""
    import dataclasses

    import keras

    from braintumor.training.features import (
        backbone_features,
        features_key,
        load_features,
        save_features,
    )
    from braintumor.training.phase import build_phase_model, run_phase

    params = tiny_params(frozen__cache_features=True, frozen__epochs=2)
    keras.utils.set_random_seed(params.common.seed)
    model = build_phase_model(params, "frozen", None)
    train = backbone_features(model, data.splits["train"].images, None, 7)
    val = backbone_features(model, data.splits["val"].images, None, 7)
    key = features_key(params, data.digest, None)
    folder = tmp_path / "features"

    def frozen(name: str) -> dict[str, Any]:
        paths = dataclasses.replace(phase_paths(tmp_path / name, "frozen"), features=folder)
        result = run_phase(params, "frozen", data, paths)
        kernel = result.model.get_layer("head_dense1").get_weights()[0]
        return {"loss": result.history[-1]["val_loss"], "kernel": kernel, **result.metrics}

    computed = run_phase(params, "frozen", data, phase_paths(tmp_path / "own", "frozen"))
    assert computed.metrics["features_source"] == "computed: no features folder given"
    save_features(folder, {"train": train, "val": val}, key)
    reused = frozen("reused")
    assert reused["features_source"] == f"reused {folder}"
    assert reused["loss"] == pytest.approx(computed.history[-1]["val_loss"], abs=1e-5)
    kernel = computed.model.get_layer("head_dense1").get_weights()[0]
    np.testing.assert_allclose(reused["kernel"], kernel, atol=1e-5)
    save_features(folder, {"train": np.zeros_like(train), "val": val}, key)
    assert np.abs(frozen("zeros")["kernel"] - kernel).max() > 1e-4  # no input, no gradient
    rows = {"train": len(train), "val": len(val)}
    save_features(folder, {"train": train, "val": val}, "another key")
    assert load_features(folder, key, rows)[0] is None
    assert "another model" in load_features(folder, key, rows)[1]
    save_features(folder, {"train": train[:-1], "val": val}, key)
    assert load_features(folder, key, rows)[0] is None
    assert "rows" in load_features(folder, key, rows)[1]
    (folder / "meta.json").write_text("{")
    assert "unreadable" in load_features(folder, key, rows)[1]
    other_seed = tiny_raw_params(frozen__cache_features=True)
    other_seed["common"]["seed"] = 7  # no weights file: the seed makes the backbone
    assert features_key(params_from_mapping(other_seed), data.digest, None) != key
    assert features_key(params, data.digest + "x", None) != key


def test_cached_features_need_a_head_only_phase(tmp_path: Path, data) -> None:
    from braintumor.training.phase import run_phase

    params = tiny_params(frozen__cache_features=True, frozen__trainable="all")
    with pytest.raises(ValueError, match="cache_features"):
        run_phase(params, "frozen", data, phase_paths(tmp_path, "frozen"))


def test_finetune_keeps_batchnorm_frozen_and_trains_the_rest(two_phases: dict[str, Any]) -> None:
    import keras

    before = weights_by_path(two_phases["frozen"].model)
    model = two_phases["finetune"].model
    after = weights_by_path(model)
    batchnorm = [
        layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(batchnorm) == 5  # three in tinycnn, two in the head
    for layer in batchnorm:
        for variable in layer.weights:  # gamma, beta, moving mean, moving variance
            np.testing.assert_array_equal(after[variable.path], before[variable.path])
    assert not np.array_equal(after["tiny_conv1/kernel"], before["tiny_conv1/kernel"])
    assert two_phases["finetune"].metrics["trainable_mode"] == "all_but_batchnorm"


def test_a_phase_with_from_block_freezes_the_blocks_before_the_first_trainable_one() -> None:
    """``train.<phase>.first_trainable_block`` reaches ``set_trainable``: with 5, block 4
    and the stem stay frozen, block 5 and the head train (BatchNormalization never)."""
    from braintumor.training.phase import build_phase_model

    raw = tiny_raw_params(frozen__trainable="from_block", frozen__first_trainable_block=5)
    raw["model"]["backbone"] = "efficientnet_lite0"
    model = build_phase_model(params_from_mapping(raw), "frozen", None)
    training = {layer.name for layer in model.layers if layer.trainable_weights}
    assert {"block5_expand_conv", "block15_project_conv", "top_conv", "head_dense1"} <= training
    assert not training & {"stem_conv", "block0_dwconv", "block4_project_conv", "block5_bn"}


def test_phase_outputs(two_phases: dict[str, Any]) -> None:
    import keras

    root = two_phases["root"]
    for phase in ("frozen", "finetune"):
        rows = list(csv.DictReader((root / "metrics" / f"{phase}_history.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
        assert all(float(r["cpu_seconds"]) > 0 for r in rows)  # the machine's share, per epoch
        metrics = json.loads((root / "metrics" / f"{phase}.json").read_text())
        assert metrics["epochs_run"] == 2 and 1 <= metrics["best_epoch"] <= 2
        assert metrics["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows))
        assert metrics["images_per_second"] > 0
        for name in ("history.png", "augmentation.png"):
            assert (root / "figures" / phase / name).stat().st_size > 1000
        state = json.loads((root / "models" / "checkpoints" / phase / "state.json").read_text())
        assert state["complete"] is True
        assert [p.name for p in (root / "models" / "checkpoints" / phase).iterdir()] == [
            "state.json"
        ]
        model = keras.saving.load_model(root / "models" / phase / "model.keras")
        assert not any(layer.name.startswith("aug_") for layer in model.layers)
        probabilities = model.predict(np.zeros((2, SIZE, SIZE, 1), np.float32), verbose=0)
        assert probabilities.shape == (2, 4)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert not list(root.rglob(".*tmp*")), "no temporary files left behind"


def test_loss_goes_down(from_scratch: dict[str, Any]) -> None:
    losses = [row["loss"] for row in from_scratch["whole"].history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.2


def test_resumed_run_matches_uninterrupted_run(from_scratch: dict[str, Any]) -> None:
    state = from_scratch["interrupted_state"]
    assert state["epoch"] == 1 and state["complete"] is False
    whole, resumed = from_scratch["whole"], from_scratch["resumed"]
    assert resumed.metrics["resumed"] is True and whole.metrics["resumed"] is False
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        np.testing.assert_allclose(
            [row[key] for row in resumed.history], [row[key] for row in whole.history], atol=1e-5
        )
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_same_seed_same_weights(from_scratch: dict[str, Any], data, tmp_path: Path) -> None:
    from braintumor.training.phase import run_phase

    again = run_phase(from_scratch["params"], "frozen", data, phase_paths(tmp_path, "frozen"))
    for a, b in zip(
        from_scratch["whole"].model.get_weights(), again.model.get_weights(), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_weight_averaging_resumes_exactly_and_saves_what_validation_measured(
    tmp_path: Path, data
) -> None:
    """With ``ema_momentum``, validation runs on the averaged weights and the best model
    saved is those averages (its validation loss is the history's best), while the
    per-epoch state keeps raw weights and averages apart: an interrupted run resumes to
    the same weights as an uninterrupted one."""
    import keras

    from braintumor.training.checkpointing import TrainingInterrupted
    from braintumor.training.phase import run_phase

    params = tiny_params(
        frozen__epochs=3,
        frozen__trainable="all",
        frozen__learning_rate=3e-3,
        frozen__ema_momentum=0.9,
    )
    whole = run_phase(params, "frozen", data, phase_paths(tmp_path / "whole", "frozen"))
    paths = phase_paths(tmp_path / "resumed", "frozen")
    with pytest.raises(TrainingInterrupted):
        run_phase(params, "frozen", data, paths, stop_after_epochs=1)
    resumed = run_phase(params, "frozen", data, paths)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [row[key] for row in resumed.history], [row[key] for row in whole.history], atol=1e-5
        )
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    saved = keras.saving.load_model(tmp_path / "whole" / "models" / "frozen" / "model.keras")
    saved.compile(loss="sparse_categorical_crossentropy")
    val = data.splits["val"]
    measured = saved.evaluate(val.images.astype("float32"), val.labels, verbose=0)
    best = min(row["val_loss"] for row in whole.history)
    assert measured == pytest.approx(best, abs=1e-4)
    # ...and they are not the last step's raw weights, which validate differently.
    plain = run_phase(
        tiny_params(frozen__epochs=3, frozen__trainable="all", frozen__learning_rate=3e-3),
        "frozen",
        data,
        phase_paths(tmp_path / "plain", "frozen"),
    )
    assert [row["val_loss"] for row in plain.history] != pytest.approx(
        [row["val_loss"] for row in whole.history], abs=1e-4
    )


def test_cosine_schedule_warms_up_decays_and_resumes_on_the_same_curve(
    tmp_path: Path, data
) -> None:
    """``schedule: cosine``: the rate each epoch starts at is the warm-up-then-cosine curve
    at that step (0 at the first step, the peak after the warm-up, lower every epoch
    after), no plateau rule touches it, and a run killed after one epoch resumes at the
    saved step: same rates, same losses, same weights as an uninterrupted run."""
    import math

    from braintumor.training.checkpointing import TrainingInterrupted
    from braintumor.training.phase import run_phase

    params = tiny_params(
        frozen__epochs=4,
        frozen__trainable="all",
        frozen__learning_rate=3e-3,
        frozen__schedule="cosine",
        frozen__warmup_epochs=1.0,
        # A plateau rule this eager would lower a constant rate after every epoch.
        frozen__reduce_lr={"patience": 0, "factor": 0.1},
    )
    whole = run_phase(params, "frozen", data, phase_paths(tmp_path / "whole", "frozen"))
    rates = [row["learning_rate"] for row in whole.history]
    # Epoch starts: step 0 (warm-up from 0), then the cosine from the peak at 1/3 and 2/3.
    expected = [0.0, 3e-3, 3e-3 * 0.5 * (1 + math.cos(math.pi / 3)), 3e-3 * 0.25]
    assert rates == pytest.approx(expected, rel=1e-4, abs=1e-9)
    paths = phase_paths(tmp_path / "resumed", "frozen")
    with pytest.raises(TrainingInterrupted):
        run_phase(params, "frozen", data, paths, stop_after_epochs=2)
    resumed = run_phase(params, "frozen", data, paths)
    assert [row["learning_rate"] for row in resumed.history] == pytest.approx(rates, rel=1e-6)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [row[key] for row in resumed.history], [row[key] for row in whole.history], atol=1e-5
        )
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_checkpoint_from_other_parameters_is_not_resumed(tmp_path: Path, data) -> None:
    from braintumor.training.phase import find_checkpoint

    params = tiny_params()
    paths = phase_paths(tmp_path, "frozen")
    paths.checkpoint_dir.mkdir(parents=True)
    expected, resume = find_checkpoint(params, "frozen", data, paths)
    assert resume is None
    (paths.checkpoint_dir / "state-epoch0001.weights.h5").write_bytes(b"x")
    (paths.checkpoint_dir / "best.keras").write_bytes(b"x")
    state = {
        "fingerprint": expected,
        "complete": False,
        "epoch": 1,
        "weights": "state-epoch0001.weights.h5",
    }
    (paths.checkpoint_dir / "state.json").write_text(json.dumps(state))
    assert find_checkpoint(params, "frozen", data, paths)[1] == state
    (paths.checkpoint_dir / "best.keras").unlink()  # a state without its best model
    assert find_checkpoint(params, "frozen", data, paths)[1] is None
    (paths.checkpoint_dir / "best.keras").write_bytes(b"x")
    other = tiny_params(frozen__learning_rate=1e-3)
    assert find_checkpoint(other, "frozen", data, paths)[1] is None
    # Only the other phase's settings changed: still resumable.
    assert find_checkpoint(tiny_params(finetune__epochs=9), "frozen", data, paths)[1] == state


@pytest.mark.slow
def test_mobilenetv3small_trains_both_phases(tmp_path: Path, data) -> None:
    """A real Keras application end to end (slow: tracing it takes ~20 s per phase)."""
    from braintumor.training.phase import run_phase

    raw = tiny_raw_params(frozen__epochs=1, finetune__epochs=1)
    raw["model"].update(backbone="mobilenetv3small", batchnorm_momentum=0.9)
    params = params_from_mapping(raw)
    frozen = run_phase(params, "frozen", data, phase_paths(tmp_path, "frozen"))
    init = tmp_path / "models" / "frozen" / "model.keras"
    finetune = run_phase(params, "finetune", data, phase_paths(tmp_path, "finetune", init))
    assert frozen.metrics["trainable_parameters"] < finetune.metrics["trainable_parameters"]
    assert np.isfinite(finetune.history[-1]["val_loss"])


def test_stage_module_leaves_the_backend_choice_to_main() -> None:
    """Importing the stage must not import keras: ``main`` sets KERAS_BACKEND first."""
    import subprocess
    import sys

    code = "import sys, braintumor.training.phase; print('keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_xla_autotune_level_replaces_the_one_in_xla_flags(monkeypatch) -> None:
    import keras

    from braintumor.model.backend import use_backend

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_gpu_autotune_level=4")
    use_backend(keras.backend.backend(), xla_gpu_autotune_level=1)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_autotune_level=1"
    use_backend(keras.backend.backend())  # null: XLA_FLAGS left alone
    assert os.environ["XLA_FLAGS"].endswith("level=1")


def test_compile_counts_are_named_per_keras_step_and_flattened_for_mlflow() -> None:
    from braintumor.training.compile_stats import step_name
    from braintumor.training.records import numeric_metrics

    assert [step_name(n) for n in ("jit(train_step)", "jit(test_step)", "jit(_uniform)")] == [
        "train_step",
        "test_step",
        "other",
    ]
    metrics = {"phase": "frozen", "epochs_run": 2, "compiles": {"train_step": 1}, "x": None}
    assert numeric_metrics(metrics) == {"epochs_run": 2, "compiles/train_step": 1}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_trains_on_another_backend(tmp_path: Path, data_dir: Path, backend: str) -> None:
    """``train.backend`` reaches Keras through KERAS_BACKEND, set by ``main`` (own process)."""
    import importlib.util

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    raw = tiny_raw_params(frozen__epochs=2)
    raw["train"]["backend"] = backend
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    metrics = run_frozen_phase_cli(tmp_path / "params.yaml", data_dir, tmp_path)
    assert metrics["backend"] == backend and metrics["epochs_run"] == 2


@pytest.mark.slow
def test_jax_phase_compiles_one_training_step_and_reuses_its_compilations(
    tmp_path: Path, data_dir: Path
) -> None:
    """What made a first Keras-JAX epoch slow, counted: with full batches only, the phase
    compiles one training step (two without: the short last batch is another program),
    and a second run loads its programs from the persistent cache with equal results."""
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")

    def run(name: str, drop_remainder: bool) -> dict[str, Any]:
        raw = tiny_raw_params(frozen__epochs=2, frozen__batch_size=6)  # 32 train, 12 val
        raw["train"].update(backend="jax", jit_compile="auto", drop_remainder=drop_remainder)
        params_file = tmp_path / "params.yaml"  # the cache is .cache/jax beside it
        params_file.write_text(yaml.safe_dump(raw))
        return run_frozen_phase_cli(params_file, data_dir, tmp_path / name)

    first = run("first", drop_remainder=True)
    assert first["compiles"]["train_step"] == 1 and first["compiles"]["test_step"] == 1
    assert first["compile_seconds"] > 0 and first["first_epoch_seconds"] > 0
    assert any((tmp_path / ".cache" / "jax").iterdir())

    again = run("again", drop_remainder=True)
    assert again["compile_cache_hits"] >= again["compiles"]["train_step"] + 1
    assert again["best_val_loss"] == first["best_val_loss"]

    ragged = run("ragged", drop_remainder=False)
    assert ragged["compiles"]["train_step"] == 2


def test_a_head_on_cached_features_is_the_same_at_16_steps_per_call() -> None:
    """Phase 1 on cached features and the audit's heads run 16 steps per compiled call
    (``features.HEAD_STEPS_PER_EXECUTION``): the same batches in the same order, so the
    same head as one step per call, only with less dispatch."""
    from braintumor.model.classifier import build_model
    from braintumor.training.features import HEAD_STEPS_PER_EXECUTION
    from braintumor.training.probe import fit_head, predict_head

    params = params_from_mapping(tiny_raw_params(frozen__epochs=3))
    model = build_model(params.model, SIZE, len(CLASSES))
    width = int(model.get_layer("head_pool").output.shape[-1])
    rng = np.random.default_rng(0)
    labels = np.arange(200) % len(CLASSES)
    # Features that carry the class (so the head learns and early stopping sees a trend).
    features = (rng.normal(size=(200, width)) + labels[:, None] * 0.3).astype(np.float32)
    heads = [
        fit_head(
            params,
            model,
            features[:160],
            labels[:160],
            features[160:],
            labels[160:],
            seed=3,
            steps_per_execution=steps,
        )
        for steps in (1, HEAD_STEPS_PER_EXECUTION)
    ]
    one, many = (predict_head(head, features[160:]) for head in heads)
    assert np.abs(one - many).max() <= 1e-6
    assert heads[1].steps_per_execution == HEAD_STEPS_PER_EXECUTION
    assert np.abs(one - predict_head(heads[0], features[160:] * 0)).max() > 1e-3  # it learned
