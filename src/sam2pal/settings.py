"""One definition of each setting of a collection run.

Every section of the workflow's config (workflow/schemas/config.schema.yaml,
documented in config/README.md) that shapes a run is a frozen dataclass here, one
field per key, with its default and, in the field's metadata:

    help    one line (the help of its command-line flag, where it has one)
    reruns  what a change of it reruns in the workflow (`RERUNS`)
    engine  True for the settings the segmentation engine takes
            (`sam2pal.inference.engine.Propagator`, `sam2pal.inference.temporal.VideoPropagator`)
    flag    its command-line flag (`Flag`), or None

    Model         the `model` section
    Segmentation  the `propagate` section
    Training      the fine-tuning settings of the trainer (`sam2pal.training.palindrome`)
    Finetune      the `finetune` section: Training and the workflow's own keys
    VideoOptions  the `video_options` section
    Outputs       the `outputs` section
    Review        the `review` section

The CLI builds its segmentation and fine-tuning flags from these fields, the pipeline
and the engine take their defaults from them, and the workflow (workflow/rules/common.smk)
derives from `reruns` which settings rerun which steps. Adding a segmentation setting
is one field of `Segmentation` (with `engine=True`), its key in the schema and its line
in config/README.md (tests/test_settings.py checks the three agree).

This module imports no torch: the Snakemake process reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

#: What changing a setting reruns in the workflow (each step reruns the ones after it).
RERUNS = {
    "nothing": "read by the jobs when they start, or resources requested: reruns nothing",
    "inputs": "chooses a step or its input files: the steps whose inputs change rerun",
    "frames": "how frames are taken from a video: frame extraction and everything after",
    "templates": "which templates are used: the templates and everything after",
    "training": "the fine-tuning (when enabled) and everything after",
    "segmentation": "the segmentation and everything after",
    "tables": "the tables and pictures only",
}


# -- value checks, also the command line's argument types ---------------------------------


def positive_float(text: str) -> float:
    """A number > 0 (raises argparse.ArgumentTypeError otherwise)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (raises argparse.ArgumentTypeError otherwise)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (raises argparse.ArgumentTypeError otherwise)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (raises argparse.ArgumentTypeError otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (raises argparse.ArgumentTypeError otherwise)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def fill_value(text: str) -> str:
    """A fill of the letterbox frame: "border", a grey level 0-255 or "R,G,B" (raises
    argparse.ArgumentTypeError otherwise); returns it without spaces or leading zeros."""
    parts = [part.strip() for part in str(text).split(",")]
    if parts == ["border"]:
        return "border"
    if len(parts) in (1, 3) and all(p.isdigit() and int(p) <= 255 for p in parts):
        return ",".join(str(int(p)) for p in parts)
    raise argparse.ArgumentTypeError(
        f"must be border, a grey level 0-255 or R,G,B (each 0-255), got {text!r}"
    )


# -- fields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """The command-line flag of a setting.

    name: the flag (dashed spellings are accepted too).
    type: the argparse type (None: from the default: int, float, str; a bool default
        makes an on/off switch).
    invert: a switch that turns a setting that is on by default off (--no_...).
    choices, nargs: as argparse's.
    """

    name: str
    type: object = None
    invert: bool = False
    choices: tuple | None = None
    nargs: str | None = None


def setting(
    default,
    help: str,
    reruns: str,
    *,
    engine: bool = False,
    flag: Flag | str | None = None,
):
    """A settings field (a dataclasses.field with its metadata; see the module docstring).

    Args:
        default: the default value (a list default is copied for each instance).
        help: one line of help.
        reruns: a key of `RERUNS`.
        engine: the segmentation engine takes this setting.
        flag: its command-line flag: a `Flag`, a flag name, or None.

    Returns:
        The dataclasses.Field.
    """
    if reruns not in RERUNS:
        raise ValueError(f"reruns must be one of {', '.join(RERUNS)}, not {reruns!r}")
    if isinstance(flag, str):
        flag = Flag(flag)
    metadata = {"help": help, "reruns": reruns, "engine": engine, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- the sections -------------------------------------------------------------------------

DEFAULT_TARGETS = ["memory_attention", "sam_mask_decoder", "memory_encoder"]

#: propagate.orientation: no search; the four quarter turns; those and their mirror images
ORIENTATIONS = ("none", "rot4", "rot4_mirror")
#: propagate.framing: how a photo is fitted to the model's square input
FRAMINGS = ("stretch", "letterbox")
#: propagate.tone: "none" (photos as they are) or "auto" (`sam2pal.inference.tone`: the dark
#: tones of dark photos lifted, unless the specimens are clearly lighter than their ground)
TONES = ("none", "auto")
#: engine settings of photos only: a video is tracked in its keyframes' orientation
#: settings of the photo engine only (the video tracker takes none of them; the zoom pass
#: runs on video frames in the independent mode, which segments them as photos)
PHOTO_ONLY_SETTINGS = (
    "orientation",
    "mirror_swap",
    "mirror_pairs",
    "zoom",
    "zoom_below",
    "zoom_margin",
    "mask_choice",
    "absent",
)
ZOOMS = ("off", "auto", "on", "best")
#: propagate.mask_choice: which of SAM2's candidate masks a structure gets: the one the
#: templates' own reading picks (`engine.template_slots`) or SAM2's (its predicted IoU)
MASK_CHOICES = ("templates", "sam2")
#: propagate.absent: the mask of a structure SAM2 judges absent (object score below 0):
#: kept, or blanked as SAM2 blanks it
ABSENTS = ("keep", "blank")
#: finetune.judge_memory: a held-out template is segmented from every other template, or
#: from the training templates alone
JUDGE_MEMORIES = ("others", "training")
#: finetune.cycle_memory: the first half of each palindrome cycle segments the photo from
#: the cycle's template alone, or from every training template
CYCLE_MEMORIES = ("template", "training")


@dataclass(frozen=True)
class Model:
    """The `model` section: the SAM2 model a collection is segmented (and trained) with."""

    config: str | None = setting(
        None,
        "SAM2 config: a packaged name or a yaml file (default: from the checkpoint)",
        "training",
        flag="--sam2_config",
    )
    checkpoint: str = setting(
        "random",
        "SAM2 checkpoint: a .pt file, an official name, sam2pal-micro or random",
        "training",
        flag="--sam2_checkpoint",
    )
    image_size: int | None = setting(
        None,
        "model input size (multiple of 32; default: the config's)",
        "training",
        flag="--image_size",
    )
    seed: int = setting(0, "seed of the random weights", "training", flag="--seed")
    checkpoint_dir: str = setting(
        "resources/checkpoints",
        "where official checkpoints are kept",
        "inputs",
        flag="--checkpoint_dir",
    )


@dataclass(frozen=True)
class Segmentation:
    """The `propagate` section: how the images are segmented."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N", "nothing", flag="--device")
    template_files: list[str] = setting([], "use only these annotated images", "templates")
    max_templates: int = setting(
        0,
        "use at most this many annotated templates in memory (0: all)",
        "templates",
        flag="--max_templates",
    )
    cycle_consistency: bool = setting(
        True,
        "skip the cycle-consistency QC score (faster)",
        "segmentation",
        engine=True,
        flag=Flag("--no_cycle_consistency", invert=True),
    )
    fill_hole_area: int = setting(
        8,
        "fill mask holes up to this many low-res pixels (0: off)",
        "segmentation",
        engine=True,
        flag="--fill_hole_area",
    )
    area_growth_limit: float = setting(
        0.0,
        "cut a structure more than this many times larger than on {reference} to its box "
        "(0: off){cut_note}",
        "segmentation",
        engine=True,
        flag=Flag("--area_growth_limit", type=non_negative_float),
    )
    area_clamp_pad: int = setting(
        10, "padding in pixels of that box", "segmentation", engine=True, flag="--area_clamp_pad"
    )
    bbox_clamp: bool = setting(
        False,
        "always cut structures to the box on {reference} (+ padding){cut_note}",
        "segmentation",
        engine=True,
        flag="--bbox_clamp",
    )
    exact: bool = setting(
        False,
        "reproduce SAM2's official predictor exactly: decode and resize at full size "
        "(slower on large photos)",
        "segmentation",
        engine=True,
        flag="--exact",
    )
    orientation: str = setting(
        "none",
        "search the orientation of each photo: none; rot4: the four quarter turns; "
        "rot4_mirror: those and their mirror images",
        "segmentation",
        engine=True,
        flag=Flag("--orientation", choices=ORIENTATIONS),
    )
    mirror_swap: bool = setting(
        False,
        "a mirrored match shows the specimen's other side: swap the names of paired "
        "left/right structures (lateral views; not for dorsal or ventral views)",
        "segmentation",
        engine=True,
        flag="--mirror_swap",
    )
    # config only: [[name_a, name_b], ...], pairs besides left_/right_ names
    mirror_pairs: list[list[str]] = setting(
        [],
        "more pairs of structure names that swap on a mirrored match",
        "segmentation",
        engine=True,
    )
    # the palindrome fine-tuning frames its images alike: a change retrains too
    framing: str = setting(
        "stretch",
        "fit each photo to the model's square input: stretch it, or letterbox it "
        "(aspect kept, padded with --framing_fill)",
        "training",
        engine=True,
        flag=Flag("--framing", choices=FRAMINGS),
    )
    framing_fill: str = setting(
        "border",
        "padding of letterboxed photos: border (the photo's border colour), a grey level "
        "0-255 or R,G,B",
        "training",
        engine=True,
        flag=Flag("--framing_fill", type=fill_value),
    )
    # the fine-tuning sees its photos toned alike: a change retrains too
    tone: str = setting(
        "auto",
        "auto: lift the dark tones of dark photos (a gamma per photo) unless the templates' "
        "structures are clearly lighter than their ground; none: photos as they are",
        "training",
        engine=True,
        flag=Flag("--tone", choices=TONES),
    )
    # the fine-tuning trains on the zoom pass's windows too (finetune.zoom_crops) and
    # scores its held-out photos with the zoom pass: a change retrains
    zoom: str = setting(
        "off",
        "segment small structures again on crops at the model's full input: off; auto: "
        "those under --zoom_below of the photo; on: every structure; best: every structure, "
        "keeping per photo the pass (whole photo or zoom) whose mask has the higher cycle IoU",
        "training",
        engine=True,
        flag=Flag("--zoom", choices=ZOOMS),
    )
    zoom_below: float = setting(
        0.1,
        "with --zoom auto: zoom a structure whose box on the templates is under this share "
        "of the photo's longer side",
        "training",
        engine=True,
        flag=Flag("--zoom_below", type=fraction),
    )
    zoom_margin: float = setting(
        0.5,
        "the zoom window around a structure: its longer side plus this share of it on each side",
        "training",
        engine=True,
        flag=Flag("--zoom_margin", type=non_negative_float),
    )
    # the fine-tuning's judges segment alike: a change retrains too
    mask_choice: str = setting(
        "templates",
        "which of SAM2's three candidate masks each structure gets: templates (the one "
        "that segments the templates from their own memory best, where it does so by "
        "0.1 IoU more than SAM2's pick) or sam2 (the one SAM2 predicts the highest IoU for)",
        "training",
        engine=True,
        flag=Flag("--mask_choice", choices=MASK_CHOICES),
    )
    absent: str = setting(
        "keep",
        "a structure SAM2 judges absent (object score under 0.5): keep its mask (the "
        "templates show it; qc.csv's min_object_score flags the photo) or blank it (SAM2's rule)",
        "training",
        engine=True,
        flag=Flag("--absent", choices=ABSENTS),
    )
    batch_size: int = setting(
        0,
        "photos per model call (0: automatic, 8 on a GPU, 1 on a CPU); changes no mask",
        "nothing",
        flag=Flag("--batch_size", type=non_negative_int),
    )
    on_bad_image: str = setting(
        "skip",
        "bad image files: list them in skipped.csv and go on (skip) or stop (fail)",
        "segmentation",
        flag=Flag("--on_bad_image", choices=("skip", "fail")),
    )
    max_skipped_fraction: float = setting(
        0.2,
        "stop when more than this share of the images (and at least two) are bad files",
        "nothing",
        flag=Flag("--max_skipped_fraction", type=fraction),
    )
    shard_size: int = setting(1000, "photos per segmentation job, about", "nothing")
    threads: int = setting(2, "CPU threads of the segmentation job", "nothing")
    mem_mb: int = setting(8000, "memory requested for the segmentation job", "nothing")
    runtime: int = setting(240, "minutes requested for the segmentation job", "nothing")


