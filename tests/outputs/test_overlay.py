"""Overlays a person can read: one colour per structure for a whole collection, from
published colour-blind-safe palettes; small and thin parts outlined, not hidden; labels
that overlap neither each other nor the legend; a legend with every structure's QC
score. Inputs are numpy masks and the project's own RLE helpers (no model runs)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from sam2pal.io.masks import encode_rle
from sam2pal.outputs.overlay import (
    PALETTE,
    Sizes,
    Structure,
    boxes_overlap,
    is_outlined,
    render_overlay,
    structure_colours,
    structure_style,
)
from sam2pal.outputs.visualize import overlay_structures, score_notes

# the published palettes, as their authors give them
OKABE_ITO = ["E69F00", "56B4E9", "009E73", "F0E442", "0072B2", "D55E00", "CC79A7", "000000"]
TOL_MUTED = ["CC6677", "332288", "DDCC77", "117733", "88CCEE", "882255", "44AA99", "999933"]
TOL_MUTED += ["AA4499"]
TOL_LIGHT = ["77AADD", "99DDFF", "44BB99", "BBCC33", "AAAA00", "EEDD88", "EE8866", "FFAABB"]
PUBLISHED = {
    tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in OKABE_ITO + TOL_MUTED + TOL_LIGHT
}


def lab(colour) -> np.ndarray:
    rgb = np.array([[colour]], np.float32) / 255
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[0, 0]


def disc(shape, cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xx - cx, yy - cy) <= r


def test_colours_are_published_distinct_and_fixed():
    assert set(PALETTE) <= PUBLISHED and len(set(PALETTE)) == len(PALETTE) == 20
    for a, b in itertools.combinations(PALETTE, 2):
        assert np.linalg.norm(lab(a) - lab(b)) >= 18  # CIELAB ΔE76
    categories = {cid: f"part{cid}" for cid in range(1, 21)}
    colours = structure_colours(categories)
    assert len(set(colours.values())) == 20
    # the same collection gets the same colours whatever the order it lists them in
    shuffled = dict(reversed(list(categories.items())))
    assert structure_colours(shuffled) == colours == structure_colours(categories)
    assert set(structure_style(categories).values()) == {"solid"}
    # past 20 structures colours repeat, told apart by the outline's style
    more = {cid: f"part{cid}" for cid in range(1, 43)}
    styles = structure_style(more)
    assert structure_colours(more)[21] == colours[1] and styles[21] == "dashed"
    assert styles[41] == "dotted" and styles[1] == "solid"


def annotation(ann_id, cid, mask, instance=1, **scores):
    return {
        "id": ann_id,
        "category_id": cid,
        "instance": instance,
        "segmentation": encode_rle(mask),
        **scores,
    }


def test_same_structure_same_colour_on_every_image():
    categories = {1: "head", 2: "antenna", 3: "eye"}
    info = {"height": 480, "width": 640}
    big = disc((480, 640), 320, 240, 150)
    small = disc((480, 640), 100, 100, 5)
    first = overlay_structures([annotation(1, 2, small, cycle_iou=0.8)], info, categories)
    second = overlay_structures(
        [annotation(2, 1, big, cycle_iou=0.9), annotation(3, 2, small, cycle_iou=0.7)],
        info,
        categories,
    )
    colour = {s.name: s.colour for s in first}
    assert colour == {s.name: s.colour for s in second}
    assert len(set(colour.values())) == 3
    # and on the pictures: the antenna's edge has its colour on both
    edge = small & ~cv2.erode(small.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for structures in (first, second):
        out = render_overlay(np.full((480, 640, 3), 128, np.uint8), structures, legend=False)
        assert (out.image[edge] == colour["antenna"]).all(axis=1).mean() > 0.8


def test_small_and_thin_structures_are_outlined_not_filled():
    photo = np.full((600, 800, 3), 128, np.uint8)
    tiny = disc((600, 800), 300, 300, 8)
    thin = np.zeros((600, 800), bool)
    thin[100:106, 100:500] = True
    large = np.zeros((600, 800), bool)
    large[300:550, 500:780] = True
    assert is_outlined(tiny) and is_outlined(thin) and not is_outlined(large)
    colours = structure_colours({1: "eye", 2: "seta", 3: "elytra"})
    structures = [
        Structure(tiny, "eye", colours[1]),
        Structure(thin, "seta", colours[2]),
        Structure(large, "elytra", colours[3]),
    ]
    out = render_overlay(photo, structures, legend=False)
    image = out.image
    assert sorted(out.outlined) == ["eye", "seta"]
    # inside the tiny mask, away from its edge, the photo is untouched (the leader line
    # of its label stops at its edge)
    inner = cv2.erode(tiny.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert inner.sum() > 40 and (image[inner] == 128).all()
    # its edge pixels take its colour (but where the leader line meets it)
    edge = tiny & ~cv2.erode(tiny.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert (image[edge] == colours[1]).all(axis=1).mean() > 0.9
    assert (image[102:104, 300] == 128).all()  # the middle of the thin part
    assert tuple(image[100, 300]) == colours[2]
    # the large structure is filled: its inside is tinted towards its colour
    tinted = image[420, 640].astype(int)
    assert np.abs(tinted - 128).max() > 20
    assert np.sign(tinted - 128).tolist() == np.sign(np.array(colours[3]) - 128).tolist()


def crowded(n: int, shape=(1200, 1600)):
    """`n` small structures crowded in the top-left corner of the image."""
    categories = {cid: f"structure {cid}" for cid in range(1, n + 1)}
    colours = structure_colours(categories)
    structures = []
    for k, cid in enumerate(categories):
        cx, cy = 30 + 25 * (k % 5), 30 + 25 * (k // 5)
        mask = disc(shape, cx, cy, 8)
        structures.append(Structure(mask, categories[cid], colours[cid], score=0.5 + k / 100))
    return structures


@pytest.mark.parametrize("corner", [None, "top-left"])
def test_labels_never_overlap_each_other_nor_the_legend(corner):
    structures = crowded(15)
    photo = np.full((1200, 1600, 3), 200, np.uint8)
    out = render_overlay(photo, structures, legend_corner=corner)
    assert out.legend is not None
    assert out.legend_corner == (corner or out.legend_corner)
    assert set(out.labels) == {s.name for s in structures}  # everyone got a label
    boxes = list(out.labels.values())
    for a, b in itertools.combinations(boxes, 2):
        assert not boxes_overlap(a, b)
    for box in boxes:
        assert not boxes_overlap(box, out.legend)
        assert 0 <= box[0] < box[2] <= 1600 and 0 <= box[1] < box[3] <= 1200
    # the legend avoids the crowded corner when it is free to choose
    if corner is None:
        assert out.legend_corner != "top-left"


def test_legend_lists_every_structure_with_its_score():
    categories = {1: "head", 2: "antenna", 3: "eye", 4: "scape"}
    info = {"height": 300, "width": 400}
    head = disc((300, 400), 200, 150, 60)
    left, right = disc((300, 400), 100, 60, 10), disc((300, 400), 300, 60, 10)
    anns = [
        annotation(1, 1, head, cycle_iou=0.834, predicted_iou=0.9),
        annotation(2, 2, left, 1, cycle_iou=0.7, predicted_iou=0.95),
        annotation(3, 2, right, 2, cycle_iou=None, predicted_iou=0.912),
        annotation(4, 4, disc((300, 400), 200, 40, 6), keyframe=True, cycle_iou=None),
    ]
    structures = overlay_structures(anns, info, categories)
    out = render_overlay(np.full((300, 400, 3), 90, np.uint8), structures)
    assert out.legend_rows == [
        ("head", "0.83"),
        ("antenna_1", "0.70"),
        ("antenna_2", "0.91 p"),
        ("eye", "not found"),
        ("scape", "keyframe"),
    ]
    assert "eye" not in out.labels and "antenna_2" in out.labels


def test_the_legend_says_what_its_scores_are_with_and_without_stability():
    """Predictions written before the masks' stability was recorded score by the IoU
    alone (`qc.structure_score`), and the legend's notes say so."""
    categories = {1: "head", 2: "antenna"}
    info = {"height": 300, "width": 400}
    anns = [
        annotation(1, 1, disc((300, 400), 200, 150, 60), cycle_iou=0.8, predicted_iou=0.9),
        annotation(2, 2, disc((300, 400), 100, 60, 10), cycle_iou=None, predicted_iou=0.9),
    ]
    structures = overlay_structures(anns, info, categories)
    assert score_notes(structures, stability=False) == [
        "QC score: cycle IoU (as in qc.csv)",
        "p: SAM2's predicted IoU (no cycle IoU)",
    ]
    assert score_notes(structures) == [
        "QC score: cycle IoU x mask stability (as in qc.csv)",
        "p: SAM2's predicted IoU x mask stability (no cycle IoU)",
    ]


