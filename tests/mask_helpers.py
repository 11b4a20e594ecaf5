"""Real figshare tumour masks with the Msoud test slices they belong to, for tiny
projects whose ``masks`` and ``localise`` stages must find a match (the localise stage
refuses a masks folder that matches no test image)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

# figshare id -> the Msoud file it is (clean's near-duplicate match, checked by test_localise)
PAIRS = {
    209: "Testing/glioma/Te-gl_0094.jpg",
    736: "Testing/glioma/Te-gl_0229.jpg",
    741: "Testing/glioma/Te-gl_0230.jpg",
    4: "Testing/meningioma/Te-me_0204.jpg",
    7: "Testing/meningioma/Te-me_0287.jpg",
    8: "Testing/meningioma/Te-me_0292.jpg",
    919: "Testing/pituitary/Te-pi_0118.jpg",
    923: "Testing/pituitary/Te-pi_0119.jpg",
    59: "Testing/pituitary/Te-pi_0107.jpg",
}


def copy_masks(mirror: Path, shelf: Path) -> pd.DataFrame:
    """``PAIRS``' images, masks and ``meta.csv`` rows from the mirror's figshare-masks into
    ``shelf`` (a figshare-masks folder); returns the rows."""
    figshare = mirror / "figshare-masks"
    (shelf / "images").mkdir(parents=True)
    (shelf / "masks").mkdir()
    meta = pd.read_csv(figshare / "meta.csv").set_index("id").loc[list(PAIRS)].reset_index()
    for name in PAIRS:
        shutil.copy(figshare / "images" / f"{name}.jpg", shelf / "images")
        shutil.copy(figshare / "masks" / f"{name}.png", shelf / "masks")
    meta.to_csv(shelf / "meta.csv", index=False)
    return meta


def copy_matching_slices(mirror: Path, msoud: Path) -> None:
    """The Msoud test slices ``PAIRS`` point at, into ``msoud`` (a source folder)."""
    for relative in PAIRS.values():
        target = msoud / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(mirror / "msoud" / relative, target)