@dataclass(frozen=True)
class Training:
    """The trainer's settings: the `finetune` keys that change the adapter."""

    # no flag of its own: --use_lora, --full and --full_finetune choose it
    mode: str = setting("lora", "lora or full fine-tuning", "training")
    lora_rank: int = setting(8, "LoRA rank", "training", flag="--lora_rank")
    lora_alpha: float = setting(16.0, "LoRA alpha", "training", flag="--lora_alpha")
    lora_dropout: float = setting(0.0, "LoRA dropout", "training", flag="--lora_dropout")
    # the SAM2 components adapted (LoRA) or trained (full fine-tuning)
    targets: list[str] = setting(
        DEFAULT_TARGETS,
        "SAM2 parts to adapt (default: memory_attention sam_mask_decoder memory_encoder; "
        "also image_encoder, obj_ptr_proj, sam_prompt_encoder)",
        "training",
        flag=Flag("--targets", nargs="+"),
    )
    learning_rate: float | None = setting(
        None,
        "learning rate (default 1e-3 with LoRA, 5e-6 for full fine-tuning)",
        "training",
        flag=Flag("--learning_rate", type=positive_float),
    )
    weight_decay: float = setting(0.01, "AdamW weight decay", "training")
    num_epochs: int = setting(10, "training epochs", "training", flag="--num_epochs")
    # on a small collection the epochs are repeated until min_steps is reached
    # (12 photos make 3 steps an epoch)
    min_steps: int = setting(
        60,
        "at least this many optimizer steps, repeating epochs on small collections",
        "training",
        flag="--min_steps",
    )
    max_images_per_epoch: int = setting(
        100, "unlabelled images per epoch", "training", flag="--max_images_per_epoch"
    )
    max_pool_images: int = setting(
        200,
        "train on at most this many unlabelled images, a seeded sample",
        "training",
        flag="--max_pool_images",
    )
    accumulation_steps: int = setting(
        4, "gradient accumulation steps", "training", flag="--accumulation_steps"
    )
    schedule: str = setting(
        "cosine",
        "learning-rate schedule after warm-up",
        "training",
        flag=Flag("--schedule", choices=("cosine", "constant")),
    )
    warmup_steps: int = setting(5, "warm-up optimizer steps", "training", flag="--warmup_steps")
    grad_clip: float = setting(1.0, "gradient norm clipping (0: off)", "training")
    bce_weight: float = setting(1.0, "weight of the binary cross-entropy term", "training")
    dice_weight: float = setting(1.0, "weight of the Dice term", "training")
    object_weight: float = setting(0.5, "weight of the object-score term", "training")
    # augmented views of every template (crop and scale, a small turn, mirror image with
    # left/right structures swapped, colour): made and encoded once, one drawn at random
    # per step with the template itself, so the loss cannot be lowered by learning the
    # one template photo
    template_views: int = setting(
        8,
        "augmented views of every template trained on beside it (0: none)",
        "training",
        flag="--template_views",
    )
    # a supervised term on known masks beside the palindrome: each cycle also segments
    # another view of its template from the template's memory. On by default: with two
    # or three templates it gained 1.4 to 2.3 points on pale_on_dark and moved the
    # other held-out collections by -0.2 to +0.5 (benchmarks/palindrome.py, README)
    anchor_weight: float = setting(
        1.0,
        "weight of a supervised term beside the palindrome loss: each cycle also segments "
        "another augmented view of its template from it, against the view's true masks "
        "(the template views, or 8 of its own with --template_views 0; 0: off)",
        "training",
        flag=Flag("--anchor_weight", type=non_negative_float),
    )
    # the return half remembers the target's predicted masks cut at 0.5 (the gradient
    # passes as if they were soft): a soft mask can carry the structure's place in
    # values below 0.5 while the prediction itself shrinks away (the thin parts)
    binary_cycle_mask: bool = setting(
        False,
        "the return half of each cycle remembers the target's predicted masks binarised at "
        "0.5 (the gradient passes straight through) instead of as probabilities",
        "training",
        flag="--binary_cycle_mask",
    )
    # the return half remembers each photo's structures without their overlaps: where
    # structures apart on the template overlap on the photo, only the likeliest keeps
    # the pixel. Aimed at the blob over the fore-body that head, pronotum, antennae and
    # legs came to share (README, the collapse), from which the return half read the
    # template's parts back. It did not help (the predictions swell all the same:
    # bronze_aligned 0.261 against 0.318 from one template), hence off
    exclusive_cycle_mask: bool = setting(
        False,
        "the return half of each cycle remembers the photo's predicted masks without "
        "overlaps between structures that are apart on the template (only the likeliest "
        "keeps each pixel)",
        "training",
        flag="--exclusive_cycle_mask",
    )
    # a term that keeps the adapter's segmentation of each training photo near the
    # untouched model's (LoRA only: the adapter switched off): the palindrome may move a
    # structure only where the cycle gains more than the move costs. By default on where
    # no template is held out to judge the epochs (one template): there the cycle IoU
    # picks the epoch, and without the term it kept adapters that erased the thin parts
    # (mean gain over zero-shot +0.8 points on the five held-out collections, +3.0 with
    # it); with held-out templates it gained nothing (blue_slate -2.2 points; README)
    stay_weight: float | None = setting(
        None,
        "weight of a term that keeps the adapter's segmentation of each training photo "
        "near the untouched model's (Dice and cross-entropy against its probabilities; "
        "LoRA only; 0: off; default 1 when no template is held out to pick the epoch, "
        "else 0)",
        "training",
        flag=Flag("--stay_weight", type=non_negative_float),
    )
    # a term on the training photo's predicted masks that keeps the template's layout:
    # with the palindrome alone the thin parts of sam2pal-micro v2 on bronze_aligned
    # turned into one blob over the fore-body shared by head, pronotum, antennae and legs
    # (antennae 4x their true area, 3% of it on an antenna), which the return half reads
    # the template's parts back from. It did not help (README), hence off
    layout_weight: float = setting(
        0.0,
        "weight of a term that keeps each training photo's predicted masks laid out as the "
        "template's: structures apart on the template stay apart, and each keeps its share "
        "of the summed area (0: off)",
        "training",
        flag=Flag("--layout_weight", type=non_negative_float),
    )
    zoom_crops: bool = setting(
        True,
        "do not train on the zoom pass's windows (with --zoom auto, on or best, the fine-tuning "
        "trains on the windows of the small structures too, cut as the segmentation cuts them)",
        "training",
        flag=Flag("--no_zoom_crops", invert=True),
    )
    # with two templates or more, one is kept out of the training and its true masks,
    # segmented from the others, choose the best epoch: the label-free cycle IoU cannot
    # tell when the adapter gets worse (it ends on the template the loss trains on)
    holdout_template: bool = setting(
        True,
        "train on every template instead of keeping some out to choose the best epoch "
        "(with two templates or more, up to holdout_templates whose structures the others "
        "show are held out and their true masks, with those of six augmented views of "
        "each, pick the epoch)",
        "training",
        flag=Flag("--no_holdout_template", invert=True),
    )
    # several held-out templates judge together: one photo (and its views) is a noisy
    # judge of an epoch, whichever photo it is. With three templates, one training and
    # two judging did better on all four held-out collections than two training and
    # one judging (benchmarks/palindrome.py (i) and (h))
    holdout_templates: int = setting(
        2,
        "with holdout_template, hold out up to this many templates (the last in file-name "
        "order whose structures the training templates still show; one always trains)",
        "training",
        flag=Flag("--holdout_templates", type=positive_int),
    )
    # after the fine-tuning the workflow segments with every template in memory, the
    # held-out ones too: judged from the training templates alone, a structure that
    # several templates read well and the adapter loses (v11's bronze_aligned antennae)
    # looks no worse with the adapter, and the per-structure choice keeps the adapter.
    # Judged from the others, v11 kept the untouched model there; v12's held-out
    # templates read those antennae no better from two templates, and the loss stays.
    judge_memory: str = setting(
        "others",
        "the templates each held-out template is segmented from when it judges an epoch: "
        "others (every other template, training and held out, closer to the segmentation "
        "with all templates in memory) or training (the training templates alone)",
        "training",
        flag=Flag("--judge_memory", choices=JUDGE_MEMORIES),
    )
    # the first half of each cycle reads the photo from every training template that shows
    # the cycle's structures (the cycle's template first; the others, or one of their
    # views, beside it), as the segmentation reads it with several templates in memory;
    # the return half and the loss stay on the cycle's template alone
    cycle_memory: str = setting(
        "template",
        "what the first half of each palindrome cycle segments the photo from: template (the "
        "cycle's template alone) or training (every training template that shows its "
        "structures, as the segmentation with several templates in memory)",
        "training",
        flag=Flag("--cycle_memory", choices=CYCLE_MEMORIES),
    )
    # the held-out template scores each structure: where the adapter does worse on one
    # than the untouched model, the segmentation keeps the untouched model for it
    per_structure_choice: bool = setting(
        True,
        "use the adapter for every structure instead of keeping the untouched model for "
        "those the held-out template says the adapter segments worse",
        "training",
        flag=Flag("--no_per_structure_choice", invert=True),
    )
    holdout_fraction: float = setting(
        0.1,
        "share of the unlabelled images held out to pick the best epoch",
        "training",
        flag="--holdout_fraction",
    )
    max_holdout: int = setting(16, "at most this many held-out images", "training")
    cache_features: bool = setting(
        True,
        "re-encode images every step instead of caching the frozen encoder's features",
        "training",
        flag=Flag("--no_feature_cache", invert=True),
    )
    # SAM2 trains with dropout 0.1 inside attention; that forces attention to build its
    # full matrices (no memory-efficient kernel): off unless asked for
    attention_dropout: float = setting(0.0, "dropout inside SAM2's attention", "training")
    gradient_checkpointing: bool = setting(
        False,
        "less memory, slower steps (recompute memory-attention activations)",
        "training",
        flag="--gradient_checkpointing",
    )
    merge_checkpoint: bool = setting(
        False,
        "also write merged.pt: a full checkpoint with the LoRA weights folded in",
        "training",
        flag="--merge_checkpoint",
    )
    seed: int = setting(
        0,
        "seed (default 0) of the training (the same seed gives the same adapter on a CPU) "
        "and of the weights of --sam2_checkpoint random",
        "training",
        flag="--seed",
    )


