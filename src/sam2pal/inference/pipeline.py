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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sam2pal.errors import InputError
from sam2pal.io.atomic import write_json
from sam2pal.io.records import ImageRecord, StructureRecord, read_records
from sam2pal.settings import PHOTO_ONLY_SETTINGS, Segmentation, engine_defaults

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
    spec,
    image_dir,
    out_json,
    base_dir=None,
    template_files=None,
    max_templates=None,
    corrections=(),
    collection_dir=None,
):
    """Load and validate the templates of a collection, select those to use, and write
    the normalised template file (COCO with RLE and absolute image paths).

    `corrections`: a reviewer's corrections files whose reviewed images join the
    selected templates (`corrections.as_templates`), found by name in `collection_dir`
    (`sam2pal.outputs.corrections.corrected_templates`)."""
    from sam2pal.io.templates import load_templates, save_template_set

    templates = load_templates(spec, image_dir=image_dir, base_dir=base_dir)
    templates = templates.select(
        file_names=template_files or None, max_templates=max_templates or None
    )
    if corrections:
        from sam2pal.outputs.corrections import corrected_templates

        templates = corrected_templates(templates, corrections, collection_dir or image_dir)
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
        from sam2pal.models.adapters import (
            adapter_kind,
            adapter_sha256,
            load_adapter,
            untouched_structures,
        )

        model = load_adapter(
            model, adapter, model_info["base_id"], config_sha256=model_info["config_sha256"]
        )
        model_info.update(
            adapter=str(Path(adapter).resolve()),
            adapter_kind=adapter_kind(adapter),
            adapter_sha256=adapter_sha256(adapter),
        )
        untouched = untouched_structures(model)
        if untouched:  # segmented with the base weights
            model_info["untouched_structures"] = sorted(untouched)
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


_MODEL_FIELDS = (
    "config",
    "checkpoint",
    "image_size",
    "seed",
    "device",
    "threads",
    "checkpoint_dir",
    "adapter",
)


@dataclass
class SegmentOptions:
    """How a collection is segmented: the keyword arguments of `segment` and
    `segment_video` (and of `sam2pal.inference.runs`).

    config, checkpoint, image_size, seed, device, threads, checkpoint_dir: the model
        (`load_model`).
    adapter: a folder written by `finetune` (LoRA or fully fine-tuned weights),
        applied on top of the checkpoint it was trained from.
    engine_settings: propagation settings over DEFAULT_ENGINE_SETTINGS.
    on_bad_image: "skip" a bad image file, or "fail" at the first.
    max_skipped_fraction: the run stops early with `propagate.TooManySkipped` when the
        images read show that more than this share of the collection is bad
        (`propagate.SkipLimit`); `merge` checks the whole collection.
    batch_size: targets per model call (`batch_size_for`; 0 is auto), recorded in the
        run file; it changes no mask.
    progress, log: progress bars, and where messages go (default: standard error).
    """

    config: str = "sam2.1_hiera_t"
    checkpoint: str = "random"
    image_size: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    checkpoint_dir: str | os.PathLike | None = None
    adapter: str | os.PathLike | None = None
    engine_settings: dict | None = None
    on_bad_image: str = "skip"
    max_skipped_fraction: float | None = 0.2
    batch_size: int | None = 0
    progress: bool = True
    log: Callable[[str], None] | None = None

    def model_args(self) -> dict:
        """The arguments of `_run_model`."""
        return {name: getattr(self, name) for name in _MODEL_FIELDS}


@dataclass
class _Run:
    """A segmentation run under way: its model, templates and settings, and when it
    started."""

    started: str
    settings: dict
    templates: object
    model: object
    model_info: dict
    device: object
    templates_info: dict


def _start_run(templates_json, engine_settings, model_args: dict, templates=None) -> _Run:
    """The model (`_run_model(**model_args)`) and templates of a run (loaded from
    `templates_json` unless given)."""
    from sam2pal.io.templates import load_coco_templates

    started = now()
    settings = _engine_settings(engine_settings)
    if templates is None:
        templates = load_coco_templates(templates_json)
    model, model_info, torch_device = _run_model(**model_args)
    templates_info = _templates_info(templates_json, templates)
    return _Run(started, settings, templates, model, model_info, torch_device, templates_info)


def _finish_run(run: _Run, run_json, image_dir, out_jsonl, skipped_csv, counts, **extra) -> None:
    """Write `skipped_csv` (when given) from the results, and the run's provenance."""
    from sam2pal.inference.propagate import write_skipped

    if skipped_csv is not None:
        write_skipped([out_jsonl], skipped_csv)
    _write_run_json(
        run_json,
        run.started,
        run.device,
        run.model_info,
        run.templates_info,
        run.settings,
        image_dir,
        counts,
        **extra,
    )


