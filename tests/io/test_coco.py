"""The one COCO reader (`sam2pal.io.coco`): every check, with one wording, whether the
file is read whole (`load_coco`) or streamed (`scan_coco`, `stream_annotations`)."""

from __future__ import annotations

import codecs
import json

import numpy as np
import pytest

from sam2pal.errors import InputError
from sam2pal.io.coco import (
    annotation_mask,
    category_masks,
    load_coco,
    scan_coco,
    stream_annotations,
)
from sam2pal.io.masks import encode_rle

H, W = 6, 8


def square() -> list:
    return [[1, 1, 5, 1, 5, 4, 1, 4]]


def valid() -> dict:
    return {
        "info": {"note": [1, {"nested": True}]},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "b.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "segmentation": square()},
            {"id": 11, "image_id": 2, "category_id": 3, "segmentation": square(), "instance": 1},
        ],
        "categories": [{"id": 3, "name": "head"}],
    }


def read_whole(path, **options):
    return load_coco(path, **options)


def read_streamed(path, **options):
    sizes = options.get("sizes", True)
    images, categories = scan_coco(path, sizes=sizes)
    return list(stream_annotations(path, images, categories))


READERS = [read_whole, read_streamed]


def error(path, reader=read_whole, **options) -> str:
    """The message of the InputError reading `path` raises; it is one line and starts
    with the file's name."""
    with pytest.raises(InputError) as info:
        reader(path, **options)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


def write(tmp_path, data) -> object:
    path = tmp_path / "coco.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def broken(tmp_path, change) -> object:
    data = valid()
    change(data)
    return write(tmp_path, data)


# -- files that are read ---------------------------------------------------------------


def test_a_valid_file_is_read_alike_whole_and_streamed(tmp_path):
    path = write(tmp_path, valid())
    data = load_coco(path)
    assert data == valid()
    images, categories = scan_coco(path)
    assert list(images.values()) == data["images"]
    assert list(categories.values()) == data["categories"]
    assert list(stream_annotations(path, images, categories)) == data["annotations"]


def test_streamed_file_keys_in_any_order_and_a_byte_order_mark(tmp_path):
    data = valid()
    turned = {key: data[key] for key in ("annotations", "categories", "info", "images")}
    path = tmp_path / "turned.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(turned).encode("utf-8"))
    images, categories = scan_coco(path)
    assert list(images) == [1, 2] and list(categories) == [3]
    assert [a["id"] for a in stream_annotations(path, images, categories)] == [10, 11]
    assert load_coco(path)["images"][1]["file_name"] == "b.jpg"


def test_integral_float_ids_and_sizes_are_read_as_integers_and_strings_as_ids(tmp_path):
    data = valid()
    data["images"][0].update(id=1.0, width=float(W))
    data["annotations"][0].update(id="ten", image_id=1.0)
    read = load_coco(write(tmp_path, data))
    assert read["images"][0]["id"] == 1 and isinstance(read["images"][0]["width"], int)
    assert read["annotations"][0]["image_id"] == 1 and read["annotations"][0]["id"] == "ten"


def test_sizes_are_optional_where_not_needed(tmp_path):
    path = broken(tmp_path, lambda d: d["images"][0].pop("width"))
    assert load_coco(path, sizes=False)["images"][0]["file_name"] == "a.jpg"
    assert len(read_streamed(path, sizes=False)) == 2


def test_category_masks_union_the_instances_of_a_category(tmp_path):
    data = valid()
    other = np.zeros((H, W), bool)
    other[5, 7] = True
    data["annotations"].append(
        {"id": 12, "image_id": 1, "category_id": 3, "segmentation": encode_rle(other)}
    )
    path = write(tmp_path, data)
    by_file, masks = category_masks(load_coco(path), path)
    assert sorted(by_file) == ["a.jpg", "b.jpg"]
    assert masks["a.jpg"]["head"][5, 7] and masks["a.jpg"]["head"][2, 2]
    assert not masks["b.jpg"]["head"][5, 7]


# -- the file ------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_missing_file(tmp_path, reader):
    assert "COCO file not found" in error(tmp_path / "absent.json", reader)
    assert "template file not found" in error(tmp_path / "absent.json", role="template file")


@pytest.mark.parametrize("reader", READERS)
def test_folder(tmp_path, reader):
    assert "is a folder, not a COCO file" in error(tmp_path, reader)


@pytest.mark.parametrize("reader", READERS)
def test_not_utf8(tmp_path, reader):
    path = tmp_path / "latin.json"
    path.write_bytes('{"images": ["é"]}'.encode("latin-1"))
    assert "not UTF-8 text" in error(path, reader)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("text", ['{"images": [}', ""])
def test_not_json(tmp_path, reader, text):
    assert "not valid JSON (" in error(write(tmp_path, text), reader)


def test_not_json_says_where(tmp_path):
    assert "at line 1, column 13" in error(write(tmp_path, '{"images": [}'))