@dataclass(frozen=True)
class Finetune(Training):
    """The `finetune` section: the trainer's settings and the workflow's own keys."""

    enabled: bool = setting(False, "fine-tune before segmenting", "inputs", flag="--pal_finetuning")
    adapter: str | None = setting(
        None, "segment with this adapter folder (no training)", "inputs", flag="--adapter"
    )
    pool_images: str | None = setting(None, "the unlabelled photos to train on", "inputs")
    training_templates: str | None = setting(
        None, "COCO JSON of more annotated training templates", "inputs", flag="--training_json"
    )
    training_template_images: str | None = setting(
        None, "folder of the training templates' photos", "inputs", flag="--training_images_dir"
    )
    threads: int = setting(2, "CPU threads of the training job", "nothing")
    mem_mb: int = setting(16000, "memory requested for the training job", "nothing")
    runtime: int = setting(720, "minutes requested for the training job", "nothing")


@dataclass(frozen=True)
class VideoOptions:
    """The `video_options` section: how a video's frames are taken and tracked."""

    mode: str = setting(
        "video",
        "video: SAM2's memory through time (default); independent: each frame from the "
        "keyframes only",
        "segmentation",
        flag=Flag("--mode", choices=("video", "independent")),
    )
    fps: float | None = setting(
        None,
        "frames per second to extract (default: every frame); with --video_dir, the frame "
        "rate for the time column",
        "frames",
        flag=Flag("--fps", type=positive_float),
    )
    start: float | None = setting(
        None, "start time in seconds", "frames", flag=Flag("--start", type=non_negative_float)
    )
    end: float | None = setting(
        None, "end time in seconds", "frames", flag=Flag("--end", type=positive_float)
    )
    max_frames: int | None = setting(
        None, "extract at most this many frames", "frames", flag=Flag("--max_frames", type=int)
    )
    max_size: int | None = setting(
        None,
        "longest side of the extracted frames in pixels (never enlarged)",
        "frames",
        flag=Flag("--max_size", type=int),
    )
    image_format: str = setting(
        "jpg",
        "frame files: jpg (default) or png (lossless)",
        "frames",
        flag=Flag("--image_format", choices=("jpg", "png")),
    )


