"""Issue 22: serving shows the explanation the localisation stage chose (HiResCAM at an
earlier block), from the one exported invoke plus NumPy (``explain.tailcam``).

On the tiny trained model of ``serving_helpers`` exported to serve HiResCAM at
``tiny_relu2`` (its tail: a strided conv, BatchNormalization, ReLU) and real msoud
slices: the served maps equal the GradientTape HiResCAM (<= 1e-4) on both runtimes, in one
invoke per upload; the bundle refuses a missing, altered or foreign ``tail.npz``; a tail
that is off makes the export's parity gate fail.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from braintumor.core.files import file_sha256
from braintumor.core.schema import ModelParams
from braintumor.explain.gradcam import GradCam
from braintumor.explain.tailcam import TailParams, TailStep
from braintumor.model.classifier import build_model
from braintumor.serving.bundle import META_FILE, MODEL_FILE, Bundle, BundleError, read_meta
from braintumor.serving.export import (
    PARITY_TOLERANCE,
    SERVED_MAP_TOLERANCE,
    ExportError,
    Parity,
    check_parity,
    export_model,
    head_params,
    measure_parity,
    served_explanation,
)
from braintumor.serving.exported import EXPORT_FILE, TAIL_FILE, Explanation, ExportedModel
from braintumor.serving.predictor import Predictor

from serving_helpers import BUNDLE_SIZE, real_slices, tiny_hirescam_bundle

LAYER = "tiny_relu2"


@pytest.fixture(scope="module")
def shipped(mirror: Path, tmp_path_factory) -> Path:
    return tiny_hirescam_bundle(mirror, tmp_path_factory.mktemp("hirescam"))


@pytest.fixture(scope="module")
def keras_model(shipped: Path):
    return keras.saving.load_model(shipped / MODEL_FILE, compile=False)


@pytest.fixture(scope="module")
def slices(mirror: Path, shipped: Path) -> np.ndarray:
    return real_slices(mirror, read_meta(shipped), 3)


@pytest.fixture
def bundle(shipped: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shipped, tmp_path / "bundle"))


def test_export_records_the_served_explanation_and_its_parity(shipped: Path) -> None:
    meta = read_meta(shipped)
    assert meta.exported["explanation"] == {"method": "hirescam", "layer": LAYER, "tail": TAIL_FILE}
    assert f"map_{LAYER}" in meta.exported["outputs"]
    assert meta.files[TAIL_FILE] == file_sha256(shipped / TAIL_FILE)
    parity = meta.exported["parity"]
    assert parity["numpy_maps"] <= PARITY_TOLERANCE
    assert parity["tail_forward"] <= PARITY_TOLERANCE
    assert parity["maps_mean"] <= meta.exported["parity_served_mean_bound"] <= 1e-2
    assert parity["maps_mean"] <= parity["maps"]
    tail = TailParams.load(shipped / TAIL_FILE)
    assert [step.kind for step in tail.steps] == ["conv", "affine", "relu"]


def test_served_maps_match_the_gradient_tape_hirescam_on_both_runtimes(
    shipped: Path, keras_model, slices: np.ndarray
) -> None:
    """The exported runtime (one invoke, NumPy tail) and the Keras runtime (GradientTape)
    show the same HiResCAM at the same layer, and the app's label names it."""
    exported = Predictor(Bundle.load(shipped))
    on_keras = Predictor(Bundle.load(shipped, runtime="keras"))
    assert exported.explanation_label == on_keras.explanation_label == f"HiResCAM at {LAYER}"
    probabilities, maps = exported.explain(slices)
    keras_p, keras_maps = on_keras.explain(slices)
    reference = GradCam.for_model(keras_model, LAYER, "centred", "hirescam").compute(
        slices[..., None]
    )
    assert np.abs(maps - reference.heatmaps).max() <= PARITY_TOLERANCE
    assert np.abs(keras_maps - reference.heatmaps).max() <= PARITY_TOLERANCE
    assert np.abs(probabilities - keras_p).max() <= PARITY_TOLERANCE
    # Not last-layer Grad-CAM: the maps differ from it on real slices.
    last = GradCam.for_model(keras_model, "top_activation").compute(slices[..., None])
    assert np.abs(maps - last.heatmaps).max() > 0.05


