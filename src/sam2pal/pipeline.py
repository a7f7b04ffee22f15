"""The steps of a collection run, as functions shared by the workflow and the CLI.

    prepare_templates -> segment -> merge -> qc / measure / evaluate / masks / overlays

Each step reads and writes files only, so the Snakemake rules (workflow/scripts/*.py)
and `sam2pal segment` call the same code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
from importlib import metadata
from pathlib import Path

from .atomic import write_json
from .errors import InputError

DEFAULT_ENGINE_SETTINGS = {
    "cycle_consistency": True,
    "fill_hole_area": 8,
    "area_growth_limit": 0.0,
    "area_clamp_pad": 10,
    "bbox_clamp": False,
}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("sam2pal", "sam2", "torch", "numpy", "pycocotools", "opencv-python-headless",
                 "scikit-image", "pillow", "peft", "snakemake"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def prepare_templates(spec, image_dir, out_json, base_dir=None, template_files=None, max_templates=None):
    """Load and validate the templates of a collection, select those to use, and write
    the normalised template file (COCO with RLE and absolute image paths)."""
    from .templates import load_templates, save_template_set

    templates = load_templates(spec, image_dir=image_dir, base_dir=base_dir)
    templates = templates.select(file_names=template_files or None, max_templates=max_templates or None)
    save_template_set(templates, out_json)
    return templates


def load_model(config, checkpoint, image_size, seed, device, checkpoint_dir=None):
    """The SAM2 model of a run and its provenance (config, checkpoint, their SHA-256,
    and `base_id`, the identity adapters are checked against)."""
    from .adapters import base_id
    from .download import DEFAULT_CHECKPOINT_DIR, resolve_checkpoint_digest
    from .model import build_model, file_sha256, resolve_config

    ckpt, ckpt_sha = resolve_checkpoint_digest(checkpoint, checkpoint_dir or DEFAULT_CHECKPOINT_DIR)
    config_path = resolve_config(config)
    config_sha = file_sha256(config_path)
    model = build_model(config_path, ckpt, image_size=image_size, device=device, seed=seed)
    info = {
        "config": str(config),
        "config_file": str(config_path),
        "config_sha256": config_sha,
        "checkpoint": ckpt if ckpt == "random" else str(Path(ckpt).resolve()),
        "checkpoint_sha256": ckpt_sha,
        "image_size": int(model.image_size),
        "seed": seed,
        "base_id": base_id(ckpt, ckpt_sha, config_sha, seed),
    }
    return model, info


def _settings_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def segment(
    templates_json,
    image_dir,
    file_names: list[str],
    out_jsonl,
    run_json,
    skipped_csv=None,
    config: str = "sam2.1_hiera_t",
    checkpoint="random",
    image_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    engine_settings: dict | None = None,
    on_bad_image: str = "skip",
    checkpoint_dir=None,
    progress: bool = True,
    log=None,
    adapter=None,
) -> dict:
    """Segment `file_names` of `image_dir` from the prepared templates.

    `adapter`: a folder written by `finetune` (LoRA or fully fine-tuned weights),
    applied on top of the checkpoint it was trained from.

    Writes the per-image results (`out_jsonl`), the run's provenance (`run_json`) and,
    when given, `skipped_csv`. Returns the counts.
    """
    import torch

    from .engine import Propagator
    from .model import file_sha256, resolve_device
    from .propagate import run_propagation, write_skipped
    from .templates import load_coco_templates

    started = now()
    if threads:
        torch.set_num_threads(int(threads))
    settings = {**DEFAULT_ENGINE_SETTINGS, **(engine_settings or {})}
    unknown = set(settings) - set(DEFAULT_ENGINE_SETTINGS)
    if unknown:
        raise InputError(f"unknown propagation setting(s): {', '.join(sorted(unknown))}")
    torch_device = resolve_device(device)
    templates = load_coco_templates(templates_json)
    model, model_info = load_model(config, checkpoint, image_size, seed, torch_device, checkpoint_dir)
    if adapter:
        from .adapters import adapter_kind, adapter_sha256, load_adapter

        model = load_adapter(model, adapter, model_info["base_id"])
        model_info.update(adapter=str(Path(adapter).resolve()), adapter_kind=adapter_kind(adapter),
                          adapter_sha256=adapter_sha256(adapter))
    templates_info = {
        "file": str(Path(templates_json).resolve()),
        "sha256": file_sha256(templates_json),
        "images": [t.file_name for t in templates.images],
        "categories": {str(k): v for k, v in templates.categories.items()},
    }
    key = _settings_key({"model": model_info, "templates": templates_info["sha256"], "settings": settings})
    propagator = Propagator(model, templates, **settings)
    counts = run_propagation(
        propagator, image_dir, file_names, out_jsonl, settings_key=key,
        on_bad_image=on_bad_image, progress=progress, log=log,
    )
    if skipped_csv is not None:
        write_skipped([out_jsonl], skipped_csv)
    write_json(run_json, {
        "sam2pal_version": package_versions().get("sam2pal"),
        "started": started,
        "finished": now(),
        "host": socket.gethostname(),
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else platform.processor() or "cpu",
        "model": model_info,
        "templates": templates_info,
        "settings": settings,
        "image_dir": str(Path(image_dir).resolve()),
        "counts": counts,
        "versions": package_versions(),
    }, indent=2)
    return counts


def categories_of(templates_json) -> tuple[dict[int, str], set[int]]:
    """Categories of a prepared template file, and those with several instances."""
    with open(templates_json, encoding="utf-8") as handle:
        data = json.load(handle)
    categories = {int(c["id"]): c["name"] for c in data["categories"]}
    multi = {int(a["category_id"]) for a in data["annotations"] if int(a.get("instance", 1)) > 1}
    return categories, multi


def merge(records, templates_json, run_jsons, out_json, polygons: bool = False) -> dict:
    """COCO predictions from per-image results, with the run's provenance in `info`."""
    from .coco import merge_predictions

    categories, _ = categories_of(templates_json)
    runs = []
    for path in run_jsons:
        with open(path, encoding="utf-8") as handle:
            runs.append(json.load(handle))
    first = runs[0] if runs else {}
    info = {
        "description": "sam2-pal predictions",
        "version": first.get("sam2pal_version"),
        "date_created": now(),
        "model": first.get("model"),
        "templates": first.get("templates"),
        "settings": first.get("settings"),
        "versions": first.get("versions"),
        "runs": [{k: r.get(k) for k in ("started", "finished", "host", "device", "device_name", "counts")} for r in runs],
    }
    return merge_predictions(records, categories, out_json, info=info, polygons=polygons)