def segment(
    templates_json,
    image_dir,
    file_names: list[str],
    out_jsonl,
    run_json,
    skipped_csv=None,
    record_extra: Callable[[ImageRecord], ImageRecord] | None = None,
    reuse=(),
    run_extra: dict | None = None,
    **options,
) -> dict:
    """Segment `file_names` of `image_dir` from the prepared templates.

    Args:
        templates_json: the prepared templates (`prepare_templates`).
        image_dir: the folder of the images.
        file_names: the images, relative to `image_dir`.
        out_jsonl: the per-image results (`sam2pal.io.records`).
        run_json: the run's provenance.
        skipped_csv: the skipped images, when given (written too when the run stops
            for too many).
        record_extra: applied to each per-image record before it is written.
        reuse: earlier results [(records .jsonl, its run.json)] of finished shards
            (`shards.reusable_results`), taken as they are where still valid
            (`reusable_records`); `run_json` lists their runs as `reused_from`.
        run_extra: more fields for `run_json`.
        **options: how to segment (`SegmentOptions`).

    Returns:
        The counts (`propagate.run_propagation`).
    """
    from sam2pal.inference.engine import Propagator

    opts = SegmentOptions(**options)
    run = _start_run(templates_json, opts.engine_settings, opts.model_args())
    key = _settings_key(
        {
            "model": run.model_info,
            "templates": run.templates_info["sha256"],
            "settings": run.settings,
        }
    )
    # the batch size changes no mask: it is not part of the key
    batch = batch_size_for(opts.batch_size, run.device)
    propagator = Propagator(run.model, run.templates, batch_size=batch, **run.settings)
    run_extra = dict(run_extra or {}, batch_size=batch, tone=propagator.tone.record())
    counts = _propagate(
        propagator,
        (image_dir, file_names, out_jsonl, skipped_csv),
        opts,
        settings_key=key,
        transform=record_extra,
        reused=reusable_records(reuse, key, image_dir, file_names, opts.log),
    )
    sources = _reused_from(out_jsonl)
    if sources:
        run_extra = dict(run_extra, reused_from=sources)
    _finish_run(
        run, run_json, image_dir, out_jsonl, skipped_csv, counts, settings_key=key, **run_extra
    )
    return counts


def _propagate(propagator, files, opts: SegmentOptions, **more) -> dict:
    """`propagate.run_propagation` of `files` (image folder, file names, result file,
    skipped.csv); when too many images are skipped, writes them all to skipped.csv
    (when given) before stopping."""
    from sam2pal.inference.propagate import TooManySkipped, run_propagation, write_skipped_rows

    image_dir, file_names, out_jsonl, skipped_csv = files
    try:
        return run_propagation(
            propagator,
            image_dir,
            file_names,
            out_jsonl,
            on_bad_image=opts.on_bad_image,
            progress=opts.progress,
            log=opts.log,
            max_skipped_fraction=opts.max_skipped_fraction,
            **more,
        )
    except TooManySkipped as exc:
        if skipped_csv is None:
            raise
        write_skipped_rows(exc.skipped, skipped_csv)
        raise TooManySkipped(f"{exc} (all of them in {skipped_csv})", exc.skipped) from None


# what a reused record keeps of the run that segmented it (`segmented_by`)
SOURCE_FIELDS = ("shard", "host", "device", "device_name", "started", "finished")


def reusable_records(reuse, key: str, image_dir, file_names, log=None) -> list[ImageRecord]:
    """Records of `file_names` in earlier result files made with the same settings
    `key`, for images not modified since (skipped images are tried again); the first
    file that has an image wins.

    Args:
        reuse: [(records .jsonl, its run.json)].
        key: the settings key of the run.
        image_dir, file_names: the images of the run.
        log: unused (kept for callers).

    Returns:
        The records, in `file_names` order; each keeps, as `segmented_by`, the shard,
        host, device and times of the run that segmented it.
    """
    wanted = set(file_names)
    found: dict[str, ImageRecord] = {}
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
            name = record.file_name
            if name in wanted and name not in found and not record.is_skipped:
                try:
                    if os.path.getmtime(Path(image_dir) / name) <= made:
                        if record.segmented_by is None:
                            record.segmented_by = source
                        found[name] = record
                except OSError:
                    continue
    return [found[name] for name in file_names if name in found]


