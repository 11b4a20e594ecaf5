"""Issue 22: serving shows the explanation the localisation stage chose (HiResCAM at an
earlier block), from the one exported invoke plus NumPy (``explain.tailcam``).

On the tiny trained model of ``serving_helpers`` exported to serve HiResCAM at
``tiny_relu2`` (its tail: a strided conv, BatchNormalization, ReLU) and real msoud
slices: the served maps equal the GradientTape HiResCAM (<= 1e-4) on both runtimes, in one
invoke per upload; the bundle refuses a missing, altered or foreign ``tail.npz``; a tail
that is off makes the export's parity gate fail.
"""

from __future__ import annotations

import hashlib
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
from braintumor.serving.bundle import (
    META_FILE,
    MODEL_FILE,
    OOD_FILE,
    Bundle,
    BundleError,
    read_meta,
    write_bundle,
)
from braintumor.serving.export import (
    PARITY_TOLERANCE,
    SERVED_MAP_TOLERANCE,
    ExportError,
    ExportResult,
    Parity,
    check_parity,
    export_model,
    head_params,
    inference_graph,
    measure_parity,
    served_explanation,
    to_tflite,
)
from braintumor.serving.exported import EXPORT_FILE, TAIL_FILE, Explanation, ExportedModel
from braintumor.serving.predictor import InputError, Predictor

from serving_helpers import (
    BUNDLE_SIZE,
    GATE_WIDTH,
    real_images,
    real_slices,
    tiny_hirescam_bundle,
)

LAYER = "tiny_relu2"
# A layer whose tail reads a value inside it: tiny_conv2, tiny_bn2, tiny_relu2 (a value the
# graph returns), then tiny_conv3, tiny_bn3 and the last ReLU (the graph's ``maps``).
EARLY = "tiny_relu1"


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
    assert meta.exported["explanation"] == {
        "method": "hirescam",
        "layer": LAYER,
        "tail": TAIL_FILE,
        "gate_width": GATE_WIDTH,
    }
    assert f"map_{LAYER}" in meta.exported["outputs"]
    assert meta.files[TAIL_FILE] == file_sha256(shipped / TAIL_FILE)
    parity = meta.exported["parity"]
    assert parity["numpy_maps"] <= PARITY_TOLERANCE
    assert parity["tail_forward"] <= PARITY_TOLERANCE
    # Soft gates cannot flip between runtimes: the served maps are held to the max bound.
    assert meta.exported["parity_served_mean_bound"] is None
    assert parity["maps_mean"] <= parity["maps"] <= PARITY_TOLERANCE
    tail = TailParams.load(shipped / TAIL_FILE)
    assert [step.kind for step in tail.steps] == ["conv", "affine", "relu"]
    assert tail.gate_width == GATE_WIDTH


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
    reference = GradCam.for_model(keras_model, LAYER, "centred", "hirescam", GATE_WIDTH).compute(
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


def alter_tail(bundle: Path, *, follow: bool) -> None:
    """The tail's first kernel scaled by 1.01; ``follow``: the manifest edited to record
    the altered file's sha256 (so that only the check against the graph can catch it)."""
    with np.load(bundle / TAIL_FILE) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["step0_kernel"] = arrays["step0_kernel"] * 1.01
    with open(bundle / TAIL_FILE, "wb") as handle:
        np.savez(handle, **arrays)
    if follow:
        meta = json.loads((bundle / META_FILE).read_text())
        meta["files"][TAIL_FILE] = file_sha256(bundle / TAIL_FILE)
        (bundle / META_FILE).write_text(json.dumps(meta))


def test_altered_tail_is_refused_in_one_line(bundle: Path) -> None:
    alter_tail(bundle, follow=False)
    with pytest.raises(BundleError, match=r"tail\.npz: sha256 differs") as caught:
        Bundle.load(bundle)
    assert "\n" not in str(caught.value)
    # The manifest edited to follow the file: the tail no longer gives the graph's pooled
    # features on the probe image.
    alter_tail(bundle, follow=True)
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
        other,
        "top_activation",
        tmp_path / "other",
        slices[:2],
        explanation=("hirescam", LAYER),
        gate_width=GATE_WIDTH,  # the same width: only the check against the graph can tell
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
    # The soft gates it names are the Keras runtime's too.
    soft = {"method": "hirescam", "layer": LAYER, "gate_width": GATE_WIDTH}
    write_bundle(
        tmp_path / "soft", shipped / MODEL_FILE, dataclasses.replace(meta, explanation=soft)
    )
    predictor = Predictor(Bundle.load(tmp_path / "soft"))
    assert predictor.bundle.explanation.gate_width == GATE_WIDTH
    _, maps = predictor.explain(slices[:4])
    expected = GradCam.for_model(keras_model, LAYER, "centred", "hirescam", GATE_WIDTH)(
        slices[:4, ..., None]
    )
    assert np.abs(maps - expected).max() <= PARITY_TOLERANCE


def test_a_gate_width_other_than_the_tails_is_refused(bundle: Path) -> None:
    """bundle.json is not in its own manifest: a gate width edited there (or out of range)
    must not serve maps other than the exported and checked ones."""
    meta = json.loads((bundle / META_FILE).read_text())
    for width, problem in ((0.0, "gate width 0.25, bundle.json records 0.0"), (2.0, "not in")):
        meta["exported"]["explanation"]["gate_width"] = width
        (bundle / META_FILE).write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=problem) as caught:
            Bundle.load(bundle)
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- the tail's values


