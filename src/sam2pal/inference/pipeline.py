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

from sam2pal.errors import InputError
from sam2pal.io.atomic import write_json
from sam2pal.settings import Segmentation, engine_defaults

#: The segmentation engine's settings and their defaults (`sam2pal.settings.Segmentation`).
DEFAULT_ENGINE_SETTINGS = engine_defaults(Segmentation)

#: Targets per model call on a GPU when propagate.batch_size is 0 (auto); 1 on a CPU,
#: where a larger batch is no faster.
GPU_BATCH_SIZE = 8


def batch_size_for(batch_size: int | None, device) -> int:
    """propagate.batch_size for a device: 0 or None is auto (GPU_BATCH_SIZE on CUDA, 1
    elsewhere)."""
    if batch_size:
        if int(batch_size) < 1:
            raise InputError(
                f"batch_size must be 0 (auto) or a positive number, not {batch_size!r}"
            )
        return int(batch_size)
    return GPU_BATCH_SIZE if getattr(device, "type", str(device)).startswith("cuda") else 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in (
        "sam2pal",
        "sam2",
        "torch",
        "numpy",
        "pycocotools",
        "opencv-python-headless",
        "scikit-image",
        "pillow",
        "peft",
        "snakemake",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def prepare_templates(
    spec, image_dir, out_json, base_dir=None, template_files=None, max_templates=None
):
    """Load and validate the templates of a collection, select those to use, and write
    the normalised template file (COCO with RLE and absolute image paths)."""
    from sam2pal.io.templates import load_templates, save_template_set

    templates = load_templates(spec, image_dir=image_dir, base_dir=base_dir)
    templates = templates.select(
        file_names=template_files or None, max_templates=max_templates or None
    )
    save_template_set(templates, out_json)
    return templates


def load_model(config, checkpoint, image_size, seed, device, checkpoint_dir=None):
    """The SAM2 model of a run and its provenance (config, checkpoint, their SHA-256,
    and `base_id`, the identity adapters are checked against)."""
    from sam2pal.models.adapters import base_id
    from sam2pal.models.build import build_model, file_sha256, resolve_config
    from sam2pal.models.download import DEFAULT_CHECKPOINT_DIR, resolve_checkpoint_digest

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


def _engine_settings(engine_settings: dict | None, group=Segmentation) -> dict:
    """The engine settings of a run: `engine_settings` over the defaults of `group`'s
    engine settings; an unknown key is an InputError."""
    defaults = engine_defaults(group)
    settings = {**defaults, **(engine_settings or {})}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise InputError(f"unknown propagation setting(s): {', '.join(sorted(unknown))}")
    return settings


def _run_model(config, checkpoint, image_size, seed, device, threads, checkpoint_dir, adapter):
    """The model of a segmentation run, with its adapter applied, and its provenance."""
    import torch

    from sam2pal.models.build import resolve_device

    if threads:
        torch.set_num_threads(int(threads))
    torch_device = resolve_device(device)
    model, model_info = load_model(
        config, checkpoint, image_size, seed, torch_device, checkpoint_dir
    )
    if adapter:
        from sam2pal.models.adapters import adapter_kind, adapter_sha256, load_adapter

        model = load_adapter(
            model, adapter, model_info["base_id"], config_sha256=model_info["config_sha256"]
        )
        model_info.update(
            adapter=str(Path(adapter).resolve()),
            adapter_kind=adapter_kind(adapter),
            adapter_sha256=adapter_sha256(adapter),
        )
    return model, model_info, torch_device


def _templates_info(templates_json, templates) -> dict:
    from sam2pal.models.build import file_sha256

    return {
        "file": str(Path(templates_json).resolve()),
        "sha256": file_sha256(templates_json),
        "images": [t.file_name for t in templates.images],
        "categories": {str(k): v for k, v in templates.categories.items()},
    }


def _write_run_json(
    run_json,
    started,
    torch_device,
    model_info,
    templates_info,
    settings,
    image_dir,
    counts,
    **extra,
) -> None:
    import torch

    write_json(
        run_json,
        {
            "sam2pal_version": package_versions().get("sam2pal"),
            "started": started,
            "finished": now(),
            "host": socket.gethostname(),
            "device": str(torch_device),
            "device_name": torch.cuda.get_device_name(torch_device)
            if torch_device.type == "cuda"
            else platform.processor() or "cpu",
            "model": model_info,
            "templates": templates_info,
            "settings": settings,
            "image_dir": str(Path(image_dir).resolve()),
            **extra,
            "counts": counts,
            "versions": package_versions(),
        },
        indent=2,
    )


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
    record_extra=None,
    reuse=(),
    run_extra: dict | None = None,
    max_skipped_fraction: float | None = 0.2,
    batch_size: int | None = 0,
) -> dict:
    """Segment `file_names` of `image_dir` from the prepared templates.

    `adapter`: a folder written by `finetune` (LoRA or fully fine-tuned weights),
    applied on top of the checkpoint it was trained from. `record_extra`: a function
    (record -> record) applied to each per-image record before it is written.
    `reuse`: earlier results [(records .jsonl, its run.json)] whose records are taken
    as they are, instead of segmenting again, where they were made with the same
    model, templates and settings and the image has not changed since (finished
    shards, `sam2pal.inference.shards.reusable_results`); `run_json` then lists, as
    `reused_from`, the runs that segmented them. `run_extra`: more fields for `run_json`.
    `batch_size`: targets per model call (`batch_size_for`; 0 is auto), recorded in
    `run_json`; it changes no mask.

    Bad image files are skipped (`on_bad_image` "fail": stop at the first). The run
    stops early with `propagate.TooManySkipped`, after writing `skipped_csv` when
    given, when the images read show that more than `max_skipped_fraction` of the
    collection is bad (`propagate.SkipLimit`); `merge` checks the whole collection.

    Writes the per-image results (`out_jsonl`), the run's provenance (`run_json`) and,
    when given, `skipped_csv`. Returns the counts.
    """
    from sam2pal.inference.engine import Propagator
    from sam2pal.inference.propagate import (
        TooManySkipped,
        run_propagation,
        write_skipped,
        write_skipped_rows,
    )
    from sam2pal.io.templates import load_coco_templates

    started = now()
    settings = _engine_settings(engine_settings)
    templates = load_coco_templates(templates_json)
    model, model_info, torch_device = _run_model(
        config, checkpoint, image_size, seed, device, threads, checkpoint_dir, adapter
    )
    templates_info = _templates_info(templates_json, templates)
    key = _settings_key(
        {"model": model_info, "templates": templates_info["sha256"], "settings": settings}
    )
    # the batch size changes no mask: it is not part of the key
    batch = batch_size_for(batch_size, torch_device)
    propagator = Propagator(model, templates, batch_size=batch, **settings)
    run_extra = dict(run_extra or {}, batch_size=batch)
    reused = reusable_records(reuse, key, image_dir, file_names, log)
    try:
        counts = run_propagation(
            propagator,
            image_dir,
            file_names,
            out_jsonl,
            settings_key=key,
            on_bad_image=on_bad_image,
            progress=progress,
            log=log,
            transform=record_extra,
            reused=reused,
            max_skipped_fraction=max_skipped_fraction,
        )
    except TooManySkipped as exc:
        if skipped_csv is None:
            raise
        write_skipped_rows(exc.skipped, skipped_csv)
        raise TooManySkipped(f"{exc} (all of them in {skipped_csv})", exc.skipped) from None
    sources = _reused_from(out_jsonl)
    if sources:
        run_extra = dict(run_extra or {}, reused_from=sources)
    if skipped_csv is not None:
        write_skipped([out_jsonl], skipped_csv)
    _write_run_json(
        run_json,
        started,
        torch_device,
        model_info,
        templates_info,
        settings,
        image_dir,
        counts,
        settings_key=key,
        **(run_extra or {}),
    )
    return counts