@dataclass(frozen=True)
class Outputs:
    """The `outputs` section: the files written besides the predictions."""

    save_masks: bool = setting(False, "one PNG per structure", "tables", flag="--save_masks")
    save_overlays: bool = setting(True, "overlay images", "tables", flag="--save_vis")
    polygons: bool = setting(
        False, "COCO segmentations as polygons instead of RLE", "tables", flag="--polygons"
    )
    overlay_max_side: int = setting(1600, "longest side of the overlays in pixels", "tables")
    mask_category_prefix: bool = setting(
        False,
        "mask PNG names start with the category",
        "tables",
        flag="--output_category_prefix",
    )
    overlay_video: bool = setting(
        False, "the frames with their masks drawn on", "tables", flag="--overlay_video"
    )
    overlay_video_fps: float | None = setting(None, "frame rate of the overlay video", "tables")
    report: bool = setting(True, "the figures of the HTML report", "tables")
    gallery_size: int = setting(12, "overlays in the report's gallery", "tables")
    publish: bool = setting(False, "a Darwin Core Archive and Fiji ROI sets in publish/", "tables")


#: review.formats: the annotation tools a review sample is written for
REVIEW_FORMATS = ("labelstudio", "cvat")


@dataclass(frozen=True)
class Review:
    """The `review` section: a sample of the results to correct in an annotation tool
    (`sam2pal.outputs.review`; `sam2pal review export` on the command line)."""

    enabled: bool = setting(False, "write results/<collection>/review/ in every run", "inputs")
    top: int = setting(10, "how many of the worst images by QC score", "tables")
    random: int = setting(10, "how many other images drawn at random", "tables")
    seed: int = setting(0, "seed of the random sample", "tables")
    formats: list = setting(list(REVIEW_FORMATS), "labelstudio and/or cvat", "tables")