@pytest.mark.parametrize("reader", READERS)
def test_not_an_object(tmp_path, reader):
    message = error(write(tmp_path, "[]"), reader)
    assert "not a COCO file (it must hold a JSON object" in message


@pytest.mark.parametrize("reader", READERS)
def test_missing_lists(tmp_path, reader):
    message = error(write(tmp_path, {"images": [], "info": {}}), reader)
    assert "missing top-level key(s) 'annotations', 'categories'" in message


@pytest.mark.parametrize("reader", READERS)
def test_not_a_list(tmp_path, reader):
    path = write(tmp_path, {"images": [], "annotations": {}, "categories": []})
    assert "'annotations' must be a list" in error(path, reader)


# -- images and categories ------------------------------------------------------------


def set_image(**entry):
    return lambda d: d["images"].__setitem__(1, entry)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda d: d["images"].__setitem__(1, "b.jpg"), "images[1] is not an object"),
        (set_image(file_name="b.jpg", width=W, height=H), "images[1] has no 'id'"),
        (
            set_image(id=[2], file_name="b.jpg", width=W, height=H),
            "images[1] has id [2], expected an integer or a string",
        ),
        (set_image(id=2, width=W, height=H), "image 2 has no 'file_name'"),
        (set_image(id=2, file_name="b.jpg", height=H), "image 2 ('b.jpg') has no 'width'"),
        (
            set_image(id=2, file_name="b.jpg", width=0, height=H),
            "image 2 ('b.jpg'): width 0 is not a positive whole number",
        ),
        (
            set_image(id=1, file_name="b.jpg", width=W, height=H),
            "duplicate image id 1 ('a.jpg' and 'b.jpg')",
        ),
    ],
)
def test_bad_image(tmp_path, reader, change, fragment):
    assert fragment in error(broken(tmp_path, change), reader)


def test_string_ids_refused_where_integers_are_needed(tmp_path):
    path = broken(tmp_path, lambda d: d["images"][1].update(id="b"))
    assert "images[1] has id 'b', expected an integer" in error(path, integer_ids=True)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "entry,fragment",
    [
        (7, "categories[1] is not an object"),
        ({"name": "eye"}, "categories[1] has no 'id'"),
        ({"id": 4, "name": " "}, "category 4 has no 'name'"),
        ({"id": 3, "name": "eye"}, "duplicate category id 3 ('head' and 'eye')"),
    ],
)
def test_bad_category(tmp_path, reader, entry, fragment):
    path = broken(tmp_path, lambda d: d["categories"].append(entry))
    assert fragment in error(path, reader)


# -- annotations ----------------------------------------------------------------------


def set_annotation(**fields):
    def change(data):
        data["annotations"][1] = {
            "id": 11,
            "image_id": 2,
            "category_id": 3,
            "segmentation": square(),
            **fields,
        }
        for key, value in fields.items():
            if value is None:
                del data["annotations"][1][key]

    return change


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda d: d["annotations"].__setitem__(1, []), "annotations[1] is not an object"),
        (set_annotation(id=None), "annotations[1] has no 'id'"),
        (set_annotation(id=10), "duplicate annotation id 10"),
        (set_annotation(image_id=None), "annotation 11 has no 'image_id'"),
        (
            set_annotation(image_id=42),
            "annotation 11 has image_id 42, but 'images' has no image id 42",
        ),
        (
            set_annotation(category_id=8),
            "annotation 11 on image 2 ('b.jpg') has category_id 8, "
            "but 'categories' has no category id 8",
        ),
        (
            set_annotation(segmentation=None),
            "annotation 11 on image 2 ('b.jpg') has no 'segmentation'",
        ),
        (
            set_annotation(instance=0),
            "annotation 11 on image 2 ('b.jpg'): instance 0 is not a positive whole number",
        ),
    ],
)
def test_bad_annotation(tmp_path, reader, change, fragment):
    assert fragment in error(broken(tmp_path, change), reader)


@pytest.mark.parametrize(
    "segmentation,reason",
    [
        (encode_rle(np.ones((H + 1, W), bool)), f"RLE size is {H + 1}x{W} (height x width)"),
        ({"size": [H, W], "counts": "X1"}, "compressed RLE counts"),
        ({"size": [H, W], "counts": [5, 3]}, "do not add up"),
        ([[1, 2, 3]], "even number"),
        ("nothing", "neither a polygon list nor an RLE dict"),
    ],
)
def test_bad_segmentation(tmp_path, segmentation, reason):
    path = broken(tmp_path, lambda d: d["annotations"][1].update(segmentation=segmentation))
    data = load_coco(path)
    image, ann = data["images"][1], data["annotations"][1]
    with pytest.raises(InputError) as info:
        annotation_mask(path, image, ann)
    message = str(info.value)
    assert message.startswith(f"{path}: annotation 11 on image 2 ('b.jpg'): invalid segmentation (")
    assert reason in message and "\n" not in message
    with pytest.raises(InputError, match="invalid segmentation"):
        category_masks(data, path)