# what a reused record keeps of the run that segmented it (`segmented_by`)
SOURCE_FIELDS = ("shard", "host", "device", "device_name", "started", "finished")


def reusable_records(reuse, key: str, image_dir, file_names, log=None) -> list[dict]:
    """Records of `file_names` in earlier result files made with the same settings
    `key`, for images not modified since (skipped images are tried again); the first
    file that has an image wins. Each record keeps, as `segmented_by`, the shard, host,
    device and times of the run that segmented it."""
    from sam2pal.inference.propagate import read_records

    wanted = set(file_names)
    found: dict[str, dict] = {}
    for records_path, run_path in reuse:
        try:
            with open(run_path, encoding="utf-8") as handle:
                run = json.load(handle)
            same = run.get("settings_key") == key
            made = os.path.getmtime(records_path)
        except (OSError, ValueError, AttributeError):
            continue
        if not same:
            continue
        source = {field: run.get(field) for field in SOURCE_FIELDS}
        for record in read_records(records_path):
            name = record.get("file_name")
            if name in wanted and name not in found and "skipped" not in record:
                try:
                    if os.path.getmtime(Path(image_dir) / name) <= made:
                        found[name] = (
                            record
                            if "segmented_by" in record
                            else dict(record, segmented_by=source)
                        )
                except OSError:
                    continue
    return [found[name] for name in file_names if name in found]


