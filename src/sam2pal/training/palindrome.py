"""Palindrome self-training: adapt SAM2 to a collection without labelling more.

For a template x0 with its true masks m0 and an unlabelled specimen x1 of the
collection, one training step runs the 4-frame cycle {x0, x1, x1, x0}:

    phase 1   memory = {x0 with m0}             -> soft prediction p1 = sigmoid(logits) on x1
    (reset)   a fresh, empty memory: nothing of phase 1 is carried over but p1
    phase 2   memory = {x1 with p1 as its mask} -> prediction of x0
    loss      BCE + Dice of that prediction against m0, plus SAM2's object-score term

The loss is taken on the template, whose masks are known, and gradients flow end to
end: through phase 2 into p1 and on through phase 1. A model that segments x1 well is
the one whose prediction leads back to m0. All structures of the template are one batch
and one backward pass; with several templates each step samples one.

The object-score term (binary cross-entropy pushing the object score of every
structure towards "present", in both phases) matters: when SAM2 says "no object", its
masks are replaced by a constant and no gradient reaches the mask decoder.

With the image encoder frozen (the default: LoRA on memory attention, mask decoder and
memory encoder), the encoder's output for every image (templates, training and
held-out photos) is computed once and reused in every epoch and every validation
(`FeatureCache`), so a step costs only the memory and decoder passes.

Unlabelled specimens come from the collection (or another folder); a few are held
out. After every epoch the engine segments the held-out specimens and the mean
cycle-consistency IoU (no labels needed), or the real IoU when ground truth is given,
picks the best adapter. The last one is kept too. With two templates or more
(`holdout_template`), one (two with three templates or more: `holdout_templates`) is
held out of the training instead and their true masks, segmented from the others, pick
the adapter: the cycle IoU ends on the template the loss trains on, and the adapter's
shortcut raises it while the targets get worse (sam2pal-micro v2 on bronze_aligned:
held-out cycle IoU 0.16 -> 0.33, true IoU 0.34 -> 0.26). Two label-free alternatives
failed the same test in a probe on that collection: the cycle IoU with the untouched
model tracking back (it rose a little as the targets got worse), and training with the
return half of the cycle on the untouched model (the targets got worse faster).

How much training: epochs of a small collection are few optimizer steps (20 photos,
4 cycles a step: 5 an epoch), so the defaults ask for at least `min_steps` (60) and a
LoRA learning rate of 1e-3. With 50 steps at 1e-4 the adapter hardly moved (+0.6 IoU
points); with these, palindrome training closed 85% of the gap to supervised LoRA on
the true masks (`benchmarks/palindrome.py`). When ground truth is known, the training
targets' phase-1 IoU is logged beside the loss (`training_steps.csv`): a loss that
falls while it stays flat is the degenerate solution (segmenting the template photo
whatever the memory holds). `template_views` counters it with augmented templates, and
`anchor_weight` adds a supervised term on them (another view of the cycle's template
segmented from it against its true masks); both are on by default (8 views, weight 1).

`Trainer` holds the state; `phase1`, `phase2` and `palindrome_loss` are the step.
"""

from __future__ import annotations

import csv
import functools
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from sam2pal.errors import InputError
from sam2pal.inference.engine import (
    ENGINE_DEFAULTS,
    Propagator,
    binary_mask_input,
    conditioning_frame,
    encode_image,
    expand_features,
    new_memory,
    track_frame,
)
from sam2pal.inference.framing import FRAMINGS, make_frame, parse_fill
from sam2pal.inference.orientation import mirror_partner
from sam2pal.inference.tone import Tone
from sam2pal.inference.zoom import crop_image, crop_masks, union_crop
from sam2pal.io.atomic import atomic_path, atomic_write
from sam2pal.io.masks import mask_iou
from sam2pal.models.adapters import (
    LORA_COMPONENTS,
    add_lora,
    save_adapter,
    save_merged_checkpoint,
)
from sam2pal.models.build import autocast
from sam2pal.settings import CYCLE_MEMORIES, JUDGE_MEMORIES, Training

LOG_COLUMNS = [
    "epoch",
    "optimizer_steps",
    "train_loss",
    "learning_rate",
    "val_cycle_iou",
    "val_template_iou",
    "val_iou",
    "seconds",
]


