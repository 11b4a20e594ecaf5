"""Issue 10: decoding budgets, one serving path, no patient data out.

Every test here is named after a finding of the attacker's run on a trained clone, and
runs on hostile files generated in ``tmp_path`` (``serving_helpers``) or real slices
from the mirror. Memory is measured in a fresh Python process (``VmHWM``, the peak
resident set) before and after decoding, so a decoder that materialises a huge array
fails the test instead of only being slow.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from braintumor.core.config import load_params
from braintumor.core.schema import CleanParams, ConfigError, ServingParams
from braintumor.data.dicom import DICOM_INFO_TAGS
from braintumor.data.imaging import decode_image
from braintumor.serving.bundle import Bundle
from braintumor.serving.predict import main as predict_main
from braintumor.serving.predict import predict_files
from braintumor.serving.predictor import (
    InputError,
    Predictor,
    decode_upload,
    load_serving_config,
    read_upload,
)

from conftest import write_params
from serving_helpers import (
    PATIENT_TAGS,
    deflated_bomb,
    deflated_copy,
    dicom_frames_not_a_number,
    dicom_rows_two_values,
    dicom_with_patient,
    png16,
    png_header_only,
    real_images,
    rle_multiframe,
    tiny_bundle_folder,
)

SETTINGS = ServingParams().resolved(CleanParams())  # what params.yaml's defaults give

_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import PIL.PngImagePlugin, pydicom, pydicom.pixels  # imported before the first reading
from braintumor.core.schema import ServingParams
from braintumor.serving.predictor import InputError, decode_upload

def peak_kb():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1])

path = Path(sys.argv[1])
settings = ServingParams(**json.loads(sys.argv[2]))
data = path.read_bytes()
before = peak_kb()
try:
    decode_upload(data, path.name, settings)
    reason = "ok"
except InputError as error:
    reason = error.reason
print(json.dumps({"reason": reason, "extra_mb": (peak_kb() - before) / 1024}))
"""


def decode_in_fresh_process(path: Path, **settings) -> tuple[str, float]:
    """(reason or "ok", MB the peak RSS grew while decoding) in a new interpreter."""
    command = [sys.executable, "-c", _PEAK_SCRIPT, str(path), json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["reason"], result["extra_mb"]


@pytest.fixture(scope="module")
def bundle_folder(mirror: Path, tmp_path_factory) -> Path:
    return tiny_bundle_folder(mirror, tmp_path_factory.mktemp("serving-path-bundle"))


@pytest.fixture(scope="module")
def predictor(bundle_folder: Path) -> Predictor:
    return Predictor(Bundle.load(bundle_folder), SETTINGS)


@pytest.fixture(scope="module")
def pyfunc(bundle_folder: Path, tmp_path_factory):
    """The registered model as MLflow saves and loads it (``models serve`` runs this)."""
    import mlflow

    from braintumor.serving.pyfunc import BundleModel, model_config

    target = tmp_path_factory.mktemp("pyfunc") / "model"
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=BundleModel(),
        artifacts={"bundle": str(bundle_folder)},
        model_config=model_config(ServingParams(), CleanParams()),
        pip_requirements=["mlflow"],  # no requirement inference (a subprocess loading TF)
    )
    return mlflow.pyfunc.load_model(str(target))


def _gray(mirror: Path) -> np.ndarray:
    return decode_image(real_images(mirror, 1)[0].read_bytes()).gray


# --------------------------------------------------------------------------- finding 1


def test_16bit_6000_png_is_refused_before_decoding_not_1_2_gb(tmp_path: Path) -> None:
    path = tmp_path / "ramp16.png"
    path.write_bytes(png16(6000))
    assert path.stat().st_size < 200_000  # the attacker's ~92 kB file
    reason, extra_mb = decode_in_fresh_process(path)
    assert reason == "too_large"
    assert extra_mb < 30, f"decoding grew the peak by {extra_mb:.0f} MB"


def test_16bit_png_within_budget_decodes_in_float32(tmp_path: Path) -> None:
    """3000 x 3000 16-bit (18 MB of pixels) is accepted; float64 temporaries (72 MB each,
    the old path) would push the peak far past this bound."""
    path = tmp_path / "ramp16.png"
    path.write_bytes(png16(3000))
    reason, extra_mb = decode_in_fresh_process(path)
    assert reason == "ok"
    assert extra_mb < 80, f"decoding grew the peak by {extra_mb:.0f} MB"


