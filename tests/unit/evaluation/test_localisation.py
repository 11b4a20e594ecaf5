"""Localisation scores where the answer is known: synthetic maps on real tumour masks.

A map peaked inside the mask scores a pointing hit, one peaked far outside a miss, one
just outside a hit only within the stated tolerance; the energy share is the mask's own
share for a uniform map and 1 for a map inside it; the centred Gaussian is computed like
any map; a flat map points nowhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braintumor.data.masks import mask_at, read_mask
from braintumor.evaluation import localisation as loc

pytestmark = pytest.mark.usefixtures("mirror")

SIZE = 128
# Real masks: a meningioma (id 4), a glioma (209) and a pituitary tumour (919).
IDS = (4, 209, 919)


def _masks(mirror: Path) -> np.ndarray:
    found = []
    for name in IDS:
        mask = read_mask(mirror / "figshare-masks" / "masks" / f"{name}.png")
        assert mask is not None
        found.append(mask_at(mask, SIZE, SIZE))
    return np.stack(found)


def _bump(row: float, column: float, sigma: float = 3.0) -> np.ndarray:
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    return np.exp(-((rows - row) ** 2 + (columns - column) ** 2) / (2 * sigma**2)).astype(
        np.float32
    )


def _inside_and_far(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """The mask's innermost pixel, and the pixel farthest from it."""
    import cv2

    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    return (
        tuple(int(v) for v in np.unravel_index(inside.argmax(), mask.shape)),  # type: ignore[return-value]
        tuple(int(v) for v in np.unravel_index(outside.argmax(), mask.shape)),  # type: ignore[return-value]
    )


def test_a_map_peaked_inside_scores_1_and_outside_0(mirror: Path) -> None:
    masks = _masks(mirror)
    inside = np.stack([_bump(*_inside_and_far(mask)[0]) for mask in masks])
    outside = np.stack([_bump(*_inside_and_far(mask)[1]) for mask in masks])
    assert loc.pointing_hits(inside, masks, 0).all()
    assert not loc.pointing_hits(outside, masks, 8).any()
    assert loc.score(inside, masks, 0)["pointing"] == 1.0
    assert loc.score(outside, masks, 8)["pointing"] == 0.0
    # A map that is exactly the mask puts all its energy inside; a far bump almost none.
    assert np.allclose(loc.energy_shares(masks.astype(np.float32), masks), 1.0)
    assert (loc.energy_shares(outside, masks) < 0.01).all()


def test_the_tolerance_is_pixels_of_dilation(mirror: Path) -> None:
    """A peak d pixels from the mask (Euclidean) is a hit exactly when d <= tolerance."""
    import cv2

    mask = _masks(mirror)[0]
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    rows, columns = np.nonzero((distance > 5.5) & (distance < 6.5))
    point = (int(rows[0]), int(columns[0]))
    heatmap = _bump(*point, sigma=1.0)[None]
    assert not loc.pointing_hits(heatmap, mask[None], 4)[0]
    assert loc.pointing_hits(heatmap, mask[None], 8)[0]


def test_a_uniform_map_scores_the_mask_area_and_a_flat_map_points_nowhere(
    mirror: Path,
) -> None:
    masks = _masks(mirror)
    uniform = np.ones_like(masks, dtype=np.float32)
    assert np.allclose(loc.energy_shares(uniform, masks), loc.area_shares(masks))
    assert not loc.pointing_hits(uniform, masks, 64).any()  # flat: no peak, however lenient
    zeros = np.zeros_like(uniform)
    assert (loc.energy_shares(zeros, masks) == 0).all()


def test_a_plateau_points_at_its_centre() -> None:
    """A coarse map upsampled has a flat top: the point is its centre, not its first pixel."""
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[40:60, 80:100] = 1.0
    assert loc.peak(heatmap) == (50, 90)  # rounded centre of rows 40-59, columns 80-99
    mask = np.zeros((SIZE, SIZE), bool)
    mask[48:53, 88:93] = True
    assert loc.pointing_hits(heatmap[None], mask[None], 0)[0]


def test_the_centred_gaussian_baseline(mirror: Path) -> None:
    masks = _masks(mirror)
    gaussian = loc.centred_gaussian(SIZE, SIZE, 0.25)
    assert gaussian.shape == (SIZE, SIZE) and gaussian.max() == pytest.approx(1.0, abs=1e-3)
    assert loc.peak(gaussian) == (64, 64)
    stack = np.broadcast_to(gaussian, masks.shape)
    result = loc.score(stack, masks, 8, ["meningioma", "glioma", "pituitary"])
    # It hits exactly the masks that come within 8 pixels of the centre.
    expected = [bool(loc.dilate(mask, 8)[64, 64]) for mask in masks]
    assert result["pointing"] == pytest.approx(np.mean(expected))
    assert result["per_class"]["pituitary"]["pointing"] == float(expected[2])
    assert 0 < result["energy"] < 1
    low, high = result["pointing_interval"]
    assert 0 <= low <= result["pointing"] <= high <= 1


def test_choose_takes_the_best_servable_map_by_pointing_then_energy() -> None:
    results = {
        "gradcam@top": {"pointing": 0.2, "energy": 0.05},
        "hirescam@block": {"pointing": 0.6, "energy": 0.08},
        "gradcampp@block": {"pointing": 0.6, "energy": 0.09},
        "occlusion@input": {"pointing": 0.9, "energy": 0.2},
    }
    best, reason = loc.choose(results, ["gradcam@top", "hirescam@block", "gradcampp@block"])
    assert best == "gradcampp@block" and "0.600" in reason
    with pytest.raises(ValueError, match="no candidate"):
        loc.choose(results, ["absent@x"])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        loc.pointing_hits(np.zeros((2, 8, 8)), np.zeros((2, 8, 9), bool), 0)
    with pytest.raises(ValueError, match="non-negative"):
        loc.energy_shares(-np.ones((1, 8, 8)), np.ones((1, 8, 8), bool))
    with pytest.raises(ValueError, match="tolerance"):
        loc.dilate(np.ones((8, 8), bool), -1)
    assert loc.wilson_interval(0, 0) == (0.0, 0.0)
    low, high = loc.wilson_interval(10, 10)
    assert high == 1.0 and 0.6 < low < 0.75
