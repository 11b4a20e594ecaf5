"""Batch prediction and the shared serving checks, on real MRI slices from the mirror.

The small real bundle, the slices, DICOM files and bad uploads come from
``serving_helpers`` (shared with ``test_app`` and ``test_browser``).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from braintumor.core.schema import ConfigError, ServingParams
from braintumor.data.imaging import decode_image
from braintumor.serving.bundle import Bundle, BundleError
from braintumor.serving.predict import find_inputs, main, predict_files, result_columns
from braintumor.serving.predictor import (
    InputError,
    Predictor,
    decode_upload,
    load_bundle,
    load_serving_config,
    parse_registry_uri,
)

from conftest import write_params
from serving_helpers import (
    BUNDLE_SIZE,
    CLASSES,
    bad_files,
    dicom_of,
    real_images,
    tiny_bundle_folder,
    write_dicom,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bundle_folder(mirror: Path, tmp_path_factory) -> Path:
    return tiny_bundle_folder(mirror, tmp_path_factory.mktemp("serving-bundle"))


@pytest.fixture(scope="session")
def predictor(bundle_folder: Path) -> Predictor:
    return Predictor(Bundle.load(bundle_folder), ServingParams(grayscale_tolerance=6.0))


@pytest.fixture
def input_tree(mirror: Path, tmp_path: Path) -> dict:
    """A folder of real slices (nested), bad files, a DICOM, and files to be skipped."""
    root = tmp_path / "inputs"
    reals = []
    for path in real_images(mirror, 2):
        target = root / "real" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        reals.append(Path(shutil.copy2(path, target)))
    upper = root / "real" / "UPPER.JPG"
    shutil.copy2(reals[0], upper)
    bad = bad_files(root / "bad" / "deeper", mirror)
    gray = decode_image(reals[1].read_bytes()).gray
    pixels, window = dicom_of(gray)
    dicom = write_dicom(root / "scan.dcm", pixels, window=window)
    (root / "notes.txt").write_text("not picked up: unsupported extension")
    (root / ".hidden").mkdir()
    shutil.copy2(reals[0], root / ".hidden" / "skipped.jpg")
    return {"root": root, "reals": [*reals, upper], "bad": bad, "dicom": dicom, "gray": gray}


# --------------------------------------------------------------------------- tests


def test_find_inputs_recurses_into_folders_and_skips_hidden_and_unknown(input_tree) -> None:
    root = input_tree["root"]
    found = find_inputs(root)
    expected = {
        *input_tree["reals"],
        input_tree["dicom"],
        *(p for p, _ in input_tree["bad"].values()),
    }
    assert set(found) == expected
    assert found == find_inputs(root)  # a stable order
    assert root / "notes.txt" in find_inputs(root, all_files=True)
    assert find_inputs(root / "notes.txt") == [root / "notes.txt"]  # a file is always tried
    assert find_inputs(root / "missing") == []


def test_predict_folder_to_csv_reports_every_file(input_tree, bundle_folder, tmp_path) -> None:
    out = tmp_path / "out.csv"
    code = main(
        [
            "--model",
            str(bundle_folder),
            str(input_tree["root"]),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == result_columns(CLASSES)
    by_file = {Path(row["file"]): row for row in rows}
    assert set(by_file) == set(find_inputs(input_tree["root"]))
    for path in [*input_tree["reals"], input_tree["dicom"]]:
        row = by_file[path]
        assert row["status"] == "ok", row
        probabilities = np.array([float(row[f"p_{name}"]) for name in CLASSES])
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["predicted_class"] == CLASSES[int(np.argmax(probabilities))]
        assert float(row["confidence"]) == pytest.approx(probabilities.max(), abs=1e-6)
    for path, reason in input_tree["bad"].values():
        row = by_file[path]
        assert (row["status"], row["reason"]) == ("error", reason), row
        assert row["error"].startswith(path.name)
        assert row["predicted_class"] == "" and row["p_glioma"] == ""


def test_probabilities_equal_bundle_predict_on_the_preprocessed_image(
    mirror, predictor, bundle_folder
) -> None:
    paths = real_images(mirror, 3, offset=10)
    results = predict_files(predictor, paths, progress=False)
    bundle = Bundle.load(bundle_folder)
    reference = bundle.predict(np.stack([bundle.preprocess_bytes(p.read_bytes()) for p in paths]))
    got = np.array([[r.probabilities[name] for name in CLASSES] for r in results])
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert not np.allclose(reference, 0.25, atol=1e-3), "the test model should not be uniform"


def test_json_output_with_gradcam_overlays(input_tree, bundle_folder, tmp_path) -> None:
    out, overlays = tmp_path / "out.json", tmp_path / "overlays"
    code = main(
        [
            "--model",
            str(bundle_folder),
            str(input_tree["root"]),
            "--output",
            str(out),
            "--overlays",
            str(overlays),
            "--no-progress",
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["classes"] == list(CLASSES)
    assert "sha256" in document["model"]
    results = {Path(r["file"]): r for r in document["results"]}
    csv_path = tmp_path / "same.csv"
    assert (
        main(
            [
                "--model",
                str(bundle_folder),
                str(input_tree["root"]),
                "--output",
                str(csv_path),
                "--no-progress",
            ]
        )
        == 0
    )
    csv_rows = {Path(r["file"]): r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    for path in input_tree["reals"]:
        result = results[path]
        assert result["status"] == "ok" and result["error"] is None
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        # Grad-CAM's forward pass gives the same probabilities as plain prediction.
        for name in CLASSES:
            assert result["probabilities"][name] == pytest.approx(
                float(csv_rows[path][f"p_{name}"]), abs=1e-5
            )
        overlay = Path(result["overlay"])
        assert overlay.is_relative_to(overlays) and overlay.name == f"{path.name}.png"
        image = cv2.imread(str(overlay))
        assert image.shape == (BUNDLE_SIZE, BUNDLE_SIZE, 3)
    text_row = results[input_tree["bad"]["text.png"][0]]
    assert text_row["status"] == "error" and text_row["reason"] == "not_an_image"
    assert text_row["probabilities"] is None and text_row["overlay"] is None
    assert len(list(overlays.rglob("*.png"))) == len(input_tree["reals"]) + 1  # + the DICOM


def test_exit_codes(bundle_folder, tmp_path, mirror, capsys) -> None:
    image = real_images(mirror, 1)[0]
    assert main(["--model", str(tmp_path / "nope"), str(image), "--no-progress"]) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text("{not json")
    assert main(["--model", str(broken), str(image), "--no-progress"]) == 1
    assert main(["--model", str(bundle_folder), str(tmp_path / "missing"), "--no-progress"]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(bundle_folder), str(tmp_path / "empty"), "--no-progress"]) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(bundle_folder), str(image), "--output", "out.xlsx"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["--model", str(bundle_folder), str(image), "--no-progress"]) == 0
    printed = capsys.readouterr().out  # CSV on standard output without --output
    assert printed.splitlines()[0] == ",".join(result_columns(CLASSES))
    assert printed.splitlines()[1].startswith(f"{image},ok,")


def test_dicom_window_is_applied(input_tree, predictor, tmp_path) -> None:
    gray = input_tree["gray"]
    settings = predictor.settings
    windowed = decode_upload(input_tree["dicom"].read_bytes(), "scan.dcm", settings)
    np.testing.assert_array_equal(windowed, gray)
    # The same slice as a PNG gets the same prediction.
    png = tmp_path / "same.png"
    cv2.imwrite(str(png), gray)
    from_png = predictor.predict(predictor.prepare(png.read_bytes(), "same.png").image)
    from_dicom = predictor.predict(predictor.prepare(input_tree["dicom"].read_bytes()).image)
    np.testing.assert_allclose(from_dicom, from_png, atol=1e-6)
    pixels, _ = dicom_of(gray)
    # A narrower window saturates: values follow DICOM's LINEAR function.
    narrow = write_dicom(tmp_path / "narrow.dcm", pixels, window=(1510.5, 511.0))
    decoded = decode_upload(narrow.read_bytes(), "narrow.dcm", settings).astype(float)
    expected = np.clip(((pixels - 1510.0) / 510.0 + 0.5), 0, 1) * 255
    np.testing.assert_allclose(decoded, np.rint(expected), atol=1)
    # No window: min-max. MONOCHROME1: inverted, tissue stays bright.
    plain = write_dicom(tmp_path / "plain.dcm", pixels)
    decoded = decode_upload(plain.read_bytes(), "plain.dcm", settings).astype(float)
    low, high = int(gray.min()), int(gray.max())
    np.testing.assert_allclose(decoded, (gray - low) * 255.0 / (high - low), atol=0.51)
    inverted = write_dicom(
        tmp_path / "mono1.dcm", pixels, window=(1510.5, 1021.0), photometric="MONOCHROME1"
    )
    np.testing.assert_array_equal(
        decode_upload(inverted.read_bytes(), "m.dcm", settings), 255 - gray
    )
    # A DICOM header without pixels, and junk named .dcm, get a reason, not a crash.
    no_pixels = write_dicom(tmp_path / "header.dcm", pixels, window=(1, 2), with_pixels=False)
    with pytest.raises(InputError) as error:
        decode_upload(no_pixels.read_bytes(), "header.dcm", settings)
    assert error.value.reason == "not_an_image" and "without image data" in str(error.value)
    with pytest.raises(InputError) as error:
        decode_upload(b"DICM" + b"\x00" * 50, "junk.dcm", settings)
    assert error.value.reason in ("corrupt", "not_an_image")


def test_size_limits_and_out_of_distribution(mirror, predictor, input_tree) -> None:
    data = real_images(mirror, 1)[0].read_bytes()
    bundle = predictor.bundle

    def refused(settings: ServingParams, payload: bytes, name: str = "x.jpg") -> InputError:
        with pytest.raises(InputError) as error:
            Predictor(bundle, settings).prepare(payload, name)
        return error.value

    error = refused(ServingParams(max_upload_bytes=1024), data)
    assert error.reason == "too_large" and "the limit is 1 kB" in str(error)
    error = refused(ServingParams(max_pixels=64 * 64), data)
    assert error.reason == "too_large" and "pixels" in str(error)
    error = refused(ServingParams(max_pixels=64 * 64), input_tree["dicom"].read_bytes(), "s.dcm")
    assert error.reason == "too_large"
    # A real slice is accepted with the default thresholds, warned or refused with tight ones.
    assert predictor.prepare(data, "x.jpg").warning is None
    warned = Predictor(bundle, ServingParams(ood_warn_z=1e-3, ood_refuse_z=100)).prepare(data)
    assert warned.warning and "standard deviations" in warned.warning
    error = refused(ServingParams(ood_warn_z=1e-3, ood_refuse_z=2e-3), data)
    assert error.reason == "out_of_distribution" and "brain MRI" in str(error)
    # An almost-white page with sparse dark marks (a scanned document) is far out.
    page = np.full((256, 256), 245, np.uint8)
    page[::9, ::3] = 20
    error = refused(ServingParams(), cv2.imencode(".png", page)[1].tobytes(), "page.png")
    assert error.reason == "out_of_distribution"


def test_serving_settings_come_from_params(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = {"serving": {"max_upload_bytes": 5000, "ood_warn_z": 2.0, "ood_refuse_z": 3.0}}
    config = load_serving_config(write_params(tmp_path, overrides))
    settings = config.settings
    assert (settings.max_upload_bytes, settings.ood_warn_z, settings.ood_refuse_z) == (
        5000,
        2.0,
        3.0,
    )
    assert (settings.grayscale_tolerance, settings.min_side) == (6.0, 32)  # the clean stage's
    assert config.default_model == "models:/brain-tumor-classifier@champion"
    assert config.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    with pytest.raises(ConfigError, match="serving"):
        load_serving_config(write_params(tmp_path / "bad", {"serving": {"ood_warn_z": -1.0}}))
    defaults = load_serving_config(tmp_path / "missing.yaml")
    assert defaults.settings.max_upload_bytes > 1_000_000 and defaults.params is None
    # A registry URI without a registry: a clear error, and no empty database created.
    database = tmp_path / "none.db"
    with pytest.raises(BundleError, match="no MLflow registry"):
        load_bundle("models:/brain@champion", tracking_uri=f"sqlite:///{database}")
    assert not database.exists()


def test_parse_registry_uri() -> None:
    assert parse_registry_uri("models:/brain@champion") == ("brain", "champion", None)
    assert parse_registry_uri("models:/brain/3") == ("brain", None, "3")
    for bad in ("models:/", "models:/brain", "models:/brain/latest@x/y"):
        with pytest.raises(ValueError):
            parse_registry_uri(bad)


@pytest.mark.integration
def test_bundle_from_the_registry_champion(bundle_folder, mirror, tmp_path, monkeypatch) -> None:
    """A pyfunc registered like the evaluate stage does (the bundle as artifact ``bundle``)
    loads through ``models:/<name>@champion``, and predicts like the local bundle."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from braintumor.serving.pyfunc import BundleModel

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    # MLflow's process-wide URI goes back to what it was after the test.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    experiment = MlflowClient(uri).create_experiment("serving-test")
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=BundleModel(),
            artifacts={"bundle": str(bundle_folder)},
            pip_requirements=["keras"],
            registered_model_name="tiny-classifier",
        )
    MlflowClient().set_registered_model_alias("tiny-classifier", "champion", "1")
    bundle = load_bundle("models:/tiny-classifier@champion", tracking_uri=uri)
    assert bundle.describe() == "tiny-classifier v1"
    images = np.stack([bundle.preprocess_bytes(p.read_bytes()) for p in real_images(mirror, 1)])
    np.testing.assert_allclose(
        bundle.predict(images), Bundle.load(bundle_folder).predict(images), atol=1e-6
    )
    out = tmp_path / "out.json"
    image = real_images(mirror, 1)[0]
    code = main(
        [
            "--model",
            "models:/tiny-classifier@champion",
            str(image),
            "--output",
            str(out),
            "--no-progress",
            "--params",
            str(tmp_path / "none.yaml"),
        ]
    )
    assert code == 0
    assert json.loads(out.read_text())["model"] == "tiny-classifier v1"
    with pytest.raises(ValueError, match="tiny-classifier"):
        load_bundle("models:/tiny-classifier@nobody", tracking_uri=uri)