def test_deflated_dicom_is_inflated_under_a_cap_not_2_gb(tmp_path: Path) -> None:
    path = deflated_bomb(tmp_path / "bomb.dcm", 200_000_000)
    assert path.stat().st_size < 1_000_000
    reason, extra_mb = decode_in_fresh_process(path, max_decode_bytes=8_000_000)
    assert reason == "too_large"
    assert extra_mb < 40, f"decoding grew the peak by {extra_mb:.0f} MB"


def test_deflated_dicom_within_budget_decodes_like_its_plain_twin(
    mirror: Path, tmp_path: Path
) -> None:
    plain = dicom_with_patient(tmp_path / "plain.dcm", _gray(mirror).astype(np.uint16) * 4)
    deflated = deflated_copy(plain, tmp_path / "deflated.dcm")
    expected = decode_upload(plain.read_bytes(), "plain.dcm", SETTINGS)
    np.testing.assert_array_equal(
        decode_upload(deflated.read_bytes(), "deflated.dcm", SETTINGS), expected
    )


def test_rle_dicom_of_8_frames_decodes_one_frame_not_1_7_gb(tmp_path: Path) -> None:
    """8 frames of 2048^2 16-bit: 64 MB if all were decoded (and 256 MB as float64)."""
    path = rle_multiframe(tmp_path / "rle.dcm", 2048, 8)
    reason, extra_mb = decode_in_fresh_process(path)
    assert reason == "out_of_distribution"  # constant frames: decoded, then blank
    assert extra_mb < 45, f"decoding grew the peak by {extra_mb:.0f} MB"


@pytest.mark.parametrize(
    "make", [dicom_rows_two_values, dicom_frames_not_a_number], ids=["rows_x2", "frames_ab"]
)
def test_bad_dicom_header_values_are_corrupt_not_type_or_value_errors(
    make, mirror: Path, tmp_path: Path
) -> None:
    path = make(tmp_path / "bad.dcm", _gray(mirror).astype(np.uint16))
    with pytest.raises(InputError) as caught:
        decode_upload(path.read_bytes(), "bad.dcm", SETTINGS)
    assert caught.value.reason == "corrupt"
    assert "\n" not in str(caught.value) and str(caught.value).startswith("bad.dcm: ")


def test_60000_squared_png_is_too_large_not_corrupt() -> None:
    with pytest.raises(InputError) as caught:
        decode_upload(png_header_only(60000, 60000), "huge.png", SETTINGS)
    assert caught.value.reason == "too_large"


def test_fifo_named_png_and_a_folder_are_refused_not_waited_on(tmp_path: Path) -> None:
    """``read_upload`` is how ``Predictor.prepare_file`` (app and predict) reads a file."""
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    signal.alarm(30)  # a blocking open would hang here: fail instead
    try:
        for path in (fifo, tmp_path / "folder.png"):
            with pytest.raises(InputError) as caught:
                read_upload(path, SETTINGS.max_upload_bytes)
            assert caught.value.reason == "not_a_file"
    finally:
        signal.alarm(0)


def test_3_gib_file_is_refused_from_its_size_without_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as handle:
        handle.truncate(3 * 2**30)  # sparse: no disk used, 3 GiB if read
    with pytest.raises(InputError) as caught:
        read_upload(big, SETTINGS.max_upload_bytes)
    assert caught.value.reason == "too_large"
    assert "3.2 GB" in str(caught.value)  # refused from the size in fstat