def _reused_from(records_path) -> list[dict]:
    """The earlier runs whose results a result file took (`segmented_by`), with the
    number of images taken from each."""
    sources: dict[str, dict] = {}
    for record in read_records(records_path):
        source = record.segmented_by
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


def _keyframe_structures(masks: dict) -> list[StructureRecord]:
    from sam2pal.inference.engine import StructurePrediction
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
        records.append(StructureRecord.from_prediction(pred, keyframe=True))
    return records


class _VideoFrames:
    """The frames of a video (its manifest) and its keyframes (the prepared templates),
    and the records of its frames."""

    def __init__(self, templates_json, manifest_csv):
        from sam2pal.io.templates import load_coco_templates
        from sam2pal.io.video import read_manifest

        self.frames = read_manifest(manifest_csv)
        if not self.frames:
            raise InputError(f"{manifest_csv}: the video has no frames")
        self.templates = load_coco_templates(templates_json)
        self.keyframes = keyframes_of(self.templates, self.frames, templates_json)
        self.row_of = {row.file: row for row in self.frames}
        self.names = [row.file for row in self.frames]

    def add_frame(self, record: ImageRecord) -> ImageRecord:
        """A frame's record segmented as a photo, with the frame's index and time, and
        on a keyframe its annotated structures as annotated."""
        row = self.row_of[record.file_name]
        record.frame_index, record.time_s = row.index, row.time_s
        if row.index in self.keyframes and not record.is_skipped:
            annotated = set(self.keyframes[row.index])
            kept = [s for s in record.structures if s.key not in annotated]
            record.structures = sorted(
                kept + _keyframe_structures(self.keyframes[row.index]), key=lambda s: s.key
            )
        return record

    def record_of(self, result) -> ImageRecord:
        """The record of a tracked frame (`sam2pal.inference.temporal.FrameResult`)."""
        row = self.frames[result.index]
        if result.skipped is not None:
            record = ImageRecord.skip(row.file, result.skipped)
        else:
            height, width = result.size
            structures = [
                StructureRecord.from_prediction(
                    pred, keyframe=(pred.category_id, pred.instance) in result.keyframe_objects
                )
                for pred in result.predictions
            ]
            record = ImageRecord(row.file, int(width), int(height), structures)
        record.frame_index, record.time_s = row.index, row.time_s
        return record


def _check_video_options(mode: str, batch_size, on_bad_image: str, engine_settings) -> None:
    orientation = _engine_settings(engine_settings)["orientation"]
    if orientation != "none":
        raise InputError(
            f"orientation {orientation}: the orientation search is for photos; a video is "
            "tracked in its keyframes' orientation (set propagate.orientation, --orientation, "
            "to none)"
        )
    if mode not in VIDEO_MODES:
        raise InputError(f"unknown video mode {mode!r} (use {' or '.join(VIDEO_MODES)})")
    zoom = _engine_settings(engine_settings)["zoom"]
    if mode == "video" and zoom not in ("off", False):
        raise InputError(
            f"zoom {zoom}: the zoom pass segments each frame on its own; video mode tracks "
            "the frames through time (use video_options.mode independent, or zoom off)"
        )
    if mode == "video" and batch_size and int(batch_size) > 1:
        raise InputError(
            f"batch_size {batch_size}: video mode tracks one frame after the other, from the "
            "frames before it; batches of frames need mode 'independent'"
        )
    if on_bad_image not in ("skip", "fail"):
        raise InputError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")


