"""The propagation engine: segment each target image from the templates' memory.

SAM2 used as a tracker on a two-frame "video" [template, target]: the template, with
its masks as input, is the conditioning frame; the target is tracked from it. Because
`SAM2Base.track_step` does not write into the memory dict it is given, the template's
conditioning output (memory features, positional encodings, object pointer) is
computed once, here in `Propagator.__init__`, and reused for every target. A target
then costs one image-encoder pass plus one memory-attention + mask-decoder pass, with
all structures (objects) as the batch dimension over the one shared encoding.

Targets never see each other: the result for an image does not depend on which other
images are in the collection or on their order, and shards can run anywhere.

Several templates sit in the memory bank at once as conditioning frames (frames
0..K-1, the target is frame K), the way the official video predictor would hold a
video whose first K frames were annotated; SAM2 attends to all of them. This
reproduces `SAM2VideoPredictor` on the video [template 1, ..., template K, target]
with masks on its first K frames (up to floating-point rounding, since the official
predictor runs objects one at a time and the engine batches them): each template's
mask goes in through `add_new_mask` (resized with antialiasing, thresholded at 0.5),
its memory is encoded from the binarised mask (holes filled, see below) and stored in
bfloat16, and the target's low-resolution logits are resized to the image size and
thresholded at 0. `fill_hole_area` (default 8, as `build_sam2_video_predictor` sets
it) fills small background holes where the official predictor does: in the
templates' low-resolution masks before their memory is encoded, and in the target's
prediction.

A structure is identified by (category id, instance rank). When not every template
shows every structure, structures are grouped by the set of templates that show them
and each group is tracked in its own batch over the same target encoding.

Per structure the engine reports SAM2's predicted IoU and object score and, when
`cycle_consistency` is on, a label-free quality estimate: the target with its
predicted mask becomes the conditioning frame of a fresh memory and each template is
tracked back from it; the IoU of that prediction with the template's true mask,
averaged over the templates, is the cycle IoU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .masks import mask_iou
from .model import autocast
from .postprocess import StructureReference, clamp_mask

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)

ObjectKey = tuple[int, int]  # (category_id, instance)


@dataclass
class StructurePrediction:
    """One structure (category instance) predicted on one target image."""

    category_id: int
    instance: int
    mask: np.ndarray  # bool, (height, width) of the target image
    predicted_iou: float
    object_score: float  # probability that the structure is present
    cycle_iou: float | None = None
    clamped: bool = False

    @property
    def score(self) -> float:
        """A score in [0, 1]: SAM2's predicted IoU times its object probability."""
        return float(min(max(self.predicted_iou, 0.0), 1.0) * self.object_score)


@dataclass
class _Template:
    size: tuple[int, int]  # (height, width)
    backbone: dict  # forward_image output for batch 1
    masks: dict[ObjectKey, np.ndarray]


@dataclass
class _Group:
    objects: list[ObjectKey]
    templates: list[int]  # indices into Propagator._templates
    memory: dict = field(default_factory=dict)  # SAM2 output dict of conditioning frames


def preprocess(image: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float tensor (1, 3, S, S) on `device`.

    The same operations, in the same dtypes, as SAM2's own frame loader (Pillow
    bicubic resize, /255 in float64, mean/std normalisation in float32).
    """
    resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(resized) / 255.0).permute(2, 0, 1).float()
    tensor -= torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    tensor /= torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    return tensor.unsqueeze(0).to(device)


def encode_image(model, image: np.ndarray) -> dict:
    """One image-encoder pass (batch 1) on an RGB uint8 image, on the model's device."""
    return model.forward_image(preprocess(image, int(model.image_size), model.device))