def _reused_from(records_path) -> list[dict]:
    """The earlier runs whose results a result file took (`segmented_by`), with the
    number of images taken from each."""
    from sam2pal.inference.propagate import read_records

    sources: dict[str, dict] = {}
    for record in read_records(records_path):
        source = record.get("segmented_by")
        if source:
            entry = sources.setdefault(json.dumps(source, sort_keys=True), dict(source, images=0))
            entry["images"] += 1
    return sorted(sources.values(), key=lambda s: (str(s.get("shard")), str(s.get("finished"))))


# -- video collections -------------------------------------------------------------------

VIDEO_MODES = ("video", "independent")


def keyframes_of(templates, frames, templates_json) -> dict[int, dict]:
    """{frame index: {(category_id, instance): mask}} of the templates (keyframes),
    matched to the frames by file name (the path inside the frames folder, else the
    bare name), never by COCO image id."""
    by_name = {row.file: row.index for row in frames}
    by_base = {}
    for row in frames:
        by_base.setdefault(Path(row.file).name, []).append(row.index)
    keyframes: dict[int, dict] = {}
    for image in templates.images:
        name = Path(image.file_name.replace("\\", "/"))
        index = by_name.get(name.as_posix())
        if index is None and len(by_base.get(name.name, [])) == 1:
            index = by_base[name.name][0]
        if index is None:
            raise InputError(
                f"{templates_json}: keyframe {image.file_name!r} is not a frame of this video "
                f"(frames are named like {frames[0].file!r}; see frames.csv)"
            )
        if index in keyframes:
            raise InputError(f"{templates_json}: frame {frames[index].file!r} is annotated twice")
        keyframes[index] = {
            (inst.category_id, inst.instance): inst.mask for inst in image.instances
        }
    return keyframes


def _frame_fields(row) -> dict:
    return {"frame_index": row.index, "time_s": row.time_s}


def _keyframe_structures(masks: dict) -> list[dict]:
    from sam2pal.inference.engine import StructurePrediction
    from sam2pal.inference.propagate import structure_record
    from sam2pal.io.masks import BoxMask

    records = []
    for (cid, inst), mask in sorted(masks.items()):
        pred = StructurePrediction(
            category_id=cid,
            instance=inst,
            box=BoxMask.from_full(mask),
            predicted_iou=1.0,
            object_score=1.0,
        )
        records.append({**structure_record(pred), "keyframe": True})
    return records


