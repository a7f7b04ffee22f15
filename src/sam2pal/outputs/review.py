"""Review export: a sample of a collection's results, ready to correct in Label Studio or CVAT.

QC ranks every image by a label-free guess of its quality (qc.csv). A person checking
the worst images fixes the worst errors, but they say nothing of the collection's
accuracy: they were chosen for looking bad. So the export takes two samples and keeps
them apart:

- `worst`: the `top` first images of qc.csv's ranking;
- `random`: `random` images drawn from the rest, without replacement, with a seeded
  generator (`random.Random(seed).sample` over the file names in sorted order), so the
  same results and seed always give the same sample. Their corrections give an unbiased
  estimate of the accuracy of the images not in the worst sample.

Templates (the images of templates.json, matched as `sam2pal evaluate` matches names:
the same path, else the same bare file name when it is unique) and images that could
not be read (qc.csv status `skipped`) are never selected. When the collection has fewer
images left than `top + random`, both samples are cut to what there is (worst first)
and the export says so, rather than stopping: a small collection is reviewed whole.

`review_sample.csv` records the sample (file_name, selected_by, qc_rank, qc_score,
seed); `sam2pal review import` reads it to keep the two samples apart.

The predicted masks go along as pre-annotations, as polygons: `mask_outlines` traces
the pixel edges of a mask (the outline of the pixels' squares, not of their centres), so
a polygon rasterised again (pycocotools, Datumaro, CVAT) gives back the same pixels and
its area is the mask's pixel count. Polygons cannot carry holes: a structure's outer
outline is kept and its holes are filled (sam2pal's masks have their small holes filled
already, propagate.fill_hole_area). A structure in several pieces gives one polygon per
piece, all with the structure's name and instance.

Two formats, each a folder of the review folder:

- `labelstudio/`: `labeling_config.xml` (a PolygonLabels tool with one label per
  structure) and `tasks.json` (one task per image, its prediction a polygon per piece,
  points in percent of the image size, the instance in the result's `meta` text). The
  photos are copied (hard-linked where possible) to `images/` and referenced by Label
  Studio's local-files URL relative to the review folder (`?d=images/<file name>`: the
  document root is the review folder, as Label Studio serves files only from a storage
  folder inside its document root, never the root itself); photos a browser cannot
  show (TIFF) are written there as PNG (`<file name>.png`), `data.file_name` keeping
  the name.
- `cvat/`: `task.zip` (`annotations/instances_default.json`, COCO 1.0 with polygons,
  and `images/<file name>`: what CVAT's "COCO 1.0" import and Datumaro's
  `coco_instances` read), `labels.json` (CVAT's label constructor, each label with an
  `instance` attribute so that CVAT keeps the instances) and `README.txt`.

Nothing in the results folder is changed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote
from xml.etree import ElementTree

import cv2
import numpy as np

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_dir, atomic_path, atomic_write, write_json
from sam2pal.io.coco import annotation_mask, load_coco, scan_coco, stream_annotations
from sam2pal.outputs.evaluate import match_names
from sam2pal.outputs.visualize import write_overlays
from sam2pal.settings import REVIEW_FORMATS

FORMATS = REVIEW_FORMATS
SAMPLE_COLUMNS = ["file_name", "selected_by", "qc_rank", "qc_score", "seed"]
#: photo formats a browser shows; others go to Label Studio as PNG
BROWSER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
#: label colours, in category order (cycled)
PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
)

LABEL_STUDIO_README = """Label Studio project of the review sample ({n} images).

1. Start Label Studio so that it serves the photos of this review folder:
     LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \\
     LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} label-studio start
2. Create a project; Settings > Labeling Interface > Code: paste labeling_config.xml.
3. Settings > Cloud Storage > Add Source Storage: Local files, absolute local path
   {images} (Label Studio serves local files only from a storage folder, and that
   folder must lie inside the document root). Save it; do not sync it.
4. Import tasks.json: each photo comes with sam2pal's masks as predictions (polygons).
   Correct them, submit, and export the project as JSON (or COCO) for
   `sam2pal review import`.
