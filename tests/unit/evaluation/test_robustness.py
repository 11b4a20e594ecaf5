"""The robustness perturbations on real slices, their levels and seeding, and the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from braintumor.core.config import load_params, params_from_mapping
from braintumor.core.schema import (
    ROBUSTNESS_PERTURBATIONS,
    ConfigError,
    PreprocessParams,
    RobustnessParams,
)
from braintumor.data.imaging import decode_image, preprocess_gray
from braintumor.evaluation.robustness import (
    CLEAN,
    KINDS,
    PERTURBATIONS,
    RobustnessError,
    apply_perturbation,
    perturb,
    perturbation_names,
    perturbation_rng,
    perturbation_sheet,
    perturbed_inputs,
    robustness_figure,
    robustness_rows_for_plot,
    robustness_table,
)

from conftest import REPO, committed_params_text, params_file

SIZE = 64


@pytest.fixture(scope="module")
def slices(mirror: Path) -> list[np.ndarray]:
    """One real msoud test slice per class, decoded as everywhere else."""
    grays = []
    for class_dir in sorted((mirror / "msoud" / "Testing").iterdir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        grays.append(decode_image(files[3].read_bytes(), name=files[3].name).gray)
    return grays


def distance(image: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(image.astype(np.float64) - reference).mean())


def test_catalogue_matches_the_config_and_the_params_files() -> None:
    assert list(PERTURBATIONS)[0] == CLEAN
    assert tuple(PERTURBATIONS)[1:] == ROBUSTNESS_PERTURBATIONS
    assert {p.kind for p in PERTURBATIONS.values()} <= set(KINDS)
    assert all(name == p.name for name, p in PERTURBATIONS.items())
    raw = yaml.safe_load(committed_params_text())
    for profile in ["paper", *(path.stem for path in (REPO / "profiles").glob("*.yaml"))]:
        params = params_from_mapping({**raw, "profile": profile}, REPO / "profiles")
        robustness = params.evaluate.robustness
        assert set(robustness.perturbations) <= set(PERTURBATIONS), profile
    paper = load_params(params_file()).evaluate.robustness
    assert paper == RobustnessParams()
    assert paper.perturbations == ROBUSTNESS_PERTURBATIONS


def test_every_perturbation_keeps_shape_and_dtype_and_only_clean_is_identity(
    slices: list[np.ndarray],
) -> None:
    for gray in slices:
        for name in PERTURBATIONS:
            perturbed = perturb(gray, name, np.random.default_rng(0))
            assert perturbed.shape == gray.shape and perturbed.dtype == np.uint8, name
            if name == CLEAN:
                np.testing.assert_array_equal(perturbed, gray)
                assert perturbed is not gray, "a copy: callers may change it"
            else:
                assert distance(perturbed, gray) > 0.3, name


@pytest.mark.parametrize(
    ("weaker", "stronger"),
    [
        ("noise_5", "noise_10"),
        ("jpeg_60", "jpeg_30"),
        ("downscale_0.5", "downscale_0.25"),
        ("rotate_5", "rotate_10"),
        ("shift_0.05", "shift_0.1"),
    ],
)
def test_the_stronger_level_moves_farther_from_the_clean_slice(
    slices: list[np.ndarray], weaker: str, stronger: str
) -> None:
    for gray in slices:
        near = perturb(gray, weaker, np.random.default_rng(3))
        far = perturb(gray, stronger, np.random.default_rng(3))  # same directions drawn
        assert distance(far, gray) > 1.05 * distance(near, gray), (weaker, stronger)


@pytest.mark.parametrize(
    ("kind", "levels"),
    [
        ("gamma", (1.0, 0.85, 0.7, 0.5)),
        ("gamma", (1.0, 1.2, 1.4, 2.0)),
        ("contrast", (1.0, 0.85, 0.7, 0.5)),
        ("contrast", (1.0, 1.15, 1.3, 1.6)),
        ("brightness", (0.0, 10.0, 25.0, 50.0)),
        ("brightness", (0.0, -10.0, -25.0, -50.0)),
    ],
)
def test_intensity_kinds_grow_with_their_level(
    slices: list[np.ndarray], kind: str, levels: tuple[float, ...]
) -> None:
    rng = np.random.default_rng(0)
    for gray in slices:
        distances = [distance(apply_perturbation(gray, kind, lv, rng), gray) for lv in levels]
        assert distances[0] == 0, "the neutral level is the identity"
        assert distances == sorted(distances) and len(set(distances)) == len(distances)


def test_intensity_kinds_follow_their_formulas() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    rng = np.random.default_rng(0)
    gamma = apply_perturbation(ramp, "gamma", 0.7, rng)
    np.testing.assert_array_equal(gamma[0], np.rint(255 * (np.arange(256) / 255) ** 0.7))
    contrast = apply_perturbation(ramp, "contrast", 1.3, rng).astype(float)
    expected = np.clip(np.rint((np.arange(256) - 127.5) * 1.3 + 127.5), 0, 255)
    np.testing.assert_array_equal(contrast[0], expected)
    brighter = apply_perturbation(ramp, "brightness", 25.0, rng)
    np.testing.assert_array_equal(brighter[0], np.minimum(np.arange(256) + 25, 255))
    flat = np.full((200, 200), 128, dtype=np.uint8)
    noisy = apply_perturbation(flat, "noise", 10.0, rng).astype(float)
    assert abs(noisy.std() - 10) < 0.5 and abs(noisy.mean() - 128) < 0.5


def test_geometry_keeps_its_magnitude_and_draws_its_direction() -> None:
    square = np.zeros((100, 100), dtype=np.uint8)
    square[40:60, 40:60] = 200
    moves = set()
    for seed in range(12):
        shifted = perturb(square, "shift_0.1", np.random.default_rng(seed))
        rows, columns = np.nonzero(shifted)
        move = (rows.mean() - 49.5, columns.mean() - 49.5)
        assert np.hypot(*move) == pytest.approx(10, abs=0.75), "10% of the side"
        assert shifted.sum() == square.sum(), "whole pixels: values kept"
        moves.add((np.sign(round(move[0])), np.sign(round(move[1]))))
    assert len(moves) >= 3, "directions vary"
    signs = set()
    for seed in range(8):
        bar = np.zeros((101, 101), dtype=np.uint8)
        bar[50, 10:91] = 255
        rotated = perturb(bar, "rotate_10", np.random.default_rng(seed)).astype(float)
        rows, columns = np.nonzero(rotated > 60)
        slope = np.polyfit(columns, rows, 1)[0]
        assert abs(np.degrees(np.arctan(slope))) == pytest.approx(10, abs=1.0)
        signs.add(np.sign(slope))
    assert signs == {-1.0, 1.0}, "both directions"


def test_perturbed_inputs_are_preprocessed_and_deterministic(slices: list[np.ndarray]) -> None:
    params = PreprocessParams()
    clean = perturbed_inputs(slices, CLEAN, SIZE, params, seed=1)
    assert clean.shape == (len(slices), SIZE, SIZE, 1) and clean.dtype == np.uint8
    for image, gray in zip(clean, slices, strict=True):
        np.testing.assert_array_equal(image[..., 0], preprocess_gray(gray, SIZE, params))
    for name in ("noise_10", "rotate_5", "shift_0.05"):
        first = perturbed_inputs(slices, name, SIZE, params, seed=1)
        np.testing.assert_array_equal(first, perturbed_inputs(slices, name, SIZE, params, 1))
        assert not np.array_equal(first, perturbed_inputs(slices, name, SIZE, params, 2))
        chunks = np.concatenate(
            [
                perturbed_inputs(slices[:2], name, SIZE, params, 1),
                perturbed_inputs(slices[2:], name, SIZE, params, 1, first_index=2),
            ]
        )
        np.testing.assert_array_equal(first, chunks)
    jpeg = perturbed_inputs(slices, "jpeg_30", SIZE, params, seed=1)
    np.testing.assert_array_equal(jpeg, perturbed_inputs(slices, "jpeg_30", SIZE, params, 9))
    assert perturbed_inputs([], "noise_5", SIZE, params, 1).shape == (0, SIZE, SIZE, 1)
    other = perturbation_rng(1, "noise_5", 0).random()
    assert other != perturbation_rng(1, "noise_10", 0).random()
    assert other == perturbation_rng(1, "noise_5", 0).random()


def test_perturbation_names_put_clean_first_and_respect_the_switch() -> None:
    assert perturbation_names(RobustnessParams()) == (CLEAN, *ROBUSTNESS_PERTURBATIONS)
    assert perturbation_names(RobustnessParams(enabled=False)) == ()
    chosen = RobustnessParams(perturbations=("jpeg_30", CLEAN, "noise_5"))
    assert perturbation_names(chosen) == (CLEAN, "jpeg_30", "noise_5")
    assert perturbation_names(RobustnessParams(perturbations=())) == (CLEAN,)


def test_bad_names_and_images_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^perturbations\[1\]: 'noize_5' is not a pert"):
        RobustnessParams(perturbations=("noise_5", "noize_5"))
    with pytest.raises(ConfigError, match="perturbations: has repeats"):
        RobustnessParams(perturbations=("noise_5", "noise_5"))
    gray = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(RobustnessError, match="'blur_3' is not a perturbation"):
        perturb(gray, "blur_3", np.random.default_rng(0))
    with pytest.raises(RobustnessError, match="2-D uint8"):
        perturb(gray.astype(np.float32), "noise_5", np.random.default_rng(0))
    with pytest.raises(RobustnessError, match="2-D uint8"):
        perturb(np.zeros((8, 8, 3), np.uint8), CLEAN, np.random.default_rng(0))
    with pytest.raises(RobustnessError, match="kind"):
        apply_perturbation(gray, "blur", 3.0, np.random.default_rng(0))


def test_table_arithmetic() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    probabilities = np.eye(4)[[0, 1, 2, 3, 0, 1, 0, 0]]  # 6 of 8 right
    table = robustness_table(
        labels,
        {
            "noise_10": probabilities,
            CLEAN: [0, 1, 2, 3, 0, 1, 2, 0],  # 7 of 8
            "jpeg_30": np.array([1, 1, 2, 3, 0, 1, 2, 0]),  # 6 of 8
        },
    )
    assert [row["perturbation"] for row in table] == [CLEAN, "noise_10", "jpeg_30"]
    assert [row["correct"] for row in table] == [7, 6, 6]
    assert all(row["count"] == 8 for row in table)
    assert [row["accuracy"] for row in table] == [0.875, 0.75, 0.75]
    assert [row["accuracy_drop"] for row in table] == [0.0, 0.125, 0.125]
    better = robustness_table([0, 1], {CLEAN: [0, 0], "gamma_0.7": [0, 1]})
    assert better[1]["accuracy_drop"] == -0.5, "negative: better than clean"


def test_table_refuses_inconsistent_input() -> None:
    with pytest.raises(RobustnessError, match="'clean' reference"):
        robustness_table([0, 1], {"noise_5": [0, 1]})
    with pytest.raises(RobustnessError, match="noise_5: 3 predictions for 2 labels"):
        robustness_table([0, 1], {CLEAN: [0, 1], "noise_5": [0, 1, 1]})
    with pytest.raises(RobustnessError, match="non-empty"):
        robustness_table([], {CLEAN: []})


def test_plot_rows_and_figures(slices: list[np.ndarray], tmp_path: Path) -> None:
    base = robustness_table([0, 1, 2], {CLEAN: [0, 1, 2], "noise_5": [0, 1, 1]})
    tuned = robustness_table([0, 1, 2], {CLEAN: [0, 1, 1], "noise_5": [0, 0, 1]})
    rows = robustness_rows_for_plot({"base": base, "finetuned": tuned})
    assert rows == [
        {"perturbation": CLEAN, "accuracy": 1.0, "model": "base"},
        {"perturbation": "noise_5", "accuracy": 0.666667, "model": "base"},
        {"perturbation": CLEAN, "accuracy": 0.666667, "model": "finetuned"},
        {"perturbation": "noise_5", "accuracy": 0.333333, "model": "finetuned"},
    ]
    for path, tables in (
        (tmp_path / "one.png", base),
        (tmp_path / "out" / "two.png", {"base": base, "finetuned": tuned}),
    ):
        assert robustness_figure(tables, path) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = perturbation_sheet(
        slices[0], list(PERTURBATIONS), SIZE, PreprocessParams(), 1, tmp_path / "sheet.png"
    )
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["one.png", "out", "sheet.png", "two.png"]


def test_module_imports_no_keras() -> None:
    code = "import sys, braintumor.evaluation.robustness; assert 'keras' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_perturbation_name_is_a_valid_mlflow_metric_key() -> None:
    """The evaluate stage logs ``finetuned.robustness.<name>`` to MLflow, which refuses
    names with characters outside this set (a ``+`` once failed the whole stage)."""
    import re

    from braintumor.evaluation.robustness import PERTURBATIONS

    allowed = re.compile(r"^[A-Za-z0-9_\-. :/]+$")
    for name in PERTURBATIONS:
        assert allowed.match(f"finetuned.robustness.{name}"), name