@pytest.fixture(scope="module")
def early(keras_model, slices: np.ndarray, tmp_path_factory) -> ExportResult:
    """The tiny model exported to serve HiResCAM at ``tiny_relu1`` (its export's gate
    passed)."""
    folder = tmp_path_factory.mktemp("early")
    return export_model(
        keras_model, "top_activation", folder, slices[:2], explanation=("hirescam", EARLY)
    )


def _bundle_of(shipped: Path, exported: ExportResult, folder: Path) -> Path:
    """A bundle with ``exported`` as its exported model, written by the bundle's writer."""
    from braintumor.evaluation.ood import OodDetector

    detector = OodDetector.load(shipped / OOD_FILE)
    write_bundle(folder, shipped / MODEL_FILE, read_meta(shipped), detector, exported)
    return folder


def test_the_graph_returns_every_tail_value_and_the_map_is_served_from_them(
    keras_model, slices: np.ndarray, early: ExportResult
) -> None:
    """Every layer whose output the tail's backward reads is an output of the one invoke;
    the served map runs the NumPy backward on those values (they are the runtime's own
    forward: within float rounding of Keras's) and equals the GradientTape HiResCAM."""
    assert early.tail_file is not None
    tail = TailParams.load(early.tail_file)
    assert tail.value_layers == (EARLY, LAYER, "top_activation")
    assert early.info["outputs"] == [
        "probabilities",
        "pooled",
        "maps",
        f"map_{EARLY}",
        f"map_{LAYER}",
    ]
    served = Explanation("hirescam", EARLY, "top_activation", tail)
    assert served.value_outputs() == (f"map_{LAYER}", "maps")
    outputs = ExportedModel(early.model_file)(slices)
    values = served.tail_values(outputs)
    assert values is not None and len(values) == len(tail.value_layers)
    taps = keras.Model(
        keras_model.input, [keras_model.get_layer(name).output for name in tail.value_layers]
    )
    for mine, theirs in zip(values, taps.predict_on_batch(slices[..., None]), strict=True):
        theirs = np.asarray(theirs)
        assert np.abs(mine - theirs).max() <= 1e-5 * max(1.0, float(np.abs(theirs).max()))
    head = head_params(keras_model)
    maps = served.maps(head, outputs.pooled, values[0], BUNDLE_SIZE, values)
    reference = GradCam.for_model(keras_model, EARLY, "centred", "hirescam").compute(
        slices[..., None]
    )
    assert reference.heatmaps.max() == 1.0  # real, non-flat maps compared
    assert np.abs(maps - reference.heatmaps).max() <= PARITY_TOLERANCE
    # The backward reads the values it is given (its ReLU gates), not a forward of its own.
    closed = [values[0], np.zeros_like(values[1]), values[2]]
    gated = served.maps(head, outputs.pooled, values[0], BUNDLE_SIZE, closed)
    assert np.abs(gated - maps).max() > 0.05
    parity = early.info["parity"]
    assert parity["maps"] <= PARITY_TOLERANCE and parity["numpy_maps"] <= PARITY_TOLERANCE