def segment_video(
    templates_json,
    frames_dir,
    manifest_csv,
    out_jsonl,
    run_json,
    skipped_csv=None,
    mode: str = "video",
    run_extra: dict | None = None,
    checkpoint_seconds: float = 60.0,
    **options,
) -> dict:
    """Segment every frame of a video (frames and their manifest from `sam2pal.io.video`)
    from its keyframes (the prepared templates).

    Either mode outputs a keyframe's annotated structures as annotated (flagged
    `keyframe`), and each record carries the frame's index and time.

    Args:
        templates_json: the prepared keyframes (`prepare_templates`).
        frames_dir, manifest_csv: the frames and their manifest (frames.csv).
        out_jsonl, run_json, skipped_csv, run_extra: as for `segment`.
        mode: "video": SAM2's temporal memory, from every keyframe backwards and
            forwards (`sam2pal.inference.temporal`); an interrupted run resumes from
            its last checkpoint (saved every `checkpoint_seconds`) with the same results
            as an uninterrupted run (`sam2pal.inference.temporal.track_video`).
            "independent": each frame from the keyframes only, like photos.
        checkpoint_seconds: time between two checkpoints in video mode.
        **options: how to segment (`SegmentOptions`). Video mode takes no batches, and
            reads frames in time order, which is no fair sample of the video: its
            `max_skipped_fraction` is only applied by `merge`.

    Returns:
        The counts, with the number of keyframes.
    """
    opts = SegmentOptions(**options)
    _check_video_options(mode, opts.batch_size, opts.on_bad_image, opts.engine_settings)
    video = _VideoFrames(templates_json, manifest_csv)
    if mode == "independent":
        counts = segment(
            templates_json,
            frames_dir,
            video.names,
            out_jsonl,
            run_json,
            skipped_csv,
            record_extra=video.add_frame,
            run_extra=run_extra,
            **options,
        )
        return {**counts, "keyframes": len(video.keyframes)}
    run = _start_run(
        templates_json, opts.engine_settings, opts.model_args(), templates=video.templates
    )
    outputs = (out_jsonl, run_json, skipped_csv)
    options = dict(on_bad_image=opts.on_bad_image, progress=opts.progress, log=opts.log)
    return _track_video(
        run, video, Path(frames_dir), manifest_csv, outputs, options, checkpoint_seconds, run_extra
    )


def _track_video(
    run: _Run, video, frames_dir: Path, manifest_csv, outputs, options, checkpoint_seconds, extra
) -> dict:
    """Video mode of `segment_video`: track the frames, write the results (`outputs`:
    records, run.json, skipped.csv) and return the counts."""
    from sam2pal.inference.temporal import VideoPropagator, track_video
    from sam2pal.io.images import read_image
    from sam2pal.models.build import file_sha256

    out_jsonl, run_json, skipped_csv = outputs
    # a checkpoint is only resumed from with the same model, keyframes, settings, frames
    # (a re-extraction rewrites the manifest) and kind of device
    key = _settings_key(
        {
            "model": run.model_info,
            "templates": run.templates_info["sha256"],
            "settings": run.settings,
            "mode": "video",
            "frames_dir": str(frames_dir.resolve()),
            "manifest": file_sha256(manifest_csv),
            "manifest_mtime_ns": os.stat(manifest_csv).st_mtime_ns,
            "device": run.device.type,
        }
    )
    frames = video.frames
    propagator = VideoPropagator(
        run.model,
        video.keyframes,
        len(frames),
        lambda i: read_image(frames_dir / frames[i].file),
        categories=run.templates.categories,
        **{k: v for k, v in run.settings.items() if k not in PHOTO_ONLY_SETTINGS},
    )
    counts = track_video(
        propagator,
        out_jsonl,
        video.record_of,
        key,
        checkpoint_seconds=checkpoint_seconds,
        desc=Path(out_jsonl).parent.parent.name or "video",
        **options,
    )
    counts["keyframes"] = len(video.keyframes)
    video_info = {
        "mode": "video",
        "frames": len(frames),
        "keyframes": sorted(video.keyframes),
        "manifest": str(Path(manifest_csv).resolve()),
        "peak_state_mb": round(propagator.peak_state_bytes / 2**20, 1),
        "tone": propagator.tone.record(),
    }
    _finish_run(
        run, run_json, frames_dir, out_jsonl, skipped_csv, counts, **(extra or {}), video=video_info
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
    """What produced a collection's masks, from the run files of its shards. The same
    dict is the `info` of predictions.json.

    Args:
        run_jsons: the run files of the shards (all of the same model, templates and
            settings).
        config: the workflow settings that shape the masks.
        collection: the collection's name.
        workflow_root: the sam2-pal checkout (default: this one).

    Returns:
        The model (checkpoint and config with their SHA-256, image size, seed), the
        adapter and its SHA-256, the templates, the settings (and whether `tone` lifted
        the photos), `config`, package
        versions, the sam2-pal git commit, and when, where and on which device each
        shard ran.
    """
    runs = _read_runs(run_jsons)
    first = runs[0][1] if runs else {}
    model = first.get("model") or {}
    shards = [_shard_entry(run) for _, run in runs]
    ran = shards + [source for shard in shards for source in shard["reused_from"]]
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
        "adapter": _adapter_of(model),
        "seeds": seeds,
        "templates": first.get("templates"),
        "settings": first.get("settings"),
        "tone": first.get("tone"),  # photos; a video's is in "video"
        "video": first.get("video"),
        "versions": first.get("versions"),
        "workflow": workflow_version(workflow_root),
        "hosts": sorted({s["host"] for s in ran if s.get("host")}),
        "devices": sorted(
            {f"{s['device']} ({s.get('device_name')})" for s in ran if s.get("device")}
        ),
        "counts": _total_counts(shards),
        "runs": shards,
    }


