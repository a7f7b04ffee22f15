"""The `sam2pal` command line.

    sam2pal segment ...         segment a folder of images from templates (all steps)
    sam2pal video ...           segment a video from annotated keyframes (all steps)
    sam2pal finetune ...        adapt SAM2 to a collection (palindrome self-training)
    sam2pal templates ...       check templates and write the normalised template file
    sam2pal measure ...         measurement tables from a COCO predictions file
    sam2pal evaluate ...        IoU / Dice of predictions against ground truth
    sam2pal masks ...           one PNG per predicted structure
    sam2pal overlays ...        overlay images
    sam2pal publish ...         Darwin Core Archive and Fiji ROI sets of a results folder
    sam2pal review export ...   a review sample for Label Studio or CVAT
    sam2pal review import ...   bring a reviewer's corrections back into a results folder
    sam2pal download-model ...  fetch an official SAM 2.1 checkpoint
    sam2pal make-demo ...       write a synthetic specimen collection

`segment` accepts the flags of the script our users come from (sam2_pal_batch), and
`video` those of its video script (sam2_finetune_palindrome_video); options are
accepted with underscores or dashes. Errors in the user's input are
printed as one line, without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
from pathlib import Path

from sam2pal import settings as settings_module
from sam2pal.errors import InputError

# Flags of the old tool that existed to limit drift along its pseudo-video. Every image
# is segmented from the templates directly here, so there is no drift to limit.
DRIFT_FLAGS = {
    "--interleave_template": "every image is segmented directly from the template memory, "
    "so there is no drift to interleave against",
    "--reanchor_every": "every image is segmented directly from the template memory, "
    "so there is nothing to re-anchor",
    "--multi_mask": "all structures of the template file are always segmented",
}


def _flag(parser_or_group, name: str, **kwargs):
    """Add an option under its underscore name and its dashed spelling."""
    names = [name]
    dashed = "--" + name[2:].replace("_", "-")
    if dashed != name:
        names.append(dashed)
    return parser_or_group.add_argument(*names, **kwargs)


# the value checks of the settings, as argparse types
_positive_float = settings_module.positive_float
_non_negative_float = settings_module.non_negative_float
_non_negative_int = settings_module.non_negative_int
_fraction = settings_module.fraction


MAX_SKIPPED_HELP = (
    "stop, listing them, when more than this share of the images (and at least two) are bad "
    "files (default 0.2; 1: never)"
)


# -- segment --------------------------------------------------------------------------

_SEGMENTATION_FIELDS = {f.name: f for f in dataclasses.fields(settings_module.Segmentation)}
_OUTPUT_FIELDS = {f.name: f for f in dataclasses.fields(settings_module.Outputs)}
_FINETUNE_FIELDS = {f.name: f for f in dataclasses.fields(settings_module.Finetune)}
_VIDEO_FIELDS = {f.name: f for f in dataclasses.fields(settings_module.VideoOptions)}


def _template_args(p, for_training: bool = False):
    t = p.add_argument_group("templates")
    _flag(
        t,
        "--template_image",
        help="the template photo (with --template_mask, or to pick one image of --template_json)",
    )
    _flag(t, "--template_mask", help="binary mask PNG of one structure on --template_image")
    _flag(
        t,
        "--structure_name",
        help="name of the --template_mask structure (default: the mask file name without a trailing _mask)",
    )
    _flag(
        t,
        "--template_labels",
        help="treat --template_mask as a label map: 'VALUE=NAME,...', e.g. '1=head,2=pronotum'",
    )
    _flag(
        t,
        "--template_json",
        help="COCO JSON of the template(s): polygons or RLE, any number of structures and annotated images",
    )
    _flag(
        t,
        "--template_dir",
        help="folder of the --template_json images (default: next to the JSON, then --image_dir)",
    )
    _setting_flag(t, _SEGMENTATION_FIELDS["max_templates"])


def _model_args(p):
    m = p.add_argument_group("model")
    _flag(
        m,
        "--sam2_checkpoint",
        help="SAM2 checkpoint: a .pt file, an official name (sam2.1_hiera_tiny/small/base_plus/large) or 'random'",
    )
    m.add_argument(
        "--sam2_config",
        "--sam2-config",
        "--model_cfg",
        "--model-cfg",
        dest="sam2_config",
        help="SAM2 config: a packaged name (sam2.1_hiera_l) or a yaml file (default: from the checkpoint)",
    )
    _flag(
        m, "--image_size", type=int, help="model input size (multiple of 32; default: the config's)"
    )
    _flag(
        m,
        "--checkpoint_dir",
        default="resources/checkpoints",
        help="where official checkpoints are kept",
    )
    _setting_flag(m, _SEGMENTATION_FIELDS["device"])
    # not propagate.threads (2): 0 keeps PyTorch's default
    _flag(
        m, "--threads", type=int, default=0, help="CPU threads for PyTorch (0: PyTorch's default)"
    )


def _dest(flag: str) -> str:
    return flag[2:]


def _default_text(value) -> str:
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


# more spellings of settings' flags (those of the old tool)
FLAG_ALIASES = {"--num_epochs": ("--epochs",)}


def _setting_flag(group, field, default=dataclasses.MISSING, text=None, **help_values):
    """Add the command-line flag of a settings field (`sam2pal.settings`).

    Args:
        group: the parser or argument group.
        field: a dataclasses.Field of a settings class, with a flag.
        default: the flag's default when not the setting's (None: tell whether it was
            given); its help then names the setting's default.
        text: the flag's help, when not the setting's.
        help_values: fill-ins of the help's {placeholders}.

    Returns:
        The argparse action.
    """
    flag = field.metadata["flag"]
    if text is None:
        text = field.metadata["help"].format(**help_values)
    value = settings_module.default_of(field)
    if isinstance(value, bool):
        if value != flag.invert:
            raise ValueError(f"{flag.name}: a switch turns {field.name} on, or off if inverted")
        kwargs = dict(action="store_true", default=False)
    else:
        kwargs = dict(default=value, choices=flag.choices, nargs=flag.nargs)
        kwargs["type"] = flag.type or (None if flag.nargs or value is None else type(value))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
        if value is not None and not isinstance(value, bool) and "default" not in text:
            text = f"{text} (default {_default_text(value)})"
    names = [flag.name, "--" + flag.name[2:].replace("_", "-"), *FLAG_ALIASES.get(flag.name, ())]
    return group.add_argument(*dict.fromkeys(names), dest=_dest(flag.name), help=text, **kwargs)


#: segmentation settings beside the engine's in the "propagation" group of the flags
PROPAGATION_FLAG_KEYS = ("batch_size",)


def _engine_args(
    p,
    reference: str,
    cut_note: str = "",
    group=settings_module.Segmentation,
    photos: bool = True,
):
    """The "propagation" flags: the engine settings of `group` that have a flag (those of
    photos only when `photos`) and PROPAGATION_FLAG_KEYS."""
    e = p.add_argument_group("propagation")
    fields = {f.name: f for f in dataclasses.fields(group)}
    for key in settings_module.keys(group, engine=True) + PROPAGATION_FLAG_KEYS:
        if fields[key].metadata["flag"] is None:
            continue
        if not photos and key in settings_module.PHOTO_ONLY_SETTINGS:
            continue
        _setting_flag(e, fields[key], reference=reference, cut_note=cut_note)


def _engine_settings(args, group=settings_module.Segmentation) -> dict:
    """The engine settings of `group` from the parsed flags.

    Args:
        args: the parsed arguments (flags added by `_engine_args`).
        group: the segmentation settings class.

    Returns:
        {key: value} of the engine settings, in field order: the default of those
        without a flag (config only), none of those the command has no flag for.
    """
    values = {}
    for field in dataclasses.fields(group):
        if not field.metadata["engine"]:
            continue
        flag = field.metadata["flag"]
        if flag is None:
            values[field.name] = settings_module.default_of(field)
        elif hasattr(args, _dest(flag.name)):
            value = getattr(args, _dest(flag.name))
            values[field.name] = (not value) if flag.invert else value
    return values


def _framing_args(p):
    """The propagate settings that the fine-tuning takes too (--framing, --framing_fill,
    --zoom...), for `finetune`, whose other flags are the trainer's."""
    g = p.add_argument_group("framing and zoom (use the same when segmenting)")
    for key in settings_module.training_keys():
        _setting_flag(g, _SEGMENTATION_FIELDS[key])