def test_one_invoke_per_upload_gives_the_served_map(shipped: Path, mirror: Path) -> None:
    calls = []

    class Counting(ExportedModel):
        def __call__(self, images):
            calls.append(len(images))
            return super().__call__(images)

    bundle = Bundle.load(shipped)
    bundle.exported = Counting(shipped / EXPORT_FILE)
    predictor = Predictor(bundle)
    path = sorted(p for p in (mirror / "msoud" / "Testing" / "meningioma").iterdir())[2]
    prepared = predictor.prepare(path.read_bytes(), path.name)
    probabilities, maps = predictor.explain_prepared([prepared])
    assert calls == [1]
    expected_p, expected_maps = predictor.explain(prepared.image[None])
    assert np.abs(maps - expected_maps).max() <= PARITY_TOLERANCE
    assert np.abs(probabilities - expected_p).max() <= PARITY_TOLERANCE


def test_altered_tail_is_refused_in_one_line(bundle: Path) -> None:
    with np.load(bundle / TAIL_FILE) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["step0_kernel"] = arrays["step0_kernel"] * 1.01
    with open(bundle / TAIL_FILE, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(BundleError, match=r"tail\.npz: sha256 differs") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)
    # The manifest edited to follow the file: the tail no longer gives the graph's pooled
    # features on the probe image.
    meta = json.loads((bundle / META_FILE).read_text())
    meta["files"][TAIL_FILE] = file_sha256(bundle / TAIL_FILE)
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"tail\.npz: disagrees with model\.tflite") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)


def test_missing_or_unrecorded_tail_is_refused(bundle: Path) -> None:
    saved = (bundle / TAIL_FILE).read_bytes()
    (bundle / TAIL_FILE).unlink()
    with pytest.raises(BundleError, match=r"tail\.npz: missing"):
        Bundle.load(bundle)
    (bundle / TAIL_FILE).write_bytes(saved)
    meta = json.loads((bundle / META_FILE).read_text())
    meta["exported"]["explanation"]["tail"] = None
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lists a tail its export did not write"):
        Bundle.load(bundle)


def test_foreign_tail_is_refused(bundle: Path, slices: np.ndarray, tmp_path: Path) -> None:
    keras.utils.set_random_seed(11)
    other = build_model(
        ModelParams(backbone="tinycnn", weights="none", dense_units=(16,)), BUNDLE_SIZE, 4
    )
    foreign = export_model(
        other, "top_activation", tmp_path / "other", slices[:2], explanation=("hirescam", LAYER)
    )
    assert foreign.tail_file is not None
    shutil.copyfile(foreign.tail_file, bundle / TAIL_FILE)
    meta = json.loads((bundle / META_FILE).read_text())
    meta["files"][TAIL_FILE] = file_sha256(bundle / TAIL_FILE)
    (bundle / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"tail\.npz: disagrees with model\.tflite"):
        Bundle.load(bundle)


def test_a_tail_off_by_a_little_fails_the_export_gate(
    shipped: Path, keras_model, slices: np.ndarray
) -> None:
    """The gate the export runs (``measure_parity`` then ``check_parity``): the real tail
    passes it; the same tail with one convolution's channels scaled by up to 10 % gives
    maps beyond 1e-4 (on Keras's own forward values, where the NumPy tail must be exact)
    and the export fails in one line naming the served map."""
    exported = ExportedModel(shipped / EXPORT_FILE)
    head = head_params(keras_model)
    served = served_explanation(keras_model, "top_activation", "hirescam", LAYER)
    good = measure_parity(keras_model, "top_activation", exported, head, slices, served)
    check_parity(good, PARITY_TOLERANCE, served.label)
    assert served.tail is not None
    steps = list(served.tail.steps)
    conv = steps[0]
    assert conv.kind == "conv"
    # Scaled per output channel (a uniform scale would cancel in the [0, 1] maps).
    ramp = np.linspace(0.9, 1.1, conv.arrays["kernel"].shape[-1]).astype(np.float32)
    steps[0] = TailStep(
        conv.kind, conv.inputs, conv.name, conv.config, {"kernel": conv.arrays["kernel"] * ramp}
    )
    off = Explanation("hirescam", LAYER, "top_activation", TailParams(LAYER, tuple(steps)))
    bad = measure_parity(keras_model, "top_activation", exported, head, slices, off)
    assert bad.numpy_maps > PARITY_TOLERANCE and bad.maps > PARITY_TOLERANCE
    assert bad.tail_forward > PARITY_TOLERANCE
    assert good.numpy_maps <= PARITY_TOLERANCE and good.tail_forward <= PARITY_TOLERANCE
    with pytest.raises(ExportError, match=f"HiResCAM at {LAYER} maps") as caught:
        check_parity(bad, PARITY_TOLERANCE, off.label)
    assert "\n" not in str(caught.value)


