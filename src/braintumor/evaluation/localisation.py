"""Does an explanation point at the tumour? Scores of saliency maps against tumour masks.

Two scores per map, both at the map's upsampled resolution (the model's input, where every
method's map lives):

- **pointing game** (Zhang et al., 2016): a hit when the map's hottest pixel lies inside
  the mask dilated by ``tolerance`` pixels (a disc). A map peaked on a plateau (a coarse
  map upsampled, ties) points at the plateau's centre of mass. A flat map (no variation:
  Grad-CAM returns zeros where nothing stands out) points nowhere and is a miss;
- **energy inside the mask**: the share of the map's total mass that falls inside the
  (undilated) mask. A uniform map scores the mask's area share, which is reported beside
  it as the floor of a map that knows nothing of the image.

The reference that knows nothing is a **centred Gaussian** (``centred_gaussian``): brain
slices are framed alike and tumours are often central (pituitary ones sit at the midline),
so a method must beat "look at the middle" to show it looks at the tumour. Pure NumPy and
OpenCV on arrays; the stage computes the maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

# A map whose range is below this (relative to its peak) points nowhere.
FLAT_TOLERANCE = 1e-6
# Ties for the hottest pixel: within this share of the peak.
PEAK_TIES = 1e-6


def _check_stack(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(maps, dtype=np.float32)
    regions = np.asarray(masks, dtype=bool)
    if values.ndim != 3 or values.shape != regions.shape:
        raise ValueError(
            f"maps and masks must be (N, H, W) of one shape, got {values.shape} and {regions.shape}"
        )
    if not np.all(np.isfinite(values)) or (values.size and values.min() < 0):
        raise ValueError("maps must be finite and non-negative")
    return values, regions


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` (H, W) grown by a disc of radius ``pixels`` (0: unchanged)."""
    if pixels < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {pixels}")
    region = np.asarray(mask, dtype=np.uint8)
    if pixels == 0:
        return region.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return np.asarray(cv2.dilate(region, kernel), dtype=bool)


def peak(heatmap: np.ndarray) -> tuple[int, int] | None:
    """(row, column) the map points at: its hottest pixel, ties resolved to their centre of
    mass (rounded); None for a flat map."""
    high, low = float(heatmap.max()), float(heatmap.min())
    if high - low <= FLAT_TOLERANCE * max(abs(high), abs(low), 1e-30):
        return None
    rows, columns = np.nonzero(heatmap >= high - PEAK_TIES * abs(high))
    return int(round(float(rows.mean()))), int(round(float(columns.mean())))


def pointing_hits(maps: np.ndarray, masks: np.ndarray, tolerance: int) -> np.ndarray:
    """(N,) bool: each map's peak lies within ``tolerance`` pixels of its mask."""
    values, regions = _check_stack(maps, masks)
    hits = np.zeros(len(values), dtype=bool)
    for index, (heatmap, region) in enumerate(zip(values, regions, strict=True)):
        point = peak(heatmap)
        if point is not None:
            hits[index] = bool(dilate(region, tolerance)[point])
    return hits


def energy_shares(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) share of each map's mass inside its mask; 0 for an all-zero map."""
    values, regions = _check_stack(maps, masks)
    totals = values.sum(axis=(1, 2), dtype=np.float64)
    inside = (values * regions).sum(axis=(1, 2), dtype=np.float64)
    return np.divide(inside, totals, out=np.zeros_like(totals), where=totals > 0)


def area_shares(masks: np.ndarray) -> np.ndarray:
    """(N,) share of the image each mask covers: a uniform map's energy share."""
    regions = np.asarray(masks, dtype=bool)
    return regions.mean(axis=(1, 2), dtype=np.float64)


