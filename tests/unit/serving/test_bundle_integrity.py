"""Issue 18 item 2: the served model bundle is tamper-evident.

One test per finding of the attacker's review, each on a real bundle (the tiny trained
model of ``serving_helpers`` with a Mahalanobis detector fitted on real slices, written by
``bundle.write_bundle``) copied to ``tmp_path`` and then tampered with as the attacker
did. Before: a detector threshold set to 1e30 with bundle.json untouched served a noise
DICOM; a deleted ``ood.npz`` fell back silently to the input-statistics check;
``model_sha256: ""`` let an altered model load unchecked; extra files were ignored. Now
``Bundle.load`` (the app, ``predict`` and the registered pyfunc) refuses each with one
line naming the file and the problem, unless ``BRAINTUMOR_UNVERIFIED_BUNDLE=1``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from braintumor.core.files import file_sha256
from braintumor.serving.bundle import (
    META_FILE,
    MODEL_FILE,
    OOD_FILE,
    UNVERIFIED_ENV,
    Bundle,
    BundleError,
)
from braintumor.serving.predictor import OUT_OF_DISTRIBUTION, InputError, Predictor

from serving_helpers import tiny_bundle_folder, tiny_bundle_with_detector, write_dicom


@pytest.fixture(scope="module")
def shipped(mirror: Path, tmp_path_factory) -> Path:
    """The bundle as the evaluate stage ships it: model, detector, bundle.json."""
    return tiny_bundle_with_detector(mirror, tmp_path_factory.mktemp("integrity"))


@pytest.fixture(scope="module")
def plain(mirror: Path, tmp_path_factory) -> Path:
    """The bundle as evaluate ships it with ``ood_method: none``: no detector."""
    return tiny_bundle_folder(mirror, tmp_path_factory.mktemp("plain"))


@pytest.fixture
def bundle(shipped: Path, tmp_path: Path) -> Path:
    """A private copy of the shipped bundle, for one test to tamper with."""
    return Path(shutil.copytree(shipped, tmp_path / "bundle"))


@pytest.fixture(autouse=True)
def _verified(monkeypatch) -> None:
    """Every test starts without the development opt-out, whatever the shell has."""
    monkeypatch.delenv(UNVERIFIED_ENV, raising=False)


def refusal(folder: Path) -> str:
    """The one-line message ``Bundle.load`` refuses ``folder`` with."""
    with pytest.raises(BundleError) as refused:
        Bundle.load(folder)
    message = str(refused.value)
    assert "\n" not in message
    return message


def changed(path: Path) -> str:
    """The refusal of a file whose bytes are not the ones bundle.json lists."""
    return f"{path}: sha256 differs from {META_FILE} (changed since written)"


def edit_meta(folder: Path, **changes) -> None:
    """Rewrite bundle.json with top-level keys changed (``None`` removes the key)."""
    data = json.loads((folder / META_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / META_FILE).write_text(json.dumps(data))


def raise_threshold(path: Path, threshold: float) -> None:
    """The attacker's edit: the detector file with only its threshold changed."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["threshold"] = np.array(threshold)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def noise_dicom(folder: Path) -> Path:
    """The attacker's input: a DICOM of uniform 12-bit noise."""
    pixels = np.random.default_rng(0).integers(0, 4096, (256, 256)).astype(np.uint16)
    return write_dicom(folder / "noise.dcm", pixels)


def test_the_writer_lists_every_file_with_its_sha256(shipped: Path, plain: Path) -> None:
    meta = json.loads((shipped / META_FILE).read_text())
    assert sorted(path.name for path in shipped.iterdir()) == [META_FILE, MODEL_FILE, OOD_FILE]
    assert meta["files"] == {name: file_sha256(shipped / name) for name in (MODEL_FILE, OOD_FILE)}
    assert meta["model_sha256"] == meta["files"][MODEL_FILE]
    assert Bundle.load(shipped).ood_detector.method == "mahalanobis"
    # A bundle written without a detector lists only the model and serves without one.
    assert set(json.loads((plain / META_FILE).read_text())["files"]) == {MODEL_FILE}
    assert Bundle.load(plain).ood_detector is None


def test_a_threshold_of_1e30_in_ood_npz_is_refused(bundle: Path, tmp_path: Path) -> None:
    """Before: bundle.json untouched, the noise DICOM was served as notumor 0.962."""
    with pytest.raises(InputError) as refused:  # the premise: the shipped detector refuses it
        Predictor(Bundle.load(bundle)).prepare_file(noise_dicom(tmp_path))
    assert refused.value.reason == OUT_OF_DISTRIBUTION
    meta_before = (bundle / META_FILE).read_bytes()
    raise_threshold(bundle / OOD_FILE, 1e30)
    assert (bundle / META_FILE).read_bytes() == meta_before
    assert refusal(bundle) == changed(bundle / OOD_FILE)