def _framing(args) -> dict:
    """{framing, framing_fill, zoom...} of the parsed flags, for `pipeline.finetune`; a
    command without one of these flags (`video` has no --zoom) trains with its default."""
    return {
        key: getattr(args, key, settings_module.default_of(_SEGMENTATION_FIELDS[key]))
        for key in settings_module.training_keys()
    }


def _training_flags(group=settings_module.Training) -> list:
    """(flag, argparse keywords, settings field) of the fine-tuning settings' flags."""
    return [(name, None, field) for name, field in settings_module.flags(group).items()]


# Fine-tuning options: (flag, argparse keywords or None, settings field or None): the
# flags of the trainer's settings (`sam2pal.settings.Training`) and those that are no
# setting. Their defaults are None so that `segment` can tell which ones were given.
FINETUNE_FLAGS = [
    (
        "--use_lora",
        dict(
            action="store_true",
            default=None,
            help="LoRA fine-tuning (recommended; without it, `segment` fine-tunes fully, as the old tool did)",
        ),
        None,
    ),
    *_training_flags(),
    ("--training_json", dict(help="COCO JSON of more annotated training templates"), None),
    ("--training_images_dir", dict(help="folder of the --training_json photos"), None),
    (
        "--ground_truth",
        dict(help="COCO ground truth of some unlabelled images: the real IoU picks the best epoch"),
        None,
    ),
]


def _finetune_args(p, title: str):
    g = p.add_argument_group(title)
    for flag, kwargs, field in FINETUNE_FLAGS:
        if field is not None:
            _setting_flag(g, field, default=None)
        else:
            _flag(g, flag, **kwargs)
    return g


def _finetune_settings(args, lora: bool) -> dict:
    values = {"mode": "lora" if lora else "full"}
    for flag, _, field in FINETUNE_FLAGS:
        value = getattr(args, _dest(flag))
        if field is not None and value is not None:
            values[field.name] = (not value) if field.metadata["flag"].invert else value
    return values


def _bad_file_args(io, files: str, kinds: str):
    """--on_bad_image and --max_skipped_fraction (`files`: images or frames)."""
    _setting_flag(
        io,
        _SEGMENTATION_FIELDS["on_bad_image"],
        text=f"bad {files[:-1]} files ({kinds}): list them in skipped.csv and go on (skip, "
        "default) or stop (fail); a file that cannot be read at all (missing, no permission) "
        "always stops",
    )
    _setting_flag(
        io,
        _SEGMENTATION_FIELDS["max_skipped_fraction"],
        text=MAX_SKIPPED_HELP.replace("images", files),
    )


def _segment_io_args(p):
    io = p.add_argument_group("input and output")
    _flag(io, "--image_dir", required=True, help="folder of images to segment")
    _flag(io, "--output_dir", required=True, help="folder for the results")
    _flag(
        io,
        "--output_timestamp",
        action="store_true",
        help="write into a new OUTPUT_DIR/YYYYmmdd-HHMMSS/ subfolder",
    )
    _setting_flag(
        io, _OUTPUT_FIELDS["save_masks"], text="write one PNG per structure to OUTPUT_DIR/masks/"
    )
    _setting_flag(
        io,
        _OUTPUT_FIELDS["mask_category_prefix"],
        text="mask PNG names start with the category: CATEGORY__IMAGE__ID.png",
    )
    # not outputs.save_overlays (on): off unless asked for, as in the old tool
    io.add_argument(
        "--save_vis",
        "--save-vis",
        "--visualize",
        action="store_true",
        dest="save_vis",
        help="write overlay images to OUTPUT_DIR/overlays/",
    )
    _setting_flag(
        io,
        _OUTPUT_FIELDS["polygons"],
        text="COCO segmentations as polygons instead of RLE (holes are lost)",
    )
    _bad_file_args(io, "images", "truncated, corrupt, not an image")


