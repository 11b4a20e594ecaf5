"""A heatmap blended over the gray slice it explains, for the app, figures and reports."""

from __future__ import annotations

import cv2
import numpy as np


def overlay(image_gray_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap (jet colour map) over a gray image; returns RGB uint8 (H, W, 3).

    ``image_gray_uint8``: (H, W) or (H, W, 1) uint8. ``heatmap``: 2-D in [0, 1], resized
    to the image if its size differs. ``alpha``: weight of the heatmap (0 = the image only).
    """
    image = np.asarray(image_gray_uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a 2-D uint8 gray image, got shape {image.shape} {image.dtype}"
        )
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    if not np.all(np.isfinite(heat)) or heat.min() < -1e-6 or heat.max() > 1 + 1e-6:
        raise ValueError("heatmap must hold values in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heat.shape != image.shape:
        size = (image.shape[1], image.shape[0])
        heat = np.asarray(cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR), np.float32)
    heat_uint8 = np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat_uint8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gray_rgb = np.repeat(image[:, :, None], 3, axis=2).astype(np.float32)
    blended = (1.0 - alpha) * gray_rgb + alpha * colour.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