def test_text_scales_with_the_output():
    """Label text is about 1.35 % of the longer side: 22 px on a 1600 px overlay."""
    assert Sizes.of(1200, 1600).font == 22 and Sizes.of(600, 800).font == 12
    structures = crowded(3, shape=(1200, 1600))
    out = render_overlay(np.full((1200, 1600, 3), 200, np.uint8), structures)
    heights = {box[3] - box[1] for box in out.labels.values()}
    assert min(heights) >= 22


def test_repeated_colours_are_drawn_dashed():
    photo = np.full((400, 400, 3), 128, np.uint8)
    ring = disc((400, 400), 200, 200, 150) & ~disc((400, 400), 200, 200, 100)
    solid = render_overlay(photo, [Structure(ring, "a", PALETTE[0])], legend=False).image
    dashed = render_overlay(
        photo, [Structure(ring, "a", PALETTE[0], style="dashed")], legend=False
    ).image
    near = [np.abs(im.astype(int) - PALETTE[0]).sum(axis=2) < 60 for im in (solid, dashed)]
    on_solid, on_dashed = near[0].sum(), near[1].sum()
    assert 0 < on_dashed < 0.8 * on_solid


def test_too_small_a_picture_leaves_the_legend_out():
    mask = disc((40, 50), 25, 20, 10)
    out = render_overlay(np.zeros((40, 50, 3), np.uint8), [(mask, "head", PALETTE[0])])
    assert out.legend is None and out.image.shape == (40, 50, 3)


