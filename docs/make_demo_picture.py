"""Compose docs/demo_overlays.jpg (the README's picture) from the demo's overlays.

.venv/bin/python docs/make_demo_picture.py    # after `make demo`

Four overlays in a 2 x 2 grid, each at the size the workflow wrote it (480 x 360), so
that the labels and legends stay readable at the width a README is shown.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["specimen_002.jpg", "specimen_005.jpg", "specimen_009.jpg", "specimen_013.jpg"]
GAP = 4  # white pixels between the tiles


def main() -> int:
    folder = ROOT / "results" / "demo" / "overlays"
    tiles = []
    for name in NAMES:
        path = folder / name
        if not path.is_file():
            sys.exit(f"{path}: not found; run `make demo` first")
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((480, 480))
            tiles.append(np.asarray(im))
    height = min(t.shape[0] for t in tiles)
    width = min(t.shape[1] for t in tiles)
    tiles = [t[:height, :width] for t in tiles]
    column = np.full((height, GAP, 3), 255, np.uint8)
    rows = [np.concatenate([a, column, b], axis=1) for a, b in (tiles[:2], tiles[2:])]
    line = np.full((GAP, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([rows[0], line, rows[1]], axis=0)
    out = ROOT / "docs" / "demo_overlays.jpg"
    Image.fromarray(grid).save(out, quality=88, optimize=True)
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
