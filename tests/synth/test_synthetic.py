"""The synthetic specimen generator: determinism, exact ground truth, COCO output."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sam2pal.errors import InputError
from sam2pal.io.masks import decode_segmentation
from sam2pal.synth import specimens as synthetic

SMALL = (240, 180)


@pytest.fixture(scope="module")
def masks():
    return synthetic.load_beetle_masks()


def test_vendored_mask_set_has_181_label_maps_and_loads(masks):
    root = resources.files("sam2pal").joinpath("data").joinpath("neon_beetles_masks")
    pngs = [f for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".png")]
    assert len(pngs) == 181
    assert root.joinpath("LICENSE").read_text().startswith("MIT License")
    readme = root.joinpath("README.md").read_text()
    assert "vendored" in readme and "2501.06749" in readme

    assert len(masks) == 181
    names = [name for name, _ in masks]
    assert names == sorted(names)
    assert len(set(names)) == 181
    assert all("/" in n and not n.endswith(".png") for n in names)
    for _, lm in masks:
        assert lm.ndim == 2 and lm.dtype == np.uint8
        assert lm.max() <= 5 and (lm == 3).any()
    # every part occurs in most masks; five masks lack one or more parts
    complete = sum(set(np.unique(lm)) == {0, 1, 2, 3, 4, 5} for _, lm in masks)
    assert complete == 176
    # callers get their own writable copies
    fresh = synthetic.load_beetle_masks()[0][1]
    before = fresh.copy()
    fresh[:] = 5
    np.testing.assert_array_equal(synthetic.load_beetle_masks()[0][1], before)


def test_same_seed_same_image_different_seed_differs(masks):
    lm = masks[10][1]
    img_a, lab_a = synthetic.render_specimen(lm, np.random.default_rng(7), size=SMALL)
    img_b, lab_b = synthetic.render_specimen(lm, np.random.default_rng(7), size=SMALL)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(lab_a, lab_b)
    img_c, lab_c = synthetic.render_specimen(lm, np.random.default_rng(8), size=SMALL)
    assert not np.array_equal(lab_a, lab_c)
    assert np.abs(img_a.astype(int) - img_c.astype(int)).mean() > 2.0
    # render_specimen is render_specimen_layers without the extras
    r = synthetic.render_specimen_layers(lm, np.random.default_rng(7), size=SMALL)
    np.testing.assert_array_equal(r.image, img_a)
    np.testing.assert_array_equal(r.labels, lab_a)


def test_image_shape_and_dtype(masks):
    img, lab = synthetic.render_specimen(masks[0][1], np.random.default_rng(0), size=(320, 200))
    assert img.shape == (200, 320, 3) and img.dtype == np.uint8
    assert lab.shape == (200, 320) and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= set(range(6))
    # the beetle is darker than a plain substrate and the photo is not flat
    assert img[lab > 0].mean() < img[lab == 0].mean()
    assert img.std() > 5


@pytest.mark.parametrize("index", [0, 37, 90, 151, 180])
def test_label_map_keeps_parts_and_scales_their_areas(masks, index):
    name, lm = masks[index]
    style = {"scale_range": (0.4, 0.7)}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        r = synthetic.render_specimen_layers(lm, rng, size=(480, 360), style=style)
        src_parts = set(np.unique(lm)) - {0}
        assert set(np.unique(r.labels)) - {0} == src_parts, name
        for k in src_parts:
            expected = (lm == k).sum() * r.scale**2
            got = (r.labels == k).sum()
            assert abs(got - expected) <= 0.02 * expected + 4 * np.sqrt(expected) + 4, (name, k)
        # the beetle's longest extent fills the requested fraction of the shorter side
        ys, xs = np.nonzero(r.labels)
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 360
        assert 0.4 - 0.02 <= extent <= 0.7 + 0.01
        # fully inside the canvas, never touching the border
        assert not r.labels[0].any() and not r.labels[-1].any()
        assert not r.labels[:, 0].any() and not r.labels[:, -1].any()


def test_labels_are_the_nearest_neighbour_warp_of_the_source(masks):
    lm = masks[5][1]
    r = synthetic.render_specimen_layers(lm, np.random.default_rng(3), size=SMALL)
    warped = cv2.warpAffine(lm, r.matrix, SMALL, flags=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(r.labels, warped)


def test_clutter_never_overlaps_the_specimen(masks):
    style = {"clutter_prob": 1.0, "scale_range": (0.35, 0.5)}
    placed = 0
    for seed in range(12):
        lm = masks[(seed * 13) % len(masks)][1]
        rng = np.random.default_rng(seed)
        r = synthetic.render_specimen_layers(lm, rng, size=(480, 360), style=style)
        near = cv2.dilate((r.labels > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert not (r.clutter & near).any()
        placed += int(r.clutter.any())
    assert placed >= 10  # with a mid-sized beetle there is almost always room
    r = synthetic.render_specimen_layers(
        masks[0][1], np.random.default_rng(0), size=SMALL, style={"clutter": False}
    )
    assert not r.clutter.any()


def test_style_pins_generator_choices(masks):
    lm = masks[20][1]
    for seed in range(4):
        r = synthetic.render_specimen_layers(
            lm,
            np.random.default_rng(seed),
            size=SMALL,
            style={
                "palettes": ["metallic_blue"],
                "backgrounds": ["slate"],
                "flip_prob": 0.0,
                "rotation_range": (30, 30),
                "clutter": False,
            },
        )
        assert r.palette == "metallic_blue" and r.background == "slate"
        assert not r.flipped and r.angle == 30.0
        assert r.image[r.labels == 0].mean() < 100  # a dark substrate
    style = synthetic.Style(palettes=("black",), backgrounds=("paper",))
    r = synthetic.render_specimen_layers(lm, np.random.default_rng(0), size=SMALL, style=style)
    assert r.palette == "black" and r.background == "paper"
    assert synthetic.Style().palettes == synthetic.DEFAULT_PALETTES
    assert "metallic_blue" not in synthetic.DEFAULT_PALETTES


@pytest.mark.parametrize(
    "style",
    [
        {"palette": "black"},
        {"palettes": ["purple"]},
        {"backgrounds": ()},
        {"scale_range": (0.5, 1.2)},
        {"background_color": (1, 2)},
        {"clutter_prob": 2},
        {"part_colors": ((1, 2, 3),)},
        {"jpeg_quality": (0, 90)},
        {"clutter_items": ("crumbs",)},
    ],
)
def test_bad_style_is_an_input_error(masks, style):
    with pytest.raises(InputError):
        synthetic.render_specimen(masks[0][1], np.random.default_rng(0), size=SMALL, style=style)


def test_bad_label_map_is_an_input_error():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError):
        synthetic.render_specimen(np.zeros((50, 50), np.uint8), rng)
    with pytest.raises(InputError):
        synthetic.render_specimen(np.full((50, 50), 9, np.uint8), rng)


def test_make_collection_writes_loadable_exact_coco(tmp_path):
    out = tmp_path / "demo"
    info = synthetic.make_collection(out, n_images=4, n_templates=2, seed=3, size=SMALL)
    assert info["n_images"] == 4 and info["n_templates"] == 2
    assert [p.name for p in info["images"]] == [f"specimen_{i:03d}.jpg" for i in range(4)]

    gt = COCO(str(out / "ground_truth.json"))
    tpl = COCO(str(out / "templates.json"))
    assert sorted(gt.cats) == [1, 2, 3, 4, 5]
    assert [gt.cats[k]["name"] for k in range(1, 6)] == list(synthetic.PARTS.values())
    assert sorted(gt.imgs) == [1, 2, 3, 4]
    assert sorted(tpl.imgs) == [1, 2]
    assert len(gt.anns) == info["n_annotations"]
    assert len(tpl.anns) == info["n_template_annotations"]
    tpl_gt = [a for a in gt.anns.values() if a["image_id"] in (1, 2)]
    assert sorted(a["id"] for a in tpl.anns.values()) == sorted(a["id"] for a in tpl_gt)

    rendered = list(synthetic.iter_collection(4, seed=3, size=SMALL))
    assert len({name for name, _ in rendered}) == 4  # different beetles
    for image_id, (name, r) in enumerate(rendered, start=1):
        meta = gt.imgs[image_id]
        assert meta["file_name"] == f"specimen_{image_id - 1:03d}.jpg"
        assert (meta["width"], meta["height"]) == SMALL and meta["source_mask"] == name
        with Image.open(out / "images" / meta["file_name"]) as im:
            assert im.format == "JPEG" and im.size == SMALL
            photo = np.asarray(im.convert("RGB")).astype(int)
        assert np.abs(photo - r.image.astype(int)).mean() < 4  # only JPEG loss
        anns = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
        assert sorted(a["category_id"] for a in anns) == sorted(set(np.unique(r.labels)) - {0})
        for a in anns:
            assert isinstance(a["segmentation"]["counts"], str)
            truth = r.labels == a["category_id"]
            np.testing.assert_array_equal(gt.annToMask(a).astype(bool), truth)
            decoded = decode_segmentation(a["segmentation"], SMALL[1], SMALL[0])
            np.testing.assert_array_equal(decoded, truth)
            assert a["area"] == truth.sum() and a["iscrowd"] == 0
        for a in tpl.loadAnns(tpl.getAnnIds(imgIds=image_id)):
            truth = r.labels == a["category_id"]
            np.testing.assert_array_equal(tpl.annToMask(a).astype(bool), truth)

    readme = (out / "README.md").read_text()
    assert "2501.06749" in readme and "10.57967/hf/5252" in readme and "MIT" in readme
    assert "sam2pal make-demo OUT_DIR --n-images 4 --n-templates 2 --seed 3" in readme
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))

    # a smaller collection in the same folder leaves no stale images behind,
    # and its images are the first images of the larger one
    synthetic.make_collection(out, n_images=2, n_templates=1, seed=3, size=SMALL)
    left = sorted(p.name for p in (out / "images").iterdir())
    assert left == ["specimen_000.jpg", "specimen_001.jpg"]
    tpl = json.loads((out / "templates.json").read_text())
    assert [img["id"] for img in tpl["images"]] == [1]
    with Image.open(out / "images" / "specimen_001.jpg") as im:
        again = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(again - rendered[1][1].image.astype(int)).mean() < 4


def test_collection_shares_one_substrate_and_is_reproducible():
    a = list(synthetic.iter_collection(3, seed=11, size=SMALL))
    b = list(synthetic.iter_collection(3, seed=11, size=SMALL))
    assert {r.background for _, r in a} == {a[0][1].background}
    for (na, ra), (nb, rb) in zip(a, b):
        assert na == nb
        np.testing.assert_array_equal(ra.image, rb.image)
    c = list(synthetic.iter_collection(3, seed=12, size=SMALL))
    assert any(not np.array_equal(ra.image, rc.image) for (_, ra), (_, rc) in zip(a, c))


def test_make_collection_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError):
        synthetic.make_collection(tmp_path, n_images=2, n_templates=3, size=SMALL)
    with pytest.raises(InputError):
        synthetic.make_collection(tmp_path, n_images=0, n_templates=0, size=SMALL)
    with pytest.raises(InputError):
        synthetic.make_collection(
            tmp_path, n_images=1, n_templates=0, size=SMALL, mask_names=["no_such/beetle"]
        )
    info = synthetic.make_collection(
        tmp_path / "one",
        n_images=2,
        n_templates=1,
        size=SMALL,
        mask_names=["advena/beetle_100_475"],
    )
    gt = json.loads(info["ground_truth"].read_text())
    assert {img["source_mask"] for img in gt["images"]} == {"advena/beetle_100_475"}


# -- the domain-randomised appearance and zoomed crops -----------------------------------


def _hash(renderings) -> str:
    h = hashlib.sha256()
    for r in renderings:
        h.update(r.image.tobytes())
        h.update(r.labels.tobytes())
    return h.hexdigest()[:16]


def test_default_renders_are_unchanged_by_the_randomisation_options():
    """Hashes taken from the generator before the randomised appearance existed: the
    demo, test and held-out collections stay byte-identical."""
    assert (
        _hash(r for _, r in synthetic.iter_collection(3, seed=3, size=SMALL)) == "022ff3b3b8b937c7"
    )
    held = {"palettes": ("metallic_blue",), "backgrounds": ("slate",)}
    assert (
        _hash(r for _, r in synthetic.iter_collection(2, seed=101, size=SMALL, style=held))
        == "cd5c4d754ee5797c"
    )
    st = synthetic.Style()
    assert st.part_colors is None and st.jpeg_quality is None and st.motion_blur_prob == 0.0
    assert (
        st.backgrounds == synthetic.DEFAULT_BACKGROUNDS
        and st.clutter_items == synthetic.CLUTTER_ITEMS
    )


def _lab_l(rgb) -> float:
    return float(cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2Lab)[0, 0, 0]) * 100 / 255


def _hue(rgb) -> tuple[float, float]:
    h, s, _ = cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV_FULL)[0, 0]
    return float(h) * 360 / 256, float(s) / 255


def test_randomised_styles_flip_the_contrast_and_cover_the_colour_wheel():
    light_on_dark, sectors = 0, {"ground": set(), "elytra": set(), "legs": set()}
    kinds = set()
    for seed in range(200):
        st = synthetic.randomised_style(np.random.default_rng(seed))
        assert st == synthetic.randomised_style(np.random.default_rng(seed))
        ground = _lab_l(st.background_color)
        parts = [_lab_l(c) for c in st.part_colors]
        # every part on the same side of the ground, clearly (L* differs by >= 20)
        light = all(p >= ground + 20 for p in parts)
        assert light or all(p <= ground - 20 for p in parts), (seed, ground, parts)
        light_on_dark += light
        for name, rgb in (
            ("ground", st.background_color),
            ("elytra", st.part_colors[2]),
            ("legs", st.part_colors[4]),
        ):
            hue, sat = _hue(rgb)
            if sat > 0.2:
                sectors[name].add(int(hue // 60))
        kinds |= set(st.backgrounds)
        assert 40 <= st.jpeg_quality[0] <= st.jpeg_quality[1] <= 95
    assert 0.35 <= light_on_dark / 200 <= 0.65
    assert all(found == set(range(6)) for found in sectors.values()), sectors
    assert kinds == set(synthetic.RANDOMISED_BACKGROUNDS)


def test_low_contrast_styles_keep_the_lightness_near_the_ground_and_the_colour_apart():
    darker = 0
    for seed in range(200):
        st = synthetic.randomised_style(np.random.default_rng(seed), low_contrast=True)
        assert st == synthetic.randomised_style(np.random.default_rng(seed), low_contrast=True)
        ground = synthetic._lab(st.background_color)
        parts = [synthetic._lab(c) for c in st.part_colors]
        gaps = [p[0] - ground[0] for p in parts]
        # every part on one side of the ground, within 22 L* units (and a rounding)
        assert all(-23 < g < 0 for g in gaps) or all(0 < g < 23 for g in gaps), (seed, gaps)
        # and told apart from it in L*a*b*
        assert min(np.linalg.norm(p - ground) for p in parts) >= 14.5, seed
        darker += gaps[0] < 0
    assert 0.3 <= darker / 200 <= 0.7


def test_randomised_rendering_is_deterministic_keeps_the_labels_and_the_contrast_sign(masks):
    for seed in range(8):
        st = synthetic.randomised_style(np.random.default_rng(seed))
        lm = masks[seed * 20][1]
        a = synthetic.render_specimen_layers(
            lm, np.random.default_rng(50 + seed), size=SMALL, style=st
        )
        b = synthetic.render_specimen_layers(
            lm, np.random.default_rng(50 + seed), size=SMALL, style=st
        )
        np.testing.assert_array_equal(a.image, b.image)
        assert a.palette == "custom"
        # the appearance changes the photo, never the pose: same labels as a plain render
        plain = synthetic.render_specimen_layers(
            lm, np.random.default_rng(50 + seed), size=SMALL, style={"scale_range": st.scale_range}
        )
        np.testing.assert_array_equal(a.labels, plain.labels)
        assert np.abs(a.image.astype(int) - plain.image.astype(int)).mean() > 5
        # the rendered specimen is lighter than the ground exactly when the style says so
        lum = cv2.cvtColor(a.image, cv2.COLOR_RGB2Lab)[..., 0].astype(float)
        body = np.isin(a.labels, (1, 2, 3))
        ground = (a.labels == 0) & ~a.clutter
        light = _lab_l(st.part_colors[2]) > _lab_l(st.background_color)
        assert (np.median(lum[body]) > np.median(lum[ground])) == light, seed


def test_camera_effects_are_the_render_camera_stage(masks):
    st = synthetic.randomised_style(np.random.default_rng(3))
    lm = masks[7][1]
    clean = synthetic.render_specimen_layers(
        lm, np.random.default_rng(1), size=SMALL, style=synthetic.without_camera(st)
    )
    photo = synthetic.camera_effects(clean.image, np.random.default_rng(2), st)
    again = synthetic.camera_effects(clean.image, np.random.default_rng(2), st)
    np.testing.assert_array_equal(photo, again)
    assert photo.shape == clean.image.shape and photo.dtype == np.uint8
    assert 1.0 < np.abs(photo.astype(int) - clean.image.astype(int)).mean() < 20
    with pytest.raises(InputError):
        synthetic.camera_effects(clean.labels, np.random.default_rng(2), st)


_CODES = np.array(
    [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]], np.uint8
)


def _fill(mask, size) -> float:
    ys, xs = np.nonzero(mask)
    return max((xs.max() - xs.min() + 1) / size[0], (ys.max() - ys.min() + 1) / size[1])


@pytest.mark.parametrize("part,fill", [(1, 0.2), (2, 0.5), (3, 0.8), (0, 0.25), (0, 0.95)])
def test_zoom_crop_makes_the_part_fill_the_asked_share_in_every_frame(masks, part, fill):
    lm = masks[12][1]
    frames = [
        synthetic.render_specimen_layers(
            lm, np.random.default_rng(s), size=(320, 240), style={"scale_range": (0.3, 0.5)}
        )
        for s in (4, 5)
    ]
    size = (256, 192)
    images, labels, windows = synthetic.zoom_crop(
        [f.image for f in frames],
        [f.labels for f in frames],
        part,
        fill,
        size,
        np.random.default_rng(0),
    )
    for f, img, lab, (x0, y0, cw, ch) in zip(frames, images, labels, windows):
        assert img.shape == (192, 256, 3) and img.dtype == np.uint8 and lab.shape == (192, 256)
        shown = lab > 0 if part == 0 else lab == part
        assert abs(_fill(shown, size) - fill) <= 0.03
        assert abs(cw / ch - 256 / 192) < 1e-9
        # image and label map go through the same window: the labels are the nearest
        # warp of the frame's labels, the picture is the frame's picture there
        m = np.array(
            [[256 / cw, 0, (0.5 - x0) * 256 / cw - 0.5], [0, 192 / ch, (0.5 - y0) * 192 / ch - 0.5]]
        )
        expected = cv2.warpAffine(
            f.labels, m, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
        )
        np.testing.assert_array_equal(lab, expected)
        assert set(np.unique(lab)) <= set(np.unique(f.labels))
    # a picture that is its own label map, colour-coded, comes out aligned with the labels
    coded = [_CODES[f.labels] for f in frames]
    images2, labels2, windows2 = synthetic.zoom_crop(
        coded, [f.labels for f in frames], part, fill, size, np.random.default_rng(0)
    )
    for img, lab, window in zip(images2, labels2, windows2):
        if window[2] > 256:  # shrunk: parts thinner than a pixel leave the nearest-neighbour labels
            continue
        reach = 2 * int(np.ceil(2 * max(256 / window[2], 1.0))) + 1  # two source pixels
        inner = np.zeros(lab.shape, bool)
        for k in np.unique(lab):  # pixels away from every label edge
            inner |= (
                cv2.erode(
                    (lab == k).astype(np.uint8),
                    np.ones((reach, reach), np.uint8),
                    borderType=cv2.BORDER_CONSTANT,
                    borderValue=0,
                )
                > 0
            )
        assert inner.sum() > 0.3 * lab.size
        assert np.abs(img[inner].astype(int) - _CODES[lab[inner]].astype(int)).max() <= 2
    again = synthetic.zoom_crop(
        [f.image for f in frames],
        [f.labels for f in frames],
        part,
        fill,
        size,
        np.random.default_rng(0),
    )
    assert all(np.array_equal(a, b) for a, b in zip(again[0], images))


def test_zoom_crop_rejects_bad_arguments(masks):
    r = synthetic.render_specimen_layers(masks[0][1], np.random.default_rng(0), size=SMALL)
    rng = np.random.default_rng(0)
    for part, fill in ((6, 0.5), (1, 0.0), (1, 1.5)):
        with pytest.raises(InputError):
            synthetic.zoom_crop([r.image], [r.labels], part, fill, SMALL, rng)
    with pytest.raises(InputError, match="does not show part"):
        synthetic.zoom_crop([r.image], [np.where(r.labels == 1, 0, r.labels)], 1, 0.5, SMALL, rng)
    with pytest.raises(InputError):
        synthetic.zoom_crop([r.image], [r.labels[:10]], 1, 0.5, SMALL, rng)


@pytest.mark.parametrize("heading", [0.0, 90.0, 200.0])
def test_heading_points_every_head_one_way(masks, heading):
    """Style.heading: rotation_range is the direction the head points (0 right, 90 up),
    whatever the source label map's own pose, mirrored or not."""
    style = synthetic.Style(rotation_range=(heading, heading), heading=True, clutter=False)
    want = np.array([np.cos(np.radians(heading)), -np.sin(np.radians(heading))])
    for index in (0, 7, 40, 90):
        lm = masks[index][1]
        for seed in (1, 2):
            r = synthetic.render_specimen_layers(
                lm, np.random.default_rng(seed), size=(360, 360), style=style
            )
            head = np.argwhere(r.labels == 1).mean(axis=0)
            body = np.argwhere(np.isin(r.labels, (1, 2, 3))).mean(axis=0)
            direction = (head - body)[::-1]  # (x, y)
            direction /= np.linalg.norm(direction)
            assert direction @ want > 0.99, (index, seed)
