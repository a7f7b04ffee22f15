"""Templates: annotated specimen photos that show SAM2 what to segment.

A template is a specimen photo with a mask for each structure drawn on it (antenna,
head, pronotum, ...). Templates come in two forms:

- a COCO JSON file (`load_coco_templates`), as exported by most annotation tools. It
  may be an export of the whole collection: images without annotations are ignored, and
  so are categories that no template annotates. Segmentations may be polygons (several
  parts of one structure are joined), uncompressed RLE or compressed RLE (holes kept).
- a list of image / mask PNG entries (`load_png_templates`), for masks painted in an
  image editor: either one binary mask per structure, or one label map whose pixel
  values stand for structures.

Both give a `TemplateSet`. Masks are in the upright frame of the photo, that is after
its EXIF orientation is applied, exactly as `sam2pal.io.images.read_image` returns it.

Several instances of one structure: when a template shows two antennae, each is an
instance. Instances of a category on one image are numbered 1, 2, ... in the order of
their annotation ids (COCO) or of the entries and labels (PNG), so annotate them in the
same order on every template (for example the left antenna before the right one):
instance 1 on one template is matched with instance 1 on the others.

`save_template_set` writes a template set as a normalised COCO file (compressed RLE
masks, the absolute path of each photo); `load_coco_templates` reads it back unchanged.

Every problem in a template file raises `InputError` with a one-line message naming
the file and, for COCO, the image or annotation concerned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sam2pal.errors import InputError
from sam2pal.io.atomic import write_json
from sam2pal.io.coco import annotation_mask, load_coco, whole_number
from sam2pal.io.images import read_image_size
from sam2pal.io.masks import encode_rle, mask_bbox, polygons_out_of_bounds

# -- data model -----------------------------------------------------------------------


@dataclass(eq=False)
class TemplateInstance:
    """One annotated structure on a template.

    `instance` is the 1-based rank of this annotation among the annotations of the same
    category on the same image, ordered by annotation id. `mask` is a bool array
    (height, width) of the upright photo.
    """

    annotation_id: int
    category_id: int
    instance: int
    mask: np.ndarray

    def __eq__(self, other):
        if not isinstance(other, TemplateInstance):
            return NotImplemented
        return (
            (self.annotation_id, self.category_id, self.instance)
            == (other.annotation_id, other.category_id, other.instance)
            and self.mask.shape == other.mask.shape
            and bool(np.array_equal(self.mask, other.mask))
        )

    __hash__ = None


@dataclass
class TemplateImage:
    """A template photo: `path` is absolute; width and height are after EXIF orientation."""

    file_name: str
    path: Path
    width: int
    height: int
    image_id: int
    instances: list[TemplateInstance] = field(default_factory=list)


@dataclass
class TemplateSet:
    """Template photos and the categories (id -> name, in id order) they annotate."""

    categories: dict[int, str]
    images: list[TemplateImage]

    def structures(self) -> list[tuple[int, int]]:
        """Sorted (category_id, instance) pairs shown on at least one template."""
        return sorted(
            {(inst.category_id, inst.instance) for image in self.images for inst in image.instances}
        )

    def select(
        self, file_names: list[str] | None = None, max_templates: int | None = None
    ) -> TemplateSet:
        """A template set with some of the templates.

        file_names: keep these templates (by file name), in this order.
        max_templates: keep at most this many: the first of `file_names`, or without
            `file_names` the first in file-name order.
        Categories that none of the kept templates annotates are dropped.
        Raises InputError for unknown file names or a bad max_templates.
        """
        if max_templates is not None and (
            isinstance(max_templates, bool)
            or not isinstance(max_templates, int)
            or max_templates < 1
        ):
            raise InputError(
                f"max_templates must be a whole number of at least 1, not {max_templates!r}"
            )
        by_name = {image.file_name: image for image in self.images}
        if file_names is not None:
            if isinstance(file_names, (str, os.PathLike)):
                file_names = [file_names]
            wanted = list(dict.fromkeys(str(name) for name in file_names))
            unknown = [name for name in wanted if name not in by_name]
            if unknown:
                raise InputError(
                    f"unknown template file name(s) {', '.join(map(repr, unknown))}; "
                    f"the templates are {', '.join(map(repr, sorted(by_name)))}"
                )
            if not wanted:
                raise InputError("the template selection is empty: name at least one template")
            chosen = [by_name[name] for name in wanted]
        elif max_templates is not None:
            chosen = sorted(self.images, key=lambda image: image.file_name)
        else:
            chosen = list(self.images)
        if max_templates is not None:
            chosen = chosen[:max_templates]
        used = {inst.category_id for image in chosen for inst in image.instances}
        categories = {cid: name for cid, name in self.categories.items() if cid in used}
        return TemplateSet(categories=categories, images=chosen)


def _rank_instances(raw: list[tuple[int, int, np.ndarray]]) -> list[TemplateInstance]:
    """(annotation_id, category_id, mask) -> instances ordered by annotation id and ranked."""
    seen: dict[int, int] = {}
    out = []
    for annotation_id, category_id, mask in sorted(raw, key=lambda item: item[0]):
        seen[category_id] = seen.get(category_id, 0) + 1
        out.append(TemplateInstance(annotation_id, category_id, seen[category_id], mask))
    return out


def _absolute(path: str | os.PathLike, base: Path | None = None) -> Path:
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_absolute() and base is not None:
        path = base / path
    return Path(os.path.abspath(path))


def _size_mismatch(found: tuple[int, int], expected: tuple[int, int]) -> str:
    """Explanation appended when width and height are swapped (an EXIF rotation)."""
    if found == (expected[1], expected[0]) and found != expected:
        return (
            "; width and height are swapped, which means the photo carries an EXIF "
            "rotation: annotate the photo as it is displayed (upright)"
        )
    return ""


# -- COCO -----------------------------------------------------------------------------


def _locate_image(
    image: dict, file_name: str, json_path, image_dir
) -> tuple[Path | None, list[Path]]:
    """The first existing candidate path of a COCO image, and all candidates."""
    json_dir = _absolute(json_path).parent
    relative = file_name.replace("\\", "/")
    candidates: list[Path] = []
    if image.get("path"):
        candidates.append(_absolute(str(image["path"]), json_dir))
    if image_dir is not None:
        candidates.append(_absolute(Path(image_dir) / relative))
    candidates.append(_absolute(json_dir / relative))
    # annotation tools often write a folder of their own in front of the name
    # ("images/sp01.jpg", "/data/upload/1/sp01.jpg"): also try the bare name
    base = Path(relative).name
    if base != relative:
        if image_dir is not None:
            candidates.append(_absolute(Path(image_dir) / base))
        candidates.append(_absolute(json_dir / base))
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return None, candidates


def _template_categories(src: Path, categories: list[dict]) -> dict[int, str]:
    """{id: name} of the checked categories of a template file; names are stripped and
    must be distinct (a name is a structure)."""
    names: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for category in categories:
        cid, name = category["id"], category["name"].strip()
        if name in by_name:
            raise InputError(
                f"{src}: duplicate category name {name!r} (ids {by_name[name]} and {cid})"
            )
        names[cid] = name
        by_name[name] = cid
    return names


def _annotated_images(src: Path, data: dict) -> list[tuple[dict, list[dict]]]:
    """(image, its annotations in id order) of each annotated image of a checked template
    file, in file order. InputError without annotations or when two of those images have
    the same file name."""
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    if not by_image:
        raise InputError(
            f"{src}: no annotations (a template file needs at least one annotated image)"
        )
    annotated = []
    file_names: dict[str, int] = {}
    for image in data["images"]:
        if image["id"] not in by_image:
            continue
        file_name, iid = image["file_name"], image["id"]
        if file_name in file_names:
            raise InputError(
                f"{src}: images {file_names[file_name]} and {iid} have the same file_name {file_name!r}"
            )
        file_names[file_name] = iid
        annotated.append((image, sorted(by_image[iid], key=lambda ann: ann["id"])))
    return annotated


def _where(image: dict) -> str:
    return f"image {image['id']} ({image['file_name']!r})"


def _template_photo(src: Path, image: dict, image_dir) -> tuple[Path, int, int]:
    """The photo of a template image, and its upright width and height, which must be
    those the file states (when it states them)."""
    path, looked = _locate_image(image, image["file_name"], src, image_dir)
    if path is None:
        raise InputError(
            f"{src}: {_where(image)}: photo not found (looked for {', '.join(map(str, looked))})"
        )
    try:
        width, height = read_image_size(path)
    except InputError as exc:
        raise InputError(f"{src}: {_where(image)}: {exc}") from None
    stated = (image.get("width", width), image.get("height", height))
    if stated != (width, height):
        raise InputError(
            f"{src}: {_where(image)}: the JSON gives {stated[0]}x{stated[1]} pixels (width x "
            f"height) but the photo {path} is {width}x{height} after EXIF orientation"
            + _size_mismatch((width, height), stated)
        )
    return path, width, height


def _template_instances(
    src: Path, image: dict, annotations: list[dict], width: int, height: int
) -> list[TemplateInstance]:
    """The ranked instances of a template image: each annotation's mask, which must lie
    inside the photo and cover at least one pixel."""
    sized = {**image, "width": width, "height": height}
    raw = []
    for ann in annotations:
        mask = annotation_mask(src, sized, ann)
        label = f"{src}: annotation {ann['id']} on {_where(image)}"
        if polygons_out_of_bounds(ann["segmentation"], height, width):
            raise InputError(
                f"{label}: polygon vertices outside the image ({width}x{height} pixels)"
            )
        if not mask.any():
            raise InputError(f"{label}: empty mask (the segmentation covers no pixel)")
        raw.append((ann["id"], ann["category_id"], mask))
    return _rank_instances(raw)


def load_coco_templates(
    json_path: str | os.PathLike, image_dir: str | os.PathLike | None = None
) -> TemplateSet:
    """Load templates from a COCO JSON file.

    Each annotated image's photo is looked for at its "path" entry (written by
    `save_template_set`; relative to the JSON file), then in `image_dir`, then next to
    the JSON file, under its `file_name`.

    Args:
        json_path: the COCO file, read by `sam2pal.io.coco.load_coco` (integer ids;
            `width` and `height` optional, and checked against the photo if given).
        image_dir: a folder to look for the photos in.

    Returns:
        The templates: the annotated images, and the categories they annotate. Raises
        InputError (one line naming the file) on any problem.
    """
    src = Path(json_path)
    data = load_coco(src, role="template file", sizes=False, integer_ids=True)
    categories = _template_categories(src, data["categories"])
    template_images = []
    for image, anns in _annotated_images(src, data):
        path, width, height = _template_photo(src, image, image_dir)
        template_images.append(
            TemplateImage(
                file_name=image["file_name"],
                path=path,
                width=width,
                height=height,
                image_id=image["id"],
                instances=_template_instances(src, image, anns, width, height),
            )
        )
    used = {inst.category_id for image in template_images for inst in image.instances}
    kept = {cid: categories[cid] for cid in sorted(categories) if cid in used}
    return TemplateSet(categories=kept, images=template_images)


def to_coco(template_set: TemplateSet) -> dict:
    """A template set as a COCO dict: compressed RLE masks, plus the photo's absolute
    "path" on each image and the "instance" rank on each annotation."""
    images, annotations = [], []
    for image in template_set.images:
        images.append(
            {
                "id": int(image.image_id),
                "file_name": image.file_name,
                "width": int(image.width),
                "height": int(image.height),
                "path": str(_absolute(image.path)),
            }
        )
        for inst in image.instances:
            annotations.append(
                {
                    "id": int(inst.annotation_id),
                    "image_id": int(image.image_id),
                    "category_id": int(inst.category_id),
                    "segmentation": encode_rle(inst.mask),
                    "area": int(np.count_nonzero(inst.mask)),
                    "bbox": mask_bbox(inst.mask),
                    "iscrowd": 0,
                    "instance": int(inst.instance),
                }
            )
    categories = [
        {"id": int(cid), "name": name} for cid, name in sorted(template_set.categories.items())
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def save_template_set(template_set: TemplateSet, path: str | os.PathLike) -> None:
    """Write `to_coco(template_set)` to `path` atomically."""
    write_json(path, to_coco(template_set))


# -- PNG masks ------------------------------------------------------------------------

_LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")


def _read_mask(path: Path, where: str) -> tuple[np.ndarray, str]:
    """Pixel values of a mask file (upright, by its EXIF orientation) and its mode."""
    try:
        with Image.open(path) as img:
            img.load()
            file_format = img.format
            img = ImageOps.exif_transpose(img)
            values, mode = np.asarray(img), img.mode
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: cannot read mask ({reason}) ({where})") from None
    if file_format in ("JPEG", "MPO"):
        raise InputError(
            f"{path}: masks must be saved without lossy compression (PNG or TIFF); "
            f"JPEG compression turns mask edges into stray nonzero pixels ({where})"
        )
    return values, mode


def _binary_foreground(values: np.ndarray, mode: str) -> np.ndarray:
    """Foreground of a binary mask: any nonzero pixel in any channel.

    With an alpha channel (RGBA, LA), a pixel is foreground when it has a nonzero colour
    and is not fully transparent, so an opaque black background counts as background;
    a mask drawn in alpha only (all colour channels zero) uses the alpha channel.
    """
    if values.ndim == 2:
        return values != 0
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        color, alpha = values[..., :-1], values[..., -1]
        if not color.any():
            return alpha != 0
        return color.any(axis=2) & (alpha != 0)
    return (values != 0).any(axis=2)


def _label_table(labels, mask_path: Path, where: str) -> list[tuple[int, str]]:
    if not isinstance(labels, dict) or not labels:
        raise InputError(
            f"{mask_path}: 'labels' must map label values to structure names, e.g. "
            f"{{1: head, 2: pronotum}} ({where})"
        )
    table: list[tuple[int, str]] = []
    seen: set[int] = set()
    for key, name in labels.items():
        value = whole_number(key)
        if value is None and isinstance(key, str) and key.strip().isdigit():
            value = int(key.strip())
        if value is None:
            raise InputError(f"{mask_path}: label value {key!r} is not a whole number ({where})")
        if value == 0:
            raise InputError(
                f"{mask_path}: label value 0 is the background and cannot be a structure ({where})"
            )
        if not 0 < value <= 65535:
            raise InputError(f"{mask_path}: label value {value} is out of range 1..65535 ({where})")
        if value in seen:
            raise InputError(f"{mask_path}: label value {value} is listed twice ({where})")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{mask_path}: label value {value} has no structure name ({where})")
        seen.add(value)
        table.append((value, name.strip()))
    return table


def _entry_paths(index: int, entry, base: Path) -> tuple[str, Path, Path]:
    """(where, photo path, mask path) of a template entry, which must name a photo, a
    mask, and either a structure or a label table."""
    where = f"template entry {index}"
    if not isinstance(entry, dict):
        raise InputError(
            f"{where}: expected a mapping with 'image', 'mask' and 'structure' or 'labels', "
            f"got {entry!r}"
        )
    image_name, mask_name = entry.get("image"), entry.get("mask")
    if not isinstance(image_name, (str, os.PathLike)) or not str(image_name).strip():
        raise InputError(f"{where}: missing 'image' (the template photo)")
    image_path = _absolute(image_name, base)
    if not isinstance(mask_name, (str, os.PathLike)) or not str(mask_name).strip():
        raise InputError(f"{image_path}: {where} has no 'mask'")
    mask_path = _absolute(mask_name, base)
    has_structure, has_labels = "structure" in entry, "labels" in entry
    if has_structure and has_labels:
        raise InputError(
            f"{mask_path}: {where} gives both 'structure' and 'labels'; give 'structure' "
            "for a binary mask or 'labels' for a label map"
        )
    if not has_structure and not has_labels:
        raise InputError(
            f"{mask_path}: {where} gives neither 'structure' (binary mask) nor 'labels' (label map)"
        )
    return where, image_path, mask_path


def _photo_record(image_path: Path, image_name, where: str, image_id: int) -> dict:
    """A new template photo: its file name, upright size, image id and no masks yet."""
    if not image_path.is_file():
        raise InputError(f"{image_path}: template photo not found ({where})")
    try:
        width, height = read_image_size(image_path)
    except InputError as exc:
        raise InputError(f"{exc} ({where})") from None
    return {
        "file_name": Path(os.fspath(image_name)).as_posix(),
        "width": width,
        "height": height,
        "image_id": image_id,
        "raw": [],
    }


def _entry_mask(mask_path: Path, where: str, image_path: Path, record: dict):
    """The pixel values and mode of an entry's mask, which must have the photo's size."""
    width, height = record["width"], record["height"]
    if not mask_path.is_file():
        raise InputError(f"{mask_path}: mask file not found ({where})")
    values, mode = _read_mask(mask_path, where)
    mask_size = (int(values.shape[1]), int(values.shape[0]))
    if mask_size != (width, height):
        raise InputError(
            f"{mask_path}: the mask is {mask_size[0]}x{mask_size[1]} pixels but the photo "
            f"{image_path} is {width}x{height} (width x height, after EXIF orientation)"
            + _size_mismatch((width, height), mask_size)
            + f" ({where})"
        )
    return values, mode


def _binary_structure(name, values, mode, mask_path: Path, where: str):
    """[(structure name, mask)] of a binary mask entry."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{mask_path}: 'structure' must be a structure name ({where})")
    name = name.strip()
    mask = _binary_foreground(values, mode)
    if not mask.any():
        raise InputError(
            f"{mask_path}: empty mask (no foreground pixel) for structure {name!r} ({where})"
        )
    return [(name, mask)]


