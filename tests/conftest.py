"""Shared fixtures: a small random-weight SAM2 and helpers to write test collections.

Random weights at a small image size keep the real SAM2 code paths fast on 2 CPU
cores; `sam2pal.models.build.build_model(..., "random")` biases the object-score head towards
"object present" so that masks (and gradients) are not all empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128


@pytest.fixture(scope="session")
def tiny_model():
    from sam2pal.models.build import build_model

    return build_model("sam2.1_hiera_t", "random", image_size=IMAGE_SIZE, device="cpu")


def blob_image(
    rng: np.random.Generator, height: int = 96, width: int = 128, boxes=()
) -> np.ndarray:
    """A noisy RGB image with coloured rectangles (x0, y0, x1, y1, colour) on it."""
    image = np.clip(rng.normal(120, 35, (height, width, 3)), 0, 255).astype(np.uint8)
    for x0, y0, x1, y1, colour in boxes:
        image[y0:y1, x0:x1] = colour
    return image


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def save_jpeg(path: Path, image: np.ndarray) -> np.ndarray:
    """Write a JPEG and return the pixels as decoded (what every reader sees)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)
    return np.array(Image.open(path).convert("RGB"))


def template_set(entries, categories):
    """A TemplateSet from [(path, {(category_id, instance): mask})]."""
    from sam2pal.io.templates import TemplateImage, TemplateInstance, TemplateSet

    images = []
    next_ann = 1
    for image_id, (path, masks) in enumerate(entries, start=1):
        instances = []
        for (cid, inst), mask in sorted(masks.items()):
            instances.append(
                TemplateInstance(annotation_id=next_ann, category_id=cid, instance=inst, mask=mask)
            )
            next_ann += 1
        h, w = next(iter(masks.values())).shape
        images.append(
            TemplateImage(
                file_name=Path(path).name,
                path=Path(path),
                width=w,
                height=h,
                image_id=image_id,
                instances=instances,
            )
        )
    return TemplateSet(categories=dict(categories), images=images)
