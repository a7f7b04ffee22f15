"""Train a small SAM2 from scratch on synthetic specimens (`sam2pal pretrain`).

No model hub can be reached from the machines this project is built on, so the demo,
the tests and the quality benchmark use a model we train ourselves: sam2pal-micro, the
real `SAM2Base` with a reduced Hiera trunk and memory (resources/models/sam2pal-micro.yaml),
saved in the official ``{"model": state_dict}`` format and loaded by the same code path
as Meta's checkpoints.

Supervision is SAM2's own, on the task the workflow runs: an *episode* is one or two
annotated templates (their part masks given as mask prompts, encoded into memory as
conditioning frames) and one target tracked from that memory; with probability
`settings.second_target` a second target, a re-posed view of the first, is tracked from
the templates plus the first target's own predicted memory (what video tracking does).
The loss is SAM2's: on every target, the best of the three candidate masks per
structure (focal x 20 + Dice) plus an L1 loss on the predicted IoU and a focal loss on
the object score. With `thin_weight`, the mask terms of structures thinner than two
cells of SAM2's output grid (legs, antennae, scapes) count more in the mean over the
structures (`thin_weights`).

Episodes are rendered on the fly, each from its own seed:

* shapes: the NEON beetle label maps not held out (`split_masks`) and random
  `procedural.procedural_insect` body plans;
* a template and its target show the same specimen in another pose (tracking) or
  two specimens of the same collection (the photo use case);
* appearance ``"v1"`` (the default, what sam2pal-micro v1 saw): the generator's
  training palettes and substrates only (`synthetic.DEFAULT_PALETTES`,
  `DEFAULT_BACKGROUNDS`: metallic blue, bronze and slate are kept for held-out tests),
  a wider scale range, and an episode-wide colour jitter (hue, saturation, brightness,
  contrast) so that colour itself is not the cue;
* appearance ``"randomised"``: `synthetic.randomised_style` per episode, part and
  ground colours from the whole colour space with light-on-dark as often as
  dark-on-light, textured grounds, clutter, lighting, blur, noise and JPEG (no colour
  jitter on top: JPEG comes last, as in a photo);
* appearance ``"mixed"``: each episode one of the two, half and half (the model
  keeps what v1's episodes taught it while it learns the randomised ones);
* with `low_contrast_fraction`, that share of the randomised episodes shows a specimen
  about as light as its ground (`randomised_style(low_contrast=True)`: every part's L*
  within 22 of the ground's, told apart by hue and chroma, as a metallic blue beetle on
  dark slate), which the 25-unit lightness gap of the others never shows;
* with `repose_fraction`, that share of the specimens drawn (every template and target
  its own draw) have their antennae and legs turned about their bases
  (`procedural.repose_appendages`): two photos of one specimen, or of one species,
  differ in where the appendages lie, and a template's antennae may lie swept back
  over the body where the target's stand forward;
* with `zoom_fraction`, that share of episodes are zoomed crops (`synthetic.zoom_crop`):
  a part present in every frame fills 20-80 % of the frame, or (a quarter of them)
  the whole specimen 25-95 %; blur, noise and JPEG are applied after the crop.

`pretrain(settings, out_dir)` writes ``<name>.pt`` (the weights), ``<name>.yaml`` (its
config), ``<name>.training.json`` (settings, time, loss) and ``<name>.training.csv`` (the
loss curve). With `resume`, a run picks up from ``<name>.state.pt``, saved every
`save_every` steps, and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from sam2pal.errors import InputError
from sam2pal.inference.engine import (
    IMG_MEAN,
    IMG_STD,
    binary_mask_input,
    conditioning_frame,
    new_memory,
    preprocess,
    track_step,
)
from sam2pal.io.atomic import atomic_path, atomic_write, write_json
from sam2pal.models.build import autocast, build_model, file_sha256, load_checkpoint, resolve_device
from sam2pal.models.download import resolve_checkpoint_digest
from sam2pal.models.registry import MICRO_MODEL, micro_model_files
from sam2pal.outputs.overlay import mean_width
from sam2pal.synth.procedural import PLANS, procedural_insect, repose_appendages
from sam2pal.synth.specimens import (
    ALL_PARTS,
    DEFAULT_BACKGROUNDS,
    DEFAULT_PALETTES,
    Style,
    camera_effects,
    collection_style,
    load_beetle_masks,
    randomised_style,
    render_specimen_layers,
    without_camera,
    zoom_crop,
)

#: Episode appearances: "v1" (sam2pal-micro v1's), "randomised" (domain randomisation)
#: and "mixed" (each episode one or the other, half and half).
APPEARANCES = ("v1", "randomised", "mixed")

LOG_COLUMNS = [
    "step",
    "loss",
    "focal",
    "dice",
    "iou_head",
    "object",
    "target_iou",
    "learning_rate",
    "seconds",
    "wait_share",
]


def split_masks(held_out_every: int = 6) -> tuple[list, list]:
    """Split the NEON label maps into training and held-out ones.

    Args:
        held_out_every: every `held_out_every`-th mask, in name order, is kept out of
            training for held-out tests.

    Returns:
        (training, held-out) lists of (name, label map).
    """
    masks = load_beetle_masks()
    held = [m for i, m in enumerate(masks) if i % held_out_every == held_out_every - 1]
    train = [m for i, m in enumerate(masks) if i % held_out_every != held_out_every - 1]
    return train, held


@dataclass
class PretrainSettings:
    # the defaults are sam2pal-micro v1's, from scratch: 4,000 episodes, about an hour on
    # 2 CPU cores (each later version went on from the one before: resources/models/README.md)
    steps: int = 1000  # optimizer steps
    episodes_per_step: int = 4
    learning_rate: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 150
    min_lr_fraction: float = 0.05
    grad_clip: float = 0.5
    image_size: int = 384
    # a resolution curriculum: the first low_res_steps at low_res_size (about 2.5x
    # cheaper per episode), the rest at image_size
    low_res_size: int = 256
    low_res_steps: int = 800
    seed: int = 0
    # episode mix
    procedural_fraction: float = 0.35  # shapes drawn from procedural insects
    same_specimen: float = 0.35  # target = the template's specimen in another pose
    # share of the drawn specimens (each template and target its own draw) whose
    # antennae and legs are turned about their bases (`procedural.repose_appendages`)
    repose_fraction: float = 0.0
    two_templates: float = 0.3
    second_target: float = 0.25
    colour_jitter: float = 0.6
    scale_range: tuple[float, float] = (0.28, 0.9)
    # appearance of the episodes: "v1", "randomised" or "mixed" (see the module docstring), and
    # the share of episodes that are zoomed crops
    appearance: str = "v1"
    zoom_fraction: float = 0.0
    # share of the randomised episodes whose specimen is about as light as its ground
    low_contrast_fraction: float = 0.0
    # procedural body plans: "v1" (sam2pal-micro v1's) or "v2" (wider proportions,
    # compound eyes, scapes and elbowed antennae; `procedural.procedural_insect`)
    body_plan: str = "v1"
    # start from these weights (a checkpoint file or name) instead of random ones
    init: str = ""
    # SAM2's loss weights
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    object_weight: float = 1.0
    # extra weight on the mask terms of thin structures: a structure's terms count
    # 1 + thin_weight x max(0, 1 - width / THIN_WIDTH_CELLS cells of SAM2's output grid)
    # (`thin_weights`); 0 weighs every structure alike, as SAM2 does
    thin_weight: float = 0.0
    save_every: int = 100
    log_every: int = 10
    # a wall-clock budget in minutes (0: none): the run ends when it is spent, with the
    # schedule (warm-up aside: learning rate, resolution) run by the share of the
    # budget spent when that is further than the share of `steps` done
    minutes: float = 0.0

    def __post_init__(self):
        problems = []
        for name in ("steps", "episodes_per_step", "save_every", "log_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if self.learning_rate <= 0:
            problems.append("learning_rate must be > 0")
        if not self.minutes >= 0:
            problems.append("minutes must be >= 0")
        if not self.thin_weight >= 0:
            problems.append("thin_weight must be >= 0")
        for name in ("image_size", "low_res_size"):
            if int(getattr(self, name)) < 64 or int(getattr(self, name)) % 32:
                problems.append(f"{name} must be a multiple of 32, at least 64")
        for name in (
            "procedural_fraction",
            "same_specimen",
            "repose_fraction",
            "two_templates",
            "second_target",
            "colour_jitter",
            "zoom_fraction",
            "low_contrast_fraction",
        ):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                problems.append(f"{name} must be between 0 and 1")
        if self.body_plan not in PLANS:
            problems.append(f"body_plan must be one of {', '.join(PLANS)}, got {self.body_plan!r}")
        if self.appearance not in APPEARANCES:
            problems.append(
                f"appearance must be one of {', '.join(APPEARANCES)}, got {self.appearance!r}"
            )
        if problems:
            raise InputError("pretrain settings: " + "; ".join(problems))
        self.scale_range = tuple(float(v) for v in self.scale_range)


# -- episodes ----------------------------------------------------------------------------


@dataclass
class Episode:
    images: list[np.ndarray]  # templates first, then targets (RGB uint8)
    labels: list[np.ndarray]  # part label maps (values 0..5) of the same frames
    n_templates: int


def colour_jitter(images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """One hue rotation, saturation, brightness and contrast change for all images of
    an episode (a collection keeps its look), with a slight per-image variation.

    Args:
        images: the episode's RGB uint8 images.
        rng: the episode's generator.

    Returns:
        The changed images.
    """
    hue = rng.uniform(-90, 90)  # degrees
    sat = rng.uniform(0.6, 1.5)
    gain = rng.uniform(0.75, 1.25)
    contrast = rng.uniform(0.75, 1.25)
    out = []
    for img in images:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + (hue + rng.normal(0, 3)) * 256 / 360) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
        mean = rgb.mean()
        rgb = (rgb - mean) * contrast + mean * gain * rng.uniform(0.95, 1.05)
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return out


def episode_shape(step: int, settings: PretrainSettings) -> tuple[int, bool]:
    """The frame structure of the episodes of an optimizer step: the episodes of one
    step share it, so they run as one batch.

    Args:
        step: the optimizer step.
        settings: the run's settings (seed, two_templates, second_target).

    Returns:
        (number of templates, whether a second target follows).
    """
    rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(5, step)))
    return (2 if rng.random() < settings.two_templates else 1), bool(
        rng.random() < settings.second_target
    )


def _episode_style(index: int, settings: PretrainSettings, rng):
    """The look of episode `index`: (appearance, style to render with, style of the
    camera stage, the zoom stream or None when not zoomed, whether to zoom on the
    whole specimen)."""
    appearance = settings.appearance
    if appearance == "mixed":  # its own stream: the draws below stay as they are
        mix_rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(9, index)))
        appearance = "randomised" if mix_rng.random() < 0.5 else "v1"
    if appearance == "randomised":
        low_contrast = False
        if settings.low_contrast_fraction > 0:  # its own stream, as the mix's
            contrast_rng = np.random.default_rng(
                np.random.SeedSequence(settings.seed, spawn_key=(10, index))
            )
            low_contrast = bool(contrast_rng.random() < settings.low_contrast_fraction)
        style = randomised_style(rng, scale_range=settings.scale_range, low_contrast=low_contrast)
    else:
        base = Style(
            palettes=DEFAULT_PALETTES,
            backgrounds=DEFAULT_BACKGROUNDS,
            scale_range=settings.scale_range,
        )
        style = collection_style(base, rng)
    camera = style  # the camera stage of the photos
    zoom_rng, whole = None, False
    if settings.zoom_fraction > 0:  # its own stream: the draws above stay as they are
        zoom_rng = np.random.default_rng(
            np.random.SeedSequence(settings.seed, spawn_key=(8, index))
        )
        if zoom_rng.random() < settings.zoom_fraction:
            whole = bool(zoom_rng.random() < 0.25)
            # render without the camera, then crop; a small specimen to zoom out of
            # the whole, a large one to zoom into a part
            style = dataclasses.replace(
                without_camera(style), scale_range=(0.25, 0.5) if whole else (0.6, 0.95)
            )
        else:
            zoom_rng = None
    return appearance, style, camera, zoom_rng, whole


def _episode_renders(
    rng, settings, shapes, size, style, n_templates: int, second_target: bool, repose_rng=None
):
    """Render the templates, the target and (with `second_target`) the target moved;
    with `repose_rng`, each of the templates' and the target's specimens has its
    appendages moved with probability `settings.repose_fraction`."""

    def shape():
        if rng.random() < settings.procedural_fraction:
            return procedural_insect(rng, plan=settings.body_plan)
        return shapes[int(rng.integers(len(shapes)))]

    def posed(src):
        if repose_rng is not None and repose_rng.random() < settings.repose_fraction:
            return repose_appendages(src, repose_rng)
        return src

    same = rng.random() < settings.same_specimen
    first = shape()
    sources = [first] + [first if same else shape() for _ in range(n_templates - 1)]
    target_src = first if same else shape()
    sources, target_src = [posed(src) for src in sources], posed(target_src)
    renders = [render_specimen_layers(src, rng, size=size, style=style) for src in sources]
    target = render_specimen_layers(target_src, rng, size=size, style=style)
    renders.append(target)
    if second_target:  # the target again, moved a little
        angle = target.angle + rng.uniform(-20, 20)
        moved = dataclasses.replace(
            style,
            rotation_range=(angle, angle),
            flip_prob=1.0 if target.flipped else 0.0,
            scale_range=_scale_near(target_src, target.scale, size, rng),
        )
        renders.append(render_specimen_layers(target_src, rng, size=size, style=moved))
    return renders


def draw_episode(
    index: int,
    settings: PretrainSettings,
    shapes: list[np.ndarray],
    n_templates: int = 1,
    second_target: bool = False,
) -> Episode:
    """Episode `index` of a run: deterministic in (settings.seed, index).

    Args:
        index: the episode's number in the run (its random streams derive from it).
        settings: the run's settings.
        shapes: the beetle label maps to draw specimens from.
        n_templates: number of templates (1 or 2).
        second_target: whether a second target, the first one moved, follows.

    Returns:
        The `Episode`: its images and label maps, templates first.
    """
    rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(7, index)))
    appearance, style, camera, zoom_rng, whole = _episode_style(index, settings, rng)
    width = int(rng.choice([320, 384, 448]))
    height = int(round(width * rng.choice([0.75, 1.0, 1.33]) / 8) * 8)
    size = (width, height)
    repose_rng = None
    if settings.repose_fraction > 0:  # its own stream: the draws above stay as they are
        repose_rng = np.random.default_rng(
            np.random.SeedSequence(settings.seed, spawn_key=(11, index))
        )
    renders = _episode_renders(
        rng, settings, shapes, size, style, n_templates, second_target, repose_rng
    )
    images = [r.image for r in renders]
    labels = [r.labels for r in renders]
    if zoom_rng is not None:
        images, labels = _zoom(images, labels, whole, size, zoom_rng)
        images = [camera_effects(img, rng, camera) for img in images]
    if appearance == "v1" and rng.random() < settings.colour_jitter:
        images = colour_jitter(images, rng)
    return Episode(images, labels, n_templates)


def _zoom(images, labels, whole: bool, size, rng) -> tuple[list, list]:
    """Zoomed crops of an episode's frames: a part seen in every frame filling 20-80 %
    of the frame (or, with `whole` or no such part, the whole specimen filling 25-95 %),
    never zooming out past the rendered canvas nor enlarging more than 4 times."""
    width, height = size

    def extent(mask):  # share of the frame spanned by the mask's bounding box
        ys, xs = np.nonzero(mask)
        return max((xs.max() - xs.min() + 1) / width, (ys.max() - ys.min() + 1) / height)

    def masks(part):
        return [lab == part if part else lab > 0 for lab in labels]

    parts = [] if whole else [k for k in ALL_PARTS if all((lab == k).sum() >= 20 for lab in labels)]
    if parts:
        part = int(parts[int(rng.integers(len(parts)))])
        low, high = 0.2, 0.8
    else:
        part, low, high = 0, 0.25, 0.95
    spans = [extent(m) for m in masks(part)]
    low, high = max(low, max(spans)), min(high, 4 * min(spans))
    if low >= high:
        return images, labels
    images, labels, _ = zoom_crop(images, labels, part, rng.uniform(low, high), size, rng)
    return images, labels


def _scale_near(src: np.ndarray, scale: float, size, rng) -> tuple[float, float]:
    """A scale range (fraction of the canvas's shorter side) within about 10% of the
    size at which `src` was just drawn with `scale` (pixels per source pixel)."""
    ys, xs = np.nonzero(src)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    frac = scale * extent / min(size)
    frac = float(np.clip(frac * rng.uniform(0.9, 1.1), 0.2, 0.95))
    return (frac, frac)


# -- the loss ----------------------------------------------------------------------------


def _focal(logits, target, alpha: float = 0.25, gamma: float = 2.0):
    """Sigmoid focal loss per mask, averaged over pixels: (B, M)."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


def _dice(logits, target):
    prob = torch.sigmoid(logits).flatten(2)
    target = target.flatten(2)
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


def _mask_ious(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over their last two dimensions (an empty union scores 0)."""
    inter = (pred & true).flatten(-2).sum(-1).float()
    union = (pred | true).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


# a structure thinner than this many cells of SAM2's output grid (a quarter of the
# input size: 2 cells = 8 px at 384) weighs more with `thin_weight`
THIN_WIDTH_CELLS = 2.0
MASK_STRIDE = 4  # input pixels per cell of SAM2's output grid


def thin_weights(truth: torch.Tensor, thin_weight: float) -> torch.Tensor:
    """The weight of each row's mask terms: 1 + thin_weight x max(0, 1 - w / 2), w the
    structure's mean width (`overlay.mean_width`: 2 x area / perimeter) in cells of the
    output grid. A leg 2 px wide at 384 px (half a cell) weighs 1 + 0.75 x thin_weight;
    a structure two cells wide or wider, and an absent one, weighs 1.

    Args:
        truth: (B, 1, S, S) true masks.
        thin_weight: the extra weight of the thinnest structures.

    Returns:
        (B,) float weights on truth's device.
    """
    weights = torch.ones(truth.shape[0], device=truth.device)
    if thin_weight == 0:
        return weights
    masks = (truth[:, 0] > 0.5).cpu().numpy()
    for row, mask in enumerate(masks):
        if mask.any():
            cells = mean_width(mask) / MASK_STRIDE
            weights[row] += thin_weight * max(0.0, 1.0 - cells / THIN_WIDTH_CELLS)
    return weights


def target_loss(sam_outputs, truth: torch.Tensor, present: torch.Tensor, s: PretrainSettings):
    """SAM2's multi-mask loss on one tracked frame.

    Args:
        sam_outputs: SAM2's outputs of the tracking step.
        truth: (B, 1, S, S) true masks.
        present: (B,) whether each structure is in the frame.
        s: the run's settings (the loss weights).

    Returns:
        (loss, {"focal", "dice", "iou_head", "object", "target_iou": floats}), the
        mask terms on the best of the candidate masks of each present structure, a
        weighted mean over the structures with `thin_weights`.
    """
    _, high_multi, ious, _, _, _, object_logits = sam_outputs
    truth_m = truth.expand_as(high_multi)
    focal = _focal(high_multi, truth_m)
    dice = _dice(high_multi, truth_m)
    with torch.no_grad():
        actual_iou = _mask_ious(high_multi > 0, truth_m > 0.5)
    iou_head = (ious.float() - actual_iou).abs()
    combo = s.focal_weight * focal + s.dice_weight * dice
    best = combo.argmin(dim=1)
    rows = torch.arange(combo.shape[0])
    w = present.float()
    n = w.sum().clamp(min=1)
    mask_w = w * thin_weights(truth, s.thin_weight)
    mask_n = mask_w.sum().clamp(min=1)
    focal_b = (focal[rows, best] * mask_w).sum() / mask_n
    dice_b = (dice[rows, best] * mask_w).sum() / mask_n
    iou_b = (iou_head.mean(1) * w).sum() / n
    obj = _focal(object_logits.float()[:, :, None], present.float()[:, None, None]).mean()
    total = (
        s.focal_weight * focal_b
        + s.dice_weight * dice_b
        + s.iou_weight * iou_b
        + s.object_weight * obj
    )
    parts = {
        "focal": focal_b.item(),
        "dice": dice_b.item(),
        "iou_head": iou_b.item(),
        "object": obj.item(),
        "target_iou": float((actual_iou[rows, best] * w).sum() / n),
    }
    return total, parts


def _row_features(model, backbone: dict, row_episode: torch.Tensor, n_frames: int, f: int):
    """The features of frame `f` of each row's episode: (vision feats, pos, sizes)."""
    index = row_episode * n_frames + f
    rows = {
        "backbone_fpn": [x[index] for x in backbone["backbone_fpn"]],
        "vision_pos_enc": [
            p[:1].expand(len(index), -1, -1, -1) for p in backbone["vision_pos_enc"]
        ],
    }
    _, vision_feats, vision_pos, sizes = model._prepare_backbone_features(rows)
    return vision_feats, vision_pos, sizes


def input_batch(images: list[np.ndarray], size: int, device, on_device: bool | None = None):
    """The model's (N, 3, S, S) input for a step's RGB uint8 images.

    `on_device` (default: on a GPU): the images go to the device as they are and are
    resized there (bicubic with antialiasing, as Pillow resizes, kept in float), so
    that the process feeding the GPU does no per-pixel work: on a CPU, `preprocess`
    (SAM2's own loader's operations) takes about 0.2 s of a 16-episode step's
    32-64 images. Otherwise `preprocess`, image by image."""
    if not (device.type == "cuda" if on_device is None else on_device):
        return torch.cat([preprocess(img, size, device) for img in images])
    mean = torch.tensor(IMG_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMG_STD, device=device)[:, None, None]
    batch = []
    for img in images:  # the episodes' canvases differ in size
        pixels = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)
        resized = F.interpolate(
            pixels[None].float() / 255.0,
            size=(size, size),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        batch.append((resized - mean) / std)
    return torch.cat(batch)


def _row_masks(episodes: list[Episode], objects: list[list[int]], f: int, size: int, device):
    """The (rows, 1, size, size) true masks of frame `f`, a row per structure and episode."""
    return torch.cat(
        [
            binary_mask_input(np.stack([e.labels[f] == k for k in objs]), size, device)
            for e, objs in zip(episodes, objects)
            if objs
        ]
    )


def _remember(model, feats, sam_outputs, current_out: dict, memory: dict, idx: int) -> None:
    """Encode tracked frame `idx` into the memory, as video tracking does."""
    vision_feats, _, sizes = feats
    _, _, _, _, high_res_masks, obj_ptr, object_logits = sam_outputs
    model._encode_memory_in_output(
        vision_feats, sizes, None, True, high_res_masks, object_logits, current_out
    )
    current_out.update(obj_ptr=obj_ptr, object_score_logits=object_logits)
    memory["non_cond_frame_outputs"][idx] = current_out


def episode_structures(episode: Episode) -> list[int]:
    """The labels of the structures an episode tracks: those seen in every template."""
    templates = episode.labels[: episode.n_templates]
    return [k for k in ALL_PARTS if all((lab == k).sum() >= 4 for lab in templates)]


def _tracked(model, episodes: list[Episode]):
    """Templates into memory as conditioning frames, then track the target(s), each
    tracked frame remembered as video tracking does.

    The episodes share their frame structure; all their structures are one SAM2 batch
    (a row per structure and episode), every image is encoded once.

    Yields:
        (sam_outputs, truth, present) per target: SAM2's outputs of the tracking step,
        the (rows, 1, S, S) true masks and whether each row's structure is in the frame.
        Nothing when no structure is seen in every template.
    """
    size = int(model.image_size)
    device = model.device
    n_frames = len(episodes[0].images)
    n_templates = episodes[0].n_templates
    if any(len(e.images) != n_frames or e.n_templates != n_templates for e in episodes):
        raise ValueError("episodes of one batch must have the same frames")
    objects = [episode_structures(e) for e in episodes]
    # row r is structure objects[e][j] of episode e; image (e, f) is e * n_frames + f
    row_episode = torch.tensor([e for e, objs in enumerate(objects) for _ in objs], device=device)
    if not len(row_episode):
        return
    images = input_batch([img for e in episodes for img in e.images], size, device)
    backbone = model.forward_image(images)
    cond = {}
    for t in range(n_templates):
        feats = _row_features(model, backbone, row_episode, n_frames, t)
        masks = _row_masks(episodes, objects, t, size, device)
        cond[t] = conditioning_frame(model, feats, t, n_frames, masks, memory_dtype=None)
    memory = new_memory(cond)
    for idx in range(n_templates, n_frames):
        f = _row_features(model, backbone, row_episode, n_frames, idx)
        current_out, sam_outputs = track_step(model, f, idx, n_frames, memory)
        truth = _row_masks(episodes, objects, idx, size, device)
        yield sam_outputs, truth, truth.flatten(1).sum(1) > 0
        if idx + 1 < n_frames:  # remember this frame, as video tracking does
            _remember(model, f, sam_outputs, current_out, memory, idx)


def batch_loss(model, episodes: list[Episode], settings: PretrainSettings):
    """Templates into memory as conditioning frames, then track the target(s)
    (`_tracked`); SAM2's loss on every target.

    Args:
        model: the SAM2Base being trained.
        episodes: episodes with the same number of frames and of templates.
        settings: the run's settings (the loss weights).

    Returns:
        (loss, {part: value}), the mean over the targets; (None, {}) when no structure
        is seen in every template.
    """
    n_targets = len(episodes[0].images) - episodes[0].n_templates
    total, parts_sum = None, {}
    for sam_outputs, truth, present in _tracked(model, episodes):
        loss, parts = target_loss(sam_outputs, truth, present, settings)
        total = loss / n_targets if total is None else total + loss / n_targets
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / n_targets
    return total, parts_sum


# -- held-out curve ----------------------------------------------------------------------


@functools.lru_cache(maxsize=2)  # rendered once per process (the episodes are only read)
def heldout_episodes(per_collection: int = 4, size=(384, 288)) -> dict[str, list[Episode]]:
    """Episodes for the held-out curve of a run: per held-out collection of
    `benchmarks/quality.py` (`synth.quality.HELD_OUT`: palettes, grounds, poses and
    shapes no training episode draws), one template and `per_collection` targets,
    rendered from seeds the benchmark does not use either (its seed + 1000).

    Returns:
        {collection name: [Episode(template, target), ...]}.
    """
    from sam2pal.synth.quality import HELD_OUT, held_out_masks, held_out_procedural
    from sam2pal.synth.specimens import iter_collection

    out = {}
    for spec in HELD_OUT:
        seed, n = spec.seed + 1000, per_collection + 1
        kinds = (
            {"shapes": held_out_procedural(seed, n)}
            if spec.shapes == "procedural"
            else {"mask_names": held_out_masks()}
        )
        renders = [
            r for _, r in iter_collection(n, seed=seed, size=size, style=spec.style, **kinds)
        ]
        template = renders[0]
        out[spec.name] = [
            Episode([template.image, r.image], [template.labels, r.labels], 1) for r in renders[1:]
        ]
    return out


def structure_ious(model, episodes: list[Episode]) -> dict[str, list[float]]:
    """IoU of the masks the tracker outputs (the candidate SAM2 picks, after its object
    score) on the targets of `episodes` (one batch: the same frames), per structure
    name: {name: [IoU of each target on which it is present]}. Gradients are tracked
    unless the caller turns them off."""
    names = [ALL_PARTS[k] for e in episodes for k in episode_structures(e)]  # `_tracked`'s rows
    out: dict[str, list[float]] = {}
    for sam_outputs, truth, present in _tracked(model, episodes):
        rows = _mask_ious(sam_outputs[4] > 0, truth > 0.5)[:, 0]
        for name, iou, seen in zip(names, rows.tolist(), present.tolist()):
            if seen:
                out.setdefault(name, []).append(iou)
    return out


def heldout_iou(model, heldout: dict[str, list[Episode]]) -> dict[str, float]:
    """Zero-shot IoU of the masks the tracker would output (the candidate SAM2 picks,
    after its object score), per collection the mean over its targets' structures,
    and their mean ("mean"); and "self": the mean over the collections of the IoU of
    each one's template segmented from its own memory (the template photo as the
    target: a tracker should get it nearly right; sam2pal-micro v2 gets 0-0.08 on
    bronze_aligned's parts). The model's training mode is restored."""
    was_training = model.training
    model.eval()

    def score(episodes) -> float:
        ious = [iou for per in structure_ious(model, episodes).values() for iou in per]
        return round(float(np.mean(ious)), 4) if ious else 0.0

    with torch.no_grad():
        out = {name: score(episodes) for name, episodes in heldout.items()}
        out["mean"] = round(float(np.mean(list(out.values()))), 4) if out else 0.0
        selves = [
            score([Episode([e.images[0]] * 2, [e.labels[0]] * 2, 1)])
            for e in (episodes[0] for episodes in heldout.values() if episodes)
        ]
        out["self"] = round(float(np.mean(selves)), 4) if selves else 0.0
    model.train(was_training)
    return out


# -- the run -----------------------------------------------------------------------------


def _budget_share(elapsed: float, s: PretrainSettings) -> float:
    """The share of the time budget spent after `elapsed` seconds (0 without one)."""
    return elapsed / (60.0 * s.minutes) if s.minutes else 0.0


def _lr_factor(step: int, s: PretrainSettings, elapsed: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine to `min_lr_fraction` over the
    remaining steps, or over the time budget when that is further spent."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    progress = max(progress, _budget_share(elapsed, s))
    return s.min_lr_fraction + (1 - s.min_lr_fraction) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


class _Episodes(torch.utils.data.IterableDataset):
    """The episodes of steps start.. in order, rendered in worker processes while the
    model trains (every episode comes from its own seed, so the order is fixed). With
    several workers each renders every n-th step, and the loader takes the workers in
    turn: the steps arrive in order, each once."""

    def __init__(self, settings: PretrainSettings, start: int):
        self.settings, self.start = settings, start

    def __iter__(self):
        cv2.setNumThreads(1)
        s = self.settings
        shapes = [m for _, m in split_masks()[0]]
        worker = torch.utils.data.get_worker_info()
        first, every = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for step in range(self.start + first, s.steps, every):
            n_templates, second = episode_shape(step, s)
            yield (
                step,
                [
                    draw_episode(step * s.episodes_per_step + e, s, shapes, n_templates, second)
                    for e in range(s.episodes_per_step)
                ],
            )


def episode_loader(s: PretrainSettings, start: int, workers: int):
    """The (step, episodes) of steps `start`.. in order, rendered by `workers`
    processes (0: in this one)."""
    return torch.utils.data.DataLoader(
        _Episodes(s, start),
        batch_size=None,
        num_workers=int(workers),
        prefetch_factor=2 if workers else None,
        # fresh processes, not forks: a fork of a process that has run PyTorch's CPU
        # threads (the held-out curve) or CUDA can hang in its first parallel region
        multiprocessing_context="spawn" if workers else None,
    )


def _size_at(step: int, s: PretrainSettings, elapsed: float = 0.0) -> int:
    """The input size of `step`: `low_res_size` for the first `low_res_steps` (or the
    same share of the time budget, when that is further spent), then `image_size`."""
    low = step < s.low_res_steps and _budget_share(elapsed, s) < s.low_res_steps / s.steps
    return s.low_res_size if low else s.image_size


class _Run:
    """Model and optimizer at one input size; `resize` rebuilds the model at another
    size with the same weights and optimizer state (SAM2's weights do not depend on it)."""

    def __init__(self, config: Path, settings: PretrainSettings, device, size: int):
        self.config, self.settings, self.device = config, settings, device
        self.model = self.optimizer = None
        self.resize(size)

    def resize(self, size: int) -> None:
        s = self.settings
        model = build_model(self.config, "random", image_size=size, device=self.device, seed=s.seed)
        for module in model.modules():
            if hasattr(module, "dropout_p"):  # attention dropout off: memory-efficient kernels
                module.dropout_p = 0.0
        if self.model is not None:
            model.load_state_dict(self.model.state_dict())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim > 1], "weight_decay": s.weight_decay},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=s.learning_rate,
        )
        if self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer.state_dict())
        self.model, self.optimizer, self.params, self.size = model, optimizer, params, size