def segment_video(
    templates_json,
    frames_dir,
    manifest_csv,
    out_jsonl,
    run_json,
    skipped_csv=None,
    mode: str = "video",
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
    run_extra: dict | None = None,
    checkpoint_seconds: float = 60.0,
    max_skipped_fraction: float | None = 0.2,
    batch_size: int | None = 0,
) -> dict:
    """Segment every frame of a video (frames and their manifest from `sam2pal.io.video`)
    from its keyframes (the prepared templates).

    mode "video": SAM2's temporal memory, from every keyframe backwards and forwards
    (`sam2pal.inference.temporal`); "independent": each frame from the keyframes only, like
    photos. Either way a keyframe's annotated structures are output as annotated
    (flagged `keyframe`), and each record carries the frame's index and time.

    In video mode an interrupted run resumes from its last checkpoint (saved every
    `checkpoint_seconds`) with the same results as an uninterrupted run
    (`sam2pal.inference.temporal.track_video`).

    `max_skipped_fraction` stops an independent-mode run early as `segment` does; in
    video mode frames are read in time order, which is no fair sample of the video,
    so only `merge` applies it.
    """
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.io.video import read_manifest

    if mode not in VIDEO_MODES:
        raise InputError(f"unknown video mode {mode!r} (use {' or '.join(VIDEO_MODES)})")
    if mode == "video" and batch_size and int(batch_size) > 1:
        raise InputError(
            f"batch_size {batch_size}: video mode tracks one frame after the other, from the "
            "frames before it; batches of frames need mode 'independent'"
        )
    if on_bad_image not in ("skip", "fail"):
        raise InputError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    frames = read_manifest(manifest_csv)
    if not frames:
        raise InputError(f"{manifest_csv}: the video has no frames")
    templates = load_coco_templates(templates_json)
    keyframes = keyframes_of(templates, frames, templates_json)
    row_of = {row.file: row for row in frames}
    names = [row.file for row in frames]

    def add_frame(record: dict) -> dict:
        row = row_of[record["file_name"]]
        record.update(_frame_fields(row))
        if row.index in keyframes and "structures" in record:
            annotated = {(cid, inst) for cid, inst in keyframes[row.index]}
            kept = [
                s
                for s in record["structures"]
                if (s["category_id"], s["instance"]) not in annotated
            ]
            record["structures"] = sorted(
                kept + _keyframe_structures(keyframes[row.index]),
                key=lambda s: (s["category_id"], s["instance"]),
            )
        return record

    if mode == "independent":
        counts = segment(
            templates_json,
            frames_dir,
            names,
            out_jsonl,
            run_json,
            skipped_csv,
            config=config,
            checkpoint=checkpoint,
            image_size=image_size,
            seed=seed,
            device=device,
            threads=threads,
            engine_settings=engine_settings,
            on_bad_image=on_bad_image,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            log=log,
            adapter=adapter,
            record_extra=add_frame,
            run_extra=run_extra,
            max_skipped_fraction=max_skipped_fraction,
            batch_size=batch_size,
        )
        return {**counts, "keyframes": len(keyframes)}

    from sam2pal.inference.propagate import structure_record, write_skipped
    from sam2pal.inference.temporal import VideoPropagator, track_video
    from sam2pal.io.images import read_image
    from sam2pal.models.build import file_sha256

    started = now()
    settings = _engine_settings(engine_settings)
    model, model_info, torch_device = _run_model(
        config, checkpoint, image_size, seed, device, threads, checkpoint_dir, adapter
    )
    templates_info = _templates_info(templates_json, templates)
    frames_dir = Path(frames_dir)
    # a checkpoint is only resumed from with the same model, keyframes, settings, frames
    # (a re-extraction rewrites the manifest) and kind of device
    key = _settings_key(
        {
            "model": model_info,
            "templates": templates_info["sha256"],
            "settings": settings,
            "mode": mode,
            "frames_dir": str(frames_dir.resolve()),
            "manifest": file_sha256(manifest_csv),
            "manifest_mtime_ns": os.stat(manifest_csv).st_mtime_ns,
            "device": torch_device.type,
        }
    )
    propagator = VideoPropagator(
        model, keyframes, len(frames), lambda i: read_image(frames_dir / frames[i].file), **settings
    )

    def record_of(result) -> dict:
        row = frames[result.index]
        if result.skipped is not None:
            record = {"file_name": row.file, "skipped": result.skipped}
        else:
            structures = []
            for pred in result.predictions:
                entry = structure_record(pred)
                if (pred.category_id, pred.instance) in result.keyframe_objects:
                    entry["keyframe"] = True
                structures.append(entry)
            height, width = result.size
            record = {
                "file_name": row.file,
                "width": int(width),
                "height": int(height),
                "structures": structures,
            }
        record.update(_frame_fields(row))
        return record

    counts = track_video(
        propagator,
        out_jsonl,
        record_of,
        key,
        on_bad_image=on_bad_image,
        progress=progress,
        log=log,
        checkpoint_seconds=checkpoint_seconds,
        desc=Path(out_jsonl).parent.parent.name or "video",
    )
    counts["keyframes"] = len(keyframes)
    if skipped_csv is not None:
        write_skipped([out_jsonl], skipped_csv)
    _write_run_json(
        run_json,
        started,
        torch_device,
        model_info,
        templates_info,
        settings,
        frames_dir,
        counts,
        **(run_extra or {}),
        video={
            "mode": mode,
            "frames": len(frames),
            "keyframes": sorted(keyframes),
            "manifest": str(Path(manifest_csv).resolve()),
            "peak_state_mb": round(propagator.peak_state_bytes / 2**20, 1),
        },
    )
    return counts