def _read_runs(run_jsons) -> list[tuple[str, dict]]:
    """(path, content) of the run files; all must be of the same model, templates and
    settings."""
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
    return runs


def _adapter_of(model: dict) -> dict | None:
    if not model.get("adapter"):
        return None
    adapter = {
        k: model.get(f"adapter{s}")
        for k, s in (("path", ""), ("kind", "_kind"), ("sha256", "_sha256"))
    }
    if model.get("untouched_structures"):
        adapter["untouched_structures"] = model["untouched_structures"]
    return adapter


def _shard_entry(run: dict) -> dict:
    return {
        "shard": run.get("shard"),
        **{
            k: run.get(k)
            for k in ("started", "finished", "host", "device", "device_name", "counts")
        },
        "reused_from": run.get("reused_from") or [],
    }


def _total_counts(shards: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for shard in shards:
        for key, value in (shard["counts"] or {}).items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


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
    framing: str = Segmentation.framing,
    framing_fill=Segmentation.framing_fill,
    zoom: str = Segmentation.zoom,
    zoom_below: float = Segmentation.zoom_below,
    zoom_margin: float = Segmentation.zoom_margin,
    tone: str = Segmentation.tone,
    mask_choice: str = Segmentation.mask_choice,
    absent: str = Segmentation.absent,
    log=print,
) -> dict:
    """Palindrome fine-tuning on a collection; writes the adapter folder `out_dir`.

    Args:
        templates_json: the prepared templates.
        pool_dir, pool_names: the unlabelled specimens (names relative to the folder);
            the template photos among them are left out.
        out_dir: the adapter folder.
        config, checkpoint, image_size, seed, device, threads, checkpoint_dir: the
            base model (`load_model`).
        settings: `sam2pal.training.palindrome.FinetuneSettings` as a dict.
        ground_truth: a COCO file whose masks give the real IoU on held-out specimens.
        extra_templates: more training templates [(COCO json, image folder)].
        framing, framing_fill: how the images are fitted to the model's square input
            (propagate.framing and framing_fill: as the segmentation frames them).
        zoom, zoom_below, zoom_margin: the segmentation's zoom pass (propagate.zoom...):
            its windows are trained on too (with `zoom_crops`), and the held-out photos
            are scored with it.
        tone: the segmentation's tone (propagate.tone): the photos are toned alike.
        mask_choice, absent: the segmentation's choice of mask (propagate.mask_choice,
            absent): the epochs are judged on masks chosen alike.
        log: where messages go.

    Returns:
        The training result (`Trainer.train`).
    """
    import torch

    from sam2pal.models.build import resolve_device
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
    truth = _ground_truth_masks(ground_truth, pool_names)
    trainer = Trainer(
        model,
        templates,
        pool,
        train_settings,
        ground_truth=truth,
        log=log,
        framing=framing,
        framing_fill=framing_fill,
        zoom=zoom,
        zoom_below=zoom_below,
        zoom_margin=zoom_margin,
        tone=tone,
        mask_choice=mask_choice,
        absent=absent,
    )
    metadata = _adapter_metadata(started, model_info, seed, templates, pool_dir, trainer)
    metadata["device"] = str(torch_device)
    metadata["framing"] = {"framing": framing, "framing_fill": framing_fill}
    metadata["tone"] = trainer.tone.record()
    metadata["mask_rule"] = dict(trainer.mask_rule)
    metadata["zoom"] = {
        **trainer.zoom,
        "crops": len(trainer.crop_templates) > 0,
        "windows": sum(map(len, trainer.crop_targets.values())),
    }
    metadata["host"] = socket.gethostname()
    metadata["versions"] = package_versions()
    result = trainer.train(out_dir, metadata)
    log(
        f"best epoch {result['best_epoch']} (score {result['best_score']}); adapter in {Path(out_dir) / 'adapter'}"
    )
    return result


def _ground_truth_masks(ground_truth, pool_names) -> dict:
    """{file name: masks} of the pool images in a ground-truth COCO file (none when
    not given)."""
    from sam2pal.io.coco import category_masks, load_coco

    if not ground_truth:
        return {}
    gt_path = Path(ground_truth)
    _, masks = category_masks(load_coco(gt_path), gt_path)
    return {name: masks[name] for name in pool_names if name in masks}


def _adapter_metadata(started, model_info, seed, templates, pool_dir, trainer) -> dict:
    """What an adapter records of its base model, templates and pool."""
    return {
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
    }