def _label_structures(labels, values, mode, mask_path: Path, where: str):
    """[(structure name, mask)] of a label map entry, in the order of its table; every
    nonzero value of the map must be listed and every listed value must occur."""
    table = _label_table(labels, mask_path, where)
    if mode not in _LABEL_MODES:
        raise InputError(
            f"{mask_path}: a label map must be a single-channel image (8- or 16-bit "
            f"gray, or palette), this one is mode {mode} ({where})"
        )
    values = values.astype(np.int64)
    present = {int(v) for v in np.unique(values)} - {0}
    listed = {value for value, _ in table}
    unlisted = sorted(present - listed)
    if unlisted:
        raise InputError(
            f"{mask_path}: label value(s) {', '.join(map(str, unlisted))} occur in the "
            f"label map but not in 'labels' ({where})"
        )
    absent = [(value, name) for value, name in table if value not in present]
    if absent:
        listing = ", ".join(f"{value} ({name!r})" for value, name in absent)
        raise InputError(
            f"{mask_path}: label value(s) {listing} listed in 'labels' but absent from "
            f"the label map ({where})"
        )
    return [(name, values == value) for value, name in table]


def load_png_templates(
    entries: list[dict], base_dir: str | os.PathLike | None = None
) -> TemplateSet:
    """Load templates from image / mask entries.

    Args:
        entries: mappings, each either
            {"image": photo, "mask": binary mask, "structure": name}: one structure;
            any nonzero pixel of the mask (any channel; for palette images, any nonzero
            palette index) is foreground, or
            {"image": photo, "mask": label map, "labels": {value: name, ...}}: a
            single-channel label map (8-bit, palette indices, 16-bit or 32-bit gray);
            each listed value is one structure, 0 is the background. Every nonzero
            value in the map must be listed and every listed value must occur.
            Several entries may name the same photo (its structures are combined) and
            a name used twice on one photo gives two instances, in entry order (label
            tables in the order listed).
        base_dir: the folder relative paths are taken from (default: the working
            folder).

    Returns:
        The templates. Category ids are 1, 2, ... in order of first appearance of each
        name; image ids and annotation ids are numbered the same way. InputError (one
        line naming the file and the entry) on any problem.
    """
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        raise InputError(
            "templates: expected a list of entries with 'image', 'mask' and 'structure' or "
            f"'labels', got {type(entries).__name__}"
        )
    if not entries:
        raise InputError("templates: the list of template entries is empty")
    base = _absolute(base_dir) if base_dir is not None else Path(os.path.abspath(os.getcwd()))
    category_ids: dict[str, int] = {}
    records: dict[Path, dict] = {}
    next_annotation = 1
    for index, entry in enumerate(entries, start=1):
        where, image_path, mask_path = _entry_paths(index, entry, base)
        record = records.get(image_path) or _photo_record(
            image_path, entry["image"], where, len(records) + 1
        )
        values, mode = _entry_mask(mask_path, where, image_path, record)
        if "structure" in entry:
            found = _binary_structure(entry["structure"], values, mode, mask_path, where)
        else:
            found = _label_structures(entry["labels"], values, mode, mask_path, where)
        for name, mask in found:
            cid = category_ids.setdefault(name, len(category_ids) + 1)
            record["raw"].append((next_annotation, cid, mask))
            next_annotation += 1
        records[image_path] = record
    return _png_template_set(records, category_ids)