def categories_of(templates_json) -> tuple[dict[int, str], set[int]]:
    """Categories of a prepared template file, and those with several instances."""
    with open(templates_json, encoding="utf-8") as handle:
        data = json.load(handle)
    categories = {int(c["id"]): c["name"] for c in data["categories"]}
    multi = {int(a["category_id"]) for a in data["annotations"] if int(a.get("instance", 1)) > 1}
    return categories, multi


def workflow_version(root=None) -> dict:
    """The git commit of the sam2-pal checkout that ran (and whether it had local
    edits), or nulls when it is not a git checkout."""
    import subprocess

    root = Path(root) if root is not None else Path(__file__).resolve().parents[3]
    info = {"path": str(root), "git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            info["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def provenance(
    run_jsons, config: dict | None = None, collection: str | None = None, workflow_root=None
) -> dict:
    """What produced a collection's masks, from the run files of its shards: the model
    (checkpoint and config with their SHA-256, image size, seed), the adapter and its
    SHA-256, the templates, the settings, `config` (the workflow settings that shape the
    masks), package versions, the sam2-pal git commit, and when, where and on which
    device each shard ran. The same dict is the `info` of predictions.json."""
    runs = []
    for path in run_jsons:
        try:
            with open(path, encoding="utf-8") as handle:
                runs.append((str(path), json.load(handle)))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read this run file ({exc})") from None
    first = runs[0][1] if runs else {}
    for path, run in runs[1:]:
        for key in ("model", "templates", "settings"):
            if run.get(key) != first.get(key):
                raise InputError(
                    f"{path}: segmented with other {key} than {runs[0][0]}; rerun the collection"
                )
    model = first.get("model") or {}
    adapter = None
    if model.get("adapter"):
        adapter = {
            k: model.get(f"adapter{s}")
            for k, s in (("path", ""), ("kind", "_kind"), ("sha256", "_sha256"))
        }
    shards = [
        {
            "shard": run.get("shard"),
            **{
                k: run.get(k)
                for k in ("started", "finished", "host", "device", "device_name", "counts")
            },
            "reused_from": run.get("reused_from") or [],
        }
        for _, run in runs
    ]
    ran = shards + [source for shard in shards for source in shard["reused_from"]]
    totals: dict[str, int] = {}
    for shard in shards:
        for key, value in (shard["counts"] or {}).items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    seeds = {"model": model.get("seed")}
    if config and "seed" in (config.get("finetune") or {}):
        seeds["finetune"] = config["finetune"]["seed"]
    started = [s["started"] for s in shards if s["started"]]
    finished = [s["finished"] for s in shards if s["finished"]]
    return {
        "description": "sam2-pal predictions",
        "version": first.get("sam2pal_version"),
        "collection": collection,
        "date_created": now(),
        "started": min(started) if started else None,
        "finished": max(finished) if finished else None,
        "config": config,
        "model": model,
        "adapter": adapter,
        "seeds": seeds,
        "templates": first.get("templates"),
        "settings": first.get("settings"),
        "video": first.get("video"),
        "versions": first.get("versions"),
        "workflow": workflow_version(workflow_root),
        "hosts": sorted({s["host"] for s in ran if s.get("host")}),
        "devices": sorted(
            {f"{s['device']} ({s.get('device_name')})" for s in ran if s.get("device")}
        ),
        "counts": totals,
        "runs": shards,
    }


def merge(
    records,
    templates_json,
    run_jsons,
    out_json,
    polygons: bool = False,
    provenance_json=None,
    config: dict | None = None,
    collection: str | None = None,
    skipped_csv=None,
    max_skipped_fraction: float | None = None,
    log=None,
) -> dict:
    """COCO predictions from per-image results (one file per shard), with the run's
    provenance in `info` and, when asked, in `provenance_json`; and `skipped_csv`.

    With `max_skipped_fraction`, first checks the whole collection: when more than
    that share of its images were skipped, every skipped file goes to `log` and
    `propagate.TooManySkipped` is raised before anything is written."""
    import sys

    from sam2pal.inference.propagate import check_skipped, write_skipped
    from sam2pal.io.coco import merge_predictions

    check_skipped(
        records,
        max_skipped_fraction,
        f"collection {collection}" if collection else Path(out_json).parent,
        log=log or (lambda msg: print(msg, file=sys.stderr)),
    )
    categories, _ = categories_of(templates_json)
    info = provenance(run_jsons, config=config, collection=collection)
    counts = merge_predictions(records, categories, out_json, info=info, polygons=polygons)
    if skipped_csv is not None:
        write_skipped(records, skipped_csv)
    if provenance_json is not None:
        write_json(provenance_json, info, indent=2)
    return counts


def qc(records, templates_json, out_csv) -> int:
    from sam2pal.outputs.qc import write_qc

    categories, multi = categories_of(templates_json)
    return write_qc(records, categories, out_csv, multi_instance=multi)


def list_collection_images(image_dir, recursive: bool = False) -> list[str]:
    from sam2pal.io.images import list_images

    return list_images(image_dir, recursive=recursive)


def relative_names(paths, image_dir) -> list[str]:
    root = os.path.abspath(image_dir)
    return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in paths]


