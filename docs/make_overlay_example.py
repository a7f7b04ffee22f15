"""Draw docs/overlay_example.jpg: an overlay as the workflow draws it, for a photo of
the size collections have (3000 x 2250), shown at the overlays' size (1600 px).

.venv/bin/python docs/make_overlay_example.py

The specimen is synthetic (`sam2pal.synth`: a procedural insect with eyes, scapes,
antennae and legs, 10 to 40 px wide at full size) and its masks are its true part
masks; the QC scores are made up for the picture (seeded), one of them as a predicted
IoU. No model runs.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import zoom  # noqa: E402  (benchmarks/zoom.py)

from sam2pal.outputs.visualize import write_overlays  # noqa: E402
from sam2pal.synth.quality import held_out_procedural  # noqa: E402
from sam2pal.synth.specimens import make_collection  # noqa: E402

SEED = 3
# the zoom benchmark's specimens (heads up, one palette on paper), larger in the frame
STYLE = {**zoom.STYLE, "scale_range": (0.45, 0.5)}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_collection(
            folder, 1, 1, SEED, size=(3000, 2250), shapes=held_out_procedural(SEED, 1), style=STYLE
        )
        coco = json.loads((folder / "ground_truth.json").read_text())
        rng = np.random.default_rng(SEED)
        for k, ann in enumerate(coco["annotations"]):
            ann["instance"] = 1
            ann["predicted_iou"] = round(float(rng.uniform(0.85, 0.97)), 3)
            ann["cycle_iou"] = None if k == 1 else round(float(rng.uniform(0.55, 0.97)), 3)
        (folder / "predictions.json").write_text(json.dumps(coco))
        write_overlays(folder / "predictions.json", folder / "images", folder / "overlays")
        overlay = next((folder / "overlays").glob("*.jpg"))
        out = ROOT / "docs" / "overlay_example.jpg"
        out.write_bytes(overlay.read_bytes())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
