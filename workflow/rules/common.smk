# Input functions, per-collection settings and the list of final outputs.

import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from sam2pal.inference import shards as sharding  # noqa: E402
from sam2pal.errors import InputError  # noqa: E402
from sam2pal import settings as settings_module  # noqa: E402
from sam2pal.io.images import list_images  # noqa: E402
from sam2pal.models.registry import (
    MICRO_MODEL,
    OFFICIAL_MODELS,
    RANDOM_CHECKPOINT,
    micro_model_files,
    official_model,
)  # noqa: E402

COLLECTIONS = config["collections"]
SECTIONS = ("model", "propagate", "outputs", "finetune", "video_options", "review")
SOURCES = ("images", "video", "frames")


def _check_sources():
    """A collection is a folder of photos, a video file or a folder of video frames."""
    for name, entry in COLLECTIONS.items():
        given = [key for key in SOURCES if entry.get(key)]
        if len(given) != 1:
            raise WorkflowError(
                f"collections.{name}: give exactly one of images (a photo folder), video (a video "
                f"file) or frames (a folder of video frames); found {', '.join(given) or 'none'}"
            )


_check_sources()


def _check_overrides():
    """Each collection's overrides, merged into the global sections, must satisfy
    those sections' schemas (unknown keys, wrong types and values are errors)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(
        open(Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
    )
    for name, entry in COLLECTIONS.items():
        for section in SECTIONS:
            if not entry.get(section):
                continue
            merged = dict(config[section], **entry[section])
            try:
                jsonschema.validate(merged, schema["properties"][section])
            except jsonschema.ValidationError as exc:
                where = ".".join(str(p) for p in exc.absolute_path) or section
                raise WorkflowError(
                    f"collections.{name}.{section}: {where}: {exc.message}"
                )


_check_overrides()

# video_options that choose how frames are extracted from a video file
EXTRACTION_KEYS = ("start", "end", "max_frames", "max_size", "image_format")


def _check_unused_settings():
    """Settings that would be accepted and do nothing are refused: extraction options
    of a folder of frames (used as it is), video options of a photo collection, an
    orientation search of a video (tracked in its keyframes' orientation), and a
    per-collection model.checkpoint_dir (one folder for the whole run)."""
    import yaml

    schema = yaml.safe_load(
        open(Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
    )
    defaults = {
        key: spec.get("default")
        for key, spec in schema["properties"]["video_options"]["properties"].items()
    }
    for name, entry in COLLECTIONS.items():
        if "checkpoint_dir" in (entry.get("model") or {}):
            raise WorkflowError(
                f"collections.{name}.model.checkpoint_dir: the folder of official checkpoints is one "
                "for the whole run; set model.checkpoint_dir at the top level (or give this "
                "collection's model.checkpoint as a file path)"
            )
        if not entry.get("images"):
            own_propagate = entry.get("propagate") or {}
            orientation = dict(config["propagate"], **own_propagate).get(
                "orientation", "none"
            )
            if orientation != "none":
                where = (
                    f"collections.{name}.propagate.orientation"
                    if "orientation" in own_propagate
                    else "propagate.orientation (set for all collections: set it under the photo collections instead)"
                )
                raise WorkflowError(
                    f"{where}: {orientation} searches the orientation of photos; collection "
                    f"{name} is a video, tracked in its keyframes' orientation: use none"
                )
        own = entry.get("video_options") or {}
        if entry.get("images") and own:
            raise WorkflowError(
                f"collections.{name}.video_options: {name} is a folder of photos; video_options "
                "apply to video and frames collections only"
            )
        if not entry.get("frames"):
            continue
        merged = dict(config["video_options"], **own)
        for key in EXTRACTION_KEYS:
            if merged.get(key) != defaults[key]:
                where = (
                    f"collections.{name}.video_options.{key}"
                    if key in own
                    else f"video_options.{key} (set for all collections: set it under the video collections instead)"
                )
                raise WorkflowError(
                    f"{where}: {key} chooses how frames are extracted from a video file, but "
                    f"collection {name} is a folder of frames, used as it is; remove it"
                )


_check_unused_settings()


def _check_zoom_best():
    """`zoom: best` chooses each structure's mask by the cycle IoU: refused without it,
    before any job runs (the fine-tuning would train first)."""
    for name, entry in COLLECTIONS.items():
        own = entry.get("propagate") or {}
        merged = dict(config["propagate"], **own)
        if merged.get("zoom") == "best" and merged.get("cycle_consistency") is False:
            where = (
                f"collections.{name}.propagate"
                if "zoom" in own or "cycle_consistency" in own
                else "propagate"
            )
            raise WorkflowError(
                f"{where}: zoom best keeps, per structure, the mask with the higher cycle IoU, "
                "so it needs cycle_consistency: true (or use zoom on)"
            )


_check_zoom_best()


wildcard_constraints:
    collection="|".join(re.escape(name) for name in COLLECTIONS),
    shard=r"[0-9]+-of-[0-9]+",


def settings(collection, section):
    """A config section with the collection's own overrides applied."""
    merged = dict(config[section])
    merged.update(COLLECTIONS[collection].get(section) or {})
    return merged


def setting(section, key=None, empty=None):
    """Input function of a collection's setting, for the input, params, threads and
    resources of a rule (its value is the value of the param, so reruns follow edits).

    Args:
        section: a config section (model, propagate, outputs, finetune,
            video_options), the collection's overrides applied; or "collection" for
            the collection's own entry (images, templates, ground_truth ...).
        key: the key in that section; None for the whole section (a dict).
        empty: given, what an unset (null or empty) value becomes, e.g. [] for an
            optional input file.

    Returns:
        A function of the wildcards giving the value.
    """

    def value(wildcards):
        name = wildcards.collection
        if section == "collection":
            found = COLLECTIONS[name][key]
        else:
            found = settings(name, section)
            found = found if key is None else found[key]
        if empty is not None and not found:
            return empty
        return found

    return value


def section(name):
    """Input function of a whole config section with a collection's overrides applied.

    Args:
        name: the section (model, propagate, outputs, finetune, video_options).

    Returns:
        A function of the wildcards giving the merged section (a dict).
    """
    return setting(name)


def of_collection(function):
    """Input function calling `function` with the collection's name.

    Args:
        function: a function of a collection name (image_dir, pool_folder ...).

    Returns:
        A function of the wildcards giving its result.
    """
    return lambda wildcards: function(wildcards.collection)


_IMAGES = {}


def folder_images(collection, folder):
    """Relative file names of the images in a folder (listed once per run)."""
    key = (collection, folder)
    if key not in _IMAGES:
        try:
            names = list_images(folder, recursive=COLLECTIONS[collection]["recursive"])
        except InputError as exc:
            raise WorkflowError(f"collection {collection}: {exc}")
        if not names:
            raise WorkflowError(
                f"collection {collection}: no images in {folder} (jpg, jpeg, png, tif, tiff, bmp, webp)"
            )
        _IMAGES[key] = names
    return _IMAGES[key]


# -- photos and video frames -------------------------------------------------------------


def kind(collection):
    """The kind of a collection: "images" (photos), "video" (a video file) or
    "frames" (extracted frames)."""
    return next(key for key in SOURCES if COLLECTIONS[collection].get(key))


def is_video(collection):
    return kind(collection) != "images"


def collections_of(*kinds):
    """Wildcard pattern matching the collections of the given kinds (or nothing)."""
    names = [name for name in COLLECTIONS if kind(name) in kinds]
    return "|".join(re.escape(name) for name in names) or "(?!)"


def image_dir(collection):
    """The folder a collection's images (or frames) are read from."""
    source = kind(collection)
    if source == "video":
        return f"results/{collection}/frames"
    return COLLECTIONS[collection][source]


def frame_manifest(collection):
    """frames.csv of a video collection; for an extracted video, after the
    extract_frames checkpoint has run (so the frames are known)."""
    if kind(collection) == "video":
        return checkpoints.extract_frames.get(collection=collection).output.manifest
    return f"results/{collection}/frames.csv"


def frame_names(collection):
    from sam2pal.io.video import read_manifest

    try:
        return [row.file for row in read_manifest(frame_manifest(collection))]
    except InputError as exc:
        raise WorkflowError(f"collection {collection}: {exc}")


def image_names(collection):
    if kind(collection) == "video":
        return frame_names(collection)
    return folder_images(collection, image_dir(collection))


def image_paths(wildcards):
    folder = image_dir(wildcards.collection)
    return [os.path.join(folder, name) for name in image_names(wildcards.collection)]


def video_mode(collection):
    """video_options.mode of a video collection (None for photos)."""
    if not is_video(collection):
        return None
    return settings(collection, "video_options")["mode"]


def template_image_dir(collection):
    """The folder the template photos are read from: template_images, else the
    collection's images."""
    return COLLECTIONS[collection]["template_images"] or image_dir(collection)


def manifest_input(wildcards):
    """frames.csv for a video collection (nothing for photos)."""
    if not is_video(wildcards.collection):
        return []
    return [frame_manifest(wildcards.collection)]


def video_settings(wildcards):
    return settings(wildcards.collection, "video_options")


def extraction_settings(wildcards):
    """The settings that change the extracted frames (the mode does not)."""
    return {k: v for k, v in video_settings(wildcards).items() if k != "mode"}


# -- fine-tuning -------------------------------------------------------------------------

# finetune keys that are about the workflow rather than the training itself
FINETUNE_WORKFLOW_KEYS = settings_module.workflow_keys()


def finetune_settings(wildcards):
    """The training settings (editing any other setting does not retrain)."""
    ft = settings(wildcards.collection, "finetune")
    return {k: v for k, v in ft.items() if k not in FINETUNE_WORKFLOW_KEYS}


def finetune_propagate(wildcards):
    """The propagate settings the fine-tuning takes too (framing, framing_fill: the
    training images are framed as the segmentation frames them; zoom, zoom_below,
    zoom_margin: the zoom pass's windows are trained on and score the held-out photos),
    so editing them retrains.
    """
    prop = settings(wildcards.collection, "propagate")
    return {key: prop[key] for key in settings_module.training_keys()}


def pool_folder(collection):
    """Folder of the unlabelled training photos: `finetune.pool_images` if it is a
    folder, else the collection's images (a COCO file there lists which of them)."""
    source = settings(collection, "finetune")["pool_images"]
    if source and not source.lower().endswith(".json"):
        return source
    return image_dir(collection)


def pool_names(collection):
    """The unlabelled photos a collection's fine-tuning trains on.

    Args:
        collection: the collection's name.

    Returns:
        Their file names in `pool_folder`: those a COCO `finetune.pool_images` lists
        (read by `sam2pal.io.coco.scan_coco`), the photos of a folder given there, else
        the collection's images. WorkflowError on a bad COCO file or a missing photo.
    """
    source = settings(collection, "finetune")["pool_images"]
    folder = pool_folder(collection)
    if not (source and source.lower().endswith(".json")):
        if not source:
            return image_names(collection)
        return folder_images(collection, folder)
    from sam2pal.io.coco import scan_coco

    try:
        images, _ = scan_coco(source, sizes=False)
    except InputError as exc:
        raise WorkflowError(f"collection {collection}: {exc}")
    names = sorted({image["file_name"] for image in images.values()})
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise WorkflowError(
            f"{source}: {len(missing)} listed photo(s) not in {folder}, e.g. {missing[0]}"
        )
    return names


def pool_paths(wildcards):
    folder = pool_folder(wildcards.collection)
    return [os.path.join(folder, n) for n in pool_names(wildcards.collection)]


def training_template_files(wildcards):
    extra = settings(wildcards.collection, "finetune")["training_templates"]
    return [extra] if extra else []


def adapter_folder(collection):
    """The adapter a collection is segmented with: trained here, given, or none."""
    ft = settings(collection, "finetune")
    if ft["enabled"] and ft["adapter"]:
        raise WorkflowError(
            f"collection {collection}: finetune.enabled trains a new adapter and finetune.adapter "
            "reuses one; set only one of them"
        )
    if ft["enabled"]:
        return f"results/{collection}/finetune/adapter"
    return ft["adapter"]


def adapter_input(wildcards):
    ft = settings(wildcards.collection, "finetune")
    if ft["enabled"]:
        return [f"results/{wildcards.collection}/finetune"]
    return [ft["adapter"]] if ft["adapter"] else []


def template_files(wildcards):
    """Files the templates are read from (edits to them rerun the collection)."""
    spec = COLLECTIONS[wildcards.collection]["templates"]
    if isinstance(spec, str):
        return [spec]
    return [path for entry in spec for path in (entry["image"], entry["mask"])]


def checkpoint_file(collection):
    """The checkpoint file a collection's model needs, or None for random weights."""
    value = str(settings(collection, "model")["checkpoint"])
    if value == RANDOM_CHECKPOINT:
        return None
    if value == MICRO_MODEL:
        return str(micro_model_files()[0])
    model = official_model(value)
    if model is not None and not os.path.isfile(value):
        return os.path.join(config["model"]["checkpoint_dir"], model.file_name)
    return value


def checkpoint_input(wildcards):
    path = checkpoint_file(wildcards.collection)
    return [] if path is None else [path]


# The propagate settings that change the masks (`reruns` "segmentation" in
# sam2pal.settings): editing these re-segments a collection; device, batch_size, threads,
# memory, runtime and shard_size do not (the jobs read the device from the config; each
# shard's run file records the one it ran on).
MASK_SETTINGS = settings_module.mask_keys()


def propagate_params(wildcards):
    prop = settings(wildcards.collection, "propagate")
    return {key: prop[key] for key in MASK_SETTINGS}


# -- shards ------------------------------------------------------------------------------

_SHARDS = {}


def collection_shards(collection):
    """{shard label: image names} (sam2pal.inference.shards: a finished collection keeps its
    layout). A video is one shard: tracking runs through its frames in order."""
    if collection not in _SHARDS:
        if is_video(collection):
            _SHARDS[collection] = {sharding.label(0, 1): image_names(collection)}
        else:
            size = settings(collection, "propagate")["shard_size"]
            _SHARDS[collection] = sharding.assign(
                image_names(collection), size, f"results/{collection}/propagate"
            )
    return _SHARDS[collection]


def shard_image_paths(wildcards):
    shards = collection_shards(wildcards.collection)
    if wildcards.shard not in shards:
        raise WorkflowError(
            f"collection {wildcards.collection} has no shard {wildcards.shard} "
            f"(it has {len(shards)}: {next(iter(shards))} ...)"
        )
    folder = image_dir(wildcards.collection)
    return [os.path.join(folder, name) for name in shards[wildcards.shard]]


def shard_results(suffix):
    """Input function: every shard's result file of a collection."""

    def files(wildcards):
        return [
            f"results/{wildcards.collection}/propagate/shard-{label}{suffix}"
            for label in collection_shards(wildcards.collection)
        ]

    return files


def provenance_config(wildcards):
    """The settings that shape a collection's masks, recorded in provenance.json
    (threads, memory, outputs and measurement settings are left out: editing them
    does not rerun the merge)."""
    name = wildcards.collection
    entry = COLLECTIONS[name]
    prop = settings(name, "propagate")
    recorded = {
        "collection": {
            key: entry.get(key)
            for key in (*SOURCES, "recursive", "templates", "template_images")
        },
        "model": settings(name, "model"),
        "propagate": {key: prop[key] for key in settings_module.recorded_keys()},
    }
    if is_video(name):
        recorded["video_options"] = video_settings(wildcards)
    ft = settings(name, "finetune")
    if ft["enabled"]:
        recorded["finetune"] = finetune_settings(wildcards)
    elif ft["adapter"]:
        recorded["finetune"] = {"adapter": ft["adapter"]}
    return recorded


# -- corrections (workflow/rules/review.smk) ----------------------------------------------


def corrections_files(collection):
    """The corrections files of a collection (its `corrections`: a file, a list, or
    {files, as_templates})."""
    value = COLLECTIONS[collection].get("corrections") or []
    if isinstance(value, dict):
        value = value.get("files") or []
    return [value] if isinstance(value, str) else list(value)


def correction_templates(collection):
    """The corrections files whose reviewed images join the templates
    (`corrections.as_templates`): the segmentation reruns with them."""
    value = COLLECTIONS[collection].get("corrections")
    if isinstance(value, dict) and value.get("as_templates"):
        return corrections_files(collection)
    return []


def _check_corrections():
    """`review_sample` estimates accuracy from corrections: refused without them."""
    for name, entry in COLLECTIONS.items():
        if entry.get("review_sample") and not corrections_files(name):
            raise WorkflowError(
                f"collections.{name}.review_sample: the sample's accuracy is estimated from "
                f"the reviewer's corrections; give them in collections.{name}.corrections"
            )


_check_corrections()


def corrected_collections():
    """Wildcard pattern matching the collections with corrections (or nothing)."""
    names = [name for name in COLLECTIONS if corrections_files(name)]
    return "|".join(re.escape(name) for name in names) or "(?!)"


def collection_records(wildcards):
    """The records merge_predictions and qc read: the shards' results, or those with
    the corrections applied (reviewed.jsonl) when the collection has corrections."""
    if corrections_files(wildcards.collection):
        return [f"results/{wildcards.collection}/reviewed.jsonl"]
    return shard_results(".jsonl")(wildcards)


def uses_gpu(wildcards):
    return 0 if settings(wildcards.collection, "propagate")["device"] == "cpu" else 1


def all_outputs():
    outputs = []
    for name, entry in COLLECTIONS.items():
        base = f"results/{name}"
        outputs += [
            f"{base}/predictions.json",
            f"{base}/provenance.json",
            f"{base}/measurements.csv",
            f"{base}/measurements_wide.csv",
            f"{base}/qc.csv",
            f"{base}/skipped.csv",
        ]
        if entry.get("ground_truth"):
            outputs.append(f"{base}/metrics.csv")
        reviewed = bool(entry.get("review_sample"))
        if reviewed:
            outputs.append(f"{base}/review_summary.csv")
        out = settings(name, "outputs")
        if is_video(name):
            outputs.append(f"{base}/frames.csv")
            if out["overlay_video"]:
                outputs.append(f"{base}/overlay.mp4")
        if out["save_masks"]:
            outputs.append(f"{base}/masks")
        if out["save_overlays"]:
            outputs.append(f"{base}/overlays")
        if out["report"]:
            outputs += [
                f"{base}/report/qc_scores.png",
                f"{base}/report/measurements.png",
            ]
            if out["gallery_size"]:
                outputs.append(f"{base}/report/gallery")
            if settings(name, "finetune")["enabled"]:
                outputs.append(f"{base}/report/training_curves.png")
            if reviewed:
                outputs.append(f"{base}/report/review.png")
        if out["publish"]:
            outputs += [f"{base}/publish/dwca.zip", f"{base}/publish/roi"]
        # once corrections come back, the review folder stays as it is: drawn again from
        # the corrected QC ranking, its sample would no longer be the one reviewed
        if settings(name, "review")["enabled"] and not corrections_files(name):
            outputs.append(f"{base}/review")
    return outputs
