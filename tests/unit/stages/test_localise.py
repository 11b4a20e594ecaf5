"""The ``masks`` and ``localise`` stages end to end on a small real subset: nine figshare
slices whose Msoud test copies are known, a food photo's mask that matches nothing, and a
small CNN of the project's builder; the metric, detail, matches and figure come out and
the unmatched mask is counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.stages import localise, masks
from mask_helpers import PAIRS, copy_masks

from conftest import QUICKSTART_SOURCES, write_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mirror")]

FOOD = 90001
SIZE = 48


@pytest.fixture(scope="module")
def project(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import keras

    from braintumor.core.config import load_params
    from braintumor.model.classifier import build_model

    root = tmp_path_factory.mktemp("localise")
    shelf = root / "mirror" / "figshare-masks"
    meta = copy_masks(mirror, shelf)
    food = sorted((mirror / "not-mri").rglob("*.jpg"))[0]
    gray = cv2.resize(cv2.imread(str(food), cv2.IMREAD_GRAYSCALE), (256, 256))
    cv2.imwrite(str(shelf / "images" / f"{FOOD}.jpg"), gray)
    blob = np.zeros((512, 512), np.uint8)
    blob[100:140, 100:140] = 255
    cv2.imwrite(str(shelf / "masks" / f"{FOOD}.png"), blob)
    food_row = {"id": FOOD, "class": "glioma", "patient_fold": 1, "original_size": 512,
                "mask_pixels": 1600}  # fmt: skip
    pd.concat([meta, pd.DataFrame([food_row])]).to_csv(shelf / "meta.csv", index=False)
    for relative in PAIRS.values():
        target = root / "raw" / "msoud" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / "msoud" / relative, target)
    params_path = write_params(
        root,
        {
            "acquire": {"sources": QUICKSTART_SOURCES[:1], "mirror": str(root / "mirror")},
            "common": {"image_size": SIZE},
            "model": {"backbone": "tinycnn", "weights": "none", "gradcam_layer": "auto"},
            "localise": {
                "layers": ["auto", "tiny_relu2"],
                "tolerance": 3,
                "occlusion_slices": 3,
                "occlusion_patch": 16,
                "occlusion_stride": 8,
                "examples": 2,
            },
        },
    )
    params = load_params(params_path)
    keras.utils.set_random_seed(0)
    model = build_model(params.model, SIZE, len(params.common.classes))
    model.save(root / "model.keras")
    return {"root": root, "params": params_path, "model": root / "model.keras"}


def _arguments(project: dict[str, Path], out: Path, **replace: Path) -> list[str]:
    paths = {"masks": out / "masks", "model": project["model"], **replace}
    return [
        "--params", str(project["params"]), "--raw", str(project["root"] / "raw"),
        "--masks", str(paths["masks"]), "--model", str(paths["model"]),
        "--metrics", str(out / "localisation.json"), "--detail", str(out / "detail.json"),
        "--matches", str(out / "matches.csv"), "--figures", str(out / "figures"),
    ]  # fmt: skip


def test_the_stages_measure_every_method_and_count_the_unmatched_mask(
    project: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BRAINTUMOR_MIRROR", raising=False)  # acquire.mirror names it
    out = tmp_path / "out"
    copied = out / "masks"
    assert masks.main(["--params", str(project["params"]), "--out", str(copied)]) == 0
    manifest = pd.read_csv(copied / "manifest.csv")
    assert len(manifest) == 2 * len(PAIRS) + 2 + 1  # images, masks, the food pair, meta
    assert localise.main(_arguments(project, out)) == 0
    metrics = json.loads((out / "localisation.json").read_text())
    assert metrics["masks"]["test"] == len(PAIRS)
    assert metrics["masks"]["unmatched"] == 1  # the food photo's mask: counted
    assert metrics["masks"]["masks"] == len(PAIRS) + 1
    assert metrics["slices"] == len(PAIRS)
    for method in ("gradcam", "hirescam", "gradcampp"):
        assert set(metrics[method]) == {"top_activation", "tiny_relu2"}
        for result in metrics[method].values():
            assert 0 <= result["pointing"] <= 1 and 0 <= result["energy"] <= 1
    assert metrics["occlusion"]["input"]["slices"] == 3
    assert 0 <= metrics["centred_gaussian"]["pointing"] <= 1
    assert 0 < metrics["centred_gaussian"]["energy"] < 1
    assert metrics["chosen"]["method"] in localise.SERVABLE
    detail = json.loads((out / "detail.json").read_text())
    assert set(detail["paired_with_occlusion"]) >= {"occlusion@input", "centred_gaussian"}
    assert (
        "centred Gaussian" in detail["card_line"]
        and metrics["chosen"]["method"] in (detail["card_line"])
    )
    # the gradient methods were measured with the served map's soft gates (params.yaml)
    from braintumor.core.config import load_params

    width = load_params(project["params"]).serving.explanation.gate_width
    assert detail["gate_width"] == width > 0
    assert f"soft ReLU gates of width {width:g}" in detail["card_line"]
    matches = pd.read_csv(out / "matches.csv")
    assert sorted(matches["status"].value_counts().items()) == [
        ("test", len(PAIRS)),
        ("unmatched", 1),
    ]
    assert (out / "figures" / "localisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_fail_in_one_line(
    project: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shelf = project["root"] / "mirror" / "figshare-masks"
    assert localise.main(_arguments(project, tmp_path, masks=tmp_path / "none")) == 1
    error = capsys.readouterr().err.strip()
    assert "meta.csv: not found" in error and "\n" not in error
    bad_model = tmp_path / "model.keras"
    bad_model.write_bytes(b"not a model")
    assert localise.main(_arguments(project, tmp_path, masks=shelf, model=bad_model)) == 1
    error = capsys.readouterr().err.strip()
    assert "not a Keras model" in error and "\n" not in error
    params = project["params"].read_text().replace("masks: figshare-masks", "masks: absent")
    other = tmp_path / "params.yaml"
    other.write_text(params)
    assert masks.main(["--params", str(other), "--out", str(tmp_path / "m")]) == 1
    error = capsys.readouterr().err.strip()
    assert "localise.masks: 'absent'" in error and "\n" not in error
    assert not (tmp_path / "m").exists()


def test_any_head_of_the_selection_keeps_the_class_proportions() -> None:
    """Occlusion runs on the head of the selection: it must not be one class only (the
    matched rows come sorted by class)."""
    rows = pd.DataFrame(
        {"class": ["glioma"] * 50 + ["meningioma"] * 30 + ["pituitary"] * 20, "id": range(100)}
    )
    everything = localise.select(rows, 0, seed=42)
    assert sorted(everything["id"]) == list(range(100))
    assert everything.head(10)["class"].value_counts().to_dict() == {
        "glioma": 5,
        "meningioma": 3,
        "pituitary": 2,
    }
    assert localise.select(rows, 20, seed=42)["class"].value_counts().to_dict() == {
        "glioma": 10,
        "meningioma": 6,
        "pituitary": 4,
    }