def training_templates(templates_json, extra=()):
    """The prepared templates plus extra training templates (COCO files with image
    folders), whose categories are matched by name; structures the prepared templates
    do not have are left out (and listed in the returned notes)."""
    from sam2pal.io.templates import TemplateSet, load_coco_templates

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
                    notes.append(
                        f"{json_path}: {image.file_name}: structure {name!r} is not in the templates; left out"
                    )
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

    from sam2pal.models.build import resolve_device
    from sam2pal.outputs.evaluate import category_masks, load_coco
    from sam2pal.training.palindrome import FinetuneSettings, Trainer

    started = now()
    if threads:
        torch.set_num_threads(int(threads))
    train_settings = FinetuneSettings.from_dict(settings)
    torch_device = resolve_device(device)
    model, model_info = load_model(
        config, checkpoint, image_size, seed, torch_device, checkpoint_dir
    )
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
        "pool": {
            "dir": str(Path(pool_dir).resolve()),
            "train": len(trainer.train_keys),
            "holdout": trainer.holdout,
        },
        "device": str(torch_device),
        "host": socket.gethostname(),
        "versions": package_versions(),
    }
    result = trainer.train(out_dir, metadata)
    log(
        f"best epoch {result['best_epoch']} (score {result['best_score']}); adapter in {Path(out_dir) / 'adapter'}"
    )
    return result
