"""Compose docs/demo_overlays.jpg (the README's picture) from the demo's overlays.

.venv/bin/python docs/make_demo_picture.py    # after `make demo`
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["specimen_002.jpg", "specimen_005.jpg", "specimen_009.jpg", "specimen_013.jpg"]


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
    row = np.concatenate([t[:height] for t in tiles], axis=1)
    out = ROOT / "docs" / "demo_overlays.jpg"
    Image.fromarray(row).save(out, quality=85, optimize=True)
    print(f"wrote {out} ({row.shape[1]}x{row.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
