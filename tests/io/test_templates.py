"""Loading and validating templates (COCO files and PNG masks), and their round trip."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam2pal.errors import InputError
from sam2pal.io.templates import (
    TemplateImage,
    TemplateInstance,
    TemplateSet,
    load_coco_templates,
    load_png_templates,
    load_templates,
    save_template_set,
    to_coco,
)

W, H = 48, 32  # template photo size (width x height)


def photo(path: Path, width=W, height=H, orientation=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[274] = orientation
        options["exif"] = exif
    Image.fromarray(pixels).save(path, **options)
    return path


def square(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with background, as COCO defines them."""
    flat = mask.T.reshape(-1)
    runs, current, length = [], False, 0
    for value in flat:
        if bool(value) == current:
            length += 1
        else:
            runs.append(length)
            current, length = bool(value), 1
    runs.append(length)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def ring() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[4:24, 10:40] = True
    mask[10:18, 20:30] = False  # the hole
    return mask


def write_coco(path: Path, images, annotations, categories=None) -> Path:
    if categories is None:
        categories = [{"id": 1, "name": "head"}, {"id": 2, "name": "antenna"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def image_entry(image_id, file_name, width=W, height=H):
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def ann(ann_id, image_id, category_id, segmentation):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
    }


@pytest.fixture
def collection(tmp_path):
    """Two annotated templates, one unannotated image, and an unused category."""
    photo(tmp_path / "t1.png")
    photo(tmp_path / "t2.png")
    left = np.zeros((H, W), bool)
    left[2:6, 2:12] = True
    images = [image_entry(1, "t1.png"), image_entry(2, "t2.png"), image_entry(3, "unannotated.jpg")]
    annotations = [
        ann(7, 1, 2, [square(30, 2, 44, 6)]),  # antenna, annotated second: instance 2
        ann(3, 1, 2, uncompressed(left)),  # antenna, instance 1
        ann(5, 1, 1, compressed(ring())),  # head with a hole
        ann(9, 2, 1, [square(4, 4, 14, 14), square(30, 20, 40, 28)]),  # head in two parts
    ]
    categories = [{"id": 1, "name": "head"}, {"id": 2, "name": "antenna"}, {"id": 3, "name": "leg"}]
    path = write_coco(tmp_path / "templates.json", images, annotations, categories)
    return path, left


# -- COCO -----------------------------------------------------------------------------


def test_coco_templates(collection, tmp_path):
    path, left = collection
    ts = load_coco_templates(path)
    # the unannotated image is ignored (its file does not even exist), 'leg' is dropped
    assert ts.categories == {1: "head", 2: "antenna"}
    assert [im.file_name for im in ts.images] == ["t1.png", "t2.png"]
    t1, t2 = ts.images
    assert t1.path == (tmp_path / "t1.png").resolve() and t1.path.is_absolute()
    assert (t1.width, t1.height, t1.image_id) == (W, H, 1)

    # instances in annotation-id order, ranked within their category
    assert [(i.annotation_id, i.category_id, i.instance) for i in t1.instances] == [
        (3, 2, 1),
        (5, 1, 1),
        (7, 2, 2),
    ]
    antenna1, head, antenna2 = t1.instances
    assert all(i.mask.dtype == bool and i.mask.shape == (H, W) for i in t1.instances)
    assert np.array_equal(antenna1.mask, left)  # uncompressed RLE, exact
    assert np.array_equal(head.mask, ring())  # compressed RLE, hole kept
    assert not head.mask[14, 25]
    assert antenna2.mask[4, 37] and not antenna2.mask[10, 37]

    # a polygon annotation in two parts gives one mask with both parts
    (parts,) = t2.instances
    count, _ = cv2.connectedComponents(parts.mask.astype(np.uint8))
    assert count - 1 == 2
    assert parts.mask[9, 9] and parts.mask[24, 35] and not parts.mask[18, 22]

    assert ts.structures() == [(1, 1), (2, 1), (2, 2)]


def test_coco_image_lookup(tmp_path):
    photos = tmp_path / "photos"
    photo(photos / "drawer1" / "t1.png")
    json_dir = tmp_path / "annotations"
    json_dir.mkdir()
    path = write_coco(
        json_dir / "t.json",
        [image_entry(1, "drawer1/t1.png")],
        [ann(1, 1, 1, [square(2, 2, 20, 20)])],
    )
    # not next to the JSON: the message says where it looked
    with pytest.raises(InputError) as info:
        load_coco_templates(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "photo not found" in message
    assert str(json_dir / "drawer1" / "t1.png") in message and "\n" not in message

    ts = load_coco_templates(path, image_dir=photos)
    assert ts.images[0].path == photos / "drawer1" / "t1.png"

    # an explicit "path" (relative to the JSON file) is used first
    data = json.loads(path.read_text())
    data["images"][0]["path"] = "../photos/drawer1/t1.png"
    path.write_text(json.dumps(data))
    assert load_coco_templates(path).images[0].path == photos / "drawer1" / "t1.png"


def test_coco_file_names_with_a_tool_folder_in_front(tmp_path):
    """CVAT / Label Studio exports put their own folders before the photo's name."""
    photo(tmp_path / "photos" / "t1.png")
    path = write_coco(
        tmp_path / "export.json",
        [image_entry(1, "/data/upload/1/t1.png")],
        [ann(1, 1, 1, [square(2, 2, 20, 20)])],
    )
    ts = load_coco_templates(path, image_dir=tmp_path / "photos")
    assert ts.images[0].path == tmp_path / "photos" / "t1.png"
    assert ts.images[0].file_name == "/data/upload/1/t1.png"


def test_round_trip(collection, tmp_path):
    path, _ = collection
    ts = load_coco_templates(path)
    out = tmp_path / "normalised" / "templates.json"
    save_template_set(ts, out)
    again = load_coco_templates(out)
    assert again == ts
    assert np.array_equal(again.images[0].instances[1].mask, ring())

    data = json.loads(out.read_text())
    assert data == to_coco(ts)
    assert {im["path"] for im in data["images"]} == {
        str(tmp_path / "t1.png"),
        str(tmp_path / "t2.png"),
    }
    first = data["annotations"][0]
    assert isinstance(first["segmentation"]["counts"], str)
    assert first["iscrowd"] == 0 and first["instance"] == 1
    assert not list(out.parent.glob(".*"))  # no temporary file left behind

    # a valid COCO file: pycocotools reads it and decodes the same masks
    coco = COCO(str(out))
    for image in ts.images:
        for inst in image.instances:
            record = coco.anns[inst.annotation_id]
            assert np.array_equal(coco.annToMask(record).astype(bool), inst.mask)
            assert record["area"] == int(inst.mask.sum())
            x, y, w, h = record["bbox"]
            ys, xs = np.nonzero(inst.mask)
            assert (x, y, w, h) == (
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            )


def test_template_equality_compares_masks():
    mask = np.zeros((2, 2), bool)
    other = mask.copy()
    other[0, 0] = True
    assert TemplateInstance(1, 1, 1, mask) == TemplateInstance(1, 1, 1, mask.copy())
    assert TemplateInstance(1, 1, 1, mask) != TemplateInstance(1, 1, 1, other)


def test_select(tmp_path):
    for name in ["c.png", "a.png", "b.png"]:
        photo(tmp_path / name)
    images = [image_entry(1, "c.png"), image_entry(2, "a.png"), image_entry(3, "b.png")]
    annotations = [
        ann(1, 1, 1, [square(2, 2, 9, 9)]),
        ann(2, 2, 1, [square(2, 2, 9, 9)]),
        ann(3, 3, 1, [square(2, 2, 9, 9)]),
        ann(4, 1, 2, [square(20, 2, 29, 9)]),  # only c.png shows an antenna
    ]
    ts = load_coco_templates(write_coco(tmp_path / "t.json", images, annotations))
    assert [im.file_name for im in ts.images] == ["c.png", "a.png", "b.png"]

    picked = ts.select(["b.png", "c.png"])
    assert [im.file_name for im in picked.images] == ["b.png", "c.png"]
    assert picked.categories == {1: "head", 2: "antenna"}

    first_two = ts.select(max_templates=2)
    assert [im.file_name for im in first_two.images] == ["a.png", "b.png"]
    assert first_two.categories == {1: "head"}  # nobody annotates the antenna any more
    assert first_two.structures() == [(1, 1)]

    assert [
        im.file_name for im in ts.select(["b.png", "a.png", "c.png"], max_templates=1).images
    ] == ["b.png"]
    assert ts.select() == ts

    with pytest.raises(
        InputError, match=r"unknown template file name\(s\) 'd.png'.*'a.png', 'b.png', 'c.png'"
    ):
        ts.select(["a.png", "d.png"])
    with pytest.raises(InputError, match="max_templates"):
        ts.select(max_templates=0)


# -- COCO validation ------------------------------------------------------------------


def coco_error(tmp_path, images=None, annotations=None, categories=None, raw=None) -> str:
    photo(tmp_path / "t1.png")
    path = tmp_path / "bad.json"
    if raw is not None:
        path.write_text(raw)
    else:
        write_coco(
            path,
            [image_entry(1, "t1.png")] if images is None else images,
            [ann(1, 1, 1, [square(2, 2, 20, 20)])] if annotations is None else annotations,
            categories,
        )
    with pytest.raises(InputError) as info:
        load_coco_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message


def test_coco_valid_baseline(tmp_path):
    photo(tmp_path / "t1.png")
    path = write_coco(
        tmp_path / "ok.json", [image_entry(1, "t1.png")], [ann(1, 1, 1, [square(2, 2, 20, 20)])]
    )
    assert load_coco_templates(path).structures() == [(1, 1)]


def test_coco_invalid_json(tmp_path):
    message = coco_error(tmp_path, raw='{"images": [}')
    assert "invalid JSON" in message and "line 1" in message


def test_coco_missing_keys(tmp_path):
    message = coco_error(tmp_path, raw=json.dumps({"images": [], "categories": []}))
    assert "missing top-level key(s) 'annotations'" in message


def test_coco_file_not_found(tmp_path):
    with pytest.raises(InputError, match="template file not found"):
        load_coco_templates(tmp_path / "absent.json")


def test_coco_size_mismatch(tmp_path):
    message = coco_error(tmp_path, images=[image_entry(1, "t1.png", width=50, height=32)])
    assert "image 1 ('t1.png')" in message
    assert "50x32" in message and f"{W}x{H}" in message and "swapped" not in message


def test_coco_size_swapped_by_exif_rotation(tmp_path):
    # the photo is stored 48 wide and 32 high but displayed rotated: 32 x 48
    photo(tmp_path / "rot.jpg", orientation=6)
    message = coco_error(
        tmp_path,
        images=[image_entry(1, "rot.jpg", width=W, height=H)],
        annotations=[ann(1, 1, 1, [square(2, 2, 20, 20)])],
    )
    assert f"{W}x{H}" in message and f"{H}x{W}" in message
    assert "swapped" in message and "EXIF rotation" in message


def test_coco_unknown_image_id(tmp_path):
    message = coco_error(tmp_path, annotations=[ann(4, 99, 1, [square(2, 2, 20, 20)])])
    assert "annotation 4" in message and "image id 99" in message


def test_coco_unknown_category_id(tmp_path):
    message = coco_error(tmp_path, annotations=[ann(4, 1, 42, [square(2, 2, 20, 20)])])
    assert "annotation 4" in message and "category id 42" in message and "'t1.png'" in message


def test_coco_empty_mask(tmp_path):
    message = coco_error(tmp_path, annotations=[ann(6, 1, 1, compressed(np.zeros((H, W), bool)))])
    assert "annotation 6" in message and "empty mask" in message


def test_coco_polygon_outside_image(tmp_path):
    message = coco_error(tmp_path, annotations=[ann(6, 1, 1, [square(30, 10, 60, 20)])])
    assert "annotation 6" in message and "outside the image" in message and f"{W}x{H}" in message


def test_coco_rle_size_mismatch(tmp_path):
    wrong = compressed(np.ones((H + 1, W), bool))
    message = coco_error(tmp_path, annotations=[ann(6, 1, 1, wrong)])
    assert "annotation 6" in message and f"RLE size is {H + 1}x{W} (height x width)" in message
    assert f"image is {H}x{W}" in message


def test_coco_corrupt_rle_counts(tmp_path):
    good = compressed(ring())
    too_long = dict(good, counts=good["counts"] + "X1")
    message = coco_error(tmp_path, annotations=[ann(6, 1, 1, too_long)])
    assert "annotation 6" in message and "invalid segmentation" in message
    message = coco_error(tmp_path, annotations=[ann(6, 1, 1, {"size": [H, W], "counts": [5, 3]})])
    assert "annotation 6" in message and "do not add up" in message


def test_coco_duplicate_ids_and_names(tmp_path):
    message = coco_error(tmp_path, images=[image_entry(1, "t1.png"), image_entry(1, "t2.png")])
    assert "duplicate image id 1" in message
    message = coco_error(
        tmp_path,
        annotations=[ann(2, 1, 1, [square(2, 2, 9, 9)]), ann(2, 1, 1, [square(12, 2, 19, 9)])],
    )
    assert "duplicate annotation id 2" in message
    message = coco_error(tmp_path, categories=[{"id": 1, "name": "head"}, {"id": 1, "name": "eye"}])
    assert "duplicate category id 1" in message
    message = coco_error(
        tmp_path, categories=[{"id": 1, "name": "head"}, {"id": 2, "name": "head"}]
    )
    assert "duplicate category name 'head'" in message
    photo(tmp_path / "t2.png")
    message = coco_error(
        tmp_path,
        images=[image_entry(1, "t1.png"), image_entry(2, "t1.png")],
        annotations=[ann(1, 1, 1, [square(2, 2, 9, 9)]), ann(2, 2, 1, [square(2, 2, 9, 9)])],
    )
    assert "images 1 and 2 have the same file_name 't1.png'" in message


def test_coco_no_annotations(tmp_path):
    message = coco_error(tmp_path, annotations=[])
    assert "no annotations" in message


def test_coco_unreadable_photo(tmp_path):
    (tmp_path / "t1.png").parent.mkdir(exist_ok=True)
    path = write_coco(
        tmp_path / "t.json", [image_entry(1, "broken.png")], [ann(1, 1, 1, [square(2, 2, 9, 9)])]
    )
    (tmp_path / "broken.png").write_text("not a picture")
    with pytest.raises(InputError) as info:
        load_coco_templates(path)
    message = str(info.value)
    assert (
        message.startswith(str(path)) and "cannot read image" in message and "broken.png" in message
    )


# -- PNG masks ------------------------------------------------------------------------


def save_mask(path: Path, array: np.ndarray, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_png_binary_and_label_map_entries(tmp_path):
    photo(tmp_path / "imgs" / "t1.png")
    photo(tmp_path / "imgs" / "t2.png")
    head = np.zeros((H, W), np.uint8)
    head[5:15, 5:15] = 255
    # an RGB mask painted in red only: any nonzero channel is foreground
    antenna_rgb = np.zeros((H, W, 3), np.uint8)
    antenna_rgb[20:25, 30:45, 0] = 200
    save_mask(tmp_path / "masks" / "t1_head.png", head)
    save_mask(tmp_path / "masks" / "t1_antenna.png", antenna_rgb)
    labels = np.zeros((H, W), np.uint8)
    labels[2:8, 2:8] = 1  # pronotum
    labels[10:12, 20:30] = 3  # antenna (left)
    labels[14:16, 20:30] = 2  # antenna (right)
    save_mask(tmp_path / "masks" / "t2_labels.png", labels)

    entries = [
        {"image": "imgs/t1.png", "mask": "masks/t1_head.png", "structure": "head"},
        {"image": "imgs/t1.png", "mask": "masks/t1_antenna.png", "structure": "antenna"},
        {
            "image": "imgs/t2.png",
            "mask": "masks/t2_labels.png",
            "labels": {1: "pronotum", "3": "antenna", 2: "antenna"},
        },
    ]
    ts = load_png_templates(entries, base_dir=tmp_path)
    assert ts.categories == {1: "head", 2: "antenna", 3: "pronotum"}
    t1, t2 = ts.images
    assert (t1.file_name, t1.image_id, t1.path) == ("imgs/t1.png", 1, tmp_path / "imgs" / "t1.png")
    assert (t2.file_name, t2.image_id) == ("imgs/t2.png", 2)
    assert [(i.annotation_id, i.category_id, i.instance) for i in t1.instances] == [
        (1, 1, 1),
        (2, 2, 1),
    ]
    assert np.array_equal(t1.instances[0].mask, head > 0)
    assert np.array_equal(t1.instances[1].mask, antenna_rgb[..., 0] > 0)
    # label table order decides the instance ranks: value 3 is antenna 1, value 2 antenna 2
    assert [(i.annotation_id, i.category_id, i.instance) for i in t2.instances] == [
        (3, 3, 1),
        (4, 2, 1),
        (5, 2, 2),
    ]
    assert np.array_equal(t2.instances[1].mask, labels == 3)
    assert np.array_equal(t2.instances[2].mask, labels == 2)
    assert ts.structures() == [(1, 1), (2, 1), (2, 2), (3, 1)]

    # the normalised file reproduces PNG templates too
    out = tmp_path / "normalised.json"
    save_template_set(ts, out)
    assert load_coco_templates(out) == ts
    assert load_templates(entries, base_dir=tmp_path) == ts


def test_png_label_map_palette_and_16bit(tmp_path):
    photo(tmp_path / "t.png")
    palette_labels = np.zeros((H, W), np.uint8)
    palette_labels[3:9, 3:9] = 4
    pal = Image.fromarray(palette_labels, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * (256 * 3 - 15))
    pal.save(tmp_path / "pal.png")
    wide = np.zeros((H, W), np.uint16)
    wide[20:30, 10:20] = 300
    wide[20:30, 30:40] = 1000
    Image.fromarray(wide).save(tmp_path / "wide.png")
    ts = load_png_templates(
        [
            {"image": "t.png", "mask": "pal.png", "labels": {4: "eye"}},
            {"image": "t.png", "mask": "wide.png", "labels": {300: "leg", 1000: "leg"}},
        ],
        base_dir=tmp_path,
    )
    (image,) = ts.images
    assert ts.categories == {1: "eye", 2: "leg"}
    assert [(i.category_id, i.instance) for i in image.instances] == [(1, 1), (2, 1), (2, 2)]
    assert np.array_equal(image.instances[0].mask, palette_labels == 4)
    assert np.array_equal(image.instances[2].mask, wide == 1000)


def test_png_rgba_mask_on_opaque_black(tmp_path):
    photo(tmp_path / "t.png")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background
    rgba[4:10, 4:10] = (255, 255, 255, 255)
    save_mask(tmp_path / "m.png", rgba, "RGBA")
    ts = load_png_templates(
        [{"image": "t.png", "mask": "m.png", "structure": "head"}], base_dir=tmp_path
    )
    assert ts.images[0].instances[0].mask.sum() == 36


def test_png_same_structure_twice_gives_instances(tmp_path):
    photo(tmp_path / "t.png")
    left = np.zeros((H, W), np.uint8)
    left[2:5, 2:10] = 1
    right = np.zeros((H, W), np.uint8)
    right[2:5, 30:40] = 1
    save_mask(tmp_path / "left.png", left)
    save_mask(tmp_path / "right.png", right)
    ts = load_png_templates(
        [
            {
                "image": str(tmp_path / "t.png"),
                "mask": str(tmp_path / "left.png"),
                "structure": "antenna",
            },
            {
                "image": str(tmp_path / "t.png"),
                "mask": str(tmp_path / "right.png"),
                "structure": "antenna",
            },
        ]
    )
    assert ts.categories == {1: "antenna"}
    assert [(i.instance, int(i.mask.sum())) for i in ts.images[0].instances] == [(1, 24), (2, 30)]


def png_error(tmp_path, entry_overrides: dict, mask=None, mask_mode=None, image=None) -> str:
    if image is None:
        photo(tmp_path / "t.png")
    if mask is None:
        mask = np.zeros((H, W), np.uint8)
        mask[3:9, 3:9] = 1
    save_mask(tmp_path / "m.png", mask, mask_mode)
    entry = {"image": "t.png", "mask": "m.png", "structure": "head"}
    entry.update(entry_overrides)
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(InputError) as info:
        load_png_templates([entry], base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "template entry 1" in message
    return message


def test_png_entry_errors(tmp_path):
    mask_path = str(tmp_path / "m.png")
    message = png_error(tmp_path, {"labels": {1: "head"}})
    assert message.startswith(mask_path) and "both 'structure' and 'labels'" in message
    message = png_error(tmp_path, {"structure": None})
    assert message.startswith(mask_path) and "neither 'structure'" in message
    message = png_error(tmp_path, {"image": "absent.jpg"})
    assert message.startswith(str(tmp_path / "absent.jpg")) and "not found" in message
    message = png_error(tmp_path, {"mask": "absent.png"})
    assert message.startswith(str(tmp_path / "absent.png")) and "mask file not found" in message
    message = png_error(tmp_path, {}, mask=np.zeros((H, W), np.uint8))
    assert message.startswith(mask_path) and "empty mask" in message and "'head'" in message


def test_png_mask_size_errors(tmp_path):
    mask = np.ones((H, W + 2), np.uint8)
    message = png_error(tmp_path, {}, mask=mask)
    assert message.startswith(str(tmp_path / "m.png"))
    assert f"{W + 2}x{H}" in message and f"{W}x{H}" in message and "swapped" not in message
    # the photo is displayed rotated (EXIF 8), the mask was drawn on the raw pixels
    photo(tmp_path / "t.png", orientation=8)
    message = png_error(tmp_path, {}, mask=np.ones((H, W), np.uint8), image="rotated")
    assert f"{W}x{H}" in message and f"{H}x{W}" in message and "swapped" in message


def test_png_jpeg_mask_refused(tmp_path):
    photo(tmp_path / "t.png")
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=75)
    with pytest.raises(InputError) as info:
        load_png_templates(
            [{"image": "t.png", "mask": "m.jpg", "structure": "head"}], base_dir=tmp_path
        )
    message = str(info.value)
    assert message.startswith(str(tmp_path / "m.jpg")) and "lossy compression" in message


def test_png_label_map_errors(tmp_path):
    labels = np.zeros((H, W), np.uint8)
    labels[1:4, 1:4] = 1
    labels[5:8, 5:8] = 2
    labels[9:12, 9:12] = 7
    message = png_error(tmp_path, {"structure": None, "labels": {1: "head", 2: "eye"}}, mask=labels)
    assert "label value(s) 7 occur in the label map but not in 'labels'" in message
    message = png_error(
        tmp_path,
        {"structure": None, "labels": {1: "head", 2: "eye", 7: "leg", 9: "wing"}},
        mask=labels,
    )
    assert "9 ('wing') listed in 'labels' but absent" in message
    message = png_error(tmp_path, {"structure": None, "labels": {0: "background"}}, mask=labels)
    assert "label value 0 is the background" in message
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[2:5, 2:5] = 1
    message = png_error(tmp_path, {"structure": None, "labels": {1: "head"}}, mask=rgb)
    assert "single-channel" in message and "RGB" in message


def test_load_templates_dispatch(collection, tmp_path):
    path, _ = collection
    by_path = load_templates("templates.json", base_dir=tmp_path)
    assert by_path == load_coco_templates(path)
    with pytest.raises(InputError, match="must be a COCO .json file"):
        load_templates("templates.yaml", base_dir=tmp_path)
    with pytest.raises(InputError, match="expected a COCO .json path or a list"):
        load_templates(42)


def test_structures_on_hand_built_set():
    mask = np.ones((2, 2), bool)
    ts = TemplateSet(
        categories={1: "head", 2: "antenna"},
        images=[
            TemplateImage(
                "a.png",
                Path("/x/a.png"),
                2,
                2,
                1,
                [TemplateInstance(1, 2, 1, mask), TemplateInstance(2, 2, 2, mask)],
            ),
            TemplateImage("b.png", Path("/x/b.png"), 2, 2, 2, [TemplateInstance(3, 1, 1, mask)]),
        ],
    )
    assert ts.structures() == [(1, 1), (2, 1), (2, 2)]
    assert to_coco(ts)["annotations"][1]["instance"] == 2