def _segment_parser(sub):
    p = sub.add_parser(
        "segment",
        help="segment a folder of specimen images from annotated templates",
        description="Segment every image in --image_dir from one or more annotated templates, "
        "and write predictions.json (COCO), measurements.csv, measurements_wide.csv, qc.csv and "
        "skipped.csv to --output_dir. With --pal_finetuning, first adapt SAM2 to the images by "
        "palindrome self-training (the adapter goes to OUTPUT_DIR/finetune/).",
    )
    _template_args(p)
    _segment_io_args(p)
    _model_args(p)

    _engine_args(p, "the template")

    ms = p.add_argument_group("measurements")
    _flag(ms, "--px_per_mm", type=_positive_float, help="scale for millimetre columns")
    _flag(ms, "--calibration_csv", help="per-image scale: CSV with columns file_name,px_per_mm")

    ft = _finetune_args(p, "palindrome fine-tuning (with --pal_finetuning)")
    _setting_flag(
        ft, _FINETUNE_FIELDS["enabled"], text="fine-tune SAM2 on --image_dir before segmenting it"
    )
    _setting_flag(
        ft,
        _FINETUNE_FIELDS["adapter"],
        text="segment with an adapter folder from an earlier fine-tuning (no training)",
    )

    old = p.add_argument_group("flags of the old tool")
    for name in DRIFT_FLAGS:
        if name == "--reanchor_every":
            _flag(old, name, type=int, default=None, help=f"accepted; {DRIFT_FLAGS[name]}")
        else:
            _flag(
                old, name, action="store_true", default=None, help=f"accepted; {DRIFT_FLAGS[name]}"
            )
    p.set_defaults(func=cmd_segment)


def _finetune_parser(sub):
    p = sub.add_parser(
        "finetune",
        help="adapt SAM2 to a collection by palindrome self-training (LoRA by default)",
        description="Palindrome self-training on the unlabelled images of --image_dir from the annotated "
        "templates. Writes OUTPUT_DIR/adapter/ (the best epoch on held-out images), adapter_last/, "
        "training_log.csv and training_curves.png; use the adapter with `segment --adapter` or the "
        "workflow's finetune.adapter.",
    )
    _template_args(p)
    io = p.add_argument_group("input and output")
    _flag(io, "--image_dir", required=True, help="folder of unlabelled images of the collection")
    _flag(io, "--output_dir", required=True, help="folder for the adapter and training logs")
    _model_args(p)
    _finetune_args(p, "training")
    _flag(
        p, "--full", action="store_true", help="full fine-tuning of the --targets instead of LoRA"
    )
    _framing_args(p)
    p.set_defaults(func=cmd_finetune)


def _video_io_args(p):
    io = p.add_argument_group("input and output")
    _flag(io, "--input", help="video file (frames are extracted into OUTPUT_DIR/frames/)")
    _flag(
        io,
        "--video_dir",
        help="folder of frames extracted beforehand (00000.jpg ... or any names in natural order)",
    )
    _flag(
        io,
        "--annotations",
        required=True,
        help="COCO JSON of the keyframes: annotations on any frames, matched by file name",
    )
    _flag(io, "--output_dir", required=True, help="folder for the results")
    _flag(
        io,
        "--export_predictions",
        default="predictions.json",
        help="name of the COCO predictions file (relative names go in OUTPUT_DIR; default predictions.json)",
    )
    _setting_flag(
        io,
        _OUTPUT_FIELDS["save_masks"],
        text="write one PNG per structure and frame to OUTPUT_DIR/masks/",
    )
    _setting_flag(
        io,
        _OUTPUT_FIELDS["overlay_video"],
        text="write OUTPUT_DIR/overlay.mp4: the frames with their masks drawn on",
    )
    _bad_file_args(io, "frames", "truncated, corrupt")


def _extraction_args(p):
    """The video options that choose how frames are extracted; None until given (they
    are refused with --video_dir, except --fps)."""
    fr = p.add_argument_group("frame extraction (with --input)")
    for key in settings_module.keys(settings_module.VideoOptions, reruns="frames"):
        _setting_flag(fr, _VIDEO_FIELDS[key], default=None)


def _video_finetune_args(p):
    ft = _finetune_args(p, "palindrome fine-tuning (with --use_lora or --full_finetune)")
    _flag(ft, "--full_finetune", action="store_true", help="full fine-tuning instead of LoRA")
    _flag(
        ft,
        "--skip_training",
        action="store_true",
        help="do not train (segment with --checkpoint, or the base model)",
    )
    _flag(
        ft,
        "--checkpoint",
        help="trained weights to segment with: an adapter folder (OUTPUT_DIR/finetune/adapter "
        "of an earlier run) or a merged .pt checkpoint",
    )
    _flag(ft, "--train_only", action="store_true", help="train and stop (no segmentation)")


def _video_parser(sub):
    p = sub.add_parser(
        "video",
        help="segment every frame of a video from annotated keyframes",
        description="Extract the frames of --input (or read --video_dir), segment every frame from the "
        "keyframes annotated in --annotations (SAM2's video memory, from every keyframe backwards and "
        "forwards), and write OUTPUT_DIR/frames/ (00000.jpg ...), frames.csv, predictions.json (COCO; "
        "image id = frame index), measurements.csv, measurements_wide.csv, qc.csv and, on request, "
        "overlay.mp4. With --use_lora, first adapt SAM2 to the video by palindrome self-training "
        "(keyframes as templates, the other frames unlabelled).",
    )
    _video_io_args(p)
    _extraction_args(p)
    _model_args(p)
    _setting_flag(p, _VIDEO_FIELDS["mode"])
    _engine_args(
        p,
        "the previous frame (video mode) or the keyframes (independent mode)",
        photos=False,
        cut_note="; in video mode the cut mask is also what SAM2 keeps in its memory for the next frames",
    )
    ms = p.add_argument_group("measurements")
    _flag(ms, "--px_per_mm", type=_positive_float, help="scale for millimetre columns")
    _video_finetune_args(p)
    p.set_defaults(func=cmd_video)


def _trained_weights(path: str | None, checkpoint: str):
    """(checkpoint, adapter) for --checkpoint: an adapter folder, or a full checkpoint."""
    if not path:
        return checkpoint, None
    target = Path(path)
    if target.is_dir():
        from sam2pal.models.adapters import adapter_kind

        try:
            adapter_kind(target)
        except InputError as exc:
            raise InputError(f"--checkpoint {target}: not an adapter folder ({exc})") from None
        return checkpoint, target
    if target.is_file():
        return str(target), None
    raise InputError(f"--checkpoint {target}: no such adapter folder or checkpoint file")