def _png_template_set(records: dict[Path, dict], category_ids: dict[str, int]) -> TemplateSet:
    """The template set of the photo records of `load_png_templates`."""
    images = [
        TemplateImage(
            file_name=record["file_name"],
            path=path,
            width=record["width"],
            height=record["height"],
            image_id=record["image_id"],
            instances=_rank_instances(record["raw"]),
        )
        for path, record in records.items()
    ]
    categories = {cid: name for name, cid in sorted(category_ids.items(), key=lambda item: item[1])}
    return TemplateSet(categories=categories, images=images)


def load_templates(
    spec,
    image_dir: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
) -> TemplateSet:
    """Templates from a config value: a COCO .json path, or a list of PNG entries.

    Relative paths (the JSON file, `image_dir`, the entries' files) are taken from
    `base_dir` when it is given.
    """
    base = _absolute(base_dir) if base_dir is not None else None
    if isinstance(spec, (str, os.PathLike)):
        if Path(os.fspath(spec)).suffix.lower() != ".json":
            raise InputError(
                f"{spec}: templates must be a COCO .json file or a list of image/mask entries"
            )
        json_path = _absolute(spec, base) if base is not None else Path(os.fspath(spec))
        if image_dir is not None and base is not None:
            image_dir = _absolute(image_dir, base)
        return load_coco_templates(json_path, image_dir=image_dir)
    if isinstance(spec, (list, tuple, dict)):
        return load_png_templates(spec, base_dir=base)
    raise InputError(
        "templates: expected a COCO .json path or a list of image/mask entries, "
        f"got {type(spec).__name__}"
    )
