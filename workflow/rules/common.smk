# Input functions, per-collection settings and the list of final outputs.

import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from sam2pal.errors import InputError  # noqa: E402
from sam2pal.images import list_images  # noqa: E402
from sam2pal.registry import OFFICIAL_MODELS, RANDOM_CHECKPOINT, official_model  # noqa: E402

COLLECTIONS = config["collections"]


wildcard_constraints:
    collection="|".join(re.escape(name) for name in COLLECTIONS),


def settings(collection, section):
    """A config section with the collection's own overrides applied."""
    merged = dict(config[section])
    merged.update(COLLECTIONS[collection].get(section) or {})
    return merged


_IMAGES = {}


def image_names(collection):
    """Relative file names of a collection's images (listed once per run)."""
    if collection not in _IMAGES:
        entry = COLLECTIONS[collection]
        try:
            names = list_images(entry["images"], recursive=entry["recursive"])
        except InputError as exc:
            raise WorkflowError(f"collection {collection}: {exc}")
        if not names:
            raise WorkflowError(
                f"collection {collection}: no images in {entry['images']} "
                "(jpg, jpeg, png, tif, tiff, bmp, webp)"
            )
        _IMAGES[collection] = names
    return _IMAGES[collection]


def image_paths(wildcards):
    folder = COLLECTIONS[wildcards.collection]["images"]
    return [os.path.join(folder, name) for name in image_names(wildcards.collection)]


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
    model = official_model(value)
    if model is not None and not os.path.isfile(value):
        return os.path.join(config["model"]["checkpoint_dir"], model.file_name)
    return value


def checkpoint_input(wildcards):
    path = checkpoint_file(wildcards.collection)
    return [] if path is None else [path]


# The propagate settings that change the masks: editing these re-segments a
# collection; threads, memory and runtime do not.
MASK_SETTINGS = (
    "device",
    "cycle_consistency",
    "fill_hole_area",
    "area_growth_limit",
    "area_clamp_pad",
    "bbox_clamp",
    "on_bad_image",
)


def propagate_params(wildcards):
    prop = settings(wildcards.collection, "propagate")
    return {key: prop[key] for key in MASK_SETTINGS}


def uses_gpu(wildcards):
    return 0 if settings(wildcards.collection, "propagate")["device"] == "cpu" else 1


def all_outputs():
    outputs = []
    for name, entry in COLLECTIONS.items():
        base = f"results/{name}"
        outputs += [
            f"{base}/predictions.json",
            f"{base}/measurements.csv",
            f"{base}/measurements_wide.csv",
            f"{base}/qc.csv",
            f"{base}/skipped.csv",
        ]
        if entry.get("ground_truth"):
            outputs.append(f"{base}/metrics.csv")
        out = settings(name, "outputs")
        if out["save_masks"]:
            outputs.append(f"{base}/masks")
        if out["save_overlays"]:
            outputs.append(f"{base}/overlays")
    return outputs