def cmd_video(args) -> int:
    from sam2pal.inference import pipeline
    from sam2pal.inference.runs import RunOutputs, run_video

    train = _check_video_flags(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, checkpoint = _model_choice(args)
    checkpoint, adapter = _trained_weights(args.checkpoint, checkpoint)
    manifest = out_dir / "frames.csv"
    frames_dir, rows = _video_frames(args, out_dir, manifest)
    print(f"{len(rows)} frames in {frames_dir}", file=sys.stderr)
    templates_json = out_dir / "templates.json"
    pipeline.prepare_templates(str(args.annotations), frames_dir, templates_json)
    names = [row.file for row in rows]
    if train:
        adapter = (
            _train(
                args,
                out_dir / "finetune",
                templates_json,
                frames_dir,
                names,
                config,
                checkpoint,
                lora=not args.full_finetune,
            )
            / "adapter"
        )
        if args.train_only:
            print(f"adapter written to {adapter}")
            return 0
    predictions = Path(args.export_predictions)
    if not predictions.is_absolute():
        predictions = out_dir / predictions
    outputs = RunOutputs(
        predictions=predictions,
        px_per_mm=args.px_per_mm,
        save_masks=args.save_masks,
        overlays=args.overlay_video,
    )
    counts = run_video(
        templates_json,
        frames_dir,
        manifest,
        out_dir,
        outputs,
        mode=args.mode,
        **_segment_options(args, config, checkpoint, adapter),
    )
    print(
        f"segmented {counts['segmented']} frames ({counts['keyframes']} keyframes), skipped "
        f"{counts['skipped']}; predictions in {predictions}"
    )
    return 0


def _segment_options(args, config: str, checkpoint, adapter) -> dict:
    """The `pipeline.SegmentOptions` of `segment` and `video`."""
    return dict(
        config=config,
        checkpoint=checkpoint,
        image_size=args.image_size,
        seed=_model_seed(args),
        device=args.device,
        threads=args.threads or None,
        on_bad_image=args.on_bad_image,
        max_skipped_fraction=args.max_skipped_fraction,
        checkpoint_dir=args.checkpoint_dir,
        adapter=adapter,
        engine_settings=_engine_settings(args),
        batch_size=args.batch_size,
    )


def _video_frames(args, out_dir: Path, manifest: Path):
    """(frames folder, manifest rows) of `video`: frames extracted from --input, or
    the frames of --video_dir."""
    from sam2pal.io.video import extract_frames, frames_from_dir

    if args.input:
        frames_dir = out_dir / "frames"
        rows = extract_frames(
            args.input,
            frames_dir,
            manifest,
            fps=args.fps,
            start=args.start,
            end=args.end,
            max_frames=args.max_frames,
            max_size=args.max_size,
            image_format=args.image_format or "jpg",
        )
    else:
        frames_dir = Path(args.video_dir)
        rows = frames_from_dir(frames_dir, manifest, fps=args.fps)
    return frames_dir, rows


def _check_video_flags(args) -> bool:
    """Reject flags of `video` that do not go together; returns whether to train."""
    if bool(args.input) == bool(args.video_dir):
        raise InputError(
            "give the video: --input VIDEO_FILE or --video_dir FRAMES_FOLDER (one of them)"
        )
    if args.full_finetune and args.use_lora:
        raise InputError("give either --use_lora or --full_finetune, not both")
    train = bool(args.use_lora or args.full_finetune) and not args.skip_training
    _check_video_training_flags(args, train)
    if args.video_dir and any(
        v is not None
        for v in (args.start, args.end, args.max_frames, args.max_size, args.image_format)
    ):
        raise InputError(
            "--start, --end, --max_frames, --max_size and --image_format choose how frames are "
            "extracted from an --input video; --video_dir frames are used as they are"
        )
    return train


def _check_video_training_flags(args, train: bool) -> None:
    random_weights = _random_weights(args) and not (
        args.checkpoint and Path(args.checkpoint).is_file()
    )
    given = [
        flag
        for flag, _, _ in FINETUNE_FLAGS
        if flag != "--use_lora"
        and getattr(args, flag[2:]) is not None
        and not (flag == "--seed" and random_weights)
    ]
    if args.seed is not None and not (train or random_weights):
        raise InputError(_SEED_UNUSED.format(train="--use_lora or --full_finetune"))
    if given and not (args.use_lora or args.full_finetune):
        raise InputError(
            f"{', '.join(given)}: training options need --use_lora (or --full_finetune)"
        )
    if args.skip_training and (args.use_lora or args.full_finetune or given):
        print(
            "note: --skip_training: no training; the training options are not used", file=sys.stderr
        )
    if train and args.checkpoint:
        raise InputError(
            "--checkpoint segments with earlier trained weights: add --skip_training, "
            "or drop --checkpoint to train new ones"
        )
    if args.train_only and not train:
        raise InputError(
            "--train_only needs --use_lora (or --full_finetune) without --skip_training"
        )


def _default_structure_name(mask_path: str) -> str:
    stem = Path(mask_path).stem
    for suffix in ("_mask", "-mask", ".mask"):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _parse_labels(text: str) -> dict[int, str]:
    labels = {}
    for item in text.split(","):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise InputError(
                f"--template_labels: '{item}' is not VALUE=NAME (e.g. '1=head,2=pronotum')"
            )
        labels[int(value)] = name.strip()
    return labels


def _png_entry(image, mask, labels, structure_name, image_flag: str, mask_flag: str) -> dict:
    """A PNG template entry: a binary mask of one structure, or a label map."""
    if not image:
        raise InputError(f"{mask_flag} needs {image_flag}")
    entry = {"image": image, "mask": mask}
    if labels:
        entry["labels"] = _parse_labels(labels)
    else:
        entry["structure"] = structure_name or _default_structure_name(mask)
    return entry


def _template_spec(args, out_dir: Path):
    """(spec, image_dir) for `pipeline.prepare_templates` from the segment flags."""
    if args.template_mask and args.template_json:
        raise InputError("give either --template_mask or --template_json, not both")
    if not args.template_mask:
        for flag in ("--structure_name", "--template_labels"):
            if getattr(args, flag[2:]) is not None:
                raise InputError(
                    f"{flag} names the structures of a --template_mask; "
                    "with --template_json they are the categories of the COCO file"
                )
    elif args.template_dir is not None:
        raise InputError(
            "--template_dir is the folder of the --template_json photos; "
            "with --template_mask give the photo as --template_image"
        )
    if args.template_mask:
        entry = _png_entry(
            args.template_image,
            args.template_mask,
            args.template_labels,
            args.structure_name,
            "--template_image",
            "--template_mask",
        )
        return [entry], None
    if not args.template_json:
        raise InputError(
            "give the templates: --template_json, or --template_image with --template_mask"
        )
    if not args.template_image:
        # the loader also looks next to the JSON file
        return str(args.template_json), args.template_dir or args.image_dir
    return _template_subset(args, out_dir), None


def _template_subset(args, out_dir: Path) -> str:
    """A template image given with a COCO file: that image (matched by file name, or
    the only annotated image of the file) is the template; returns the COCO file of
    that image alone (written to `out_dir`)."""
    from sam2pal.io.atomic import write_json
    from sam2pal.io.coco import load_coco

    path = Path(args.template_json)
    data = load_coco(path, role="template file", sizes=False, integer_ids=True)
    annotated = {a["image_id"] for a in data["annotations"]}
    images = [im for im in data["images"] if im["id"] in annotated]
    wanted = Path(args.template_image).name
    chosen = [im for im in images if Path(im["file_name"]).name == wanted]
    if not chosen and len(images) == 1:
        chosen = images
    if not chosen:
        raise InputError(
            f"{path}: no annotated image named {wanted} (annotated: {', '.join(im['file_name'] for im in images)})"
        )
    image = dict(chosen[0], path=str(Path(args.template_image).resolve()))
    subset = dict(
        data,
        images=[image],
        annotations=[a for a in data["annotations"] if a["image_id"] == image["id"]],
    )
    subset_path = out_dir / "template_input.json"
    write_json(subset_path, subset)
    return str(subset_path)


_SEED_UNUSED = (
    "--seed seeds the training ({train}) and the weights of --sam2_checkpoint random; "
    "here nothing is random, so it would change nothing"
)


def _random_weights(args) -> bool:
    from sam2pal.models.registry import RANDOM_CHECKPOINT

    return str(args.sam2_checkpoint).strip() == RANDOM_CHECKPOINT


def _model_seed(args) -> int:
    """The seed of the model's weights when they are random (--seed, default 0); it is
    recorded with the model and in adapters trained on it."""
    return args.seed if args.seed is not None else 0


def _model_choice(args) -> tuple[str, str]:
    from sam2pal.models.registry import choose_config

    checkpoint = args.sam2_checkpoint
    if checkpoint is None:
        raise InputError(
            "give --sam2_checkpoint: a .pt file, an official name such as sam2.1_hiera_large, or 'random'"
        )
    return choose_config(args.sam2_config, checkpoint), checkpoint


def cmd_segment(args) -> int:
    from sam2pal.inference.runs import RunOutputs, run_photos

    _check_segment_flags(args)
    out_dir = Path(args.output_dir)
    if args.output_timestamp:
        out_dir = out_dir / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    config, checkpoint, templates_json, names = _prepare(args, out_dir)
    adapter = args.adapter
    if args.pal_finetuning:
        adapter = (
            _train(
                args,
                out_dir / "finetune",
                templates_json,
                args.image_dir,
                names,
                config,
                checkpoint,
                lora=bool(args.use_lora),
            )
            / "adapter"
        )
    outputs = RunOutputs(
        polygons=args.polygons,
        px_per_mm=args.px_per_mm,
        calibration_csv=args.calibration_csv,
        save_masks=args.save_masks,
        category_prefix=args.output_category_prefix,
        overlays=args.save_vis,
    )
    counts = run_photos(
        templates_json,
        args.image_dir,
        names,
        out_dir,
        outputs,
        **_segment_options(args, config, checkpoint, adapter),
    )
    print(
        f"segmented {counts['segmented']} images, skipped {counts['skipped']}; results in {out_dir}"
    )
    return 0


def _check_segment_flags(args) -> None:
    """Reject flags of `segment` that do not go together; notes on flags of the old
    tool that change nothing here."""
    given = [
        flag
        for flag, _, _ in FINETUNE_FLAGS
        if getattr(args, flag[2:]) is not None and not (flag == "--seed" and _random_weights(args))
    ]
    if args.seed is not None and not (args.pal_finetuning or _random_weights(args)):
        raise InputError(_SEED_UNUSED.format(train="--pal_finetuning"))
    if given and not args.pal_finetuning:
        raise InputError(f"{', '.join(given)}: training options need --pal_finetuning")
    if args.output_category_prefix and not args.save_masks:
        raise InputError(
            "--output_category_prefix names the mask PNGs: add --save_masks to write them"
        )
    if args.pal_finetuning and args.adapter:
        raise InputError(
            "give either --pal_finetuning (train a new adapter) or --adapter (use one), not both"
        )
    for flag, why in DRIFT_FLAGS.items():
        if getattr(args, flag[2:]) not in (None, False):
            print(f"note: {flag} has no effect here: {why}", file=sys.stderr)


def _prepare(args, out_dir: Path):
    """(config, checkpoint, normalised template file, image names) for segment/finetune."""
    from sam2pal.inference.pipeline import list_collection_images, prepare_templates

    config, checkpoint = _model_choice(args)
    spec, template_image_dir = _template_spec(args, out_dir)
    templates_json = out_dir / "templates.json"
    prepare_templates(spec, template_image_dir, templates_json, max_templates=args.max_templates)
    names = list_collection_images(args.image_dir)
    if not names:
        raise InputError(
            f"{args.image_dir}: no images found (extensions: jpg, jpeg, png, tif, tiff, bmp, webp)"
        )
    return config, checkpoint, templates_json, names


def _train(
    args, out_dir: Path, templates_json, pool_dir, pool_names, config, checkpoint, lora: bool
) -> Path:
    from sam2pal.inference import pipeline

    if args.training_images_dir and not args.training_json:
        raise InputError("--training_images_dir needs --training_json")
    extra = (
        [(args.training_json, args.training_images_dir or Path(args.training_json).parent)]
        if args.training_json
        else []
    )
    pipeline.finetune(
        templates_json,
        pool_dir,
        pool_names,
        out_dir,
        config=config,
        checkpoint=checkpoint,
        image_size=args.image_size,
        seed=_model_seed(args),
        device=args.device,
        threads=args.threads or None,
        settings=_finetune_settings(args, lora),
        ground_truth=args.ground_truth,
        extra_templates=extra,
        checkpoint_dir=args.checkpoint_dir,
        log=lambda msg: print(msg, file=sys.stderr),
        **_framing(args),
    )
    return out_dir


def cmd_finetune(args) -> int:

    if args.full and args.use_lora:
        raise InputError("give either --full or --use_lora, not both")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, checkpoint, templates_json, names = _prepare(args, out_dir)
    _train(
        args, out_dir, templates_json, args.image_dir, names, config, checkpoint, lora=not args.full
    )
    print(f"adapter written to {out_dir / 'adapter'} (last epoch: {out_dir / 'adapter_last'})")
    return 0


# -- small commands -------------------------------------------------------------------


def cmd_templates(args) -> int:
    from sam2pal.inference import pipeline

    spec = args.coco
    if args.mask and args.coco:
        raise InputError("give either --coco or --mask, not both")
    if not args.mask:
        for flag in ("--image", "--structure_name", "--labels"):
            if getattr(args, flag[2:]) is not None:
                raise InputError(
                    f"{flag} goes with --mask (a PNG mask template); a --coco file names its own "
                    "photos and structures"
                )
    if args.mask:
        spec = [
            _png_entry(args.image, args.mask, args.labels, args.structure_name, "--image", "--mask")
        ]
    if spec is None:
        raise InputError("give --coco, or --image with --mask")
    templates = pipeline.prepare_templates(
        spec,
        args.image_dir,
        args.out,
        template_files=args.template_files,
        max_templates=args.max_templates,
    )
    n = sum(len(t.instances) for t in templates.images)
    print(
        f"{len(templates.images)} template image(s), {n} structure instance(s), "
        f"categories: {', '.join(templates.categories.values())}; written to {args.out}"
    )
    return 0


def cmd_measure(args) -> int:
    from sam2pal.outputs.measure import measure_coco

    summary = measure_coco(
        args.coco,
        args.out,
        px_per_mm=args.px_per_mm,
        calibration_csv=args.calibration_csv,
        wide_csv=args.wide,
    )
    print(
        f"measured {summary['n_annotations']} structures on {summary['n_images']} images -> {args.out}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from sam2pal.outputs.evaluate import evaluate

    means = evaluate(
        args.gt,
        args.pred,
        args.out,
        templates=args.templates,
        finetune_record=args.finetune_record,
        log=print,
    )
    for category, iou in means.items():
        print(f"{category}: mean IoU {iou:.3f} (targets)")
    return 0


def cmd_masks(args) -> int:
    from sam2pal.outputs.visualize import export_masks

    n = export_masks(args.coco, args.out_dir, category_prefix=args.category_prefix)
    print(f"wrote {n} mask PNGs to {args.out_dir}")
    return 0


def cmd_overlays(args) -> int:
    from sam2pal.outputs.visualize import write_overlays

    n = write_overlays(args.coco, args.image_dir, args.out_dir, max_side=args.max_side)
    print(f"wrote {n} overlays to {args.out_dir}")
    return 0


def cmd_download(args) -> int:
    from sam2pal.models.download import download_model

    path = download_model(args.name, args.dest)
    print(f"{path}: ok")
    return 0


DEMO_VIDEO_README = """# Demo video (synthetic)

`video.mp4`: {n_frames} frames at {fps} fps ({width} x {height}) of one beetle that turns,
drifts and flexes, rendered by `sam2pal make-demo --video` (seed {seed}) from a real NEON
beetle part mask ({mask_name}; MIT licence, see src/sam2pal/data/neon_beetles_masks).

- `keyframes.json`: COCO annotations of the keyframes {keyframes} (files `00008.jpg` ...,
  as the frames are named when extracted; matched by file name).
- `ground_truth.json`: the exact part masks of every frame (image id = frame index).
"""


def cmd_make_demo(args) -> int:
    from sam2pal.synth.specimens import make_collection, make_video

    if args.video:
        keyframes = (8, 24)
        result = make_video(
            args.out_dir, n_frames=32, fps=8, seed=args.seed, size=(320, 240), keyframes=keyframes
        )
        from sam2pal.io.atomic import atomic_write

        with atomic_write(Path(args.out_dir) / "README.md") as handle:
            handle.write(
                DEMO_VIDEO_README.format(
                    n_frames=32,
                    fps=8,
                    width=320,
                    height=240,
                    seed=args.seed,
                    mask_name=result["mask_name"],
                    keyframes=list(keyframes),
                )
            )
        print(f"wrote a synthetic video to {result['video']} (keyframes {list(keyframes)})")
        return 0
    result = make_collection(
        args.out_dir, n_images=args.n_images, n_templates=args.n_templates, seed=args.seed
    )
    print(
        f"wrote a synthetic collection to {args.out_dir} ({result.get('n_images', args.n_images)} images)"
    )
    return 0


def cmd_pretrain(args) -> int:
    import torch

    from sam2pal.training.pretrain import PretrainSettings, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    values = {
        k: getattr(args, k)
        for k in (
            "steps",
            "episodes_per_step",
            "learning_rate",
            "image_size",
            "low_res_size",
            "low_res_steps",
            "seed",
            "appearance",
            "zoom_fraction",
            "low_contrast_fraction",
            "thin_weight",
            "body_plan",
            "init",
            "procedural_fraction",
            "repose_fraction",
            "warmup_steps",
            "minutes",
        )
    }
    record = pretrain(
        PretrainSettings(**values),
        args.out_dir,
        config=args.config,
        device=args.device,
        name=args.name,
        resume=not args.restart,
        workers=args.workers,
        stop_after=args.stop_after,
        eval_every=args.eval_every,
    )
    if record is None:
        return 0
    print(
        f"wrote {Path(args.out_dir) / record['checkpoint']} (sha256 {record['checkpoint_sha256']}, "
        f"{record['seconds'] / 60:.1f} min)"
    )
    return 0


def _pretrain_parser(sub):
    from sam2pal.training.pretrain import PretrainSettings

    d = PretrainSettings()
    p = sub.add_parser(
        "pretrain",
        help="train the small sam2pal-micro SAM2 from scratch on synthetic specimens",
        description="Train a SAM2 (the real SAM2Base; by default the reduced sam2pal-micro config) from "
        "random weights on synthetic specimen episodes: annotated template(s) in memory, the target's part "
        "masks as supervision (or, with --init, from given weights). The defaults reproduce sam2pal-micro "
        "v1 (about an hour on 2 CPU cores); v2 went on from v1, v3 from v2, v4 from v3, v5 from v4, v6 from v5, v7 from v6, v8 from v7, v9 from v8, v10 from v9, v11 from v10 and the shipped v12 from v11 with the options given in "
        "resources/models/README.md. Writes NAME.pt, NAME.yaml, NAME.training.json, "
        "NAME.training.csv (the loss curve) and NAME.heldout.csv (the held-out curve) to --out_dir; an "
        "interrupted run resumes from NAME.state.pt.",
    )
    _flag(p, "--out_dir", default="resources/models", help="folder to write the model to")
    _flag(p, "--name", default="sam2pal-micro", help="file name stem of the model")
    _flag(p, "--config", help="SAM2 model yaml (default: resources/models/sam2pal-micro.yaml)")
    _flag(p, "--steps", type=int, default=d.steps, help="optimizer steps")
    _flag(
        p,
        "--episodes_per_step",
        type=int,
        default=d.episodes_per_step,
        help="episodes in one batch",
    )
    _flag(
        p,
        "--learning_rate",
        type=_positive_float,
        default=d.learning_rate,
        help="peak AdamW learning rate",
    )
    _flag(
        p, "--image_size", type=int, default=d.image_size, help="model input size (the final steps)"
    )
    _flag(
        p,
        "--low_res_size",
        type=int,
        default=d.low_res_size,
        help="input size of the first --low_res_steps",
    )
    _flag(
        p,
        "--low_res_steps",
        type=int,
        default=d.low_res_steps,
        help="steps trained at --low_res_size",
    )
    _flag(p, "--seed", type=int, default=d.seed, help="seed of the episodes and of the weights")
    _pretrain_episode_flags(p, d)
    _pretrain_run_flags(p, d)
    p.set_defaults(func=cmd_pretrain)


def _pretrain_episode_flags(p, d) -> None:
    """What the synthetic training episodes look like."""
    _flag(
        p,
        "--appearance",
        default=d.appearance,
        help="look of the episodes: v1 (sam2pal-micro v1's), randomised (domain-randomised colours, "
        "grounds, lighting, blur, noise and JPEG) or mixed (half and half)",
    )
    _flag(
        p,
        "--zoom_fraction",
        type=float,
        default=d.zoom_fraction,
        help="share of episodes (0-1) that are zoomed crops of a part or the whole specimen",
    )
    _flag(
        p,
        "--low_contrast_fraction",
        type=float,
        default=d.low_contrast_fraction,
        help="share of the randomised episodes (0-1) whose specimen is about as light as its "
        "ground (told apart by hue and chroma)",
    )
    _flag(
        p,
        "--thin_weight",
        type=float,
        default=d.thin_weight,
        help="extra weight (>= 0) of the mask loss of structures thinner than two cells of the "
        "model's output grid (8 px at 384): 1 + this x (1 - width / 2 cells); 0 weighs all alike",
    )
    _flag(
        p,
        "--body_plan",
        default=d.body_plan,
        help="procedural insects: v1 (sam2pal-micro v1's) or v2 (wider proportions, compound eyes, scapes, "
        "elbowed antennae)",
    )
    _flag(
        p,
        "--procedural_fraction",
        type=float,
        default=d.procedural_fraction,
        help="share of shapes (0-1) drawn from procedural insects rather than the NEON masks",
    )
    _flag(
        p,
        "--repose_fraction",
        type=float,
        default=d.repose_fraction,
        help="share of the drawn specimens (0-1; each template and target its own draw) whose "
        "antennae and legs are turned about their bases",
    )


def _pretrain_run_flags(p, d) -> None:
    """Schedule, start point, machine and resuming."""
    _flag(
        p,
        "--warmup_steps",
        type=int,
        default=d.warmup_steps,
        help="steps of linear learning-rate warm-up",
    )
    _flag(
        p,
        "--init",
        default=d.init,
        help="start from this checkpoint (file or name, e.g. sam2pal-micro) instead of random weights",
    )
    _flag(p, "--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _flag(
        p, "--threads", type=int, default=0, help="CPU threads for PyTorch (0: PyTorch's default)"
    )
    _flag(
        p,
        "--workers",
        type=int,
        default=0,
        help="processes rendering episodes beside the training (0: none)",
    )
    _flag(p, "--restart", action="store_true", help="ignore a saved NAME.state.pt and start afresh")
    _flag(p, "--stop_after", type=int, help="stop once this many steps are done (resume later)")
    _flag(
        p,
        "--minutes",
        type=float,
        default=d.minutes,
        help="a time budget: train for this many minutes (the learning rate and resolution schedule "
        "follow the share of it spent; --steps is then an upper bound) and write the model (0: none)",
    )
    _flag(
        p,
        "--eval_every",
        type=int,
        default=50,
        help="score the held-out episodes every this many steps into NAME.heldout.csv (0: never)",
    )


def build_parser() -> argparse.ArgumentParser:
    from sam2pal import __version__

    parser = argparse.ArgumentParser(prog="sam2pal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sam2pal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _segment_parser(sub)
    _video_parser(sub)
    _finetune_parser(sub)
    _pretrain_parser(sub)
    _templates_parser(sub)
    _table_parsers(sub)
    _picture_parsers(sub)
    _tool_parsers(sub)
    _publish_parser(sub)
    _review_parsers(sub)
    return parser


def _templates_parser(sub) -> None:
    p = sub.add_parser("templates", help="check templates and write the normalised template file")
    _flag(p, "--coco", help="COCO JSON of the templates")
    _flag(p, "--image_dir", help="folder of the template images (default: next to the JSON)")
    _flag(p, "--image", help="template photo, with --mask")
    _flag(p, "--mask", help="mask PNG on --image (binary, or a label map with --labels)")
    _flag(p, "--structure_name", help="name of the structure of a binary --mask")
    _flag(p, "--labels", help="label map values: 'VALUE=NAME,...'")
    _flag(p, "--template_files", nargs="+", help="use only these annotated images (file names)")
    _flag(
        p, "--max_templates", type=int, default=0, help="use at most this many templates (0: all)"
    )
    _flag(p, "--out", required=True, help="normalised template file to write")
    p.set_defaults(func=cmd_templates)


def _table_parsers(sub) -> None:
    p = sub.add_parser("measure", help="measurement tables from COCO predictions")
    _flag(p, "--coco", required=True, help="COCO predictions file")
    _flag(p, "--out", required=True, help="long table (one row per structure)")
    _flag(p, "--wide", help="also write the wide table (one row per specimen) here")
    _flag(p, "--px_per_mm", type=_positive_float, help="scale for millimetre columns")
    _flag(p, "--calibration_csv", help="per-image scale: CSV with columns file_name,px_per_mm")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("evaluate", help="IoU and Dice of predictions against ground truth")
    _flag(p, "--gt", required=True, help="ground-truth COCO file")
    _flag(p, "--pred", required=True, help="predictions COCO file")
    _flag(p, "--out", required=True, help="metrics CSV to write")
    _flag(
        p,
        "--templates",
        help="the templates file the predictions were made with (templates.json in the output "
        "folder): structures annotated there are scored as role template (keyframe in a "
        "video), not in the target means",
    )
    _flag(
        p,
        "--finetune_record",
        help="the adapter the predictions were made with (its folder, or the folder "
        "finetune wrote): its training templates and, when the ground truth picked "
        "its epoch, its hold-out images are scored apart from the targets",
    )
    p.set_defaults(func=cmd_evaluate)


def _picture_parsers(sub) -> None:
    p = sub.add_parser("masks", help="one PNG per predicted structure")
    _flag(p, "--coco", required=True, help="COCO predictions file")
    _flag(p, "--out_dir", required=True, help="folder to write")
    _flag(p, "--category_prefix", action="store_true", help="names start with the category")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("overlays", help="overlay images of predictions")
    _flag(p, "--coco", required=True, help="COCO predictions file")
    _flag(p, "--image_dir", required=True, help="folder of the images")
    _flag(p, "--out_dir", required=True, help="folder to write")
    _flag(p, "--max_side", type=int, default=1600, help="longest side of the overlays in pixels")
    p.set_defaults(func=cmd_overlays)


def _tool_parsers(sub) -> None:
    p = sub.add_parser(
        "download-model", help="download an official SAM 2.1 checkpoint (checks its SHA-256)"
    )
    p.add_argument(
        "name",
        help="sam2.1_hiera_tiny, sam2.1_hiera_small, sam2.1_hiera_base_plus or sam2.1_hiera_large",
    )
    p.add_argument("--dest", default="resources/checkpoints", help="folder to put it in")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "make-demo", help="write a synthetic specimen collection (images, templates, ground truth)"
    )
    p.add_argument("out_dir")
    _flag(p, "--n_images", type=int, default=16)
    _flag(p, "--n_templates", type=int, default=2)
    _flag(p, "--seed", type=int, default=0)
    _flag(
        p,
        "--video",
        action="store_true",
        help="write the demo video (video.mp4, keyframes.json, ground_truth.json) instead",
    )
    p.set_defaults(func=cmd_make_demo)


# -- publish --------------------------------------------------------------------------


def _publish_parser(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="Darwin Core Archive (dwca.zip) and ImageJ/Fiji ROI sets of a results folder",
    )
    _flag(
        p,
        "--results",
        required=True,
        help="results folder (predictions.json, measurements.csv, provenance.json, qc.csv)",
    )
    _flag(
        p,
        "--sample_sheet",
        help="CSV of file_name and Darwin Core Occurrence terms (occurrenceID, catalogNumber, "
        "...), a row per image (default: occurrenceID from the file names)",
    )
    _flag(p, "--out", help="folder to write dwca.zip and roi/ into (default: RESULTS/publish)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    from sam2pal.outputs.publish import write_dwca, write_roi_sets

    results = Path(args.results)
    out = Path(args.out) if args.out else results / "publish"
    counts = write_dwca(results, out / "dwca.zip", sample_sheet=args.sample_sheet)
    rois = write_roi_sets(results / "predictions.json", out / "roi")
    print(
        f"{out / 'dwca.zip'}: {counts['occurrences']} occurrences, "
        f"{counts['measurements']} measurements; {rois} ROIs in {out / 'roi'}"
    )
    return 0


# -- review ---------------------------------------------------------------------------


def _review_parsers(sub) -> None:
    """`sam2pal review ...`: correcting results in an annotation tool."""
    p = sub.add_parser(
        "review", help="send results to a reviewer (export) and bring corrections back (import)"
    )
    review = p.add_subparsers(dest="review_command", required=True)
    _review_export_parser(review)
    _review_import_parser(review)


def _review_export_parser(review) -> None:
    from sam2pal.outputs.review import FORMATS

    p = review.add_parser(
        "export",
        help="the worst images by QC and a random sample, with their masks as pre-annotations",
        description="Write a review folder: review_sample.csv (which images, worst by QC or drawn "
        "at random), and a Label Studio project (labelstudio/, photos in images/) and/or a CVAT "
        "task (cvat/task.zip, COCO 1.0) with the predicted structures as polygons. The random "
        "sample's corrections estimate the collection's accuracy without bias.",
    )
    _flag(
        p,
        "--results",
        required=True,
        help="folder `sam2pal segment` wrote (qc.csv, predictions.json, templates.json)",
    )
    _flag(p, "--image_dir", required=True, help="folder of the collection's images")
    _flag(
        p, "--top", type=_non_negative_int, required=True, help="how many of the worst images by QC"
    )
    _flag(
        p,
        "--random",
        type=_non_negative_int,
        required=True,
        help="how many other images drawn at random",
    )
    _flag(p, "--seed", type=int, default=0, help="seed of the random sample (default 0)")
    _flag(p, "--format", nargs="+", choices=FORMATS, required=True, help="labelstudio and/or cvat")
    _flag(p, "--out", required=True, help="the review folder to write")
    p.set_defaults(func=cmd_review_export)


def cmd_review_export(args) -> int:
    from sam2pal.outputs.review import export_review

    export_review(
        args.results,
        args.image_dir,
        args.out,
        top=args.top,
        n_random=args.random,
        seed=args.seed,
        formats=args.format,
    )
    return 0


def _review_import_parser(review) -> None:
    p = review.add_parser(
        "import",
        help="corrected masks replace the predictions; tables and QC are made again",
        description="Read a reviewer's corrections (a Label Studio JSON export, or a COCO file "
        "such as CVAT's COCO 1.0 export), matched to the results by file name and structure "
        "name: the corrected masks replace the predictions of the reviewed images in "
        "predictions.json (marked corrected), and qc.csv, measurements.csv and "
        "measurements_wide.csv are made again, without running the model. With --review, "
        "review_summary.csv estimates the collection's accuracy from the random sample.",
    )
    _flag(p, "--results", required=True, help="the results folder (OUTPUT_DIR of segment/video)")
    _flag(
        p,
        "--corrections",
        required=True,
        nargs="+",
        help="corrections file(s): Label Studio JSON export or COCO (a later file wins for an "
        "image in several; the predictions of the segmentation are the start of every import)",
    )
    _flag(
        p,
        "--review",
        help="the folder of `sam2pal review export` (its review_sample.csv): adds "
        "review_summary.csv",
    )
    _flag(p, "--px_per_mm", type=_positive_float, help="the run's scale for millimetre columns")
    _flag(p, "--calibration_csv", help="the run's per-image scale: CSV file_name,px_per_mm")
    p.set_defaults(func=cmd_review_import)


def cmd_review_import(args) -> int:
    from sam2pal.outputs.corrections import import_corrections

    counts = import_corrections(
        args.results,
        args.corrections,
        review_dir=args.review,
        px_per_mm=args.px_per_mm,
        calibration_csv=args.calibration_csv,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    summary = (
        f"; accuracy estimate in {Path(args.results) / 'review_summary.csv'}"
        if counts["summary_rows"] is not None
        else ""
    )
    print(
        f"corrected {counts['corrected']} of {counts['images']} images; predictions.json, "
        f"qc.csv and the measurement tables made again in {args.results}{summary}"
    )
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"sam2pal: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