#: config section -> its settings class
SECTIONS = {
    "model": Model,
    "propagate": Segmentation,
    "finetune": Finetune,
    "video_options": VideoOptions,
    "outputs": Outputs,
    "review": Review,
}


# -- what the code derives from them ------------------------------------------------------


def default_of(field):
    """The default of a settings field (a fresh list for a list default)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def defaults(group) -> dict:
    """The settings of a group with their defaults.

    Args:
        group: a settings class (e.g. `Segmentation`).

    Returns:
        {key: default} in field order.
    """
    return dataclasses.asdict(group())


def keys(group, reruns: str | None = None, engine: bool | None = None) -> tuple[str, ...]:
    """The keys of a group, in field order, optionally only those with a given metadata.

    Args:
        group: a settings class.
        reruns: only the settings whose change reruns this (a key of `RERUNS`).
        engine: only the settings the segmentation engine takes (True) or does not (False).

    Returns:
        The keys.
    """
    if reruns is not None and reruns not in RERUNS:
        raise ValueError(f"reruns must be one of {', '.join(RERUNS)}, not {reruns!r}")
    return tuple(
        f.name
        for f in dataclasses.fields(group)
        if (reruns is None or f.metadata["reruns"] == reruns)
        and (engine is None or f.metadata["engine"] == engine)
    )


def engine_defaults(group=Segmentation) -> dict:
    """The segmentation engine's settings with their defaults.

    Args:
        group: the segmentation settings class (`Segmentation`, or one derived from it).

    Returns:
        {key: default} of the fields marked `engine`, in field order.
    """
    values = defaults(group)
    return {key: values[key] for key in keys(group, engine=True)}


def mask_keys(group=Segmentation) -> tuple[str, ...]:
    """The `propagate` settings that change the masks: the propagate rule's params
    (editing one re-segments the collection).

    Args:
        group: the segmentation settings class.

    Returns:
        The keys whose change reruns the segmentation (or the fine-tuning, and so the
        segmentation after it), in field order.
    """
    return tuple(
        f.name
        for f in dataclasses.fields(group)
        if f.metadata["reruns"] in ("training", "segmentation")
    )


def training_keys(group=Segmentation) -> tuple[str, ...]:
    """The `propagate` settings the fine-tuning takes too (the images are framed alike
    for training and segmentation): params of the finetune rule as well.

    Args:
        group: the segmentation settings class.

    Returns:
        The keys whose change reruns the fine-tuning, in field order.
    """
    return keys(group, reruns="training")


def recorded_keys(group=Segmentation) -> tuple[str, ...]:
    """The `propagate` settings recorded in provenance.json: those that change the
    masks, then those that choose the templates.

    Args:
        group: the segmentation settings class.

    Returns:
        The keys.
    """
    return mask_keys(group) + keys(group, reruns="templates")


def workflow_keys(group=Finetune) -> tuple[str, ...]:
    """The `finetune` keys about the workflow rather than the training itself (which
    steps run, on which files, with which resources): all but the trainer's settings.

    Args:
        group: the fine-tuning section's class.

    Returns:
        The keys whose change does not rerun the training as a setting of it, in field order.
    """
    training = set(keys(group, reruns="training"))
    return tuple(key for key in keys(group) if key not in training)


def flags(group) -> dict:
    """The command-line flags of a group.

    Args:
        group: a settings class.

    Returns:
        {flag name: dataclasses.Field} of the fields that have a flag, in field order.
    """
    return {
        f.metadata["flag"].name: f
        for f in dataclasses.fields(group)
        if f.metadata["flag"] is not None
    }