"""

CVAT_README = """CVAT task of the review sample ({n} images): task.zip holds the photos (images/) and
sam2pal's masks as polygons (annotations/instances_default.json, COCO 1.0).

1. Create a project; in its labels, open "Raw" and paste labels.json (the structures,
   each with an "instance" attribute so that the instances are kept).
2. Project > Actions > Import dataset: format "COCO 1.0", file task.zip. CVAT creates
   a task with the photos and the polygons.
   (Or: create a task with the photos of images/ in task.zip, then Actions > Upload
   annotations, format "COCO 1.0", file task.zip.)
3. Correct the polygons, then export the task's annotations as "COCO 1.0" for
   `sam2pal review import`.
"""


@dataclass(frozen=True)
class Selected:
    """An image of the review sample.

    file_name: as in predictions.json and qc.csv.
    selected_by: "worst" or "random".
    qc_rank: its rank in qc.csv (1: worst).
    qc_score: its QC score (None when qc.csv has none).
    """

    file_name: str
    selected_by: str
    qc_rank: int
    qc_score: float | None


# -- selection ------------------------------------------------------------------------


def read_qc_ranking(qc_csv: str | os.PathLike) -> list[dict]:
    """The rows of qc.csv in rank order.

    Args:
        qc_csv: the file `sam2pal.outputs.qc.write_qc` wrote.

    Returns:
        [{"rank": int, "file_name": str, "status": str, "qc_score": float | None}].
        Raises InputError when the file is missing or not a qc.csv.
    """
    path = Path(qc_csv)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"rank", "file_name", "status", "qc_score"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(
                    f"{path}: not a qc.csv (no column(s) {', '.join(sorted(missing))})"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    rank = int(row["rank"])
                    score = float(row["qc_score"]) if row["qc_score"] else None
                except (TypeError, ValueError):
                    raise InputError(
                        f"{path}: line {line}: rank or qc_score is not a number"
                    ) from None
                rows.append(
                    {
                        "rank": rank,
                        "file_name": row["file_name"],
                        "status": row["status"],
                        "qc_score": score,
                    }
                )
    except FileNotFoundError:
        raise InputError(
            f"{path}: qc.csv not found (is this a folder `sam2pal segment` wrote?)"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    return sorted(rows, key=lambda row: row["rank"])


def template_names(
    templates_json: str | os.PathLike, file_names: Iterable[str], image_dir
) -> set[str]:
    """The names among `file_names` that are template photos.

    A name is a template's when its photo (under `image_dir`) is the template's photo, or
    when it names the same image as a template's file name (`match_names`).

    Args:
        templates_json: the normalised template file (templates.json).
        file_names: the collection's image names.
        image_dir: the collection's image folder.

    Returns:
        The template photos' names.
    """
    data = load_coco(templates_json, role="template file", sizes=False)
    paths = {os.path.realpath(im["path"]) for im in data["images"] if im.get("path")}
    names = list(file_names)
    found = {n for n in names if os.path.realpath(Path(image_dir) / n) in paths}
    found.update(match_names(names, [im["file_name"] for im in data["images"]]))
    return found


def select_sample(
    ranking: list[dict],
    exclude: set[str],
    top: int,
    n_random: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[Selected]:
    """The worst `top` images of the ranking and `n_random` others drawn at random.

    Args:
        ranking: qc.csv's rows in rank order (`read_qc_ranking`).
        exclude: names never selected (templates).
        top: how many of the worst.
        n_random: how many drawn from the rest.
        seed: the random generator's seed.
        log: where the note on a sample cut to the collection goes.

    Returns:
        The worst in rank order, then the random sample in rank order.
    """
    eligible = [r for r in ranking if r["status"] != "skipped" and r["file_name"] not in exclude]
    if top + n_random > len(eligible):
        left = len(ranking) - len(eligible)
        kept_top = min(top, len(eligible))
        kept_random = min(n_random, len(eligible) - kept_top)
        log(
            f"review: {len(eligible)} images can be reviewed ({left} templates or unreadable "
            f"left out), fewer than {top} worst + {n_random} random: taking {kept_top} worst "
            f"and {kept_random} random"
        )
        top, n_random = kept_top, kept_random
    worst, rest = eligible[:top], eligible[top:]
    drawn = set(random.Random(seed).sample(sorted(r["file_name"] for r in rest), n_random))
    sample = [Selected(r["file_name"], "worst", r["rank"], r["qc_score"]) for r in worst]
    sample += [
        Selected(r["file_name"], "random", r["rank"], r["qc_score"])
        for r in rest
        if r["file_name"] in drawn
    ]
    return sample


def write_sample_csv(path: str | os.PathLike, sample: list[Selected], seed: int) -> None:
    """Write review_sample.csv (atomically)."""
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for s in sample:
            score = "" if s.qc_score is None else f"{s.qc_score:.4f}"
            writer.writerow(
                {
                    "file_name": s.file_name,
                    "selected_by": s.selected_by,
                    "qc_rank": s.qc_rank,
                    "qc_score": score,
                    "seed": seed,
                }
            )


# -- polygons -------------------------------------------------------------------------


def mask_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The outer outlines of a mask's pieces along its pixels' edges.

    The mask is doubled in size and OpenCV traces its outer contours through the
    centres of the boundary's half-pixels; a half-pixel at 2x (left, top) lies on
    its pixel's edge x, one at 2x + 1 (right, bottom) on edge x + 1. Holes are filled.

    Args:
        mask: a bool array (height, width).

    Returns:
        One (n, 2) float array of (x, y) vertices per piece, in image pixel units (0 is
        the image's left or top edge).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, y0 = int(xs.min()), int(ys.min())
    crop = mask[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1].astype(np.uint8)
    big = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outlines = []
    for contour in contours:
        points = (contour.reshape(-1, 2) + 1) // 2
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = np.any(points[1:] != points[:-1], axis=1)
        points = points[keep]
        if len(points) > 1 and np.array_equal(points[0], points[-1]):
            points = points[:-1]
        outlines.append(points.astype(float) + [x0, y0])
    return outlines


def polygon_area(points: np.ndarray) -> float:
    """Area of a polygon (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


# -- predictions ----------------------------------------------------------------------


@dataclass
class ImagePrediction:
    """An image of the sample with its predicted structures.

    image: its predictions.json entry.
    structures: [(category id, instance, outlines)] in (category, instance) order.
    """

    image: dict
    structures: list[tuple[int, int, list[np.ndarray]]]


def predicted_outlines(
    predictions_json: str | os.PathLike, images: dict, categories: dict, names: set[str]
) -> dict[str, ImagePrediction]:
    """The predicted outlines of some images of predictions.json.

    The annotations are streamed: only the masks of `names` are decoded.

    Args:
        predictions_json: the COCO predictions file.
        images, categories: its images and categories (`scan_coco`).
        names: the images wanted (file names).

    Returns:
        {file name: ImagePrediction} of `names`.
    """
    wanted = {iid: im for iid, im in images.items() if im["file_name"] in names}
    found = {im["file_name"]: ImagePrediction(im, []) for im in wanted.values()}
    for ann in stream_annotations(predictions_json, images, categories, "predictions file"):
        image = wanted.get(ann["image_id"])
        if image is None:
            continue
        mask = annotation_mask(predictions_json, image, ann)
        instance = int(ann.get("instance") or 1)
        found[image["file_name"]].structures.append(
            (ann["category_id"], instance, mask_outlines(mask))
        )
    for prediction in found.values():
        prediction.structures.sort(key=lambda s: (s[0], s[1]))
    return found


# -- Label Studio ---------------------------------------------------------------------


def labelstudio_config(categories: dict[int, str]) -> str:
    """Label Studio's labelling config: a PolygonLabels tool with one label per structure.

    Args:
        categories: {category id: name}.

    Returns:
        The XML text.
    """
    view = ElementTree.Element("View")
    ElementTree.SubElement(view, "Image", name="image", value="$image", zoom="true")
    labels = ElementTree.SubElement(view, "PolygonLabels", name="label", toName="image")
    for index, (_, name) in enumerate(sorted(categories.items())):
        ElementTree.SubElement(
            labels, "Label", value=name, background=PALETTE[index % len(PALETTE)]
        )
    ElementTree.indent(view)
    return ElementTree.tostring(view, encoding="unicode") + "\n"


def local_files_url(relative: str) -> str:
    """Label Studio's URL of a file under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    return "/data/local-files/?d=" + quote(relative, safe="/")


def labelstudio_task(
    prediction: ImagePrediction,
    categories: dict[int, str],
    image_url: str,
    selected: Selected,
    model_version: str,
) -> dict:
    """One Label Studio task: the photo and its structures as a polygon prediction.

    Args:
        prediction: the image and its outlines.
        categories: {category id: name}.
        image_url: the URL Label Studio loads the photo from.
        selected: its place in the sample (its QC score is the prediction's score).
        model_version: the prediction's model version.

    Returns:
        The task (Label Studio's JSON import format).
    """
    width, height = prediction.image["width"], prediction.image["height"]
    results = []
    for category_id, instance, outlines in prediction.structures:
        for piece, points in enumerate(outlines, start=1):
            percent = np.round(points / [width, height] * 100, 4)
            results.append(
                {
                    "id": f"c{category_id}i{instance}p{piece}",
                    "type": "polygonlabels",
                    "from_name": "label",
                    "to_name": "image",
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "value": {
                        "points": percent.tolist(),
                        "closed": True,
                        "polygonlabels": [categories[category_id]],
                    },
                    "meta": {"text": [f"instance {instance}"]},
                }
            )
    predicted = {"model_version": model_version, "result": results}
    if selected.qc_score is not None and math.isfinite(selected.qc_score):
        predicted["score"] = round(selected.qc_score, 4)
    return {
        "data": {"image": image_url, "file_name": prediction.image["file_name"]},
        "predictions": [predicted],
    }


def _place_photo(source: Path, dest: Path) -> None:
    """`dest` becomes the photo `source`: a hard link where possible, else a copy."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _browser_copy(source: Path, dest: Path) -> None:
    """`dest` (PNG) becomes the photo `source` as sam2pal reads it (upright, 8-bit RGB)."""
    from PIL import Image

    from sam2pal.io.images import read_image

    with atomic_path(dest) as tmp:
        Image.fromarray(read_image(source)).save(tmp, format="PNG")


def write_labelstudio(
    folder: Path,
    review_dir: Path,
    sample: list[Selected],
    predictions: dict[str, ImagePrediction],
    categories: dict[int, str],
    model_version: str,
) -> None:
    """Write labelstudio/ (config, tasks, README) into `folder` (a fresh folder).

    Args:
        folder: where to write.
        review_dir: the review folder (Label Studio's document root; the photos are in
            its images/), named in the README.
        sample: the images, in task order.
        predictions: their predictions.
        categories: {category id: name}.
        model_version: the predictions' model version.
    """
    (folder / "labeling_config.xml").write_text(labelstudio_config(categories), encoding="utf-8")
    tasks = []
    for selected in sample:
        name = selected.file_name
        served = name if Path(name).suffix.lower() in BROWSER_SUFFIXES else name + ".png"
        url = local_files_url(PurePosixPath("images", served).as_posix())
        tasks.append(labelstudio_task(predictions[name], categories, url, selected, model_version))
    (folder / "tasks.json").write_text(json.dumps(tasks) + "\n", encoding="utf-8")
    root = review_dir.resolve()
    readme = LABEL_STUDIO_README.format(n=len(sample), root=root, images=root / "images")
    (folder / "README.txt").write_text(readme, encoding="utf-8")


def place_photos(images_dir: Path, image_dir: Path, names: list[str]) -> None:
    """Put the sample's photos into `images_dir` for Label Studio: each photo under its
    name, plus a PNG (`<name>.png`) of those a browser cannot show; other files there
    are removed."""
    keep = set()
    for name in names:
        source, dest = image_dir / name, images_dir / name
        if Path(name).suffix.lower() in BROWSER_SUFFIXES:
            _place_photo(source, dest)
            keep.add(dest)
        else:
            _browser_copy(source, dest.with_name(dest.name + ".png"))
            keep.add(dest.with_name(dest.name + ".png"))
    if images_dir.is_dir():
        for path in images_dir.rglob("*"):
            if path.is_file() and path not in keep:
                path.unlink()


# -- CVAT -----------------------------------------------------------------------------


def coco_document(
    sample: list[Selected], predictions: dict[str, ImagePrediction], categories: dict[int, str]
) -> dict:
    """COCO 1.0 of the sample with polygon segmentations, as CVAT writes and reads it.

    Images are numbered 1..N in sample order; each structure instance is one
    annotation (its pieces one polygon each) with attributes `occluded` (CVAT's) and
    `instance`.

    Args:
        sample: the images.
        predictions: their predictions.
        categories: {category id: name}.

    Returns:
        The COCO dict.
    """
    images, annotations = [], []
    for image_id, selected in enumerate(sample, start=1):
        image = predictions[selected.file_name].image
        images.append(
            {
                "id": image_id,
                "width": image["width"],
                "height": image["height"],
                "file_name": selected.file_name,
                "license": 0,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": 0,
            }
        )
        for category_id, instance, outlines in predictions[selected.file_name].structures:
            if not outlines:
                continue
            points = np.concatenate(outlines)
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category_id),
                    "segmentation": [o.reshape(-1).tolist() for o in outlines],
                    "area": sum(polygon_area(o) for o in outlines),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                    "attributes": {"occluded": False, "instance": instance},
                }
            )
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"description": "sam2pal review sample", "contributor": "sam2pal"},
        "categories": [
            {"id": int(cid), "name": name, "supercategory": ""}
            for cid, name in sorted(categories.items())
        ],
        "images": images,
        "annotations": annotations,
    }