def test_a_tail_whose_forward_alone_is_off_fails_the_export_gate(
    shipped: Path, keras_model, slices: np.ndarray
) -> None:
    """The NumPy gradient is compared on Keras's own values, which hides a forward that
    is wrong where the gradient is not (a BatchNormalization shift moves values, not the
    gradient through the step): the tail's forward is held to the bound on its own."""
    exported = ExportedModel(shipped / EXPORT_FILE)
    head = head_params(keras_model)
    served = served_explanation(keras_model, "top_activation", "hirescam", LAYER)
    assert served.tail is not None
    steps = list(served.tail.steps)
    affine = steps[1]
    assert affine.kind == "affine"
    shift = affine.arrays["shift"] + np.linspace(0.0, 0.5, affine.arrays["shift"].size)
    steps[1] = TailStep(
        affine.kind,
        affine.inputs,
        affine.name,
        affine.config,
        {"scale": affine.arrays["scale"], "shift": shift.astype(np.float32)},
    )
    off = Explanation("hirescam", LAYER, "top_activation", TailParams(LAYER, tuple(steps)))
    bad = measure_parity(keras_model, "top_activation", exported, head, slices, off)
    assert bad.numpy_maps <= PARITY_TOLERANCE < bad.tail_forward
    with pytest.raises(ExportError, match="tail forward") as caught:
        check_parity(bad, PARITY_TOLERANCE, off.label, SERVED_MAP_TOLERANCE)
    assert "\n" not in str(caught.value)


def test_served_maps_are_judged_by_their_mean_where_a_gate_can_flip() -> None:
    """Seed 3 of the quickstart: one validation slice's served map (and the NumPy forward's)
    moved by 1.15e-2 at its worst pixel, 7.9e-4 on average, when a ReLU6 input within
    float rounding of a gate flipped; the gradient on Keras's values was exact (8e-7).
    That passes; a served map off by more on average, or any exact part off, does not."""
    flipped = Parity(32, 2.6e-6, 1.15e-2, 1.0, numpy_maps=8e-7, maps_mean=7.9e-4, tail_forward=2e-7)
    check_parity(flipped, PARITY_TOLERANCE, "HiResCAM", SERVED_MAP_TOLERANCE)
    with pytest.raises(ExportError, match="served maps max 1.15e-02 against 0.0001"):
        check_parity(flipped, PARITY_TOLERANCE, "HiResCAM")  # no tail: the max is exact
    for wrong in (
        replace(flipped, maps_mean=2e-2),
        replace(flipped, numpy_maps=2e-4),
        replace(flipped, probabilities=2e-4),
        replace(flipped, tail_forward=2e-4),
    ):
        with pytest.raises(ExportError):
            check_parity(wrong, PARITY_TOLERANCE, "HiResCAM", SERVED_MAP_TOLERANCE)


def test_export_refuses_an_explanation_one_pass_cannot_serve(
    keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="serving.explanation.method: 'gradcampp'"):
        export_model(
            keras_model, "top_activation", tmp_path, slices[:2], explanation=("gradcampp", LAYER)
        )
    with pytest.raises(ExportError, match="serving.explanation.layer: .*no layer named 'nope'"):
        export_model(
            keras_model, "top_activation", tmp_path, slices[:2], explanation=("hirescam", "nope")
        )


def test_the_app_labels_the_map_with_its_method_and_layer(shipped: Path, tmp_path: Path) -> None:
    from braintumor.serving.app.page import build_app

    page = build_app(Predictor(Bundle.load(shipped)), upload_folder=tmp_path)
    labels = {
        block.elem_id: getattr(block, "label", None)
        for block in page.blocks.blocks.values()
        if getattr(block, "elem_id", None)
    }
    assert labels["overlay"] == f"HiResCAM at {LAYER} overlay (predicted class)"


def test_a_bundle_without_export_serves_its_named_explanation_with_keras(
    shipped: Path, keras_model, slices: np.ndarray, tmp_path: Path
) -> None:
    """No export (the JAX backend): bundle.json's ``explanation`` still names the map, and
    the Keras runtime computes it with the GradientTape."""
    import dataclasses

    from braintumor.serving.bundle import write_bundle

    meta = dataclasses.replace(
        read_meta(shipped), exported={}, explanation={"method": "hirescam", "layer": LAYER}
    )
    folder = tmp_path / "keras-only"
    write_bundle(folder, shipped / MODEL_FILE, meta)
    predictor = Predictor(Bundle.load(folder))
    assert predictor.bundle.runtime == "keras"
    assert predictor.explanation_label == f"HiResCAM at {LAYER}"
    _, maps = predictor.explain(slices[:4])
    expected = GradCam.for_model(keras_model, LAYER, "centred", "hirescam")(slices[:4, ..., None])
    assert np.abs(maps - expected).max() <= PARITY_TOLERANCE