@pytest.mark.slow
def test_predict_on_a_hostile_folder_writes_a_row_per_file(
    bundle_folder: Path, mirror: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    real = Path(shutil.copy2(real_images(mirror, 1)[0], folder / "real.jpg"))
    gray = _gray(mirror).astype(np.uint16)
    expected = {
        str(real): "",
        str(dicom_rows_two_values(folder / "rows.dcm", gray)): "corrupt",
        str(dicom_frames_not_a_number(folder / "frames.dcm", gray)): "corrupt",
        str(deflated_bomb(folder / "bomb.dcm", 100_000_000)): "too_large",
        str(folder / "huge.png"): "too_large",
        str(folder / "ramp16.png"): "too_large",
        str(folder / "fifo.png"): "not_a_file",
        str(folder / "big.png"): "too_large",
    }
    (folder / "huge.png").write_bytes(png_header_only(60000, 60000))
    (folder / "ramp16.png").write_bytes(png16(6000))
    os.mkfifo(folder / "fifo.png")
    with (folder / "big.png").open("wb") as handle:
        handle.truncate(3 * 2**30)
    output = tmp_path / "out.csv"
    signal.alarm(120)
    try:
        code = predict_main(
            [
                str(folder),
                "--model",
                str(bundle_folder),
                "--output",
                str(output),
                "--no-progress",
                "--params",
                str(tmp_path / "none.yaml"),
            ]
        )
    finally:
        signal.alarm(0)
    assert code == 0
    rows = {row["file"]: row for row in csv.DictReader(output.open())}
    assert {name: row["reason"] for name, row in rows.items()} == expected
    assert rows[str(real)]["status"] == "ok"


# --------------------------------------------------------------------------- finding 2


def _bad_file_set(mirror: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Blank, a colour photograph (not-mri), truncated, too large, not an image, and a bad
    DICOM header: each with the one reason every entry point must give."""
    folder.mkdir(parents=True, exist_ok=True)
    real = real_images(mirror, 1)[0].read_bytes()
    files = {
        "blank.png": (
            cv2.imencode(".png", np.full((128, 128), 90, np.uint8))[1].tobytes(),
            "out_of_distribution",
        ),
        "food.jpg": ((mirror / "not-mri" / "food_001.jpg").read_bytes(), "colour"),
        "truncated.jpg": (real[: len(real) // 2], "truncated"),
        "ramp16.png": (png16(6000), "too_large"),
        "notes.png": (b"minutes of the meeting\n" * 20, "not_an_image"),
    }
    out = {}
    for name, (content, reason) in files.items():
        (folder / name).write_bytes(content)
        out[name] = (folder / name, reason)
    gray = decode_image(real).gray.astype(np.uint16)
    out["rows.dcm"] = (dicom_rows_two_values(folder / "rows.dcm", gray), "corrupt")
    return out


BAD_NAMES = ["blank.png", "food.jpg", "truncated.jpg", "ramp16.png", "notes.png", "rows.dcm"]


@pytest.fixture(scope="module")
def bad_set(mirror: Path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _bad_file_set(mirror, tmp_path_factory.mktemp("bad-set"))


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_NAMES)
def test_same_bad_file_same_reason_from_predict_pyfunc_and_app(
    name: str, predictor: Predictor, pyfunc, bad_set: dict
) -> None:
    path, reason = bad_set[name]
    # The app: Handlers._outputs calls Predictor.prepare(data, name) on the upload's bytes.
    with pytest.raises(InputError) as app_error:
        predictor.prepare(path.read_bytes(), path.name)
    # predict: Predictor.prepare_file (a safe read, then prepare), one row per file.
    (row,) = predict_files(predictor, [path], progress=False)
    with pytest.raises(InputError) as file_error:
        predictor.prepare_file(path)
    # The registered pyfunc (and so `mlflow models serve`): bytes in, a row out.
    import pandas as pd

    frame = pyfunc.predict(pd.DataFrame({"image": [path.read_bytes()]}))
    reasons = (app_error.value.reason, row.reason, file_error.value.reason, frame.loc[0, "reason"])
    assert reasons == (reason,) * 4
    assert row.status == frame.loc[0, "status"] == "error"
    assert frame.loc[0, "predicted"] == "" and np.isnan(frame.iloc[0, 1])


@pytest.mark.slow
def test_pyfunc_answers_a_good_image_like_the_app_beside_a_bad_one(
    predictor: Predictor, pyfunc, mirror: Path
) -> None:
    import pandas as pd

    good = real_images(mirror, 1)[0].read_bytes()
    frame = pyfunc.predict(pd.DataFrame({"image": [good, b"not an image at all"]}))
    expected = predictor.predict(predictor.prepare(good).image[None])[0]
    np.testing.assert_allclose(
        frame.loc[0, list(predictor.classes)].astype(float), expected, rtol=1e-5, atol=1e-6
    )
    assert list(frame["status"]) == ["ok", "error"]
    assert frame.loc[1, "reason"] == "not_an_image"


@pytest.mark.slow
def test_pyfunc_arrays_go_through_the_same_checks(pyfunc, mirror: Path) -> None:
    """An RGB array of a colour photograph was silently converted to gray before."""
    food = cv2.cvtColor(cv2.imread(str(mirror / "not-mri" / "food_002.jpg")), cv2.COLOR_BGR2RGB)
    frame = pyfunc.predict([food, _gray(mirror)])
    assert list(frame["reason"]) == ["colour", ""]


def test_serving_batch_size_is_one_schema_for_stages_and_serving(tmp_path: Path) -> None:
    overrides = {"serving": {"batch_size": 8, "max_decode_bytes": 9_000_000}}
    path = write_params(tmp_path, overrides)
    params = load_params(path)  # every stage loads this
    assert (params.serving.batch_size, params.serving.max_decode_bytes) == (8, 9_000_000)
    settings = load_serving_config(path).settings
    assert settings == params.serving.resolved(params.clean)
    bad = write_params(tmp_path / "bad", {"serving": {"batch_sise": 8}})
    for load in (load_params, load_serving_config):
        with pytest.raises(ConfigError, match=r"^serving\.batch_sise: unknown key"):
            load(bad)


# --------------------------------------------------------------------------- finding 3


def _assert_no_patient_data(text: str) -> None:
    """No patient value (or a name part of 4+ letters) anywhere in ``text``; one-letter
    values such as PatientSex "F" cannot be told apart from ordinary text."""
    for keyword, value in PATIENT_TAGS.items():
        for part in {value, *value.split("^")}:
            assert len(part) < 4 or part not in text, f"{keyword} leaked"


@pytest.mark.slow
def test_dicom_patient_tags_never_leave_the_decoder(
    predictor: Predictor, pyfunc, bundle_folder: Path, mirror: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    gray = _gray(mirror).astype(np.uint16) * 4
    (tmp_path / "in").mkdir()
    good = dicom_with_patient(tmp_path / "in" / "scan.dcm", gray)
    dicom_rows_two_values(tmp_path / "in" / "rows.dcm", gray)
    dicom_frames_not_a_number(tmp_path / "in" / "frames.dcm", gray)
    deflated_copy(good, tmp_path / "in" / "deflated.dcm")
    prepared = predictor.prepare_file(good)
    assert set(prepared.info) <= {"format", "frames", "width", "height", *DICOM_INFO_TAGS}
    texts = [repr(prepared), json.dumps(prepared.info)]
    for extension in ("csv", "json"):
        output = tmp_path / f"out.{extension}"
        assert (
            predict_main(
                [
                    str(tmp_path / "in"),
                    "--model",
                    str(bundle_folder),
                    "--output",
                    str(output),
                    "--no-progress",
                    "--params",
                    str(tmp_path / "none.yaml"),
                ]
            )
            == 0
        )
        texts.append(output.read_text())
    import pandas as pd

    files = sorted((tmp_path / "in").iterdir())
    frame = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in files]}))
    assert sorted(frame["status"]) == ["error", "error", "ok", "ok"]
    texts.append(frame.to_csv())
    texts.append("\n".join(record.getMessage() for record in caplog.records))
    _assert_no_patient_data("\n".join(texts))
    assert "scan.dcm" in texts[2]  # the outputs were really written and read


def test_patient_check_would_catch_a_leak() -> None:
    """The leak check itself can fail: a text holding a patient name does not pass."""
    with pytest.raises(AssertionError, match="PatientName"):
        _assert_no_patient_data(f"decoded {PATIENT_TAGS['PatientName']}")
    with pytest.raises(AssertionError, match="PatientID"):
        _assert_no_patient_data(f"row 3: {PATIENT_TAGS['PatientID']}")


@pytest.mark.slow
def test_pyfunc_applies_the_serving_settings_it_was_logged_with(
    bundle_folder: Path, mirror: Path, tmp_path: Path
) -> None:
    import mlflow
    import pandas as pd

    from braintumor.serving.pyfunc import BundleModel, model_config

    mlflow.pyfunc.save_model(
        path=str(tmp_path / "model"),
        python_model=BundleModel(),
        artifacts={"bundle": str(bundle_folder)},
        model_config=model_config(ServingParams(max_upload_bytes=1024), CleanParams()),
        pip_requirements=["mlflow"],
    )
    strict = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    frame = strict.predict(pd.DataFrame({"image": [real_images(mirror, 1)[0].read_bytes()]}))
    assert frame.loc[0, "reason"] == "too_large"