def _resume_state(state_path: Path, s: PretrainSettings):
    """The saved state of an interrupted run with the same settings, or None."""
    if not state_path.is_file():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    # settings added since a state was saved have their defaults in it
    saved = {**dataclasses.asdict(PretrainSettings()), **state["settings"]}
    if saved != dataclasses.asdict(s):
        raise InputError(
            f"{state_path}: saved by a run with other settings; remove it to start afresh"
        )
    return state


def _start_weights(run: _Run, s: PretrainSettings, state, log) -> str | None:
    """Load the initial weights (`s.init`) or the resumed state into `run`; returns the
    SHA-256 of the initial checkpoint (None without one)."""
    init_sha256 = None
    if s.init:
        init_path, init_sha256 = resolve_checkpoint_digest(s.init)
        if state is None:
            load_checkpoint(run.model, init_path)
            log(f"starting from {init_path}")
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        log(f"resuming at step {state['step']} of {s.steps}")
    return init_sha256


def _train_step(run: _Run, step: int, episodes: list[Episode], s: PretrainSettings, dev, elapsed):
    """One optimizer step on the episodes of `step`, `elapsed` seconds into the run;
    returns its loss and parts, or None when no structure was seen."""
    torch.manual_seed(int(np.random.SeedSequence(s.seed, spawn_key=(3, step)).generate_state(1)[0]))
    for group in run.optimizer.param_groups:
        group["lr"] = s.learning_rate * _lr_factor(step, s, elapsed)
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(dev):
        loss, parts = batch_loss(run.model, episodes, s)
    if loss is None:
        return None
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, s.grad_clip)
    run.optimizer.step()
    return {"loss": float(loss.detach()), **parts}


