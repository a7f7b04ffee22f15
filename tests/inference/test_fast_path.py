"""The engine's work around the model on large photos: masks resized only inside their
box and run-length encoded from it, photos decoded at a reduced size, the cycle IoU
from boxes, several targets per model call; each against the exact path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, blob_image, box_mask, save_jpeg, template_set
from PIL import Image

from sam2pal.inference.engine import Propagator, preprocess, upsample_to_box
from sam2pal.inference.postprocess import StructureReference, clamp_mask
from sam2pal.io.images import read_image, read_image_reduced
from sam2pal.io.masks import BoxMask, decode_segmentation, encode_rle, mask_bbox


def _random_mask(rng, height, width):
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        mask[
            y0 : y0 + int(rng.integers(1, height + 1)), x0 : x0 + int(rng.integers(1, width + 1))
        ] = True
    mask ^= rng.random((height, width)) < 0.05
    return mask


def test_box_mask_encodes_as_the_full_mask():
    """RLE, area and bbox from the box equal pycocotools' on the full mask, including
    runs that go on from the bottom of a column to the top of the next one."""
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 7), (7, 1), (5, 4), (30, 20), (64, 90)]
    for trial in range(150):
        height, width = shapes[trial % len(shapes)]
        mask = _random_mask(rng, height, width)
        if trial % 10 == 0:
            mask[:] = True
        box = BoxMask.from_full(mask)
        assert np.array_equal(box.full(), mask)
        assert box.rle() == encode_rle(mask), (trial, height, width)
        assert box.bbox() == mask_bbox(mask)
        assert box.area == int(mask.sum())
        # the same mask in a loose box (background around it) encodes the same
        pad = BoxMask(mask.shape, 0, 0, mask)
        assert pad.rle() == encode_rle(mask) and pad.bbox() == mask_bbox(mask)
    empty = BoxMask.empty((4, 6))
    assert empty.rle() == encode_rle(np.zeros((4, 6), bool)) and empty.bbox() == [
        0.0,
        0.0,
        0.0,
        0.0,
    ]


def test_box_mask_cut_equals_the_full_mask_cut():
    rng = np.random.default_rng(1)
    for _ in range(40):
        mask = _random_mask(rng, 40, 60)
        x0, x1 = sorted(rng.random(2))
        y0, y1 = sorted(rng.random(2))
        reference = StructureReference(float(rng.uniform(0.005, 0.3)), (x0, y0, x1, y1))
        full_cut, full_flag = clamp_mask(mask, reference, area_growth_limit=2.0, pad=3)
        box_cut, box_flag = clamp_mask(
            BoxMask.from_full(mask), reference, area_growth_limit=2.0, pad=3
        )
        assert np.array_equal(box_cut.full(), full_cut) and box_flag == full_flag


def test_box_upsampling_equals_torch_interpolate():
    """Thresholding the bilinear resize only inside the box gives the very pixels of
    F.interpolate over the whole image (up- and down-sizing, odd sizes)."""
    rng = np.random.default_rng(2)
    differ = total = 0
    for trial in range(120):
        h, w = int(rng.integers(4, 64)), int(rng.integers(4, 64))
        height, width = int(rng.integers(3, 500)), int(rng.integers(3, 500))
        logits = (rng.normal(size=(h, w)) - rng.uniform(0, 3)).astype(np.float32)
        if trial % 9 == 0:
            logits[:] = -1.0
        full = (
            F.interpolate(
                torch.from_numpy(logits)[None, None],
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            > 0
        )
        box = upsample_to_box(torch.from_numpy(logits), (height, width))
        differ += int((box.full() != full.numpy()).sum())
        total += height * width
    assert total > 5_000_000 and differ == 0


def _collection(tmp_path, n_targets=3, size=(120, 160)):
    rng = np.random.default_rng(3)
    height, width = size
    masks = {
        (1, 1): box_mask(height, width, 30, 25, 120, 90),
        (2, 1): box_mask(height, width, 50, 40, 80, 70),
    }
    template = tmp_path / "template.jpg"
    save_jpeg(template, blob_image(rng, height, width, [(30, 25, 120, 90, (200, 60, 40))]))
    targets = []
    for i in range(n_targets):
        dx = int(rng.integers(-8, 9))
        targets.append(
            save_jpeg(
                tmp_path / f"t{i}.jpg",
                blob_image(rng, height, width, [(30 + dx, 25, 120 + dx, 90, (195, 65, 45))]),
            )
        )
    return template_set([(template, masks)], {1: "body", 2: "spot"}), targets


def _same(a, b):
    """The same structures, masks and scores, up to the rounding of batched matrix
    products: their order of summation depends on the batch size and on the CPU's
    vector unit, and a pixel whose logit lies within rounding of 0 may flip (1 pixel in
    15,000 seen on AVX2)."""
    assert [(p.category_id, p.instance) for p in a] == [(p.category_id, p.instance) for p in b]
    for p, q in zip(a, b):
        differ = int((p.mask != q.mask).sum())
        assert differ <= max(2, 1e-3 * max(p.box.area, q.box.area)), differ
        assert p.predicted_iou == pytest.approx(q.predicted_iou, abs=1e-5)
        assert p.object_score == pytest.approx(q.object_score, abs=1e-5)
        assert (p.cycle_iou is None) == (q.cycle_iou is None)
        if p.cycle_iou is not None:
            assert p.cycle_iou == pytest.approx(q.cycle_iou, abs=1e-4)


@pytest.mark.parametrize("exact", [False, True])
def test_batch_gives_the_masks_of_one_at_a_time(tmp_path, tiny_model, exact):
    """Several targets per encoder and tracking call (propagate.batch_size): the same
    masks and scores as one target at a time, QC included."""
    templates, targets = _collection(tmp_path, n_targets=3)
    one = Propagator(tiny_model, templates, exact=exact)
    many = Propagator(tiny_model, templates, exact=exact, batch_size=3)
    singles = [one.predict(image) for image in targets]
    batch = many.predict_batch(targets)
    assert len(batch) == 3
    for a, b in zip(singles, batch):
        _same(a, b)
    # a short last batch, and a batch of one, too
    for a, b in zip(singles[1:], many.predict_batch(targets[1:])):
        _same(a, b)


def test_exact_and_fast_engines_agree(tmp_path, tiny_model):
    """On an image given whole, the fast path (box upsampling, cycle IoU from boxes)
    gives the exact path's masks and cycle IoUs."""
    templates, targets = _collection(tmp_path, n_targets=2)
    fast = Propagator(tiny_model, templates)
    exact = Propagator(tiny_model, templates, exact=True)
    for image in targets:
        for p, q in zip(fast.predict(image), exact.predict(image)):
            assert p.box.rle() == q.box.rle()
            assert p.cycle_iou == pytest.approx(q.cycle_iou, abs=1e-12)