def cvat_labels(categories: dict[int, str]) -> list[dict]:
    """CVAT's label constructor ("Raw") for the structures: polygon labels with a
    numeric `instance` attribute."""
    return [
        {
            "name": name,
            "color": PALETTE[index % len(PALETTE)],
            "type": "polygon",
            "attributes": [
                {
                    "name": "instance",
                    "mutable": False,
                    "input_type": "number",
                    "default_value": "1",
                    "values": ["1", "1000", "1"],
                }
            ],
        }
        for index, (_, name) in enumerate(sorted(categories.items()))
    ]


def write_cvat(
    folder: Path,
    image_dir: Path,
    sample: list[Selected],
    predictions: dict[str, ImagePrediction],
    categories: dict[int, str],
) -> None:
    """Write cvat/ (task.zip, labels.json, README.txt) into `folder` (a fresh folder)."""
    coco = coco_document(sample, predictions, categories)
    with zipfile.ZipFile(folder / "task.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("annotations/instances_default.json", json.dumps(coco))
        for selected in sample:
            source = image_dir / selected.file_name
            if not source.is_file():
                raise InputError(f"{source}: photo of the review sample not found in --image_dir")
            archive.write(source, "images/" + selected.file_name, compress_type=zipfile.ZIP_STORED)
    write_json(folder / "labels.json", cvat_labels(categories), indent=1)
    (folder / "README.txt").write_text(CVAT_README.format(n=len(sample)), encoding="utf-8")


# -- the export -----------------------------------------------------------------------


def _same_sample(path: Path, sample: list[Selected], seed: int) -> bool:
    """Whether an existing review_sample.csv records this sample."""
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", newline="") as handle:
        old = [
            (r.get("file_name"), r.get("selected_by"), r.get("seed"))
            for r in csv.DictReader(handle)
        ]
    return old == [(s.file_name, s.selected_by, str(seed)) for s in sample]


def export_review(
    results: str | os.PathLike,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    top: int,
    n_random: int,
    seed: int = 0,
    formats: Iterable[str] = FORMATS,
    log: Callable[[str], None] = print,
) -> list[Selected]:
    """Export a review sample of a results folder for Label Studio and/or CVAT.

    Args:
        results: what `sam2pal segment` (or the workflow) wrote: qc.csv,
            predictions.json, templates.json.
        image_dir: the collection's photos.
        out: the review folder: review_sample.csv, images/ (Label Studio's photos),
            labelstudio/, cvat/.
        top: how many of the worst images by QC.
        n_random: how many images drawn at random from the rest.
        seed: the random sample's seed.
        formats: "labelstudio" and/or "cvat".
        log: where messages go.

    Returns:
        The sample. A review folder of another sample (another seed, size or results)
        is replaced as a whole; with the same sample, the formats not asked for are
        kept. A folder that is not empty and holds no review_sample.csv is refused.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(
            f"unknown review format {', '.join(unknown) or '(none)'}: use {' or '.join(FORMATS)}"
        )
    if top < 0 or n_random < 0:
        raise InputError(f"--top and --random must be >= 0, got {top} and {n_random}")
    if top + n_random == 0:
        raise InputError("nothing to review: --top and --random are both 0")
    results, image_dir, out = Path(results), Path(image_dir), Path(out)
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: image folder not found")
    ranking = read_qc_ranking(results / "qc.csv")
    templates = results / "templates.json"
    predictions_json = results / "predictions.json"
    if not predictions_json.is_file():
        raise InputError(f"{predictions_json}: predictions file not found")
    images, raw_categories = scan_coco(predictions_json, role="predictions file")
    exclude = template_names(templates, [r["file_name"] for r in ranking], image_dir)
    sample = select_sample(ranking, exclude, top, n_random, seed, log)
    predicted = {im["file_name"] for im in images.values()}
    stale = [s.file_name for s in sample if s.file_name not in predicted]
    if stale:
        raise InputError(
            f"{results / 'qc.csv'}: ranks {stale[0]!r}, which {predictions_json.name} does "
            "not have: qc.csv and predictions.json are not from the same run"
        )
    categories = {cid: c["name"] for cid, c in raw_categories.items()}
    predictions = predicted_outlines(
        predictions_json, images, raw_categories, {s.file_name for s in sample}
    )
    from sam2pal import __version__

    model_version = f"sam2pal {__version__}"
    for s in sample:
        if not (image_dir / s.file_name).is_file():
            raise InputError(f"{image_dir / s.file_name}: photo of the review sample not found")
    sample_csv = out / "review_sample.csv"
    if out.is_dir() and any(out.iterdir()) and not sample_csv.is_file():
        raise InputError(
            f"{out}: not empty and not a review folder (no review_sample.csv): give a new "
            "or empty folder to --out"
        )

    def write(folder: Path) -> None:
        # what the reviewer will see, as the collection's overlays draw it (the same
        # colours, legend and QC scores): to glance through before opening the tool
        write_overlays(
            predictions_json, image_dir, folder / "overlays", only=[s.file_name for s in sample]
        )
        if "labelstudio" in formats:
            place_photos(folder / "images", image_dir, [s.file_name for s in sample])
            with atomic_dir(folder / "labelstudio") as ls_folder:
                write_labelstudio(ls_folder, out, sample, predictions, categories, model_version)
        if "cvat" in formats:
            with atomic_dir(folder / "cvat") as cvat_folder:
                write_cvat(cvat_folder, image_dir, sample, predictions, categories)

    if _same_sample(sample_csv, sample, seed):
        write(out)  # the other formats' folders stay: they are of this sample
    else:
        if sample_csv.is_file():
            log(f"review: {out} held another sample: replacing it")
        with atomic_dir(out) as folder:
            write_sample_csv(folder / "review_sample.csv", sample, seed)
            write(folder)
    counts = defaultdict(int)
    for s in sample:
        counts[s.selected_by] += 1
    log(
        f"review: {counts['worst']} worst and {counts['random']} random images "
        f"(seed {seed}) -> {out} ({', '.join(formats)})"
    )
    return sample