def fill_holes(low_res_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Fill background holes of at most `max_area` pixels with a small positive score.

    The post-processing of SAM2's video predictor (`fill_hole_area`), which there needs
    SAM2's CUDA extension; done here with OpenCV's 8-connected components so that it
    runs everywhere. `low_res_logits` is (B, 1, h, w).
    """
    if max_area <= 0:
        return low_res_logits
    background = (low_res_logits <= 0).cpu().numpy().astype(np.uint8)
    holes = np.zeros_like(background, dtype=bool)
    for b in range(background.shape[0]):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(background[b, 0], connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] <= max_area)
        small = small[small > 0]  # label 0 is the foreground here
        if len(small):
            holes[b, 0] = np.isin(labels, small)
    if not holes.any():
        return low_res_logits
    hole_tensor = torch.from_numpy(holes).to(low_res_logits.device)
    return torch.where(hole_tensor, torch.full_like(low_res_logits, 0.1), low_res_logits)


# -- SAM2 steps shared by the engine and the palindrome trainer ---------------------------


def expand_features(model, backbone: dict, batch: int):
    """Backbone output of one image expanded to `batch` objects and flattened for
    tracking: (vision_feats, vision_pos_embeds, feat_sizes)."""
    expanded = {
        "backbone_fpn": [f.expand(batch, -1, -1, -1) for f in backbone["backbone_fpn"]],
        "vision_pos_enc": [p.expand(batch, -1, -1, -1) for p in backbone["vision_pos_enc"]],
    }
    _, feats, pos, sizes = model._prepare_backbone_features(expanded)
    return feats, pos, sizes


def binary_mask_input(masks: np.ndarray, image_size: int, device) -> torch.Tensor:
    """(B, H, W) bool masks -> (B, 1, S, S) binary float, as `add_new_mask` does."""
    tensor = torch.from_numpy(masks[:, None].astype(np.float32)).to(device)
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = F.interpolate(
            tensor, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
        tensor = (tensor >= 0.5).float()
    return tensor


def conditioning_frame(
    model, feats, frame_idx: int, num_frames: int, mask_inputs: torch.Tensor,
    fill_hole_area: int = 0, memory_dtype: torch.dtype | None = torch.bfloat16,
) -> dict:
    """A conditioning frame's output with its memory encoded, as the official
    predictor's `add_new_mask` followed by `propagate_in_video_preflight` makes it.

    `mask_inputs` (B, 1, S, S) may be soft (probabilities): gradients then flow from the
    memory back into it (the palindrome's phase 2). `memory_dtype` None keeps the
    memory features in the compute dtype (training); bfloat16 is what the official
    predictor stores.
    """
    vision_feats, vision_pos, sizes = feats
    _, sam_outputs, _, _ = model._track_step(
        frame_idx=frame_idx,
        is_init_cond_frame=True,
        current_vision_feats=vision_feats,
        current_vision_pos_embeds=vision_pos,
        feat_sizes=sizes,
        point_inputs=None,
        mask_inputs=mask_inputs,
        output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
        num_frames=num_frames,
        track_in_reverse=False,
        prev_sam_mask_logits=None,
    )
    _, _, _, low_res_masks, _, obj_ptr, object_score_logits = sam_outputs
    pred_masks = fill_holes(low_res_masks, fill_hole_area)
    image_size = int(model.image_size)
    high_res = F.interpolate(pred_masks, size=(image_size, image_size), mode="bilinear", align_corners=False)
    maskmem_features, maskmem_pos_enc = model._encode_new_memory(
        current_vision_feats=vision_feats,
        feat_sizes=sizes,
        pred_masks_high_res=high_res,
        object_score_logits=object_score_logits,
        is_mask_from_pts=True,
    )
    if memory_dtype is not None:
        maskmem_features = maskmem_features.to(memory_dtype)
    return {
        "maskmem_features": maskmem_features,
        "maskmem_pos_enc": maskmem_pos_enc,
        "pred_masks": pred_masks,
        "obj_ptr": obj_ptr,
        "object_score_logits": object_score_logits,
    }


def track_step(model, feats, frame_idx: int, num_frames: int, memory: dict, reverse: bool = False):
    """SAM2's tracking step on a non-conditioning frame (no memory encoding):
    returns its (current_out, sam_outputs)."""
    vision_feats, vision_pos, sizes = feats
    current_out, sam_outputs, _, _ = model._track_step(
        frame_idx=frame_idx,
        is_init_cond_frame=False,
        current_vision_feats=vision_feats,
        current_vision_pos_embeds=vision_pos,
        feat_sizes=sizes,
        point_inputs=None,
        mask_inputs=None,
        output_dict=memory,
        num_frames=num_frames,
        track_in_reverse=reverse,
        prev_sam_mask_logits=None,
    )
    return current_out, sam_outputs


def track_frame(model, feats, frame_idx: int, num_frames: int, memory: dict, fill_hole_area: int = 0):
    """Track a non-conditioning frame from `memory`.

    Returns the low-resolution mask logits (B, 1, S/4, S/4), SAM2's predicted IoU (B,)
    and its object-score logits (B,).
    """
    _, sam_outputs = track_step(model, feats, frame_idx, num_frames, memory)
    _, _, ious, low_res_masks, _, _, object_score_logits = sam_outputs
    low_res = fill_holes(low_res_masks.float(), fill_hole_area)
    return low_res, ious.float().max(dim=1).values, object_score_logits.float()[:, 0]


def new_memory(cond_frames: dict) -> dict:
    """A fresh SAM2 output dict holding only the given conditioning frames."""
    return {"cond_frame_outputs": dict(cond_frames), "non_cond_frame_outputs": {}}


def logits_to_masks(low_res: torch.Tensor, size: tuple[int, int], threshold: float = 0.0) -> list[np.ndarray]:
    """Low-res logits (B, 1, h, w) -> B bool masks at `size` (height, width), resized one
    at a time (bilinear, as the official predictor does) to bound memory on large images."""
    masks = []
    for b in range(low_res.shape[0]):
        full = F.interpolate(low_res[b : b + 1].float(), size=size, mode="bilinear", align_corners=False)
        masks.append((full[0, 0] > threshold).cpu().numpy())
    return masks


def cycle_ious(model, feats, low_res: torch.Tensor, references, fill_hole_area: int = 0,
               threshold: float = 0.0) -> list[float]:
    """Label-free quality of predicted masks: the target, with its predicted masks
    (`low_res`, B objects), becomes the conditioning frame of a fresh memory, and each
    reference image is tracked back from it; returns per object the IoU with the
    reference's known mask, averaged over the references.

    `references`: [(backbone of the reference image, [B bool masks])].
    """
    image_size = int(model.image_size)
    mask_in = (
        F.interpolate(low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False) > 0
    ).float()
    batch = low_res.shape[0]
    memory = new_memory({0: conditioning_frame(model, feats, 0, 2, mask_in, fill_hole_area)})
    totals = np.zeros(batch)
    for backbone, masks in references:
        back, _, _ = track_frame(model, expand_features(model, backbone, batch), 1, 2, memory, fill_hole_area)
        for i, pred in enumerate(logits_to_masks(back, masks[0].shape, threshold)):
            totals[i] += mask_iou(pred, masks[i])
    return (totals / max(len(references), 1)).tolist()


class Propagator:
    """Segments target images from a template set with a SAM2 model.

    Parameters
    ----------
    model: a SAM2Base (see `sam2pal.model.build_model`), in eval mode.
    templates: a `sam2pal.templates.TemplateSet` (all its images go into the memory
        bank; select first with `TemplateSet.select`).
    read_image: function path -> RGB uint8 array, for the template images.
    fill_hole_area: fill background holes up to this many low-resolution pixels, as
        SAM2's video predictor does (8 there); 0 disables.
    cycle_consistency: compute the cycle IoU (costs one memory pass per template).
    backbones: the template images' image-encoder outputs, in `templates.images`
        order, when already computed (the trainer's feature cache); the template
        images are then neither read nor encoded again.
    area_growth_limit, area_clamp_pad, bbox_clamp: post-processing relative to the
        template structure (see `sam2pal.postprocess.clamp_mask`); off by default.
    """

    def __init__(
        self,
        model,
        templates,
        read_image=None,
        fill_hole_area: int = 8,
        cycle_consistency: bool = True,
        area_growth_limit: float = 0.0,
        area_clamp_pad: int = 10,
        bbox_clamp: bool = False,
        mask_threshold: float = 0.0,
        backbones: list[dict] | None = None,
    ):
        if read_image is None:
            from .images import read_image
        self.model = model
        self.device = model.device
        self.image_size = int(model.image_size)
        self.fill_hole_area = int(fill_hole_area)
        self.cycle_consistency = bool(cycle_consistency)
        self.area_growth_limit = float(area_growth_limit or 0.0)
        self.area_clamp_pad = int(area_clamp_pad)
        self.bbox_clamp = bool(bbox_clamp)
        self.mask_threshold = float(mask_threshold)
        self.categories = dict(templates.categories)

        if backbones is not None and len(backbones) != len(templates.images):
            raise ValueError(f"{len(backbones)} template backbones for {len(templates.images)} template images")
        self._templates: list[_Template] = []
        with torch.inference_mode(), autocast(self.device):
            for index, tmpl in enumerate(templates.images):
                masks = {(inst.category_id, inst.instance): inst.mask for inst in tmpl.instances}
                if backbones is None:
                    rgb = read_image(tmpl.path)
                    self._templates.append(_Template(rgb.shape[:2], self._encode(rgb), masks))
                else:
                    self._templates.append(_Template((tmpl.height, tmpl.width), backbones[index], masks))

        keys = sorted({k for t in self._templates for k in t.masks})
        if not keys:
            raise ValueError("the template set has no structures")
        self.objects: list[ObjectKey] = keys
        by_templates: dict[tuple[int, ...], list[ObjectKey]] = {}
        for key in keys:
            shown_on = tuple(i for i, t in enumerate(self._templates) if key in t.masks)
            by_templates.setdefault(shown_on, []).append(key)
        self.groups = [_Group(objs, list(tids)) for tids, objs in by_templates.items()]
        self.references = {
            key: StructureReference.from_masks(
                [t.masks[key] for t in self._templates if key in t.masks]
            )
            for key in keys
        }
        with torch.inference_mode(), autocast(self.device):
            for group in self.groups:
                group.memory = self._template_memory(group)

    # -- SAM2 steps -------------------------------------------------------------------

    def _encode(self, rgb: np.ndarray) -> dict:
        """One image-encoder pass (batch 1)."""
        return encode_image(self.model, rgb)

    def _features(self, backbone: dict, batch: int):
        return expand_features(self.model, backbone, batch)

    def _template_memory(self, group: _Group) -> dict:
        num_frames = len(group.templates) + 1
        cond = {}
        for frame_idx, t_index in enumerate(group.templates):
            tmpl = self._templates[t_index]
            masks = np.stack([tmpl.masks[key] for key in group.objects])
            cond[frame_idx] = conditioning_frame(
                self.model, self._features(tmpl.backbone, len(group.objects)), frame_idx, num_frames,
                binary_mask_input(masks, self.image_size, self.device), self.fill_hole_area,
            )
        return new_memory(cond)

    def _track(self, feats, frame_idx: int, num_frames: int, memory: dict):
        return track_frame(self.model, feats, frame_idx, num_frames, memory, self.fill_hole_area)

    def _to_image_masks(self, low_res: torch.Tensor, size: tuple[int, int]) -> list[np.ndarray]:
        return logits_to_masks(low_res, size, self.mask_threshold)

    def _cycle_iou(self, group: _Group, feats, low_res: torch.Tensor) -> list[float]:
        references = [
            (self._templates[t].backbone, [self._templates[t].masks[key] for key in group.objects])
            for t in group.templates
        ]
        return cycle_ious(self.model, feats, low_res, references, self.fill_hole_area, self.mask_threshold)

    # -- public -----------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, image, backbone: dict | None = None) -> list[StructurePrediction]:
        """All structures on one RGB uint8 image, in `self.objects` order.

        `backbone`: the image's image-encoder output when already computed (the
        trainer's feature cache); `image` may then be just its (height, width).
        """
        height, width = image[:2] if isinstance(image, tuple) else image.shape[:2]
        results: dict[ObjectKey, StructurePrediction] = {}
        with autocast(self.device):
            if backbone is None:
                backbone = self._encode(image)
            for group in self.groups:
                feats = self._features(backbone, len(group.objects))
                num_frames = len(group.templates) + 1
                low_res, ious, obj_logits = self._track(feats, num_frames - 1, num_frames, group.memory)
                cycle = self._cycle_iou(group, feats, low_res) if self.cycle_consistency else None
                masks = self._to_image_masks(low_res, (height, width))
                probs = torch.sigmoid(obj_logits).cpu().tolist()
                ious = ious.cpu().tolist()
                for i, key in enumerate(group.objects):
                    mask, clamped = clamp_mask(
                        masks[i], self.references[key],
                        area_growth_limit=self.area_growth_limit,
                        pad=self.area_clamp_pad, always=self.bbox_clamp,
                    )
                    results[key] = StructurePrediction(
                        category_id=key[0], instance=key[1], mask=mask,
                        predicted_iou=float(ious[i]), object_score=float(probs[i]),
                        cycle_iou=None if cycle is None else float(cycle[i]),
                        clamped=clamped,
                    )
        return [results[key] for key in self.objects]