def _log_row(done: int, run: _Run, seconds: float, window: list[dict], wait_share: float) -> dict:
    """The loss curve's row after `done` steps: means over the steps since the last, and
    the share of their time the model waited for episodes to be rendered."""
    row = {
        "step": done,
        "learning_rate": run.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 1),
        "wait_share": round(wait_share, 3),
    }
    for key in LOG_COLUMNS[1:7]:
        row[key] = round(float(np.mean([w[key] for w in window])), 5) if window else None
    return row


@dataclass
class _Progress:
    """What a run has done so far, saved with its state: the steps, the seconds, the
    loss curve's rows and the held-out curve's rows."""

    step: int = 0
    seconds: float = 0.0
    rows: list = dataclasses.field(default_factory=list)
    heldout: list = dataclasses.field(default_factory=list)


def _save_state(state_path: Path, run: _Run, progress: _Progress, s) -> None:
    """Save what a resumed run needs to go on."""
    with atomic_path(state_path) as tmp:
        torch.save(
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "step": progress.step,
                "rows": progress.rows,
                "heldout_rows": progress.heldout,
                "seconds": progress.seconds,
                "settings": dataclasses.asdict(s),
            },
            tmp,
        )


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_results(out: Path, name: str, model, config: Path, progress: _Progress, s, extra):
    """Write the weights, the config, the loss curve, the held-out curve and the
    training record (with the run's `extra` facts: init_sha256, device, workers);
    returns the record."""
    weights = out / f"{name}.pt"
    with atomic_path(weights) as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    yaml_out = out / f"{name}.yaml"
    if yaml_out.resolve() != config.resolve():
        with atomic_path(yaml_out) as tmp:
            shutil.copyfile(config, tmp)
    _write_csv(out / f"{name}.training.csv", progress.rows, LOG_COLUMNS)
    if progress.heldout:
        _write_csv(out / f"{name}.heldout.csv", progress.heldout, list(progress.heldout[0]))
    record = {
        "name": name,
        "checkpoint": weights.name,
        "checkpoint_sha256": file_sha256(weights),
        "config": yaml_out.name,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "settings": dataclasses.asdict(s),
        "init_sha256": extra["init_sha256"],
        "steps_done": progress.step,
        "stopped_by": "steps" if progress.step >= s.steps else "time budget",
        "episodes": progress.step * s.episodes_per_step,
        "seconds": round(progress.seconds, 1),
        "device": extra["device"],
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "workers": extra["workers"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "final": progress.rows[-1] if progress.rows else None,
        "heldout_first": progress.heldout[0] if progress.heldout else None,
        "heldout_final": progress.heldout[-1] if progress.heldout else None,
    }
    write_json(out / f"{name}.training.json", record, indent=1)
    return record


class _HeldOutCurve:
    """The held-out IoU every `every` steps (0: never), appended to the run's progress."""

    def __init__(self, every: int, progress: _Progress, log):
        self.every, self.progress, self.log = int(every), progress, log
        self.episodes = heldout_episodes() if self.every else None

    def __call__(self, run: _Run, done: int, seconds: float, last: bool = False) -> None:
        if not self.every or not (done % self.every == 0 or last):
            return
        if self.progress.heldout and self.progress.heldout[-1]["step"] == done:
            return
        scores = heldout_iou(run.model, self.episodes)
        row = {"step": done, "size": run.size, "seconds": round(seconds, 1), **scores}
        self.progress.heldout.append(row)
        self.log(
            f"step {done}: held-out IoU {scores['mean']}, the templates onto themselves "
            f"{scores['self']} ({run.size} px)"
        )


def _run_steps(
    run: _Run,
    dev,
    progress: _Progress,
    state_path: Path,
    stop_after: int | None,
    workers: int,
    curve: _HeldOutCurve,
    log,
) -> bool:
    """Train the run's steps from `progress.step` on, appending the loss curve's rows
    and saving the state every `save_every` steps; returns True when the run is over
    (its steps done or its time budget spent), False once `stop_after` steps are done
    (the state saved)."""
    s = run.settings
    loader = iter(episode_loader(s, progress.step, workers))
    t0, before = time.time(), progress.seconds
    window: list[dict] = []
    curve(run, progress.step, before)  # the curve's first point (once per run)
    # where the time goes: waiting for the rendered episodes, or training on them
    waited, window_start = 0.0, time.time()
    while True:
        asked = time.time()
        batch = next(loader, None)
        if batch is None:
            break
        step, episodes = batch
        waited += time.time() - asked
        elapsed = before + time.time() - t0
        if _size_at(step, s, elapsed) != run.size:
            run.resize(_size_at(step, s, elapsed))
            log(f"step {step}: input size {run.size}")
        losses = _train_step(run, step, episodes, s, dev, elapsed)
        if losses is not None:
            window.append(losses)
        done = step + 1
        progress.step, progress.seconds = done, before + time.time() - t0
        over = done >= s.steps or _budget_share(progress.seconds, s) >= 1.0
        if done % s.log_every == 0 or over:
            share = waited / max(time.time() - window_start, 1e-9)
            row = _log_row(done, run, progress.seconds, window, share)
            progress.rows.append(row)
            window, waited, window_start = [], 0.0, time.time()
            log(
                f"step {done}/{s.steps} loss {row['loss']} target IoU {row['target_iou']} "
                f"({row['seconds']:.0f} s, {share:.0%} of it waiting for episodes)"
            )
        stopping = stop_after is not None and done >= stop_after
        curve(run, done, progress.seconds, last=over or stopping)
        if over:
            return True
        if done % s.save_every == 0 or stopping:
            _save_state(state_path, run, progress, s)
        if stopping:
            log(f"stopped after step {done}; run again to resume from {state_path}")
            return False
    return True


def pretrain(
    settings: PretrainSettings,
    out_dir,
    config=None,
    device: str = "auto",
    name: str = MICRO_MODEL,
    resume: bool = False,
    workers: int = 0,
    stop_after: int | None = None,
    eval_every: int = 50,
    log=print,
) -> dict | None:
    """Train from random weights; returns the training record (also written as JSON).

    Every step seeds PyTorch from (seed, step), so a resumed run ends with the same
    weights as one run through (without a time budget, which ends a run by the clock).

    Args:
        settings: the run's settings; out_dir: where the files go (created if needed).
        config: the model config (default: sam2pal-micro's); device: "auto", "cpu", ...
        name: the files' stem; resume: go on from ``<name>.state.pt`` if there is one.
        workers: processes rendering episodes (0: in this process).
        stop_after: stop once this many steps are done, keeping the resumable state
            (for machines with a time limit per job).
        eval_every: score the held-out episodes (`heldout_episodes`) every this many
            steps, at the start and at the end, into ``<name>.heldout.csv`` (0: never;
            it does not change the weights).
        log: where progress lines go.

    Returns:
        The training record, or None when stopped by `stop_after`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Path(config) if config else micro_model_files()[1]
    if not config.is_file():
        raise InputError(f"{config}: model config file not found")
    dev = resolve_device(device)
    s = settings
    state_path = out / f"{name}.state.pt"
    state = _resume_state(state_path, s) if resume else None
    progress = (
        _Progress()
        if state is None
        else _Progress(
            state["step"], state["seconds"], state["rows"], state.get("heldout_rows", [])
        )
    )
    run = _Run(config, s, dev, _size_at(progress.step, s, progress.seconds))
    init_sha256 = _start_weights(run, s, state, log)
    curve = _HeldOutCurve(eval_every, progress, log)
    if not _run_steps(run, dev, progress, state_path, stop_after, workers, curve, log):
        return None
    if run.size != s.image_size:
        run.resize(s.image_size)
    model = run.model.eval()
    device_name = str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    extra = {"init_sha256": init_sha256, "device": device_name, "workers": int(workers)}
    record = _write_results(out, name, model, config, progress, s, extra)
    state_path.unlink(missing_ok=True)
    log(json.dumps({k: record[k] for k in ("checkpoint", "checkpoint_sha256", "seconds")}))
    return record