@dataclass(frozen=True)
class FinetuneSettings(Training):
    """Training settings: the fields of `sam2pal.settings.Training` (the workflow's
    `finetune` section less its workflow keys; see config/README.md), checked."""

    def __post_init__(self):
        problems = []
        if self.mode not in ("lora", "full"):
            problems.append(f"mode must be lora or full, not {self.mode!r}")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule must be cosine or constant, not {self.schedule!r}")
        if self.cycle_memory not in CYCLE_MEMORIES:
            problems.append(
                f"cycle_memory must be one of {', '.join(CYCLE_MEMORIES)}, not {self.cycle_memory!r}"
            )
        if self.judge_memory not in JUDGE_MEMORIES:
            problems.append(
                f"judge_memory must be one of {', '.join(JUDGE_MEMORIES)}, not {self.judge_memory!r}"
            )
        for name in (
            "lora_rank",
            "num_epochs",
            "max_images_per_epoch",
            "max_pool_images",
            "accumulation_steps",
            "holdout_templates",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("min_steps", "template_views"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0")
        if self.stay_weight and self.mode != "lora":
            problems.append("stay_weight needs mode lora (the untouched model is the adapter off)")
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append("learning_rate must be > 0")
        if not 0 <= self.attention_dropout < 1:
            problems.append("attention_dropout must be in [0, 1)")
        if not 0 <= self.holdout_fraction < 1:
            problems.append("holdout_fraction must be in [0, 1)")
        unknown = set(self.targets) - set(LORA_COMPONENTS)
        if unknown:
            problems.append(
                f"unknown targets {sorted(unknown)} (choose from {', '.join(LORA_COMPONENTS)})"
            )
        if problems:
            raise InputError("finetune settings: " + "; ".join(problems))

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 1e-3 if self.mode == "lora" else 5e-6

    @classmethod
    def from_dict(cls, values: dict | None) -> FinetuneSettings:
        values = dict(values or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown finetune setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def left_untouched(before: dict, after: dict, margin: float) -> list[str]:
    """The structure names whose IoU over the held-out templates and their views,
    `after` minus `before` ({name: [IoU per template or view]}), is below zero by more
    than `margin` standard errors of that difference (a negative margin: the names
    where it is not above zero by that much)."""
    left = []
    for name, ious in after.items():
        if name not in before:
            continue
        diff = np.asarray(ious) - np.asarray(before[name])
        error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean() + margin * error < 0:
            left.append(name)
    return sorted(left)


def release_inference_tensors(model) -> None:
    """Replace tensors that SAM2 modules cache across calls (RoPE frequencies, position
    encodings) if an inference-mode pass created them: autograd cannot use those."""
    for module in model.modules():
        freqs = getattr(module, "freqs_cis", None)
        if isinstance(freqs, torch.Tensor) and freqs.is_inference():
            module.freqs_cis = freqs.clone()
        cache = getattr(module, "cache", None)
        if isinstance(cache, dict):
            cache.clear()


class FeatureCache:
    """Image-encoder outputs of the training images, computed once (frozen encoder).

    Position encodings depend only on the feature sizes, so one copy serves all
    images. Without caching (or with a trainable image encoder) every call encodes.
    """

    def __init__(
        self,
        model,
        device,
        enabled: bool,
        trainable_encoder: bool,
        framing: str = "stretch",
        fill="border",
    ):
        self.model = model
        self.framing, self.fill = framing, fill
        self.device = device
        self.enabled = enabled and not trainable_encoder
        self.trainable_encoder = trainable_encoder
        self.store: dict[str, list[torch.Tensor]] = {}
        self.pos: list[torch.Tensor] | None = None
        self.sizes: dict[str, tuple[int, int]] = {}
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def _encode(self, image: np.ndarray) -> dict:
        frame = make_frame(*image.shape[:2], int(self.model.image_size), self.framing)
        with autocast(self.device):
            return encode_image(self.model, image, frame, self.fill)

    def add(self, key: str, image: np.ndarray) -> None:
        self.sizes[key] = image.shape[:2]
        if not self.enabled or key in self.store:
            return
        with torch.no_grad():
            out = self._encode(image)
        self.store[key] = [f.detach().to(self.dtype) for f in out["backbone_fpn"]]
        if self.pos is None:
            self.pos = [p.detach().float() for p in out["vision_pos_enc"]]

    def backbone(self, key: str, image_loader) -> dict:
        if self.enabled:
            return {
                "backbone_fpn": [f.float() for f in self.store[key]],
                "vision_pos_enc": self.pos,
            }
        image = image_loader(key)
        if self.trainable_encoder:
            return self._encode(image)
        with torch.no_grad():
            return self._encode(image)


@dataclass
class _TrainingTemplate:
    key: str
    objects: list[tuple[int, int]]
    mask_input: torch.Tensor  # (B, 1, S, S) binary
    # other training templates (or views of them) in the first half's memory beside this
    # one (`cycle_memory: training`), as (feature-cache key, their masks of `objects`)
    companions: tuple[tuple[str, torch.Tensor], ...] = ()


def _checkpointed(forward, *args, **kwargs):
    """Run a layer under activation checkpointing (dropout masks are replayed)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice, per object, averaged."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    return (1 - (2 * inter + 1) / (prob.sum(1) + target.sum(1) + 1)).mean()


LAYOUT_APART = 0.05  # structures overlapping by less than this share of the smaller are apart


def apart_structures(masks: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: which pairs of the (B, ...) masks (soft or binary) overlap by less
    than `LAYOUT_APART` of the smaller one's area (an empty mask is apart from all
    others; none from itself)."""
    flat = masks.float().flatten(1)
    area = flat.sum(1).clamp_min(1e-6)
    smaller = torch.minimum(area[:, None], area[None, :])
    apart = (flat @ flat.T) / smaller < LAYOUT_APART
    return apart.fill_diagonal_(False)


def exclusive(prob: torch.Tensor, apart: torch.Tensor) -> torch.Tensor:
    """`prob` (B, 1, H, W), each structure zeroed wherever one of those it is apart
    from (`apart`, (B, B) bool, as `apart_structures` gives) is likelier: structures
    apart on the template cannot share pixels (no gradient through the choice)."""
    flat = prob.detach().flatten(1)
    keep = torch.ones_like(flat)
    for i in range(len(flat)):
        if apart[i].any():
            keep[i] = (flat[i] >= flat[apart[i]].amax(0)).to(flat.dtype)
    return prob * keep.reshape(prob.shape)


def layout_loss(logits: torch.Tensor, template_masks: torch.Tensor) -> torch.Tensor:
    """How far the soft masks of `logits` (B, 1, h, w), one structure each, on a photo
    stray from the layout of the template's masks (B, 1, S, S) of the same structures:
    the mean, over the pairs of structures apart on the template, of their soft overlap
    on the photo as a share of the smaller one's area; plus the mean, over the
    structures on the template, of |log| of the ratio of their share of the summed
    area on the photo to their share on the template. Zero for a prediction laid out
    as the template at any scale; large when the structures merge into one blob or
    one of them swells or vanishes (sizes measured at the logits' resolution)."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    truth = F.adaptive_avg_pool2d(template_masks.float(), logits.shape[-2:]).flatten(1)
    present = truth.sum(1) > 0
    if int(present.sum()) < 2:
        return prob.new_zeros(())
    prob, truth = prob[present], truth[present]
    area, area0 = prob.sum(1), truth.sum(1)
    apart = torch.triu(apart_structures(truth), diagonal=1)
    loss = prob.new_zeros(())
    if apart.any():
        smaller = torch.minimum(area[:, None], area[None, :]) + 1.0
        loss = loss + ((prob @ prob.T) / smaller)[apart].mean()
    share = (area + 1.0) / (area.sum() + 1.0)
    return loss + torch.log(share / (area0 / area0.sum())).abs().mean()


def _swap_mirrored(masks: np.ndarray, objects, categories: dict) -> np.ndarray:
    """The masks of a mirrored view with left and right structures' masks swapped."""
    names = [categories.get(cid) for cid, _ in objects]
    index = {(names[i], objects[i][1]): i for i in range(len(objects))}
    swapped = masks.copy()
    for i, name in enumerate(names):
        partner = mirror_partner(name or "")
        j = index.get((partner, objects[i][1]))
        if j is not None:
            swapped[i] = masks[j]
    return swapped


def template_view(
    image: np.ndarray, masks: np.ndarray, objects, categories: dict, rng: np.random.Generator
):
    """An augmented view of a template photo and its masks: scaled 0.85-1.15 about a
    shifted centre, turned up to 15 degrees, mirrored half the time (masks of
    left/right structures swapped), brightness, contrast and hue changed a little.

    Args:
        image: the RGB uint8 photo.
        masks: its (N, H, W) bool masks.
        objects: the masks' (category id, instance).
        categories: {category id: name} (names tell left from right).
        rng: the generator of the changes.

    Returns:
        (RGB uint8 view, its (N, H, W) bool masks).
    """
    import cv2

    height, width = image.shape[:2]
    scale = rng.uniform(0.85, 1.15)
    angle = rng.uniform(-15, 15)
    centre = (
        width / 2 + rng.uniform(-0.08, 0.08) * width,
        height / 2 + rng.uniform(-0.08, 0.08) * height,
    )
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    mirror = bool(rng.random() < 0.5)
    if mirror:  # then mirror the whole frame
        matrix = np.array([[-1, 0, width - 1], [0, 1, 0]], float) @ np.vstack([matrix, [0, 0, 1]])
    out = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    warped = np.stack(
        [
            cv2.warpAffine(
                m.astype(np.uint8),
                matrix,
                (width, height),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            > 0
            for m in masks
        ]
    )
    if mirror:
        warped = _swap_mirrored(warped, objects, categories)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 256
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
    mean = rgb.mean()
    rgb = (rgb - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.15)
    return np.clip(rgb, 0, 255).astype(np.uint8), warped


class Trainer:
    """Palindrome fine-tuning of a SAM2 model on one collection.

    model: a SAM2Base (see `sam2pal.models.build.build_model`), on its device.
    templates: a `sam2pal.io.templates.TemplateSet` (all its images are training templates).
    pool: {key: image path} of unlabelled specimens (template photos are left out).
    ground_truth: optional {key: {category name: bool mask}} for the real IoU.
    """

    OBJECTIVES = ("palindrome", "supervised")
    SELECT_BY = ("auto", "cycle_iou", "no_ground_truth")
    VALIDATION_VIEWS = 6  # augmented views of each held-out template beside it
    ANCHOR_VIEWS = 8  # views of each template for anchor_weight with template_views 0
    # a structure goes to the untouched model when the adapter is worse on the held-out
    # templates and their views by more than this many standard errors of the difference
    UNTOUCHED_MARGIN = 2.0

    def __init__(
        self,
        model,
        templates,
        pool: dict,
        settings: FinetuneSettings,
        ground_truth: dict | None = None,
        read_image=None,
        log=print,
        objective: str = "palindrome",
        select_by: str = "auto",
        framing: str = "stretch",
        framing_fill="border",
        zoom: str = "off",
        zoom_below: float = ENGINE_DEFAULTS["zoom_below"],
        zoom_margin: float = ENGINE_DEFAULTS["zoom_margin"],
        tone: str = ENGINE_DEFAULTS["tone"],
        mask_choice: str = ENGINE_DEFAULTS["mask_choice"],
        absent: str = ENGINE_DEFAULTS["absent"],
    ):
        """`objective` "supervised" (an upper bound for benchmarks, not a workflow
        mode) trains phase 1 alone against the targets' true masks: every training
        image needs ground truth. `select_by` "cycle_iou" picks the best epoch on the
        label-free cycle IoU even where ground truth is known (it is then only logged,
        as is the training targets' IoU beside the loss, step by step);
        "no_ground_truth" picks it as the workflow does without ground truth (on the
        held-out templates where there are any, else on the cycle IoU). `framing` and
        `framing_fill`: how images go into the model's square input, as at inference
        (`sam2pal.inference.framing`): the adapter is trained on what it will see.
        `zoom`, `zoom_below`, `zoom_margin`: the segmentation's zoom pass
        (`sam2pal.inference.zoom_pass`); with it on and `zoom_crops` set, the zoom
        pass's windows are trained on as well (`_add_zoom_crops`), and the held-out
        images are scored with the zoom pass. `tone`: the segmentation's tone
        (`sam2pal.inference.tone`), decided on all the templates: every photo read here
        is toned as the segmentation will tone it. `mask_choice`, `absent`: the
        segmentation's choice of mask (`engine.Propagator`): the held-out templates and
        photos that judge the epochs are segmented as the collection will be."""
        if objective not in self.OBJECTIVES:
            raise InputError(
                f"finetune: objective must be one of {', '.join(self.OBJECTIVES)}, got {objective!r}"
            )
        if select_by not in self.SELECT_BY:
            raise InputError(
                f"finetune: select_by must be one of {', '.join(self.SELECT_BY)}, got {select_by!r}"
            )
        self.objective, self.select_by = objective, select_by
        if read_image is None:
            from sam2pal.io.images import read_image
        self.tone = Tone.resolve(
            tone,
            lambda: (
                (read_image(t.path), [inst.mask for inst in t.instances]) for t in templates.images
            ),
        )
        self.read_image = self.tone.reader(read_image)
        self.settings = settings
        self.log = log
        self.device = model.device
        self.image_size = int(model.image_size)
        if framing not in FRAMINGS:
            raise InputError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
        self.framing, self.framing_fill = framing, parse_fill(framing_fill)
        all_templates = templates
        templates, self.validation_templates = self._hold_out_templates(templates, settings)
        if settings.stay_weight is None:  # on where no template is held out to judge
            lone = settings.mode == "lora" and not self.validation_templates
            stay = 1.0 if lone and objective == "palindrome" else 0.0
            settings = self.settings = replace(settings, stay_weight=stay)
        self.categories = dict(templates.categories)
        self.template_set = templates
        self.all_template_set = all_templates  # the held-out templates too
        self.ground_truth = ground_truth or {}
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        self.rng = np.random.default_rng(settings.seed)
        release_inference_tensors(model)
        self._prepare_model(model)
        self._split_pool(pool, all_templates)
        trainable_encoder = "image_encoder" in settings.targets
        self.cache = FeatureCache(
            self.sam,
            self.device,
            settings.cache_features,
            trainable_encoder,
            self.framing,
            self.framing_fill,
        )
        self.templates: list[_TrainingTemplate] = []
        # every template's feature-cache key by file name (training and held out), and
        # the file name of each held-out template's photo and views by their keys
        self.template_keys: dict[str, str] = {}
        self.validation_sources: dict[str, str] = {}
        self.views: dict[str, list[_TrainingTemplate]] = {}
        self._zoom_wanted = zoom not in ("off", False) and settings.zoom_crops
        self._view_sources: dict[str, tuple] = {}
        # pixels made here (template views, zoom windows), kept without the feature cache
        self.crop_images: dict[str, np.ndarray] = {}
        for t in templates.images:
            self._add_template(t)
        if settings.cycle_memory == "training":
            self.log(
                f"each cycle's first half reads its photo from the {len(self.templates)} "
                "training template(s) that show the cycle's structures (cycle_memory: training)"
            )
        for key in self.train_keys + self.holdout:
            self.cache.add(key, self.read_image(self.paths[key]))
        self.validation_truths: dict[str, dict[str, np.ndarray]] = {}
        self.validation_pixels: dict[str, np.ndarray] = {}  # views, when read back
        keep_pixels = not self.cache.enabled or zoom not in ("off", False)
        for held in self.validation_templates:
            self._add_validation_template(held, keep_pixels)
        if objective == "palindrome" and not self.validation_templates and not self.ground_truth:
            self.log(
                "no template held out: the label-free cycle IoU picks the epoch, and it can "
                "keep an adapter that segments worse than the untouched model (README, "
                "Adapting SAM2 to a collection); annotate a second template to judge it"
                + ("" if settings.stay_weight else ", or set stay_weight: 1 (config/README.md)")
            )
        if isinstance(zoom, bool):  # YAML's unquoted off / on
            zoom = "on" if zoom else "off"
        self.zoom = {"zoom": zoom, "zoom_below": zoom_below, "zoom_margin": zoom_margin}
        self.mask_rule = {"mask_choice": mask_choice, "absent": absent}
        # per zoom cluster, its training templates (template windows, and windows of
        # the template views); per training image, its (cluster, window key) pairs
        self.crop_templates: dict[int, list[_TrainingTemplate]] = {}
        self.crop_targets: dict[str, list[tuple[int, str]]] = {}
        if zoom != "off" and settings.zoom_crops:
            self._add_zoom_crops()
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.step_target_ious: list[float | None] = []  # phase-1 IoU where the truth is known
        self._truth_inputs: dict[tuple[str, str], torch.Tensor | None] = {}
        # (template, its companions, photo) -> the untouched model's phase-1 logits
        # (stay_weight)
        self._untouched_logits: dict[tuple[str, ...], torch.Tensor] = {}
        self._apart: dict[str, torch.Tensor] = {}  # template key -> apart_structures

    def _prepare_model(self, model) -> None:
        """Add LoRA (or choose the parameters to train in full), set the attention dropout
        and gradient checkpointing; sets `peft_model`, `sam` and `params`."""
        settings = self.settings
        if settings.mode == "lora":
            self.peft_model = add_lora(
                model,
                settings.lora_rank,
                settings.lora_alpha,
                settings.lora_dropout,
                settings.targets,
            )
            self.sam = self.peft_model.base_model.model
        else:
            self.peft_model = None
            self.sam = model
            for name, param in model.named_parameters():
                # the mask decoder's two feature convolutions act on the image features:
                # they stay frozen while the image encoder is, so cached features hold
                in_features = name.startswith(
                    ("sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1")
                )
                trainable = name.split(".")[0] in settings.targets
                param.requires_grad_(
                    trainable and not (in_features and "image_encoder" not in settings.targets)
                )
        for module in self.sam.modules():
            if hasattr(module, "dropout_p"):  # SAM2's attention modules
                module.dropout_p = float(settings.attention_dropout)
        if settings.gradient_checkpointing:
            for layer in self.sam.memory_attention.layers:
                layer.forward = functools.partial(_checkpointed, layer.forward)
        self.params = [p for p in self.sam.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("finetune: nothing to train (check targets)")

    @staticmethod
    def _hold_out_templates(templates, settings):
        """(training templates, the held-out templates in file-name order): with
        `holdout_template` and two templates or more, up to `holdout_templates` of them,
        the last in file-name order first, each one only if the templates left to train
        still show all its structures (a template showing one of its own trains: the
        training would lose it); at least one template trains."""
        if not settings.holdout_template or len(templates.images) < 2:
            return templates, []
        training = sorted(templates.images, key=lambda image: image.file_name)
        held = []
        for image in reversed(list(training)):
            if len(held) >= settings.holdout_templates or len(training) < 2:
                break
            others = [other for other in training if other is not image]
            shown = {inst.category_id for other in others for inst in other.instances}
            if {inst.category_id for inst in image.instances} <= shown:
                training, held = others, [image, *held]
        if not held:
            return templates, []
        return templates.select([t.file_name for t in training]), held

    def _add_validation_template(self, image, keep_pixels: bool) -> None:
        """A held-out template: its photo and `VALIDATION_VIEWS` augmented views of it
        (`template_view`, a fixed seed: the same views every epoch) into the feature
        cache, and their true masks (of the structures the training templates show, by
        name) for `validate`. One photo alone is a noisy judge; its views (scaled,
        turned, mirrored, recoloured) steady it. `keep_pixels`: keep the views' pixels
        (the validation reads the photos when the features are not cached or with the
        zoom pass)."""
        key = f"validation-template:{image.file_name}"
        self.template_keys[image.file_name] = key
        self.validation_sources[key] = image.file_name
        self.paths[key] = Path(image.path)
        photo = self.read_image(image.path)
        self.cache.add(key, photo)
        objects = [(inst.category_id, inst.instance) for inst in image.instances]
        masks = np.stack([inst.mask for inst in image.instances])
        self.validation_truths[key] = self._named_truth(objects, masks)
        rng = np.random.default_rng(1234)
        for v in range(self.VALIDATION_VIEWS):
            view, view_masks = template_view(photo, masks, objects, self.categories, rng)
            view_key = f"{key}#view{v}"
            self.validation_sources[view_key] = image.file_name
            self.cache.add(view_key, view)
            if keep_pixels:
                self.validation_pixels[view_key] = view
            self.validation_truths[view_key] = self._named_truth(objects, view_masks)
        self.log(
            f"template {image.file_name} held out: its true masks (and those of "
            f"{self.VALIDATION_VIEWS} views of it) choose the best epoch"
        )

    def _named_truth(self, objects, masks: np.ndarray) -> dict[str, np.ndarray]:
        """{structure name: union of its masks} of the categories the training knows."""
        truth: dict[str, np.ndarray] = {}
        for (category_id, _), mask in zip(objects, masks):
            name = self.categories.get(category_id)
            if name is not None:
                truth[name] = truth[name] | mask if name in truth else mask.copy()
        return truth

    def _split_pool(self, pool: dict, templates) -> None:
        """The pool, minus the template photos (`templates`, the held-out one included):
        a seeded sample of held-out images and of at most max_pool_images training
        images (a collection may hold 100,000); sets `paths`, `holdout` and `train_keys`."""
        settings = self.settings
        template_paths = {str(Path(t.path).resolve()) for t in templates.images}
        keys = sorted(k for k, p in pool.items() if str(Path(p).resolve()) not in template_paths)
        self.paths = {k: Path(pool[k]) for k in keys}
        order = list(self.rng.permutation(len(keys)))
        n_holdout = 0
        if len(keys) >= 2 and settings.holdout_fraction > 0:
            n_holdout = min(
                settings.max_holdout, max(1, round(len(keys) * settings.holdout_fraction))
            )
        self.holdout = sorted(keys[i] for i in order[:n_holdout])
        self.train_keys = sorted(
            keys[i] for i in order[n_holdout : n_holdout + settings.max_pool_images]
        )
        if not self.train_keys:
            raise InputError(
                "finetune: no unlabelled images to train on (the pool holds only templates)"
            )
        if self.objective == "supervised":
            unlabelled = [k for k in self.train_keys if not self.ground_truth.get(k)]
            if unlabelled:
                raise InputError(
                    f"finetune: supervised training needs ground truth for {unlabelled[0]} "
                    f"and {len(unlabelled) - 1} more training images"
                )

    def _add_template(self, t) -> None:
        """Add template image `t` (and `template_views` random views of it, or
        `ANCHOR_VIEWS` for the anchor term alone) to the training templates and the
        feature cache."""
        key = f"template:{t.file_name}"
        self.template_keys[t.file_name] = key
        self.paths[key] = Path(t.path)
        image = self.read_image(t.path)
        self.cache.add(key, image)
        objects = [(i.category_id, i.instance) for i in t.instances]
        masks = np.stack([i.mask for i in t.instances])
        self.templates.append(_TrainingTemplate(key, objects, self._mask_input(masks)))
        self.views[key] = []
        s = self.settings
        for v in range(s.template_views or (self.ANCHOR_VIEWS if s.anchor_weight else 0)):
            view_image, view_masks = template_view(image, masks, objects, self.categories, self.rng)
            view_key = f"{key}#view{v}"
            self._add_crop(view_key, view_image)
            if self._zoom_wanted:  # the zoom crops cut the views too
                self._view_sources[view_key] = (view_image, dict(zip(objects, view_masks)))
            self.views[key].append(
                _TrainingTemplate(view_key, objects, self._mask_input(view_masks))
            )

    def _mask_input(self, masks: np.ndarray) -> torch.Tensor:
        """(B, H, W) masks as the model's (B, 1, S, S) mask input, framed."""
        frame = make_frame(*masks.shape[1:], self.image_size, self.framing)
        return binary_mask_input(masks, self.image_size, self.device, frame)

    # -- the palindrome ---------------------------------------------------------------

    def _backbone(self, key: str) -> dict:
        return self.cache.backbone(key, self._image)

    def _image(self, key: str) -> np.ndarray:
        crop = self.crop_images.get(key)
        return crop if crop is not None else self.read_image(self.paths[key])

    def _add_crop(self, key: str, image: np.ndarray) -> None:
        """Pixels made here (a zoom window, a template view) into the feature cache
        (kept as pixels without it, encoded at every use)."""
        self.cache.add(key, image)
        if not self.cache.enabled:
            self.crop_images[key] = image

    def _add_zoom_crops(self) -> None:
        """Train on the zoom pass's windows too, cut as the segmentation cuts them.

        The engine with the zoom pass (on the untrained adapter: the base model) gives
        the clusters of small structures and each template's window; every training
        image's whole-photo prediction frames its window (or places it from the
        template, `zoom_pass.ZoomPass.target_windows`). Each cycle on a window pairs
        it with a template window of the same cluster (or of a template view, with the
        window framed on the view's masks), whose structures' masks the loss is taken
        on. Ground truth, where given, is cut alike (the logged target IoU)."""
        self.sam.eval()  # the windows are framed as the segmentation frames them
        engine = Propagator(
            self.sam,
            self.template_set,
            read_image=self.read_image,
            tone=Tone(),  # its photos come toned from here
            cycle_consistency=False,
            framing=self.framing,
            framing_fill=self.framing_fill,
            **self.mask_rule,
            # `best` cuts `on`'s windows (it chooses between the passes afterwards)
            **{**self.zoom, "zoom": "on" if self.zoom["zoom"] == "best" else self.zoom["zoom"]},
        )
        zoom = engine.zoom_pass
        if zoom is None or not zoom.clusters:
            release_inference_tensors(self.sam)
            return
        by_index = list(self.template_set.images)
        for k, cluster in enumerate(zoom.clusters):
            crops = self.crop_templates.setdefault(k, [])
            for t in cluster.templates:
                key = f"template:{by_index[t].file_name}"
                masks = {(i.category_id, i.instance): i.mask for i in by_index[t].instances}
                sources = [(key, self.read_image(by_index[t].path), masks)]
                for view in self.views.get(key, []):
                    sources.append((view.key, *self._view_sources[view.key]))
                for source_key, image, source_masks in sources:
                    stacked = np.stack([source_masks[o] for o in cluster.objects])
                    if not stacked.any():
                        continue  # a view that turned the structures out of the frame
                    window = union_crop([zoom.window(m) for m in stacked if m.any()])
                    crop_key = f"{source_key}#zoom{k}"
                    self._add_crop(crop_key, crop_image(image, window, self.framing_fill))
                    crops.append(
                        _TrainingTemplate(
                            crop_key,
                            list(cluster.objects),
                            self._mask_input(crop_masks(stacked, window)),
                        )
                    )
        self._view_sources.clear()
        for key in self.train_keys:
            image = self.read_image(self.paths[key])
            pending = engine.start_batch([image], zoom=False)[0]
            truth = self.ground_truth.get(key)
            for k, window, _ in zoom.target_windows(pending.first_boxes(), pending.size):
                if not self.crop_templates.get(k):
                    continue
                crop_key = f"{key}#zoom{k}"
                self._add_crop(crop_key, zoom.cut(image, window))
                self.crop_targets.setdefault(key, []).append((k, crop_key))
                if truth:
                    self.ground_truth[crop_key] = {
                        name: crop_masks(mask[None], window)[0] for name, mask in truth.items()
                    }
        del engine
        release_inference_tensors(self.sam)
        self.log(
            f"zoom crops: {len(self.crop_templates)} cluster(s) of small structures, "
            f"{sum(map(len, self.crop_targets.values()))} windows of training photos"
        )

    def phase1(self, template: _TrainingTemplate, template_backbone: dict, target_backbone: dict):
        """Template (with its true masks) in memory, and its `companions` after it, the
        photo last -> logits on the target. The segmentation orders its templates by
        file name: the same memory when the cycle's template is the first (the object
        pointers' temporal positions differ otherwise, the masks' memories do not).

        Returns (low-res logits on x1, object logits on x1, the phase-1 memory, the
        target's features)."""
        batch = len(template.objects)
        frames = [(template_backbone, template.mask_input)] + [
            (self._backbone(key), masks) for key, masks in template.companions
        ]
        num_frames = len(frames) + 1
        memory = new_memory(
            {
                index: conditioning_frame(
                    self.sam,
                    expand_features(self.sam, backbone, batch),
                    index,
                    num_frames,
                    masks,
                    memory_dtype=None,
                )
                for index, (backbone, masks) in enumerate(frames)
            }
        )
        target_feats = expand_features(self.sam, target_backbone, batch)
        logits, _, object_logits = track_frame(
            self.sam, target_feats, len(frames), num_frames, memory
        )
        return logits, object_logits, memory, target_feats

    def with_companions(self, template: _TrainingTemplate) -> _TrainingTemplate:
        """`template` (a training template or one of its views) with the other training
        templates that show all its structures as its companions (`cycle_memory:
        training`): each the template itself or, with `template_views`, one of its views
        drawn at random, its masks in `template`'s order of structures."""
        if self.settings.cycle_memory != "training":
            return template
        companions = []
        for other in self.templates:
            views = self.views.get(other.key, [])
            if template.key in {other.key, *(v.key for v in views)}:
                continue  # the cycle's own template
            if not set(template.objects) <= set(other.objects):
                continue
            if views and self.settings.template_views:
                family = [*views, other]
                other = family[int(self.rng.integers(len(family)))]
            order = [other.objects.index(o) for o in template.objects]
            companions.append((other.key, other.mask_input[order]))
        return replace(template, companions=tuple(companions))

    def soft_mask(
        self, low_res_logits: torch.Tensor, template: _TrainingTemplate | None = None
    ) -> torch.Tensor:
        """Phase-1 logits -> (B, 1, S, S) probabilities, the mask phase 2 remembers.

        With `binary_cycle_mask` the values are cut at 0.5 while the gradient is that
        of the probabilities (straight-through). With `exclusive_cycle_mask` (and the
        `template` the logits came from), structures apart on the template keep, where
        they overlap, only the likeliest of them."""
        size = (self.image_size, self.image_size)
        prob = torch.sigmoid(
            F.interpolate(low_res_logits, size=size, mode="bilinear", align_corners=False)
        )
        if self.settings.exclusive_cycle_mask and template is not None:
            if template.key not in self._apart:
                self._apart[template.key] = apart_structures(template.mask_input)
            prob = exclusive(prob, self._apart[template.key])
        if not self.settings.binary_cycle_mask:
            return prob
        return (prob > 0.5).to(prob.dtype) + (prob - prob.detach())

    def phase2(
        self,
        template: _TrainingTemplate,
        template_backbone: dict,
        target_feats,
        soft_mask: torch.Tensor,
    ):
        """A fresh memory holding only the target and its soft mask -> the template.

        Returns (low-res logits on x0, object logits on x0)."""
        cond = conditioning_frame(self.sam, target_feats, 0, 2, soft_mask, memory_dtype=None)
        memory = new_memory({0: cond})  # the reset: nothing of phase 1 but the soft mask
        template_feats = expand_features(self.sam, template_backbone, len(template.objects))
        logits, _, object_logits = track_frame(self.sam, template_feats, 1, 2, memory)
        return logits, object_logits

    def _mask_loss(
        self, logits: torch.Tensor, truth: torch.Tensor, objectness: torch.Tensor, logits1
    ):
        """The weighted loss of low-res `logits` against (B, 1, S, S) `truth`, with an
        object-score term, and its parts (with the phase-1 logits `logits1`)."""
        s = self.settings
        size = (self.image_size, self.image_size)
        high = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        bce = F.binary_cross_entropy_with_logits(high, truth)
        dice = dice_loss(high, truth)
        total = s.bce_weight * bce + s.dice_weight * dice + s.object_weight * objectness
        return total, {
            "bce": bce.item(),
            "dice": dice.item(),
            "object": objectness.item(),
            "logits1": logits1,
        }

    def palindrome_loss(self, template: _TrainingTemplate, target_key: str):
        """The loss of one {x0, x1, x1, x0} cycle.

        Args:
            template: the training template (x0) with its true masks.
            target_key: the unlabelled target image (x1).

        Returns:
            (loss, parts): parts holds the bce, dice and object terms and the phase-1
            logits on the target ("logits1").
        """
        template_backbone = self._backbone(template.key)  # once per step, cached or not
        logits1, object1, _, target_feats = self.phase1(
            template, template_backbone, self._backbone(target_key)
        )
        logits0, object0 = self.phase2(
            template, template_backbone, target_feats, self.soft_mask(logits1, template)
        )
        present = torch.ones_like(object0)
        objectness = 0.5 * (
            F.binary_cross_entropy_with_logits(object0, present)
            + F.binary_cross_entropy_with_logits(object1, present)
        )
        return self._mask_loss(logits0, template.mask_input, objectness, logits1)

    def truth_input(self, template: _TrainingTemplate, key: str) -> torch.Tensor | None:
        """(B, 1, S, S) true masks of image `key` for the template's structures (by
        category name; empty where a structure is absent), or None without ground truth."""
        cached = (template.key, key)
        if cached not in self._truth_inputs:
            truth = self.ground_truth.get(key)
            value = None
            if truth:
                shape = next(iter(truth.values())).shape
                masks = np.stack(
                    [
                        truth.get(self.categories.get(cid), np.zeros(shape, bool))
                        for cid, _ in template.objects
                    ]
                )
                value = self._mask_input(masks)
            self._truth_inputs[cached] = value
        return self._truth_inputs[cached]

    def anchor_loss(self, template: _TrainingTemplate, view: _TrainingTemplate) -> torch.Tensor:
        """Phase 1 from `template` onto `view`, another view of the same photo, against
        the view's true masks (`anchor_weight`): a supervised term on known masks that
        keeps the adapter segmenting from memory what the template shows."""
        logits, objects, _, _ = self.phase1(
            template, self._backbone(template.key), self._backbone(view.key)
        )
        truth = view.mask_input
        present = (truth.flatten(1).sum(1) > 0).float().reshape(objects.shape)
        objectness = F.binary_cross_entropy_with_logits(objects, present)
        return self._mask_loss(logits, truth, objectness, logits)[0]

    def stay_loss(self, template: _TrainingTemplate, target_key: str, logits1) -> torch.Tensor:
        """Dice and cross-entropy of the phase-1 `logits1` against the untouched model's
        probabilities on the same photo from the same template (`stay_weight`): the
        adapter switched off, no gradient, computed once per (template, photo) and kept."""
        cached = (template.key, *(key for key, _ in template.companions), target_key)
        if cached not in self._untouched_logits:
            with torch.no_grad(), self.peft_model.disable_adapter():
                ref = self.phase1(
                    template, self._backbone(template.key), self._backbone(target_key)
                )[0]
            self._untouched_logits[cached] = ref.detach()
        size = (self.image_size, self.image_size)
        ref = torch.sigmoid(
            F.interpolate(
                self._untouched_logits[cached], size=size, mode="bilinear", align_corners=False
            )
        ).to(logits1.dtype)
        return self._mask_loss(logits1, ref, logits1.new_zeros(()), logits1)[0]  # no object term

    def supervised_loss(self, template: _TrainingTemplate, target_key: str):
        """Phase 1 alone against the target's true masks (the oracle of benchmarks).

        Args:
            template: the training template with its true masks.
            target_key: the target image, which must have ground truth.

        Returns:
            (loss, parts), as `palindrome_loss`.
        """
        logits1, object1, _, _ = self.phase1(
            template, self._backbone(template.key), self._backbone(target_key)
        )
        truth = self.truth_input(template, target_key)
        present = (truth.flatten(1).sum(1) > 0).float().reshape(object1.shape)
        objectness = F.binary_cross_entropy_with_logits(object1, present)
        return self._mask_loss(logits1, truth, objectness, logits1)

    def target_iou(
        self, template: _TrainingTemplate, key: str, logits1: torch.Tensor
    ) -> float | None:
        """Mean IoU over structures of the phase-1 prediction on a training target, at
        the model's input size; None without ground truth."""
        truth = self.truth_input(template, key)
        if truth is None:
            return None
        size = (self.image_size, self.image_size)
        with torch.no_grad():
            pred = (
                F.interpolate(
                    logits1.detach().float(), size=size, mode="bilinear", align_corners=False
                )
                > 0
            )
            gt = truth > 0.5
            inter = (pred & gt).flatten(1).sum(1).float()
            union = (pred | gt).flatten(1).sum(1).float()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
        return float(iou.mean())

    # -- validation -------------------------------------------------------------------

    def validate(self) -> dict:
        """Score the model on the held-out images (the held-out photos segmented from
        the training templates, each held-out template and its views from the templates
        `judge_memory` gives).

        Returns:
            {"val_cycle_iou": mean cycle IoU, "val_template_iou": mean IoU of the
            held-out templates and their views, "val_template_ious": the same per structure
            name, "val_template_view_ious": per structure name, the IoU of the template
            and of each view, "val_iou": mean real IoU where there is ground truth
            (category masks by name), "val_ious": the same per structure name}; None
            (or {}) for what cannot be measured.
        """
        if not self.holdout and not self.validation_templates:
            return {
                "val_cycle_iou": None,
                "val_template_iou": None,
                "val_template_ious": {},
                "val_template_view_ious": {},
                "val_iou": None,
                "val_ious": {},
            }
        self.sam.eval()
        zoom = self.zoom["zoom"] != "off"
        engines: dict[tuple[str, ...], Propagator] = {}
        cycles = []
        template_ious: dict[str, list[float]] = {}  # per structure name
        truth_ious: dict[str, list[float]] = {}  # held-out photos', per structure name
        validation = self.validation_truths
        for key in self.holdout + list(validation):
            memory = self.judge_memory(key)
            if memory not in engines:
                engines[memory] = self._judge(memory, zoom)
            backbone = self._backbone(key) if self.cache.enabled else None
            if backbone is not None and not zoom:
                image = self.cache.sizes[key]
            elif key in self.validation_pixels:
                image = self.validation_pixels[key]
            else:
                image = self.read_image(self.paths[key])
            preds = engines[memory].predict(image, backbone=backbone)
            if key in validation:
                names = list(validation[key])
                for name, iou in zip(names, self._truth_ious(preds, validation[key])):
                    template_ious.setdefault(name, []).append(iou)
                continue
            cycles += [p.cycle_iou for p in preds]
            truth = self.ground_truth.get(key) or {}
            for name, iou in zip(truth, self._truth_ious(preds, truth)):
                truth_ious.setdefault(name, []).append(iou)
        del engines
        release_inference_tensors(self.sam)
        self.sam.train()
        ious = [v for per in truth_ious.values() for v in per]
        return {
            "val_cycle_iou": float(np.mean(cycles)) if cycles else None,
            "val_template_iou": (
                float(np.mean([v for per in template_ious.values() for v in per]))
                if template_ious
                else None
            ),
            "val_template_ious": {name: float(np.mean(v)) for name, v in template_ious.items()},
            # per structure, the IoU of each held-out template and of each of its views
            "val_template_view_ious": {name: list(v) for name, v in template_ious.items()},
            "val_iou": float(np.mean(ious)) if ious else None,
            "val_ious": {name: float(np.mean(v)) for name, v in truth_ious.items()},
        }

    def judge_memory(self, key: str) -> tuple[str, ...]:
        """The file names of the templates that `validate` segments image `key` from: for
        a held-out template (or a view of it) with `judge_memory: others`, every other
        template, the other held-out ones too (after the fine-tuning the segmentation
        has them all in memory); otherwise, and for the held-out photos, the training
        templates."""
        training = tuple(t.file_name for t in self.template_set.images)
        held = self.validation_sources.get(key)
        if held is None or self.settings.judge_memory != "others":
            return training
        others = [t.file_name for t in self.validation_templates if t.file_name != held]
        return training + tuple(others)

    def _judge(self, memory: tuple[str, ...], zoom: bool) -> Propagator:
        """The engine of `validate` with the templates `memory` (file names) in memory.
        Their features come from the cache too: every image of the training (templates,
        training and held-out photos) goes through the image encoder once (with the
        zoom pass, whose windows are cut from the photos, the photos are read)."""
        templates = self.all_template_set.select(list(memory))
        backbones = (
            [self._backbone(self.template_keys[t.file_name]) for t in templates.images]
            if self.cache.enabled and not zoom
            else None
        )
        return Propagator(
            self.sam,
            templates,
            read_image=self.read_image,
            tone=Tone(),  # its photos come toned from here
            fill_hole_area=0,
            cycle_consistency=True,
            backbones=backbones,
            framing=self.framing,
            framing_fill=self.framing_fill,
            **self.zoom,
            **self.mask_rule,
        )

    def _truth_ious(self, preds, truth: dict) -> list[float]:
        """Per structure name of `truth`, the IoU of the predictions of that name."""
        ious = []
        for name, mask in truth.items():
            pred = np.zeros_like(mask)
            for p in preds:
                if self.categories.get(p.category_id) == name:
                    pred |= p.mask
            ious.append(mask_iou(pred, mask))
        return ious

    def labels_record(self) -> dict:
        """Which images' true masks the training saw, for `sam2pal_adapter.json` (read
        by `sam2pal.outputs.evaluate`, which scores those images apart from the targets).

        selection.by: "ground_truth_iou" when the real IoU on `ground_truth_images` (the
        held-out images with ground truth) picks the best epoch, "template_iou" when the
        held-out templates' (`validation_templates`, file names) do, "cycle_iou" when the
        label-free cycle IoU does, null without held-out images. training_templates:
        {file name: structure names} of the templates whose masks the loss is taken on.
        """
        with_truth = [key for key in self.holdout if self.ground_truth.get(key)]
        by = None
        if with_truth and self.select_by == "auto":
            by = "ground_truth_iou"
        elif self.validation_templates and self.select_by != "cycle_iou":
            by = "template_iou"
        elif self.holdout:
            by = "cycle_iou"
        structures = {}
        for t in self.template_set.images:
            names = {self.categories.get(inst.category_id) for inst in t.instances}
            structures.setdefault(t.file_name, set()).update(n for n in names if n)
        return {
            "selection": {
                "by": by,
                "holdout": list(self.holdout),
                "ground_truth_images": with_truth,
                "validation_templates": [t.file_name for t in self.validation_templates],
            },
            "training_templates": {name: sorted(cats) for name, cats in sorted(structures.items())},
        }

    def score(self, metrics: dict) -> float | None:
        """The number the best adapter is chosen on, as `labels_record` says: the real
        IoU of held-out photos, the held-out templates', or the cycle IoU."""
        key = {
            "ground_truth_iou": "val_iou",
            "template_iou": "val_template_iou",
            "cycle_iou": "val_cycle_iou",
        }.get(self.labels_record()["selection"]["by"])
        if key == "val_template_iou" and self._chooses_per_structure():
            # what the segmentation will use: per structure, the adapter, or the
            # untouched model (epoch 0) where it is surely better on the held-out templates
            ious, before = metrics.get("val_template_ious"), self.history[0]["val_template_ious"]
            if ious:
                left = self._left_untouched(metrics)
                return float(np.mean([before[n] if n in left else v for n, v in ious.items()]))
        return None if key is None else metrics.get(key)

    def _left_untouched(self, metrics: dict) -> list[str]:
        """The structures the untouched model (epoch 0) segments surely better than the
        adapter of `metrics`: over the held-out templates and their views, the adapter's
        IoU minus the untouched model's is below zero by more than `UNTOUCHED_MARGIN`
        standard errors (one photo and its views are a noisy judge: a structure the
        adapter leaves as it was stays with the adapter)."""
        return left_untouched(
            self.history[0].get("val_template_view_ious") or {},
            metrics.get("val_template_view_ious") or {},
            self.UNTOUCHED_MARGIN,
        )

    def _chooses_per_structure(self) -> bool:
        """Whether the adapters record the structures left to the untouched model
        (`per_structure_choice`, a LoRA adapter off the image encoder, the held-out
        templates choosing the epoch, their epoch-0 scores known)."""
        s = self.settings
        return (
            s.per_structure_choice
            and s.mode == "lora"
            and "image_encoder" not in s.targets
            and self.labels_record()["selection"]["by"] == "template_iou"
            and bool(self.history)
            and bool(self.history[0].get("val_template_ious"))
        )

    def untouched_structures(self, epoch: int) -> list[str]:
        """The structures whose held-out-template IoU at `epoch` is below the untouched
        model's (epoch 0): the segmentation keeps the untouched model for them (none
        without the per-structure choice)."""
        if epoch == 0 or not self._chooses_per_structure():
            return []
        return self._left_untouched(self.history[epoch])

    # -- training ---------------------------------------------------------------------

    def _scheduler(self, optimizer, total_steps: int):
        warmup = max(0, int(self.settings.warmup_steps))

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if self.settings.schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _plan_steps(self) -> tuple[int, int]:
        """Images per epoch and optimizer steps in all; sets `num_epochs` (more than
        the settings' when needed to reach min_steps). An image's zoom windows are
        cycles of their own (on average over the training images)."""
        s = self.settings
        per_epoch = min(len(self.train_keys), s.max_images_per_epoch)
        windows = sum(map(len, self.crop_targets.values())) / len(self.train_keys)
        steps_per_epoch = math.ceil(round(per_epoch * (1 + windows)) / s.accumulation_steps)
        self.num_epochs = max(s.num_epochs, math.ceil(s.min_steps / steps_per_epoch))
        if self.num_epochs > s.num_epochs:
            self.log(
                f"{self.num_epochs} epochs of {steps_per_epoch} optimizer steps (min_steps {s.min_steps})"
            )
        return per_epoch, steps_per_epoch * self.num_epochs

    def _save(self, out_dir: Path, folder: str, epoch: int, metadata: dict) -> None:
        """Save the adapter (or the fully trained weights) of `epoch` into `folder`."""
        s = self.settings
        kind = s.mode
        weights = self.peft_model if kind == "lora" else self.sam
        meta = dict(
            metadata,
            kind=kind,
            epoch=epoch,
            history=self.history,
            settings=asdict(s),
            categories={str(k): v for k, v in self.categories.items()},
            **self.labels_record(),
        )
        meta["selection"]["untouched_structures"] = self.untouched_structures(epoch)
        save_adapter(weights, out_dir / folder, meta, kind)

    def _train_epoch(self, per_epoch: int, optimizer, scheduler, step_loss) -> tuple[list, int]:
        """One epoch over a seeded sample of `per_epoch` training images; returns the
        images' losses and the number of optimizer steps taken."""
        s = self.settings
        order = self.rng.permutation(len(self.train_keys))[:per_epoch]
        losses, optimizer_steps = [], 0
        optimizer.zero_grad(set_to_none=True)
        cycles = []  # (template, target key): the whole photo, then its zoom windows
        for index in order:
            key = self.train_keys[int(index)]
            template = self.templates[int(self.rng.integers(len(self.templates)))]
            views = self.views.get(template.key)
            anchor = None
            if views:  # the template itself or one of its views (template_views)
                family = [*views, template]
                pick = int(self.rng.integers(len(family))) if s.template_views else len(views)
                if s.anchor_weight:  # another of them, segmented from it against its truth
                    others = [v for j, v in enumerate(family) if j != pick]
                    anchor = others[int(self.rng.integers(len(others)))]
                template = family[pick]
            cycles.append((self.with_companions(template), key, anchor))
            for k, crop_key in self.crop_targets.get(key, []):
                crops = self.crop_templates[k]
                cycles.append((crops[int(self.rng.integers(len(crops)))], crop_key, None))
        for i, (template, key, anchor) in enumerate(cycles):
            with autocast(self.device):
                loss, parts = step_loss(template, key)
                if anchor is not None:
                    loss = loss + s.anchor_weight * self.anchor_loss(template, anchor)
                if s.stay_weight and self.objective == "palindrome":
                    loss = loss + s.stay_weight * self.stay_loss(template, key, parts["logits1"])
                if s.layout_weight and self.objective == "palindrome":
                    loss = loss + s.layout_weight * layout_loss(
                        parts["logits1"], template.mask_input
                    )
            (loss / s.accumulation_steps).backward()
            losses.append(loss.item())
            self.step_losses.append(loss.item())
            self.step_target_ious.append(self.target_iou(template, key, parts["logits1"]))
            if (i + 1) % s.accumulation_steps == 0 or i + 1 == len(cycles):
                if s.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_steps += 1
        return losses, optimizer_steps

    def _add_history(self, epoch, optimizer_steps, train_loss, lr, metrics, start) -> dict:
        """Append the row of `epoch` to the history (training_log.csv) and return it."""
        row = {
            "epoch": epoch,
            "optimizer_steps": optimizer_steps,
            "train_loss": train_loss,
            "learning_rate": lr,
            **metrics,
            "seconds": round(time.perf_counter() - start, 2),
        }
        self.history.append(row)
        return row

    def train(self, out_dir, metadata: dict) -> dict:
        """Train, writing into `out_dir`: adapter/ (best), adapter_last/,
        training_log.csv, training_steps.csv, training_curves.png (and merged.pt).

        Args:
            out_dir: the output folder (created if needed).
            metadata: facts about the run saved with every adapter (base_id, ...).

        Returns:
            {"best_epoch", "best_score", "untouched_structures", "history"}: the epoch
            whose adapter is kept in adapter/, its score, the structures it leaves to
            the untouched model (`untouched_structures`), and the per-epoch rows of
            training_log.csv.
        """
        s = self.settings
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_epoch, total_steps = self._plan_steps()
        optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        scheduler = self._scheduler(optimizer, total_steps)
        start = time.perf_counter()
        baseline = self.validate()
        self._add_history(0, 0, None, 0.0, baseline, start)
        best_score, best_epoch = self.score(baseline), 0
        self._save(out_dir, "adapter", 0, metadata)  # zero-initialised LoRA = the base model
        self.log(f"epoch 0 (before training): {baseline}")
        optimizer_steps = 0
        step_loss = self.supervised_loss if self.objective == "supervised" else self.palindrome_loss
        self.sam.train()
        for epoch in range(1, self.num_epochs + 1):
            losses, steps = self._train_epoch(per_epoch, optimizer, scheduler, step_loss)
            optimizer_steps += steps
            metrics = self.validate()
            lr = scheduler.get_last_lr()[0]
            row = self._add_history(
                epoch, optimizer_steps, float(np.mean(losses)), lr, metrics, start
            )
            self.log(f"epoch {epoch}: loss {row['train_loss']:.4f}, {metrics}")
            score = self.score(metrics)
            if score is not None and best_score is not None and score > best_score:
                best_score, best_epoch = score, epoch
                self._save(out_dir, "adapter", epoch, metadata)
            elif best_score is None:  # nothing to choose on: the latest is the best
                self._save(out_dir, "adapter", epoch, metadata)
            self._write_logs(out_dir)
        self.sam.eval()
        self._save(out_dir, "adapter_last", self.num_epochs, metadata)
        if s.merge_checkpoint and s.mode == "lora":
            save_merged_checkpoint(self.peft_model, out_dir / "merged.pt", metadata)
        self._write_logs(out_dir)
        self._plot(out_dir / "training_curves.png")
        untouched = self.untouched_structures(best_epoch)
        if untouched:
            self.log(
                f"epoch {best_epoch} kept; the held-out templates say the untouched model "
                f"segments these better, the segmentation keeps it for them: "
                f"{', '.join(untouched)}"
            )
        return {
            "best_epoch": best_epoch,
            "best_score": best_score,
            "untouched_structures": untouched,
            "history": self.history,
        }

    def _write_logs(self, out_dir: Path) -> None:
        with atomic_write(out_dir / "training_log.csv") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})
        with atomic_write(out_dir / "training_steps.csv") as handle:
            handle.write("step,loss,target_iou\n")
            handle.writelines(
                f"{i},{loss:.6f},{'' if iou is None else f'{iou:.4f}'}\n"
                for i, (loss, iou) in enumerate(
                    zip(self.step_losses, self.step_target_ious), start=1
                )
            )

    def _plot(self, path: Path) -> None:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        steps = np.arange(1, len(self.step_losses) + 1)
        left.plot(steps, self.step_losses, color="0.7", lw=0.8, label="per step")
        if len(self.step_losses) >= 5:
            window = max(2, len(self.step_losses) // 20)
            smooth = np.convolve(self.step_losses, np.ones(window) / window, mode="valid")
            left.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
        left.set(xlabel="training step", ylabel="palindrome loss", title="training loss")
        left.legend(frameon=False)
        epochs = [r["epoch"] for r in self.history]
        for key, label in (
            ("val_cycle_iou", "held-out cycle IoU"),
            ("val_iou", "held-out IoU (ground truth)"),
        ):
            values = [r.get(key) for r in self.history]
            if any(v is not None for v in values):
                right.plot(
                    epochs, [np.nan if v is None else v for v in values], marker="o", label=label
                )
        right.set(xlabel="epoch (0 = before training)", ylabel="IoU", title="validation")
        right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if right.lines:
            right.legend(frameon=False)
        else:
            right.text(
                0.5, 0.5, "no held-out images", ha="center", va="center", transform=right.transAxes
            )
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
