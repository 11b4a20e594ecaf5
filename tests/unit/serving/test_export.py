"""Issue 22 items 1-2: the exported model (LiteRT + the head in NumPy) answers like Keras,
in one pass, and a bundle refuses an exported file that is not its own.

On the tiny trained model of ``serving_helpers`` and real msoud slices: parity of the
probabilities and of the one-pass Grad-CAM maps with the Keras GradientTape path (<= 1e-4),
the export gate, the bundle's checks (missing, altered, foreign file), and the serving
path (``Predictor``) running one invoke per upload without Keras.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from braintumor.core.files import file_sha256
from braintumor.core.schema import ModelParams
from braintumor.explain.gradcam import GradCam
from braintumor.explain.headcam import HeadParams, head_gradcam, softmax
from braintumor.model.classifier import build_model
from braintumor.serving.bundle import META_FILE, MODEL_FILE, Bundle, BundleError, read_meta
from braintumor.serving.export import PARITY_TOLERANCE, ExportError, export_model, head_params
from braintumor.serving.exported import EXPORT_FILE, HEAD_FILE, ExportedModel
from braintumor.serving.predictor import InputError, Predictor

from serving_helpers import BUNDLE_SIZE, CLASSES, real_slices, tiny_exported_bundle


@pytest.fixture(scope="module")
def shipped(mirror: Path, tmp_path_factory) -> Path:
    return tiny_exported_bundle(mirror, tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def keras_model(shipped: Path):
    return keras.saving.load_model(shipped / MODEL_FILE, compile=False)


@pytest.fixture(scope="module")
def slices(mirror: Path, shipped: Path) -> np.ndarray:
    return real_slices(mirror, read_meta(shipped), 3)


@pytest.fixture
def bundle(shipped: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shipped, tmp_path / "bundle"))


def test_exported_probabilities_and_maps_match_keras_on_real_slices(
    shipped: Path, keras_model, slices: np.ndarray
) -> None:
    """The graph's probabilities, the NumPy head's and the one-pass Grad-CAM (centred
    logit, the predicted class) against Keras and its GradientTape, image by image."""
    meta = read_meta(shipped)
    exported = ExportedModel(shipped / EXPORT_FILE)
    head = HeadParams.load(shipped / HEAD_FILE)
    batch = slices[..., None].astype(np.float32)
    reference = GradCam.for_model(keras_model, meta.gradcam_layer).compute(batch)
    keras_p = np.asarray(keras_model.predict_on_batch(batch))
    for index, image in enumerate(slices):
        outputs = exported(image[None])
        result = head_gradcam(head, outputs.pooled, outputs.maps, image.shape)
        assert np.abs(outputs.probabilities[0] - keras_p[index]).max() <= PARITY_TOLERANCE
        assert np.abs(softmax(result.logits)[0] - keras_p[index]).max() <= PARITY_TOLERANCE
        assert result.class_indices[0] == reference.class_indices[index]
        assert np.abs(result.heatmaps[0] - reference.heatmaps[index]).max() <= PARITY_TOLERANCE
    assert reference.heatmaps.max() > 0.99  # real maps, not all zeros


def test_head_gradcam_matches_gradienttape_for_every_class(
    shipped: Path, keras_model, slices: np.ndarray
) -> None:
    """Not only the predicted class: the hand-written backward pass through both
    BatchNormalizations and the ReLU Dense gives GradientTape's weights for each class,
    for the centred score and the raw logit."""
    meta = read_meta(shipped)
    exported = ExportedModel(shipped / EXPORT_FILE)
    head = head_params(keras_model)
    outputs = exported(slices)
    batch = slices[..., None].astype(np.float32)
    for score in ("centred", "logit"):
        cam = GradCam(keras_model, meta.gradcam_layer, score=score)
        for class_index in range(len(CLASSES)):
            expected = cam.compute(batch, class_index).heatmaps
            result = head_gradcam(
                head,
                outputs.pooled,
                outputs.maps,
                slices.shape[1:],
                np.full(len(slices), class_index),
                centred=score == "centred",
            )
            worst = np.abs(result.heatmaps - expected).max()
            assert worst <= PARITY_TOLERANCE, (score, class_index, worst)


def test_bundle_serves_the_exported_model_by_default(shipped: Path, slices: np.ndarray) -> None:
    served = Bundle.load(shipped)
    assert served.runtime == "litert" and served.model is None
    assert "model.tflite" in served.describe()
    keras_served = Bundle.load(shipped, runtime="keras")
    assert keras_served.runtime == "keras" and keras_served.exported is None
    difference = np.abs(served.predict(slices) - keras_served.predict(slices)).max()
    assert difference <= PARITY_TOLERANCE
    meta = read_meta(shipped)
    assert meta.files[EXPORT_FILE] == meta.exported["sha256"] == file_sha256(shipped / EXPORT_FILE)
    assert meta.exported["parity"]["probabilities"] <= PARITY_TOLERANCE


class CountingModel(ExportedModel):
    """The real exported model, counting its invokes."""

    calls = 0

    def __call__(self, images):
        CountingModel.calls += 1
        return super().__call__(images)


def test_one_invoke_per_upload_feeds_the_ood_check_classification_and_gradcam(
    shipped: Path, mirror: Path, keras_model
) -> None:
    bundle = Bundle.load(shipped)
    bundle.exported = CountingModel(shipped / EXPORT_FILE)
    predictor = Predictor(bundle)
    path = sorted(p for p in (mirror / "msoud" / "Testing" / "glioma").iterdir() if p.is_file())[3]
    CountingModel.calls = 0
    prepared = predictor.prepare(path.read_bytes(), path.name)
    probabilities, heatmaps = predictor.explain_prepared([prepared])
    assert CountingModel.calls == 1
    keras_predictor = Predictor(Bundle.load(shipped, runtime="keras"))
    expected_p, expected_maps = keras_predictor.explain(prepared.image[None])
    assert np.abs(probabilities - expected_p).max() <= PARITY_TOLERANCE
    assert np.abs(heatmaps - expected_maps).max() <= PARITY_TOLERANCE
    assert np.allclose(predictor.classify([prepared]), probabilities)
    assert CountingModel.calls == 1


def test_missing_exported_file_is_refused_in_one_line(bundle: Path) -> None:
    (bundle / EXPORT_FILE).unlink()
    with pytest.raises(BundleError, match=r"model\.tflite: missing") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)


def test_altered_exported_file_is_refused_in_one_line(bundle: Path) -> None:
    data = bytearray((bundle / EXPORT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / EXPORT_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.tflite: sha256 differs") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)


def _rehash(bundle: Path, name: str, *, exported_entry: bool) -> None:
    """What an attacker who also edits bundle.json does: the manifest follows the file."""
    meta = json.loads((bundle / META_FILE).read_text())
    meta["files"][name] = file_sha256(bundle / name)
    if exported_entry:
        meta["exported"]["sha256"] = meta["files"][name]
    (bundle / META_FILE).write_text(json.dumps(meta))


def _other_export(keras_model, slices: np.ndarray, folder: Path) -> Path:
    """The same architecture with other weights (another seed), exported for real."""
    keras.utils.set_random_seed(11)
    other = build_model(
        ModelParams(backbone="tinycnn", weights="none", dense_units=(16,)), BUNDLE_SIZE, 4
    )
    layer = "top_activation"
    return export_model(other, layer, folder, slices[:2]).model_file.parent


def test_exported_file_of_another_model_is_refused(
    bundle: Path, keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    foreign = _other_export(keras_model, slices, tmp_path / "other")
    shutil.copyfile(foreign / EXPORT_FILE, bundle / EXPORT_FILE)
    _rehash(bundle, EXPORT_FILE, exported_entry=True)
    with pytest.raises(BundleError, match="answers differently from the model") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)
    # The manifest alone not updated: the export's own record catches it first.
    meta = json.loads((bundle / META_FILE).read_text())
    meta["exported"]["sha256"] = "0" * 64
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="differs from the one its export recorded"):
        Bundle.load(bundle)


def test_head_of_another_model_is_refused(
    bundle: Path, keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    foreign = _other_export(keras_model, slices, tmp_path / "other")
    shutil.copyfile(foreign / HEAD_FILE, bundle / HEAD_FILE)
    _rehash(bundle, HEAD_FILE, exported_entry=False)
    with pytest.raises(BundleError, match=r"head\.npz: disagrees with model\.tflite"):
        Bundle.load(bundle)


def test_export_fails_in_one_line_beyond_the_parity_bound(
    keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    """The gate itself: the float export differs from Keras by ~1e-7 here, so a bound
    below that must stop it, with nothing left behind."""
    with pytest.raises(ExportError, match="disagrees with the Keras model beyond") as caught:
        export_model(keras_model, "top_activation", tmp_path, slices[:2], tolerance=1e-12)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / EXPORT_FILE).exists() and not (tmp_path / HEAD_FILE).exists()


def test_export_refuses_a_map_layer_the_pooling_does_not_read(
    keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="'tiny_relu2' is not the map head_pool averages"):
        export_model(keras_model, "tiny_relu2", tmp_path, slices[:2])


def test_registered_pyfunc_serves_the_exported_model(
    shipped: Path, mirror: Path, tmp_path: Path
) -> None:
    """``mlflow.pyfunc`` save and load (what the registry and ``mlflow models serve`` run):
    the loaded model answers from ``model.tflite``, like the Keras path within 1e-4, and
    its requirements name the LiteRT runtime, not TensorFlow or Keras."""
    import mlflow

    from braintumor.core.schema import CleanParams, ServingParams
    from braintumor.serving.pyfunc import BundleModel, model_config, served_requirements

    requirements = served_requirements(True, ["keras==3", "tensorflow-cpu==2"])
    assert any(r.startswith("ai-edge-litert==") for r in requirements)
    assert not any(r.startswith(("keras", "tensorflow")) for r in requirements)
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "model"),
        python_model=BundleModel(),
        artifacts={"bundle": str(shipped)},
        model_config=model_config(ServingParams(), CleanParams()),
        pip_requirements=requirements,
    )
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    served = loaded.unwrap_python_model().predictor
    assert served.bundle.runtime == "litert" and served.bundle.model is None
    paths = [
        sorted(p for p in (mirror / "msoud" / "Testing" / name).iterdir() if p.is_file())[7]
        for name in CLASSES
    ]
    table = loaded.predict([path.read_bytes() for path in paths])
    keras_predictor = Predictor(Bundle.load(shipped, runtime="keras"))
    for path, (_, row) in zip(paths, table.iterrows(), strict=True):
        try:  # the same checks: a slice the tiny detector refuses is refused by both
            prepared = keras_predictor.prepare(path.read_bytes())
        except InputError as error:
            assert row["status"] == "error" and row["reason"] == error.reason
            continue
        assert row["status"] == "ok"
        expected = keras_predictor.classify([prepared])[0]
        assert np.abs(row[list(CLASSES)].to_numpy(float) - expected).max() <= PARITY_TOLERANCE
    assert (table["status"] == "ok").sum() >= 2


def test_extra_layer_maps_come_from_the_same_invoke(
    keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    """The seam for another map (localisation may choose an earlier block): the graph also
    returns ``map_<layer>``, equal to the Keras layer's output, and says so in its record."""
    result = export_model(
        keras_model, "top_activation", tmp_path, slices[:2], extra_layers=("tiny_relu2",)
    )
    assert result.info["outputs"][-1] == "map_tiny_relu2"
    outputs = ExportedModel(result.model_file)(slices[:3])
    probe = keras.Model(keras_model.inputs, keras_model.get_layer("tiny_relu2").output)
    expected = np.asarray(probe.predict_on_batch(slices[:3, ..., None].astype(np.float32)))
    assert outputs.extra["map_tiny_relu2"].shape == expected.shape
    assert np.abs(outputs.extra["map_tiny_relu2"] - expected).max() <= 1e-4 * max(
        1.0, float(np.abs(expected).max())
    )
    with pytest.raises(ExportError, match="extra_layers: the model has no layer 'nope'"):
        export_model(keras_model, "top_activation", tmp_path, slices[:2], extra_layers=("nope",))