def test_a_deleted_ood_npz_is_refused_not_a_silent_fallback(bundle: Path) -> None:
    (bundle / OOD_FILE).unlink()
    assert refusal(bundle) == f"{bundle / OOD_FILE}: missing (listed in {META_FILE})"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model_sha256": ""}, "model_sha256 is empty"),
        ({"files": {MODEL_FILE: "", OOD_FILE: "0" * 64}}, f"{MODEL_FILE} has an empty sha256"),
        ({"files": {MODEL_FILE: "x" * 64}}, f"{MODEL_FILE} has a malformed sha256"),
        ({"files": {OOD_FILE: "0" * 64}}, f"does not list {MODEL_FILE}"),
        ({"files": {MODEL_FILE: "0" * 64, "../x": "0" * 64}}, "lists '../x', which is not a"),
    ],
    ids=["model_sha256", "manifest-entry", "malformed", "no-model", "path"],
)
def test_an_empty_or_bad_hash_in_bundle_json_is_refused(
    bundle: Path, changes: dict, expected: str
) -> None:
    edit_meta(bundle, **changes)
    message = refusal(bundle)
    assert message.startswith(f"{bundle / META_FILE}: ") and expected in message


@pytest.mark.parametrize("clear_model_sha256", [False, True], ids=["untouched", "hash-emptied"])
def test_an_altered_model_keras_is_refused(bundle: Path, clear_model_sha256: bool) -> None:
    """Before: with ``model_sha256: ""`` an altered model loaded without any check."""
    import keras

    model = keras.saving.load_model(bundle / MODEL_FILE, compile=False)
    last = model.layers[-1]
    last.set_weights([weight + 1.0 for weight in last.get_weights()])
    (bundle / MODEL_FILE).unlink()
    model.save(bundle / MODEL_FILE)
    if clear_model_sha256:
        edit_meta(bundle, model_sha256="")
        assert refusal(bundle) == f"{bundle / META_FILE}: model_sha256 is empty"
    else:
        assert refusal(bundle) == changed(bundle / MODEL_FILE)


@pytest.mark.parametrize("extra", ["notes.txt", "ood.npz"])
def test_an_unlisted_extra_file_is_refused(
    shipped: Path, plain: Path, tmp_path: Path, extra: str
) -> None:
    """Before: extra files were ignored, and an ``ood.npz`` dropped into a bundle shipped
    without a detector was served."""
    folder = tmp_path / "bundle"
    if extra == OOD_FILE:  # the plain bundle (no detector) with the shipped one's added
        shutil.copytree(plain, folder)
        shutil.copy(shipped / OOD_FILE, folder / OOD_FILE)
    else:
        shutil.copytree(shipped, folder)
        (folder / extra).write_text("not part of the bundle\n")
    expected = f"{folder / extra}: not listed in {META_FILE} (not part of this bundle)"
    assert refusal(folder) == expected


def test_a_bundle_from_before_manifests_is_refused_with_how_to_rebuild(bundle: Path) -> None:
    edit_meta(bundle, files=None, format_version=1)
    message = refusal(bundle)
    assert message.startswith(f"{bundle / META_FILE}: lists no files with their sha256")
    assert "dvc repro evaluate" in message and f"{UNVERIFIED_ENV}=1" in message


def test_the_opt_out_loads_a_tampered_bundle_with_a_loud_warning(
    bundle: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    raise_threshold(bundle / OOD_FILE, 1e30)
    for value in ("0", "true", ""):  # only exactly 1 opts out
        monkeypatch.setenv(UNVERIFIED_ENV, value)
        refusal(bundle)
    monkeypatch.setenv(UNVERIFIED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="braintumor.serving.bundle"):
        loaded = Bundle.load(bundle)
    (record,) = [r for r in caplog.records if r.name == "braintumor.serving.bundle"]
    assert record.levelno == logging.WARNING and "UNVERIFIED MODEL BUNDLE" in record.message
    assert f"{bundle / OOD_FILE}: sha256 differs" in record.message
    # What the refusal protects against: the tampered detector now serves the noise.
    assert loaded.ood_detector.threshold == 1e30
    prepared = Predictor(loaded).prepare_file(noise_dicom(tmp_path))
    assert prepared.probabilities is not None


@pytest.mark.slow
def test_pyfunc_load_of_a_tampered_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    """The registered model loads its bundle artifact through ``Bundle.load``: a copy
    tampered inside the saved MLflow model fails ``mlflow.pyfunc.load_model``."""
    import mlflow

    from braintumor.serving.pyfunc import BundleModel

    target = tmp_path / "model"
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=BundleModel(),
        artifacts={"bundle": str(bundle)},
        pip_requirements=["mlflow"],  # no requirement inference (a subprocess loading TF)
    )
    copies = [path.parent for path in target.rglob(META_FILE)]
    assert len(copies) == 1
    mlflow.pyfunc.load_model(str(target))  # the premise: the intact copy loads
    raise_threshold(copies[0] / OOD_FILE, 1e30)
    with pytest.raises(BundleError) as refused:
        mlflow.pyfunc.load_model(str(target))
    assert str(refused.value) == changed(copies[0] / OOD_FILE)