def write_collection(folder, n_images=3, shape=(600, 800)):
    """`n_images` grey frames with a head that moves from the bottom left to the top
    right, and a small eye below the middle; their predictions.json (COCO, RLE masks,
    QC fields)."""
    from PIL import Image

    images_dir = folder / "images"
    images_dir.mkdir()
    images, anns = [], []
    for k in range(n_images):
        name = f"{k:05d}.jpg"
        Image.fromarray(np.full((*shape, 3), 120, np.uint8)).save(images_dir / name)
        images.append(
            {"id": k, "file_name": name, "height": shape[0], "width": shape[1], "frame_index": k}
        )
        x, y = 150 + 250 * k, 450 - 150 * k
        for cid, mask in ((1, disc(shape, x, y, 120)), (2, disc(shape, 400, 540, 8))):
            anns.append(
                annotation(len(anns) + 1, cid, mask, cycle_iou=0.8, predicted_iou=0.9)
                | {"image_id": k, "area": int(mask.sum()), "score": 0.9, "iscrowd": 0}
            )
    categories = [{"id": 1, "name": "head"}, {"id": 2, "name": "eye"}]
    pred = folder / "predictions.json"
    pred.write_text(
        __import__("json").dumps({"images": images, "annotations": anns, "categories": categories})
    )
    return pred, images_dir


def test_a_video_keeps_its_legend_in_one_place(tmp_path):
    from sam2pal.outputs.visualize import image_groups, render_images

    pred, images_dir = write_collection(tmp_path)
    corners = {}
    for steady in (False, True):
        categories, _, groups = image_groups(pred)
        drawn = list(render_images(categories, groups, images_dir, steady_legend=steady))
        corners[steady] = [d.legend_corner for _, d in drawn]
        for _, d in drawn:
            assert d.legend_rows == [("head", "0.80"), ("eye", "0.80")]
    assert len(set(corners[False])) > 1  # each frame alone takes its emptiest corner
    assert len(set(corners[True])) == 1 and corners[True][0] == corners[False][0]


def test_gallery_and_video_are_drawn_like_the_overlays(tmp_path):
    """The report's gallery and the overlay video use the same drawing: colours of the
    collection, outlines, legend (their pictures match the overlays' at the same
    size)."""
    from PIL import Image

    from sam2pal.io.video import count_frames
    from sam2pal.outputs.report import write_gallery
    from sam2pal.outputs.visualize import write_overlay_video, write_overlays

    pred, images_dir = write_collection(tmp_path)
    qc = tmp_path / "qc.csv"
    qc.write_text(
        "rank,file_name,status,qc_score\n1,00001.jpg,ok,0.8\n2,00000.jpg,ok,0.8\n"
        "3,00002.jpg,ok,0.8\n"
    )
    assert write_gallery(pred, qc, images_dir, tmp_path / "gallery", size=1, max_side=800) == 2
    assert write_overlays(pred, images_dir, tmp_path / "overlays", max_side=800) == 3
    gallery = np.asarray(Image.open(tmp_path / "gallery" / "worst_01_00001.jpg"), int)
    overlay = np.asarray(Image.open(tmp_path / "overlays" / "00001.jpg"), int)
    assert gallery.shape == overlay.shape == (600, 800, 3)
    assert np.abs(gallery - overlay).mean() < 2  # the same picture, but for JPEG
    # the eye (small) keeps the photo inside its outline; the head is tinted
    assert np.abs(overlay[540, 400] - 120).max() < 12
    assert np.abs(overlay[300, 360] - 120).max() > 25
    assert write_overlay_video(pred, images_dir, tmp_path / "overlay.mp4", fps=5) == 3
    assert count_frames(tmp_path / "overlay.mp4") == 3


def test_a_long_legend_shrinks_to_fit_and_marks_repeated_colours():
    """25 structures on an 800 x 600 overlay: the legend still lists all of them (in
    smaller text), and the five past the palette are drawn dashed."""
    shape = (600, 800)
    categories = {cid: f"part {cid}" for cid in range(1, 26)}
    colours, styles = structure_colours(categories), structure_style(categories)
    structures = [
        Structure(disc(shape, 60 + 28 * k, 300, 10), name, colours[cid], 0.9, style=styles[cid])
        for k, (cid, name) in enumerate(categories.items())
    ]
    out = render_overlay(np.full((*shape, 3), 128, np.uint8), structures)
    assert [name for name, _ in out.legend_rows] == list(categories.values())
    assert [s.style for s in structures].count("dashed") == 5
    assert out.legend[3] - out.legend[1] <= 600