def test_a_bundle_exported_before_the_tail_values_still_serves(
    shipped: Path, keras_model, slices: np.ndarray, early: ExportResult, mirror: Path, tmp_path
) -> None:
    """A graph that returns only ``map_<layer>`` (the export before the tail's values):
    the bundle loads, the tail runs forward in NumPy from the map, and the maps are the
    same as from the graph that returns the values (and the tape's)."""
    graph = inference_graph(keras_model, "top_activation", (EARLY,))
    blob = to_tflite(graph, BUNDLE_SIZE)
    (tmp_path / "old").mkdir()
    old_file = tmp_path / "old" / EXPORT_FILE
    old_file.write_bytes(blob)
    info = {
        **early.info,
        "outputs": ["probabilities", "pooled", "maps", f"map_{EARLY}"],
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    old = ExportResult(old_file, early.head_file, info, early.tail_file)
    before = Predictor(Bundle.load(_bundle_of(shipped, old, tmp_path / "before")))
    after = Predictor(Bundle.load(_bundle_of(shipped, early, tmp_path / "after")))
    assert before.explanation_label == after.explanation_label == f"HiResCAM at {EARLY}"
    paths = []  # real slices the tiny model's detector accepts
    for path in real_images(mirror, 3, "Testing", offset=30):
        try:
            after.prepare(path.read_bytes(), path.name)
        except InputError:
            continue
        paths.append(path)
    assert len(paths) >= 2
    prepared_before = [before.prepare(p.read_bytes(), p.name) for p in paths]
    prepared_after = [after.prepare(p.read_bytes(), p.name) for p in paths]
    assert all(item.values is None for item in prepared_before)
    assert all(item.values is not None and len(item.values) == 3 for item in prepared_after)
    p_before, maps_before = before.explain_prepared(prepared_before)
    p_after, maps_after = after.explain_prepared(prepared_after)
    assert np.abs(p_before - p_after).max() <= PARITY_TOLERANCE
    assert np.abs(maps_before - maps_after).max() <= PARITY_TOLERANCE
    images = np.stack([item.image for item in prepared_after])
    reference = GradCam.for_model(keras_model, EARLY, "centred", "hirescam").compute(
        images[..., None]
    )
    assert np.abs(maps_after - reference.heatmaps).max() <= PARITY_TOLERANCE
    _, maps_batch = before.explain(slices)  # the batch path falls back the same way
    _, maps_values = after.explain(slices)
    assert np.abs(maps_batch - maps_values).max() <= PARITY_TOLERANCE


def test_a_changed_tail_is_refused_where_the_graph_returns_its_values(
    shipped: Path, early: ExportResult, tmp_path: Path
) -> None:
    """Serving's backward reads the graph's values, not the tail's forward, but loading
    still runs the tail forward against the graph and refuses one that differs (the
    manifest edited to follow the file), in one line."""
    folder = _bundle_of(shipped, early, tmp_path / "bundle")
    Bundle.load(folder)
    alter_tail(folder, follow=True)
    with pytest.raises(BundleError, match=r"tail\.npz: disagrees with model\.tflite") as caught:
        Bundle.load(folder)
    assert "\n" not in str(caught.value)