def centred_gaussian(height: int, width: int, sigma: float) -> np.ndarray:
    """The map that knows nothing: a Gaussian at the image centre, ``sigma`` as a share of
    the side, scaled to peak at 1."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    rows = (np.arange(height) - (height - 1) / 2) / (sigma * height)
    columns = (np.arange(width) - (width - 1) / 2) / (sigma * width)
    return np.exp(-0.5 * (rows[:, None] ** 2 + columns[None, :] ** 2)).astype(np.float32)


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal one)."""
    if total == 0:
        return 0.0, 0.0
    share = hits / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def score(
    maps: np.ndarray,
    masks: np.ndarray,
    tolerance: int,
    labels: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Pointing game and energy share of a stack of maps: overall (with the pointing game's
    Wilson interval) and per class when ``labels`` are given."""
    hits = pointing_hits(maps, masks, tolerance)
    shares = energy_shares(maps, masks)
    return summarise(hits, shares, labels)


def summarise(
    hits: np.ndarray, shares: np.ndarray, labels: Sequence[str] | np.ndarray | None = None
) -> dict[str, Any]:
    """The numbers of ``score`` from per-image hits and energy shares."""
    total = len(hits)
    low, high = wilson_interval(int(hits.sum()), total)
    result: dict[str, Any] = {
        "slices": total,
        "pointing": float(hits.mean()) if total else 0.0,
        "pointing_interval": [low, high],
        "energy": float(shares.mean()) if total else 0.0,
    }
    if labels is not None:
        names = np.asarray(labels)
        result["per_class"] = {
            str(label): {
                "slices": int((names == label).sum()),
                "pointing": float(hits[names == label].mean()),
                "energy": float(shares[names == label].mean()),
            }
            for label in sorted(set(names.tolist()))
        }
    return result


def choose(results: Mapping[str, Mapping[str, Any]], candidates: Sequence[str]) -> tuple[str, str]:
    """The map to show, by measurement: among ``candidates`` (keys of ``results``, the
    methods cheap enough to serve), the highest pointing game, ties broken by energy
    share. Returns (key, the reason in words)."""
    available = [key for key in candidates if key in results]
    if not available:
        raise ValueError("no candidate method was measured")
    best = max(available, key=lambda key: (results[key]["pointing"], results[key]["energy"]))
    runner = sorted(
        (key for key in available if key != best),
        key=lambda key: (results[key]["pointing"], results[key]["energy"]),
    )
    reason = (
        f"highest pointing game among {', '.join(available)}: "
        f"{results[best]['pointing']:.3f} (energy {results[best]['energy']:.3f})"
    )
    if runner:
        other = runner[-1]
        reason += f"; next {other} {results[other]['pointing']:.3f}"
    return best, reason


def localisation_figure(
    results: Mapping[str, Mapping[str, Any]],
    baseline: Mapping[str, Any],
    area_share: float,
    examples: Sequence[Mapping[str, Any]],
    path: Any,
) -> None:
    """Bars of the pointing game and the energy share per method@layer, with the centred
    Gaussian and the mask's area share as lines, and example slices: the slice with its
    mask's contour, then each map over it with the contour and the point it picks.

    ``examples``: dicts with ``image`` (H, W uint8), ``mask`` (H, W bool), ``title`` and
    ``maps`` ({method@layer: (H, W) in [0, 1]})."""
    from braintumor.reports.figures import new_figure, save_figure

    keys = list(results)
    columns = 1 + len(keys)
    rows = 1 + len(examples)
    figure = new_figure(
        figsize=(max(8.0, 2.0 * columns), 3.6 + 2.0 * len(examples)), layout="constrained"
    )
    grid = figure.add_gridspec(rows, columns, height_ratios=[1.6] + [1.0] * len(examples))
    bars = figure.add_subplot(grid[0, :])
    positions = np.arange(len(keys))
    width = 0.4
    pointing = [results[key]["pointing"] for key in keys]
    energy = [results[key]["energy"] for key in keys]
    bars.bar(positions - width / 2, pointing, width, label="pointing game")
    bars.bar(positions + width / 2, energy, width, label="energy in mask")
    bars.axhline(
        baseline["pointing"],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"centred Gaussian: pointing {baseline['pointing']:.2f}",
    )
    bars.axhline(
        baseline["energy"],
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"centred Gaussian: energy {baseline['energy']:.2f}",
    )
    bars.axhline(
        area_share,
        color="red",
        linestyle=":",
        linewidth=1,
        label=f"mask area (uniform map) {area_share:.3f}",
    )
    for position, value in zip(positions, pointing, strict=True):
        bars.text(position - width / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    bars.set_xticks(positions, [key.replace("@", "\n@") for key in keys], fontsize=7)
    bars.set_ylim(0, 1.05)
    bars.set_title(
        f"Explanations against tumour masks ({results[keys[0]]['slices']} test slices)"
        if keys
        else "no method measured"
    )
    bars.legend(fontsize=7, loc="upper right")
    for row, example in enumerate(examples, start=1):
        image, mask = example["image"], example["mask"]
        axis = figure.add_subplot(grid[row, 0])
        axis.imshow(image, cmap="gray", vmin=0, vmax=255)
        axis.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        axis.set_title(example["title"], fontsize=7)
        axis.axis("off")
        for column, key in enumerate(keys, start=1):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(image, cmap="gray", vmin=0, vmax=255)
            heatmap = example["maps"].get(key)
            if heatmap is not None:
                axis.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                point = peak(heatmap)
                if point is not None:
                    axis.plot(point[1], point[0], marker="+", color="white", markersize=9)
            axis.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            axis.set_title(key, fontsize=6)
            axis.axis("off")
    save_figure(figure, path)