def test_cycle_iou_from_boxes_equals_full_size(tmp_path, tiny_model):
    """The cycle IoU computed inside the boxes equals the one on full-size masks, for
    two templates tracked back in one batch."""
    from sam2pal.inference.engine import cycle_ious, stacked_features

    templates, targets = _collection(tmp_path, n_targets=1)
    second, _ = _collection(tmp_path / "second", n_targets=1)
    both = template_set(
        [
            (t.path, {(i.category_id, i.instance): i.mask for i in t.instances})
            for t in (templates.images[0], second.images[0])
        ],
        {1: "body", 2: "spot"},
    )
    engine = Propagator(tiny_model, both, cycle_consistency=False)
    group = engine.groups[0]
    assert len(group.templates) == 2
    with torch.inference_mode():
        backbone = tiny_model.forward_image(preprocess(targets[0], IMAGE_SIZE, tiny_model.device))
        feats = stacked_features(tiny_model, [backbone], len(group.objects))
        low_res, _, _ = engine._track(group, feats, 2, 3, group.memory)
        full = [
            (engine._templates[t].backbone, [engine._templates[t].masks[k] for k in group.objects])
            for t in group.templates
        ]
        boxes = [(b, [BoxMask.from_full(m) for m in masks]) for b, masks in full]
        assert cycle_ious(tiny_model, feats, low_res, boxes) == cycle_ious(
            tiny_model, feats, low_res, full
        )