def qc(records, templates_json, out_csv) -> int:
    from .qc import write_qc

    categories, multi = categories_of(templates_json)
    return write_qc(records, categories, out_csv, multi_instance=multi)


def list_collection_images(image_dir, recursive: bool = False) -> list[str]:
    from .images import list_images

    return list_images(image_dir, recursive=recursive)


def relative_names(paths, image_dir) -> list[str]:
    root = os.path.abspath(image_dir)
    return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]


def training_templates(templates_json, extra=()):
    """The prepared templates plus extra training templates (COCO files with image
    folders), whose categories are matched by name; structures the prepared templates
    do not have are left out (and listed in the returned notes)."""
    from .templates import TemplateSet, load_coco_templates

    base = load_coco_templates(templates_json)
    by_name = {name: cid for cid, name in base.categories.items()}
    images = list(base.images)
    notes = []
    known = {str(Path(t.path).resolve()) for t in images}
    for json_path, image_dir in extra:
        more = load_coco_templates(json_path, image_dir)
        for image in more.images:
            if str(Path(image.path).resolve()) in known:
                continue
            kept = []
            for inst in image.instances:
                name = more.categories[inst.category_id]
                if name in by_name:
                    inst.category_id = by_name[name]
                    kept.append(inst)
                else:
                    notes.append(f"{json_path}: {image.file_name}: structure {name!r} is not in the templates; left out")
            if kept:
                image.instances = kept
                images.append(image)
                known.add(str(Path(image.path).resolve()))
    return TemplateSet(categories=dict(base.categories), images=images), notes


def finetune(
    templates_json,
    pool_dir,
    pool_names: list[str],
    out_dir,
    config: str = "sam2.1_hiera_t",
    checkpoint="random",
    image_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    settings: dict | None = None,
    ground_truth=None,
    extra_templates=(),
    checkpoint_dir=None,
    log=print,
) -> dict:
    """Palindrome fine-tuning on a collection; writes the adapter folder `out_dir`.

    `pool_names` (relative to `pool_dir`) are the unlabelled specimens; the template
    photos among them are left out. `ground_truth`: a COCO file whose masks give the
    real IoU on held-out specimens. `extra_templates`: [(COCO json, image folder)].
    """
    import torch

    from .evaluate import category_masks, load_coco
    from .model import resolve_device
    from .pal import FinetuneSettings, Trainer

    started = now()
    if threads:
        torch.set_num_threads(int(threads))
    train_settings = FinetuneSettings.from_dict(settings)
    torch_device = resolve_device(device)
    model, model_info = load_model(config, checkpoint, image_size, seed, torch_device, checkpoint_dir)
    templates, notes = training_templates(templates_json, extra_templates)
    for note in notes:
        log(note)
    pool = {name: Path(pool_dir) / name for name in pool_names}
    truth = {}
    if ground_truth:
        gt_path = Path(ground_truth)
        _, masks = category_masks(load_coco(gt_path), gt_path)
        truth = {name: masks[name] for name in pool_names if name in masks}
    trainer = Trainer(model, templates, pool, train_settings, ground_truth=truth, log=log)
    metadata = {
        "sam2pal_version": package_versions().get("sam2pal"),
        "created": started,
        "base_id": model_info["base_id"],
        "base_checkpoint": model_info["checkpoint"],
        "base_checkpoint_sha256": model_info["checkpoint_sha256"],
        "model_config": model_info["config"],
        "model_config_sha256": model_info["config_sha256"],
        "image_size": model_info["image_size"],
        "model_seed": seed,
        "templates": [t.file_name for t in templates.images],
        "pool": {"dir": str(Path(pool_dir).resolve()), "train": len(trainer.train_keys),
                 "holdout": trainer.holdout},
        "device": str(torch_device),
        "host": socket.gethostname(),
        "versions": package_versions(),
    }
    result = trainer.train(out_dir, metadata)
    log(f"best epoch {result['best_epoch']} (score {result['best_score']}); adapter in {Path(out_dir) / 'adapter'}")
    return result