def test_reduced_decode_keeps_the_photo_grid(tmp_path):
    """A JPEG much larger than the model's input is decoded at a reduced size (at least
    the model's size on each side), upright, and reports its full upright size; other
    formats and small JPEGs are read whole."""
    rng = np.random.default_rng(4)
    photo = np.clip(rng.normal(120, 30, (600, 800, 3)), 0, 255).astype(np.uint8)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(photo).save(plain, quality=90)
    turned = tmp_path / "turned.jpg"
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # stored sideways: upright it is 600 wide, 800 high
    Image.fromarray(photo).save(turned, quality=90, exif=exif)
    png = tmp_path / "photo.png"
    Image.fromarray(photo).save(png)

    rgb, size = read_image_reduced(plain, 128)
    assert size == (600, 800) and rgb.shape == (150, 200, 3)  # 1/4: 1/8 would go below 128
    rgb, size = read_image_reduced(turned, 128)
    assert size == (800, 600) == read_image(turned).shape[:2] and rgb.shape == (200, 150, 3)
    # the reduced photo is the full one, smaller
    full = read_image(turned).astype(float)
    small = np.asarray(
        Image.fromarray(read_image(turned)).resize((150, 200), Image.Resampling.BOX), float
    )
    assert np.abs(rgb.astype(float) - small).mean() < 6 and full.shape == (800, 600, 3)
    rgb, size = read_image_reduced(png, 128)
    assert size == (600, 800) and rgb.shape == (600, 800, 3)
    rgb, size = read_image_reduced(plain, 700)
    assert size == (600, 800) and rgb.shape == (600, 800, 3)


def test_engine_reads_large_photos_reduced_and_masks_them_full_size(tmp_path, tiny_model):
    """`read_target` + `predict(size=...)`: the masks are on the photo's full grid; with
    `exact` the photo is read whole."""
    templates, _ = _collection(tmp_path, n_targets=1)
    rng = np.random.default_rng(6)
    big = blob_image(rng, 720, 960, [(180, 150, 720, 540, (200, 60, 40))])
    path = tmp_path / "big.jpg"
    save_jpeg(path, big)
    fast = Propagator(tiny_model, templates)
    rgb, size = fast.read_target(path)
    assert size == (720, 960) and max(rgb.shape[:2]) < 960 and min(rgb.shape[:2]) >= IMAGE_SIZE
    preds = fast.predict(rgb, size=size)
    assert all(p.box.size == (720, 960) for p in preds)
    exact = Propagator(tiny_model, templates, exact=True)
    rgb, size = exact.read_target(path)
    assert rgb.shape[:2] == size == (720, 960)
    exact_preds = exact.predict(rgb)
    for p, q in zip(preds, exact_preds):
        a, b = p.mask, q.mask
        union = (a | b).sum()
        # the same structure, a few pixels apart along its outline
        assert union == 0 or (a & b).sum() / union > 0.9


def test_collection_run_in_batches_writes_the_same_records(tmp_path, tiny_model):
    """run_propagation with batch_size 3 (bad files among the photos) writes the very
    records of batch_size 1."""
    from sam2pal.inference.propagate import run_propagation

    templates, targets = _collection(tmp_path, n_targets=5)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(targets):
        Image.fromarray(image).save(images / f"p{i}.jpg", quality=95)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    names = sorted(p.name for p in images.iterdir())
    outputs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}" / "predictions.jsonl"
        counts = run_propagation(
            Propagator(tiny_model, templates, batch_size=batch),
            images,
            names,
            out,
            settings_key="k",
            progress=False,
        )
        assert counts["segmented"] == 5 and counts["skipped"] == 1
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    # the same records, up to the rounding of batched matrix products (see _same)
    assert len(outputs[0]) == len(outputs[1])
    for one, many in zip(*outputs):
        assert one.keys() == many.keys() and one["file_name"] == many["file_name"]
        assert one.get("skipped") == many.get("skipped")
        for a, b in zip(one.get("structures", []), many.get("structures", [])):
            assert a.keys() == b.keys()
            assert (a["category_id"], a["instance"]) == (b["category_id"], b["instance"])
            masks = [
                decode_segmentation(x["segmentation"], one["height"], one["width"]) for x in (a, b)
            ]
            assert (masks[0] != masks[1]).sum() <= max(2, 1e-3 * masks[0].sum())
            for key in ("predicted_iou", "object_score", "cycle_iou"):
                assert a[key] == pytest.approx(b[key], abs=1e-5)
