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
tracked back from it (all templates in one batch); the IoU of that prediction with the
template's true mask, averaged over the templates, is the cycle IoU. And always its
stability (SAM's stability score: how little the mask changes when its logits are cut
at -1 or +1 instead of 0), which ranks a structure's predictions across photos where the
cycle IoU and the predicted IoU do not (`benchmarks/qc_rank.py`).

Large photos: a 12-megapixel photo is 46 times the pixels of a 1024 x 1024 model
input, and full-size work around the model costs more than the model. So a mask is
resized to the photo only inside the box where its logits can be positive
(`upsample_to_box`, the very pixels of a full-size resize), kept as that box
(`masks.BoxMask`), and run-length encoded from it; the cycle IoU is computed inside
the boxes too; and `read_target` decodes a JPEG at a reduced size when the model sees
it much smaller. `exact=True` decodes and resizes at full size, as the official
predictor does (the equivalence tests use it). `batch_size` targets go through the
image encoder and each tracking call together (`predict_batch`): the same masks as one
at a time, in larger calls that keep a GPU busy.

Turned and mirrored specimens (`orientation`): SAM2's tracking is anchored to the
template's orientation. With "rot4" (or "rot4_mirror") the templates are turned by 0,
90, 180 and 270 degrees clockwise (and mirrored first), each orientation's memory is
built once, and the memories are joined along the batch: a target is encoded once and
tracked from every orientation in one call (orientations x structures), and the
orientation with the best score wins: SAM2's confidence (predicted IoU times object
probability, averaged over all structures, absent ones included) times the agreement
of the predicted structures' silhouette with the turned templates'
(`orientation.silhouette`: their layout around their centroid, at their scale). The
confidence alone is what the upstream tool used; it tells the orientation only for a
model anchored to the template's orientation, and a model trained on turned pairs (the
shipped sam2pal-micro) gives every orientation the same confidence, while its masks
follow the specimen: the silhouette then tells which way the template is turned. The
winner's masks, already on the target's own pixel grid, are kept. With `mirror_swap`, a mirrored match reports each
paired structure (left/right) under its partner's name.

Which mask (`mask_choice`, `absent`): for a structure tracked from memory SAM2's mask
decoder gives three candidate masks and keeps the one whose IoU it predicts highest,
and it blanks the mask when its object score says the structure is absent. Both
choices are SAM2's guesses about a photo it knows nothing of; the templates say more.
With `mask_choice` "templates" each template is segmented from the templates' memory as
if it were a target (`template_slots`), and a structure whose masks of one candidate
fit the templates' own masks better, by `CHOICE_MARGIN` IoU, than the candidates SAM2
picks there gets that candidate on every target; the others keep SAM2's pick. (With
sam2pal-micro the legs are read best by the second candidate while SAM2 keeps the
third; `benchmarks/readout.py`.) With `absent` "keep" a structure the templates show
keeps its mask where SAM2 judges it absent (its object score stays in the prediction).
`mask_choice: sam2` with `absent: blank` is SAM2's own rule (the equivalence tests).

Framing (`framing`): SAM2 stretches every image to its square input; "letterbox" keeps
the aspect (`sam2pal.inference.framing`): the image is scaled to fit, padded with a
fill colour, and the prediction is mapped back from the image's rectangle in one
bilinear resampling. Templates and targets are framed alike.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2pal.errors import InputError
from sam2pal.inference.framing import (
    FRAMINGS,
    Frame,
    framed_image,
    framed_masks,
    make_frame,
    parse_fill,
    unframe_to_box,
)
from sam2pal.inference.orientation import (
    Candidate,
    candidates,
    mask_silhouette,
    mirror_map,
    silhouette,
    silhouette_iou,
    transform_image,
    transform_masks,
)
from sam2pal.inference.postprocess import StructureReference, clamp_mask
from sam2pal.inference.tone import Tone
from sam2pal.inference.zoom_pass import ZOOMS, ZoomPass, low_res_box
from sam2pal.io.masks import BoxMask, box_iou, mask_iou
from sam2pal.models.adapters import untouched_model, untouched_structures
from sam2pal.models.build import autocast
from sam2pal.settings import ABSENTS, MASK_CHOICES, Segmentation, engine_defaults

#: the defaults of the engine settings (`sam2pal.settings.Segmentation`)
ENGINE_DEFAULTS = engine_defaults(Segmentation)

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)

ObjectKey = tuple[int, int]  # (category_id, instance)


@dataclass
class StructurePrediction:
    """One structure (category instance) predicted on one target image."""

    category_id: int
    instance: int
    box: BoxMask  # the mask on the target image's full pixel grid, stored as its box
    predicted_iou: float
    object_score: float  # probability that the structure is present
    cycle_iou: float | None = None
    clamped: bool = False
    zoomed: bool = False  # the mask and scores are the zoom pass's
    zoom_placed: bool = False  # its window was placed from the template (nothing found first)
    # SAM's stability score of the mask's logits (`stability_scores`); None where the
    # mask is not a prediction (a video keyframe's annotation)
    stability: float | None = None

    @property
    def mask(self) -> np.ndarray:
        """The mask as a full-size bool array (height, width) of the target image."""
        return self.box.full()

    @property
    def score(self) -> float:
        """A score in [0, 1]: SAM2's predicted IoU times its object probability."""
        return float(min(max(self.predicted_iou, 0.0), 1.0) * self.object_score)


class Predictions(list):
    """The `StructurePrediction`s of one image (a list), and the orientation chosen for
    it: None when no orientation was searched, else {"rotation": R, "mirrored": M,
    "candidates": [{"rotation", "mirrored", "score"}, ...]}: the photo shows the
    template turned R degrees clockwise, after a left-right mirror when M is true."""

    orientation: dict | None = None


@dataclass
class _Template:
    size: tuple[int, int]  # (height, width)
    backbone: dict  # forward_image output for batch 1
    masks: dict[ObjectKey, np.ndarray]
    frame: Frame | None = None  # where it sits in the model's input (None: stretched)


@dataclass
class _Group:
    objects: list[ObjectKey]
    templates: list[int]  # indices into a template view (Propagator._views[c])
    # SAM2 output dict of conditioning frames: the memories of every orientation
    # candidate joined along the batch, candidate after candidate (objects in each)
    memory: dict = field(default_factory=dict)
    # per candidate, per template index: its masks of the group's objects as boxes
    # (the cycle IoU's truth)
    boxes: list[dict[int, list]] = field(default_factory=list)
    # `memory` for a batch of several targets: (targets, repeated memory), the last one asked for
    repeated: tuple[int, dict] = (1, {})
    # segmented with the untouched model (structures the adapter left to it,
    # `adapters.untouched_structures` and `adapters.untouched_model`)
    untouched: bool = False
    # per object, the candidate mask it gets (`template_slots`), -1: SAM2's pick; None:
    # SAM2's pick for all
    slots: torch.Tensor | None = None


def preprocess(
    image: np.ndarray, image_size: int, device: torch.device, frame=None, fill="border"
) -> torch.Tensor:
    """Resize and normalise an image for the model.

    Stretched (no `frame`, or a stretched one): the same operations, in the same dtypes,
    as SAM2's own frame loader (Pillow bicubic resize, /255 in float64, mean/std
    normalisation in float32). Letterboxed: the image resized into the frame's inner
    rectangle, on a square of the fill colour (`sam2pal.inference.framing`), then
    normalised alike.

    Args:
        image: RGB uint8 (H, W, 3); a reduced copy of the photo is resized alike.
        image_size: the model's input size S.
        device: where the tensor goes.
        frame: the photo's `framing.Frame` (None: stretched).
        fill: the letterbox's fill (`framing.parse_fill`).

    Returns:
        The normalised float tensor (1, 3, S, S).
    """
    if frame is None or frame.stretched:
        resized = np.asarray(
            Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
        )
    else:
        resized = framed_image(image, frame, fill)
    tensor = torch.from_numpy(resized / 255.0).permute(2, 0, 1).float()
    tensor -= torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    tensor /= torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    return tensor.unsqueeze(0).to(device)


def encode_image(model, image: np.ndarray, frame=None, fill="border") -> dict:
    """One image-encoder pass (batch 1) on an RGB uint8 image, on the model's device
    (framed as `preprocess` says)."""
    return model.forward_image(preprocess(image, int(model.image_size), model.device, frame, fill))


def stability_scores(low_res_logits: torch.Tensor, threshold: float) -> list[float]:
    """SAM's stability score of each mask of a (batch, 1, h, w) or (1, h, w) logits
    tensor: the IoU of the masks cut at `threshold` + 1 and `threshold` - 1
    (`sam2.utils.amg.calculate_stability_score`); 0 where both are empty."""
    from sam2.utils.amg import calculate_stability_score

    logits = low_res_logits.float().reshape(-1, *low_res_logits.shape[-2:])
    scores = calculate_stability_score(logits, threshold, 1.0)
    return [float(v) if torch.isfinite(v) else 0.0 for v in scores.cpu()]


def fill_holes(low_res_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Fill background holes of at most `max_area` pixels with a small positive score.

    The post-processing of SAM2's video predictor (`fill_hole_area`), which there needs
    SAM2's CUDA extension; done here with OpenCV's 8-connected components so that it
    runs everywhere.

    Args:
        low_res_logits: (B, 1, h, w) mask logits.
        max_area: the largest hole filled, in pixels; 0 disables.

    Returns:
        The logits with the holes set to 0.1 (the same tensor when nothing changes).
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


def upsample_to_box(logits, size: tuple[int, int], threshold: float = 0.0) -> BoxMask:
    """Threshold a low-resolution logit map (h, w) resized bilinearly to `size` (height,
    width), computing the resize only where it can exceed the threshold.

    A bilinear value is a weighted mean of four neighbours, so it exceeds the threshold
    only where one of its neighbours does: outside the box of those, nothing is
    computed. Inside, the weights are those of torch's `F.interpolate(mode="bilinear",
    align_corners=False)` in float32; the result differs from it at most where a value
    lies within rounding of the threshold. (`framing.unframe_to_box` on a stretched
    frame, which this is.)

    Args:
        logits: the (h, w) logit map.
        size: the (height, width) of the full-size mask.
        threshold: pixels above it are the mask.

    Returns:
        The mask as a tight `BoxMask` on the full-size grid.
    """
    side = int(logits.shape[-1])
    return unframe_to_box(logits, make_frame(int(size[0]), int(size[1]), side), threshold)


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


def binary_mask_input(masks: np.ndarray, image_size: int, device, frame=None) -> torch.Tensor:
    """(B, H, W) bool masks -> (B, 1, S, S) binary float, as `add_new_mask` does
    (letterboxed into the frame's inner rectangle when a letterbox `frame` is given)."""
    if frame is not None and not frame.stretched:
        return torch.from_numpy(framed_masks(masks, frame)[:, None]).to(device)
    if masks.dtype == bool:  # bytes, not floats, travel to the device
        tensor = torch.from_numpy(np.ascontiguousarray(masks[:, None])).to(device).float()
    else:
        tensor = torch.from_numpy(masks[:, None].astype(np.float32)).to(device)
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = F.interpolate(
            tensor,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        tensor = (tensor >= 0.5).float()
    return tensor


def conditioning_frame(
    model,
    feats,
    frame_idx: int,
    num_frames: int,
    mask_inputs: torch.Tensor,
    fill_hole_area: int = 0,
    memory_dtype: torch.dtype | None = torch.bfloat16,
) -> dict:
    """A conditioning frame's output with its memory encoded, as the official
    predictor's `add_new_mask` followed by `propagate_in_video_preflight` makes it.

    Args:
        model, feats, frame_idx, num_frames: the SAM2Base, the frame's (vision_feats,
            vision_pos_embeds, feat_sizes), its index and the frame count.
        mask_inputs: (B, 1, S, S) masks; may be soft (probabilities): gradients then
            flow from the memory back into them (the palindrome's phase 2).
        fill_hole_area: as in `fill_holes`, on the predicted masks before encoding.
        memory_dtype: None keeps the memory features in the compute dtype (training);
            bfloat16 is what the official predictor stores.

    Returns:
        The frame's maskmem_features, maskmem_pos_enc, pred_masks, obj_ptr and
        object_score_logits.
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
    high_res = F.interpolate(
        pred_masks, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
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


#: `mask_choice: templates`: a candidate replaces SAM2's pick when it reads the templates
#: better by this much IoU (measured: `benchmarks/readout.py`)
CHOICE_MARGIN = 0.1
#: SAM2's logit of a blanked (absent) mask
NO_OBJ_SCORE = -1024.0


# per thread, the lists of decoder calls its open `decoder_outputs` blocks collect
_CAPTURE = threading.local()
_HOOK_LOCK = threading.Lock()


def _collect(module, inputs, outputs) -> None:
    for calls in getattr(_CAPTURE, "open", ()):
        calls.append(outputs)


def hook_decoder(model) -> None:
    """Give the model's SAM mask decoder the hook that `decoder_outputs` collects from,
    once (it does nothing outside a `decoder_outputs` block). Registered before any
    tracking (`Propagator.__init__`), so that no thread adds it while another runs the
    decoder."""
    decoder = model.sam_mask_decoder
    with _HOOK_LOCK:
        if not getattr(decoder, "_sam2pal_collects", False):
            decoder.register_forward_hook(_collect)
            decoder._sam2pal_collects = True


@contextmanager
def decoder_outputs(model):
    """Collect the SAM mask decoder's outputs (masks (B, K, h, w), predicted IoUs (B, K),
    output tokens, object-score logits (B, 1)) of the calls this thread makes inside the
    block: the K candidate masks as the decoder gives them, before SAM2 blanks those of
    an absent object and keeps the one of highest predicted IoU. Other threads tracking
    with the same model at the same time (`run_propagation` runs `predict` in threads)
    collect their own calls; blocks of one thread inside each other each collect them."""
    hook_decoder(model)
    if not hasattr(_CAPTURE, "open"):
        _CAPTURE.open = []
    calls: list = []
    _CAPTURE.open.append(calls)
    try:
        yield calls
    finally:
        _CAPTURE.open.pop()  # blocks of one thread close in the reverse order they open


def track_frame(
    model,
    feats,
    frame_idx: int,
    num_frames: int,
    memory: dict,
    fill_hole_area: int = 0,
    slots: torch.Tensor | None = None,
    keep_absent: bool = False,
):
    """Track a non-conditioning frame from `memory`.

    Args:
        model: the SAM2Base.
        feats: the frame's (vision_feats, vision_pos_embeds, feat_sizes).
        frame_idx, num_frames: the frame's index and the frame count.
        memory: the SAM2 output dict to track from.
        fill_hole_area: as in `fill_holes`, on the predicted logits.
        slots: per object (the batch is that list repeated), the candidate mask to
            keep, -1 for SAM2's pick (`template_slots`); None: SAM2's pick for all.
        keep_absent: keep the mask where SAM2 judges the object absent (SAM2 blanks it).

    Returns:
        The low-resolution mask logits (B, 1, S/4, S/4), the predicted IoU of the mask
        kept (B,) and the object-score logits (B,). Without `slots` and `keep_absent`,
        exactly SAM2's.
    """
    if slots is None and not keep_absent:
        _, sam_outputs = track_step(model, feats, frame_idx, num_frames, memory)
        _, _, ious, low_res_masks, _, _, object_score_logits = sam_outputs
        low_res = fill_holes(low_res_masks.float(), fill_hole_area)
        return low_res, ious.float().max(dim=1).values, object_score_logits.float()[:, 0]
    with decoder_outputs(model) as calls:
        track_step(model, feats, frame_idx, num_frames, memory)
    masks, ious, _, object_score_logits = calls[-1]
    masks, ious, objects = masks.float(), ious.float(), object_score_logits.float()[:, 0]
    pick = ious.argmax(dim=1)
    if slots is not None and masks.shape[1] > 1:
        slots = slots.to(pick.device).repeat(len(pick) // len(slots))
        pick = torch.where(slots >= 0, slots, pick)
    rows = torch.arange(len(pick), device=pick.device)
    low_res = masks[rows, pick].unsqueeze(1)
    if not keep_absent:
        low_res = torch.where(objects[:, None, None, None] > 0, low_res, NO_OBJ_SCORE)
    return fill_holes(low_res, fill_hole_area), ious[rows, pick], objects


def template_slots(
    model,
    memory: dict,
    references: list,
    num_frames: int,
    threshold: float = 0.0,
    frames: list | None = None,
    margin: float = CHOICE_MARGIN,
) -> torch.Tensor:
    """Per object, the candidate mask that reads the templates best, where it reads them
    better than SAM2's pick by `margin` IoU (else -1: SAM2's pick).

    Each reference (a template in `memory`) is tracked from `memory` as the target
    frame, and each of the decoder's candidate masks is compared with the reference's
    own mask; the IoUs are averaged over the references, SAM2's pick (highest predicted
    IoU) on each reference likewise.

    Args:
        model: the SAM2Base.
        memory: the templates' memory (conditioning frames 0..num_frames-2).
        references: [(backbone of a template, [its mask of each object, bool array or
            `BoxMask`])].
        num_frames: the memory's frame count plus one (the target's index plus one).
        threshold: logits above it are the mask.
        frames: per reference its `framing.Frame`, when letterboxed.
        margin: the IoU a candidate must gain over SAM2's pick.

    Returns:
        A long tensor (objects,): the candidate index, or -1.
    """
    objects = len(references[0][1])
    feats = stacked_features(model, [backbone for backbone, _ in references], objects)
    with decoder_outputs(model) as calls:
        track_step(model, feats, num_frames - 1, num_frames, repeat_memory(memory, len(references)))
    masks, ious = calls[-1][0].float().cpu(), calls[-1][1].float().cpu()
    count = masks.shape[1]
    read = np.zeros((objects, count))
    picked = np.zeros(objects)
    for r, (_, truths) in enumerate(references):
        frame = None if frames is None else frames[r]
        for i, truth in enumerate(truths):
            row = r * objects + i
            fits = [reference_iou(masks[row, k], truth, frame, threshold) for k in range(count)]
            read[i] += fits
            picked[i] += fits[int(ious[row].argmax())]
    read /= len(references)
    picked /= len(references)
    best = read.argmax(axis=1)
    better = read[np.arange(objects), best] - picked > margin
    return torch.as_tensor(np.where(better, best, -1), dtype=torch.long)


def reference_iou(logits: torch.Tensor, truth, frame=None, threshold: float = 0.0) -> float:
    """IoU of low-resolution logits (h, w) of a reference image with its known mask
    (bool array or `BoxMask`), inside the boxes; through `frame` when letterboxed."""
    if not isinstance(truth, BoxMask):
        truth = BoxMask.from_full(truth)
    if frame is not None and not frame.stretched:
        return box_iou(unframe_to_box(logits, frame, threshold), truth)
    return box_iou(upsample_to_box(logits, truth.size, threshold), truth)


def new_memory(cond_frames: dict) -> dict:
    """A fresh SAM2 output dict holding only the given conditioning frames."""
    return {"cond_frame_outputs": dict(cond_frames), "non_cond_frame_outputs": {}}


def logits_to_masks(
    low_res: torch.Tensor, size: tuple[int, int], threshold: float = 0.0
) -> list[np.ndarray]:
    """Low-res logits (B, 1, h, w) -> B bool masks at `size` (height, width), resized one
    at a time (bilinear, as the official predictor does) to bound memory on large images."""
    masks = []
    for b in range(low_res.shape[0]):
        full = F.interpolate(
            low_res[b : b + 1].float(), size=size, mode="bilinear", align_corners=False
        )
        masks.append((full[0, 0] > threshold).cpu().numpy())
    return masks


def logits_to_boxes(
    low_res: torch.Tensor,
    size: tuple[int, int],
    threshold: float = 0.0,
    exact: bool = False,
    frame=None,
) -> list[BoxMask]:
    """Low-res logits (B, 1, h, w) -> B masks at `size` (height, width) as `BoxMask`s.

    Resized only inside each structure's box (`upsample_to_box`), or, with `exact`,
    over the whole image as the official predictor does (`logits_to_masks`). With a
    letterbox `frame`, mapped from the frame's inner rectangle back to the photo
    (`framing.unframe_to_box`: one bilinear resampling, no crop-then-resize)."""
    if frame is not None and not frame.stretched:
        low_res = low_res.detach().float().cpu()
        return [unframe_to_box(low_res[b, 0], frame, threshold) for b in range(low_res.shape[0])]
    if exact:
        return [BoxMask.from_full(mask) for mask in logits_to_masks(low_res, size, threshold)]
    low_res = low_res.detach().float().cpu()
    return [upsample_to_box(low_res[b, 0], size, threshold) for b in range(low_res.shape[0])]


def _repeat_batch(value, times: int):
    """A memory entry (tensor, list of tensors, or other) repeated `times` along the
    batch (object) dimension: [objects, objects, ...]."""
    if times == 1:
        return value
    if torch.is_tensor(value):
        return value.repeat(times, *([1] * (value.dim() - 1)))
    if isinstance(value, list):
        return [_repeat_batch(v, times) for v in value]
    return value


def repeat_memory(memory: dict, times: int) -> dict:
    """A SAM2 output dict of conditioning frames for `times` copies of its objects."""
    if times == 1:
        return memory
    return {
        kind: {
            frame: {name: _repeat_batch(value, times) for name, value in out.items()}
            for frame, out in frames.items()
        }
        for kind, frames in memory.items()
    }


def _concat_batch(values: list):
    """Memory entries of several memories joined along the batch (object) dimension."""
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, list):
        return [_concat_batch([v[i] for v in values]) for i in range(len(first))]
    return first


def concat_memories(memories: list[dict]) -> dict:
    """SAM2 output dicts of conditioning frames with the same frames, joined along the
    batch: the objects of the first, then those of the second, ..."""
    if len(memories) == 1:
        return memories[0]
    first = memories[0]
    return {
        kind: {
            frame: {name: _concat_batch([m[kind][frame][name] for m in memories]) for name in out}
            for frame, out in frames.items()
        }
        for kind, frames in first.items()
    }


def stacked_features(model, backbones: list[dict], batch: int):
    """Features of several images for tracking, each image's expanded to `batch`
    objects, image after image (flattened as `expand_features`)."""
    if len(backbones) == 1:
        return expand_features(model, backbones[0], batch)
    stacked = {
        key: [
            torch.cat([b[key][level].expand(batch, -1, -1, -1) for b in backbones])
            for level in range(len(backbones[0][key]))
        ]
        for key in ("backbone_fpn", "vision_pos_enc")
    }
    _, feats, pos, sizes = model._prepare_backbone_features(stacked)
    return feats, pos, sizes


def cycle_ious(
    model,
    feats,
    low_res: torch.Tensor,
    references,
    fill_hole_area: int = 0,
    threshold: float = 0.0,
    repeat: int = 1,
    frames: list | None = None,
    slots: torch.Tensor | None = None,
    keep_absent: bool = False,
) -> list[float]:
    """Label-free quality of predicted masks: the target, with its predicted masks
    (`low_res`, B objects), becomes the conditioning frame of a fresh memory, and each
    reference image is tracked back from it; returns per object the IoU with the
    reference's known mask, averaged over the references.

    `references`: [(backbone of the reference image, [B masks])], the masks bool arrays
    or `BoxMask`s. All references are tracked back in one batch. With `BoxMask`s the
    IoU is computed inside the boxes only (`upsample_to_box`, `box_iou`): the same value
    as on the full arrays, at the cost of the structures' boxes instead of the whole
    photo. `repeat`: the batch holds that many targets, each with the same B objects
    (the references' masks are B per reference), so B = len(low_res) / repeat.
    `frames`: per reference its `framing.Frame` when the references are letterboxed
    (their predictions are mapped back to their own pixel grids through it).
    `slots`, `keep_absent`: which mask the references get, as in `track_frame`.

    Args:
        model: the SAM2Base.
        feats: the target's features, expanded to the batch.
        low_res: the predicted low-resolution logits (batch, 1, h, w).
        references, repeat: see above.
        fill_hole_area: as in `fill_holes`.
        threshold: logits above it are the mask.

    Returns:
        Per object of the batch, the mean IoU over the references.
    """
    image_size = int(model.image_size)
    mask_in = (
        F.interpolate(
            low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        > 0
    ).float()
    batch = low_res.shape[0]
    memory = new_memory({0: conditioning_frame(model, feats, 0, 2, mask_in, fill_hole_area)})
    back_feats = stacked_features(model, [backbone for backbone, _ in references], batch)
    back, _, _ = track_frame(
        model,
        back_feats,
        1,
        2,
        repeat_memory(memory, len(references)),
        fill_hole_area,
        slots,
        keep_absent,
    )
    back = back.float().cpu()
    totals = np.zeros(batch)
    for r, (_, masks) in enumerate(references):
        logits = back[r * batch : (r + 1) * batch]
        frame = None if frames is None else frames[r]
        if (frame is not None and not frame.stretched) or isinstance(masks[0], BoxMask):
            for i in range(batch):
                totals[i] += reference_iou(logits[i, 0], masks[i % len(masks)], frame, threshold)
        else:
            for i, pred in enumerate(logits_to_masks(logits, masks[0].shape, threshold)):
                totals[i] += mask_iou(pred, masks[i % len(masks)])
    return (totals / max(len(references), 1)).tolist()


class Propagator:
    """Segments target images from a template set with a SAM2 model.

    Parameters
    ----------
    model: a SAM2Base (see `sam2pal.models.build.build_model`), in eval mode.
    templates: a `sam2pal.io.templates.TemplateSet` (all its images go into the memory
        bank; select first with `TemplateSet.select`).
    read_image: function path -> RGB uint8 array, for the template images.
    fill_hole_area: fill background holes up to this many low-resolution pixels, as
        SAM2's video predictor does (8 there); 0 disables.
    cycle_consistency: compute the cycle IoU (costs one memory pass per template).
    backbones: the template images' image-encoder outputs, in `templates.images`
        order, when already computed (the trainer's feature cache, encoded with the
        same framing); the template images are then neither read nor encoded again.
    area_growth_limit, area_clamp_pad, bbox_clamp: post-processing relative to the
        template structure (see `sam2pal.inference.postprocess.clamp_mask`); off by default.
    orientation: "none", "rot4" or "rot4_mirror": the orientation search. The templates
        are turned by 0, 90, 180 and 270 degrees (and mirrored), each orientation's
        memory built once; each target is encoded once and tracked from all of them in
        one batch, and the orientation with the best score wins: the mean over all
        structures of SAM2's predicted IoU times its object probability (a structure
        predicted absent counts with its low score), times the silhouette agreement
        (see the module docstring). The masks are on the target's own pixel grid; the
        choice and every candidate's score, confidence and shape agreement are recorded
        (`Predictions.orientation`).
    mirror_swap: on a mirrored match, report each paired structure under its partner's
        name (left <-> right): for lateral views, where a mirrored match shows the
        specimen's other side. Off for dorsal and ventral views.
    mirror_pairs: more pairs of category names for `mirror_swap` ([[a, b], ...]); names
        with left/right in them pair by themselves, instances of one category by side
        (`orientation.mirror_map`).
    framing: "stretch" (SAM2's own: every image stretched to the square input) or
        "letterbox" (aspect kept, padded with `framing_fill`); see
        `sam2pal.inference.framing`.
    framing_fill: the letterbox's fill: "border" (each image's border colour), a grey
        level or an RGB colour.
    mask_choice: "templates" (per structure the candidate mask that reads the templates
        best, where it beats SAM2's pick there by `CHOICE_MARGIN`; `template_slots`) or
        "sam2" (SAM2's pick: the highest predicted IoU); see the module docstring.
    absent: "keep" (a structure SAM2 judges absent keeps its mask) or "blank" (SAM2's
        rule: an empty mask).
    zoom, zoom_below, zoom_margin: the zoom pass for small structures ("off", "auto",
        "on" or "best"; see `sam2pal.inference.zoom_pass`; "best" needs
        `cycle_consistency`).
    tone: "none" or "auto" (`sam2pal.inference.tone`: lift the dark tones of dark photos
        unless the templates' structures are clearly lighter than their ground), or a `Tone`
        already resolved; the templates read here and the targets given to `predict`
        (not given backbones) are toned alike. With `backbones`, the caller tones.
    """

    def __init__(
        self,
        model,
        templates,
        read_image=None,
        fill_hole_area: int = ENGINE_DEFAULTS["fill_hole_area"],
        cycle_consistency: bool = ENGINE_DEFAULTS["cycle_consistency"],
        area_growth_limit: float = ENGINE_DEFAULTS["area_growth_limit"],
        area_clamp_pad: int = ENGINE_DEFAULTS["area_clamp_pad"],
        bbox_clamp: bool = ENGINE_DEFAULTS["bbox_clamp"],
        mask_threshold: float = 0.0,
        backbones: list[dict] | None = None,
        exact: bool = ENGINE_DEFAULTS["exact"],
        batch_size: int = 1,
        orientation: str = ENGINE_DEFAULTS["orientation"],
        mirror_swap: bool = ENGINE_DEFAULTS["mirror_swap"],
        mirror_pairs=ENGINE_DEFAULTS["mirror_pairs"],
        framing: str = ENGINE_DEFAULTS["framing"],
        framing_fill=ENGINE_DEFAULTS["framing_fill"],
        zoom: str = ENGINE_DEFAULTS["zoom"],
        zoom_below: float = ENGINE_DEFAULTS["zoom_below"],
        zoom_margin: float = ENGINE_DEFAULTS["zoom_margin"],
        tone=ENGINE_DEFAULTS["tone"],
        mask_choice: str = ENGINE_DEFAULTS["mask_choice"],
        absent: str = ENGINE_DEFAULTS["absent"],
    ):
        if read_image is None:
            from sam2pal.io.images import read_image
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
        if framing not in FRAMINGS:
            raise InputError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
        if mask_choice not in MASK_CHOICES:
            raise InputError(
                f"mask_choice must be one of {', '.join(MASK_CHOICES)}, not {mask_choice!r}"
            )
        if absent not in ABSENTS:
            raise InputError(f"absent must be one of {', '.join(ABSENTS)}, not {absent!r}")
        self.mask_choice = mask_choice
        self.keep_absent = absent == "keep"
        if mask_choice != "sam2" or self.keep_absent:
            for tracker in (model, untouched_model(model)):
                if tracker is not None:
                    hook_decoder(tracker)
        self.model = model
        self.exact = bool(exact)
        self.batch_size = int(batch_size)
        self.device = model.device
        self.image_size = int(model.image_size)
        self.fill_hole_area = int(fill_hole_area)
        self.cycle_consistency = bool(cycle_consistency)
        self.area_growth_limit = float(area_growth_limit or 0.0)
        self.area_clamp_pad = int(area_clamp_pad)
        self.bbox_clamp = bool(bbox_clamp)
        self.mask_threshold = float(mask_threshold)
        self.categories = dict(templates.categories)
        # structures the model's adapter leaves to the untouched model (by name), and
        # that model (the base weights, sharing the image encoder)
        self.untouched = untouched_structures(model)
        self.untouched_model = untouched_model(model)
        self.orientation = str(orientation)
        self.mirror_swap = bool(mirror_swap)
        self.framing = framing
        try:  # settings of the user's: a bad one is an InputError (one line, no traceback)
            self.candidates: list[Candidate] = candidates(self.orientation)
            self.framing_fill = parse_fill(framing_fill)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if backbones is not None and len(self.candidates) > 1:
            raise ValueError("template backbones can be given only without an orientation search")
        if isinstance(zoom, bool):  # YAML's unquoted off / on
            zoom = "on" if zoom else "off"
        if zoom not in ZOOMS:
            raise InputError(f"zoom must be one of {', '.join(ZOOMS)}, not {zoom!r}")
        if zoom == "best" and not cycle_consistency:
            raise InputError(
                "zoom: best keeps the pass whose mask has the higher cycle IoU, "
                "so it needs cycle_consistency on"
            )
        if backbones is not None and zoom != "off":
            raise ValueError("template backbones can be given only without the zoom pass")
        self.zoom = zoom
        # the template photos, kept for the zoom pass's windows
        self._template_images: list[np.ndarray] = []
        if backbones is not None and isinstance(tone, str) and tone != "none":
            raise ValueError("template backbones can be given only with a resolved tone")
        self.tone, read_image = self._resolve_tone(tone, templates, read_image)

        # per orientation candidate, the templates turned (and mirrored) that way
        self._views = self._encode_templates(templates, read_image, backbones)
        self._templates = self._views[0]
        self._build_groups()
        try:
            self.mirror = self._mirror_map(mirror_pairs)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        # per candidate, per template: the silhouette of its structures, turned
        self._silhouettes = (
            [
                [mask_silhouette(np.logical_or.reduce(list(t.masks.values()))) for t in view]
                for view in self._views
            ]
            if len(self.candidates) > 1
            else []
        )
        self._zoom = (
            ZoomPass(self, self._template_images, zoom, zoom_below, zoom_margin)
            if zoom != "off"
            else None
        )
        self._template_images = []

    def _frame(self, height: int, width: int) -> Frame:
        return make_frame(int(height), int(width), self.image_size, self.framing)

    @property
    def zoom_pass(self) -> ZoomPass | None:
        """The zoom pass (None with zoom off)."""
        return self._zoom

    @staticmethod
    def _resolve_tone(tone, templates, read_image):
        """(the resolved `Tone`, the template reader giving toned photos); an "auto" tone
        reads the templates once to decide, and they are not read again."""
        if isinstance(tone, Tone):
            return tone, tone.reader(read_image)
        photos: dict = {}

        def samples():
            for tmpl in templates.images:
                photos[tmpl.path] = read_image(tmpl.path)
                yield photos[tmpl.path], [inst.mask for inst in tmpl.instances]

        resolved = Tone.resolve(tone, samples)
        return resolved, resolved.reader(
            lambda path: photos.pop(path) if path in photos else read_image(path)
        )

    def _encode_templates(self, templates, read_image, backbones) -> list[list[_Template]]:
        """Each template image's features (encoded here, or the given backbones) and its
        structures' masks, per orientation candidate: the image and masks turned (and
        mirrored) as the candidate says."""
        if backbones is not None and len(backbones) != len(templates.images):
            raise ValueError(
                f"{len(backbones)} template backbones for {len(templates.images)} template images"
            )
        views: list[list[_Template]] = [[] for _ in self.candidates]
        with torch.inference_mode(), autocast(self.device):
            for index, tmpl in enumerate(templates.images):
                masks = {(inst.category_id, inst.instance): inst.mask for inst in tmpl.instances}
                if backbones is not None:
                    frame = self._frame(tmpl.height, tmpl.width)
                    size = (tmpl.height, tmpl.width)
                    views[0].append(_Template(size, backbones[index], masks, frame))
                    continue
                rgb = read_image(tmpl.path)
                if self.zoom != "off":
                    self._template_images.append(rgb)
                for view, candidate in zip(views, self.candidates):
                    turned = transform_image(rgb, candidate)
                    keys = list(masks)
                    turned_masks = (
                        transform_masks(np.stack([masks[k] for k in keys]), candidate)
                        if keys
                        else []
                    )
                    frame = self._frame(*turned.shape[:2])
                    view.append(
                        _Template(
                            turned.shape[:2],
                            self._encode(turned, frame),
                            dict(zip(keys, turned_masks)),
                            frame,
                        )
                    )
        return views

    def _build_groups(self) -> None:
        """Structures grouped by the templates that show them, each group's memory built
        once per orientation candidate (and the template boxes the cycle-consistency
        check compares with)."""
        keys = sorted({k for t in self._templates for k in t.masks})
        if not keys:
            raise ValueError("the template set has no structures")
        self.objects: list[ObjectKey] = keys
        by_templates: dict[tuple, list[ObjectKey]] = {}
        for key in keys:
            shown_on = tuple(i for i, t in enumerate(self._templates) if key in t.masks)
            untouched = self.categories.get(key[0]) in self.untouched
            by_templates.setdefault((shown_on, untouched), []).append(key)
        self.groups = [
            _Group(objs, list(tids), untouched=untouched)
            for (tids, untouched), objs in by_templates.items()
        ]
        # per candidate: the clamping references of the structures, on the turned templates
        self._references = [
            {
                key: StructureReference.from_masks([t.masks[key] for t in view if key in t.masks])
                for key in keys
            }
            for view in self._views
        ]
        self.references = self._references[0]
        with torch.inference_mode(), autocast(self.device):
            for group in self.groups:
                memories = [self._template_memory(group, view) for view in self._views]
                group.memory = concat_memories(memories)
                if self.mask_choice == "templates":
                    view = self._views[0]  # the choice holds for every orientation
                    group.slots = template_slots(
                        self.model_of(group),
                        memories[0],
                        [
                            (view[t].backbone, [view[t].masks[key] for key in group.objects])
                            for t in group.templates
                        ],
                        len(group.templates) + 1,
                        self.mask_threshold,
                        frames=[view[t].frame for t in group.templates],
                    )
                if self.cycle_consistency:
                    group.boxes = [
                        {
                            t: [BoxMask.from_full(view[t].masks[key]) for key in group.objects]
                            for t in group.templates
                        }
                        for view in self._views
                    ]

    def _mirror_map(self, pairs) -> dict[ObjectKey, ObjectKey]:
        """Which structure a structure is reported as on a mirrored match (`mirror_swap`)."""
        if not self.mirror_swap or not any(c.mirrored for c in self.candidates):
            return {}
        # positions for pairing instances by side: each structure on the first template
        # that shows it
        masks: dict[ObjectKey, np.ndarray] = {}
        for tmpl in self._templates:
            for key, mask in tmpl.masks.items():
                masks.setdefault(key, mask)
        return mirror_map(self.objects, self.categories, masks, pairs or ())

    # -- SAM2 steps -------------------------------------------------------------------

    def model_of(self, group):
        """The model that segments `group` (or a zoom cluster): the untouched model for
        the structures the adapter leaves to it, else the model. The image encoder is
        the same in both."""
        return self.untouched_model if group.untouched else self.model

    def _encode(self, rgb: np.ndarray, frame: Frame | None = None) -> dict:
        """One image-encoder pass (batch 1)."""
        return encode_image(self.model, rgb, frame, self.framing_fill)

    def _features(self, backbone: dict, batch: int):
        return expand_features(self.model, backbone, batch)

    def _template_memory(self, group: _Group, view: list[_Template]) -> dict:
        num_frames = len(group.templates) + 1
        cond = {}
        for frame_idx, t_index in enumerate(group.templates):
            tmpl = view[t_index]
            masks = np.stack([tmpl.masks[key] for key in group.objects])
            cond[frame_idx] = conditioning_frame(
                self.model_of(group),
                self._features(tmpl.backbone, len(group.objects)),
                frame_idx,
                num_frames,
                binary_mask_input(masks, self.image_size, self.device, tmpl.frame),
                self.fill_hole_area,
            )
        return new_memory(cond)

    def _track(self, group: _Group, feats, frame_idx: int, num_frames: int, memory: dict):
        return track_frame(
            self.model_of(group),
            feats,
            frame_idx,
            num_frames,
            memory,
            self.fill_hole_area,
            group.slots,
            self.keep_absent,
        )

    def _memory(self, group: _Group, targets: int) -> dict:
        """The group's template memory (all candidates) for a batch of `targets` images."""
        if targets == 1:
            return group.memory
        if group.repeated[0] != targets:
            group.repeated = (targets, repeat_memory(group.memory, targets))
        return group.repeated[1]

    def _cycle_iou(
        self, group: _Group, candidate: int, feats, low_res: torch.Tensor, targets: int
    ) -> list[float]:
        view = self._views[candidate]
        references = [(view[t].backbone, group.boxes[candidate][t]) for t in group.templates]
        return cycle_ious(
            self.model_of(group),
            feats,
            low_res,
            references,
            self.fill_hole_area,
            self.mask_threshold,
            repeat=targets,
            frames=[view[t].frame for t in group.templates],
            slots=group.slots,
            keep_absent=self.keep_absent,
        )

    # -- public -----------------------------------------------------------------------

    def read_target(self, path) -> tuple[np.ndarray, tuple[int, int]]:
        """A target photo as the engine wants it.

        Decoded at a reduced size when that loses nothing the model sees (JPEG scaled
        by 1/2 to 1/8, keeping at least the model's input size on each side,
        `images.read_image_reduced`); at full size with `exact`, as the official
        predictor reads it. The masks are on the photo's full pixel grid either way.

        Args:
            path: the image file.

        Returns:
            (RGB uint8 image, (height, width) of the photo).
        """
        from sam2pal.io.images import read_image, read_image_reduced

        if self.exact or (self._zoom is not None and self._zoom.clusters):
            # the zoom pass cuts its windows from the photo at full resolution
            rgb = read_image(path)
            return rgb, rgb.shape[:2]
        return read_image_reduced(path, self.image_size)

    def predict(
        self, image, backbone: dict | None = None, size: tuple[int, int] | None = None
    ) -> Predictions:
        """All structures on one RGB uint8 image.

        Args:
            image: the RGB uint8 image; just its (height, width) when `backbone` is given.
            backbone: the image's image-encoder output when already computed (the
                trainer's feature cache).
            size: the (height, width) of the output masks when `image` is a reduced copy
                of the photo (`read_target`); by default the image's own size.

        Returns:
            A `StructurePrediction` per structure, in `self.objects` order (a
            `Predictions` list, with the orientation chosen).
        """
        return self.predict_batch(
            [image], None if backbone is None else [backbone], None if size is None else [size]
        )[0]

    def predict_batch(
        self, images: list, backbones: list[dict] | None = None, sizes: list | None = None
    ) -> list[Predictions]:
        """`predict` for several images in one image-encoder call and one tracking call
        per template group (the batch is images x orientations x structures): the same
        masks as one image at a time, in fewer, larger calls (what keeps a GPU busy).

        Args:
            images, backbones, sizes: per image, as `predict`'s image, backbone, size.

        Returns:
            Per image, its `Predictions`.
        """
        return [pending.finish() for pending in self.start_batch(images, backbones, sizes)]

    def _encode_targets(self, images: list, frames: list[Frame]) -> list[dict]:
        """The targets' image-encoder outputs, from one call."""
        batch = torch.cat(
            [
                preprocess(image, self.image_size, self.device, frame, self.framing_fill)
                for image, frame in zip(images, frames)
            ]
        )
        encoded = self.model.forward_image(batch)
        if len(images) == 1:
            return [encoded]
        return [
            {
                key: [level[i : i + 1] for level in encoded[key]]
                for key in ("backbone_fpn", "vision_pos_enc")
            }
            for i in range(len(images))
        ]

    @torch.inference_mode()
    def start_batch(
        self,
        images: list,
        backbones: list[dict] | None = None,
        sizes: list | None = None,
        zoom: bool = True,
    ) -> list[PendingPrediction]:
        """The model's part of `predict_batch`.

        Args:
            images, backbones, sizes: as in `predict_batch`.
            zoom: run the zoom pass (when the engine has one); False gives the
                whole-photo pass alone (the trainer frames its zoom windows from it).

        Returns:
            Per image a `PendingPrediction` holding the low-resolution logits and
            scores, whose `finish()` (resizing the masks to the photo and cutting them;
            CPU work that may run in another thread while the model goes on with the
            next batch) gives the predictions.
        """
        n = len(images)
        if sizes is None:
            sizes = [image[:2] if isinstance(image, tuple) else image.shape[:2] for image in images]
        frames = [self._frame(s[0], s[1]) for s in sizes]
        count = len(self.candidates)
        with autocast(self.device):
            if backbones is None:
                images = [self.tone.apply(image) for image in images]
                backbones = self._encode_targets(images, frames)
            tracked = []
            confidence = np.zeros((n, count))
            union = None  # per target and candidate: the union of the predicted masks
            for group in self.groups:
                objects = len(group.objects)
                # the batch: target after target, in each candidate after candidate
                feats = stacked_features(self.model, backbones, count * objects)
                num_frames = len(group.templates) + 1
                low_res, ious, obj_logits = self._track(
                    group, feats, num_frames - 1, num_frames, self._memory(group, n)
                )
                probs = torch.sigmoid(obj_logits).cpu().numpy().reshape(n, count, objects)
                ious = ious.cpu().numpy().reshape(n, count, objects)
                confidence += (np.clip(ious, 0.0, 1.0) * probs).sum(axis=2)
                if count > 1:
                    above = (low_res > self.mask_threshold).reshape(
                        n, count, objects, *low_res.shape[-2:]
                    )
                    above = above.any(dim=2).cpu().numpy()
                    union = above if union is None else union | above
                tracked.append((group, feats, low_res, ious, probs))
            confidence /= len(self.objects)
            if count > 1:
                shape = self._shape_agreement(union, frames)
                scores = confidence * shape
            else:
                shape, scores = None, confidence
            # np.argmax keeps the first of equal scores: the template's own orientation
            chosen = scores.argmax(axis=1)
            pending = [
                PendingPrediction(self, (int(s[0]), int(s[1])), frame, int(c))
                for s, frame, c in zip(sizes, frames, chosen)
            ]
            if count > 1:
                for j in range(n):
                    pending[j].orientation = self._orientation_record(
                        int(chosen[j]), scores[j], confidence[j], shape[j]
                    )
            for group, feats, low_res, ious, probs in tracked:
                self._add_chosen(pending, group, backbones, feats, low_res, ious, probs, chosen)
            if zoom and self._zoom is not None:
                self._zoom.run(pending, images, chosen)
        return pending

    def _shape_agreement(self, union: np.ndarray, frames: list[Frame]) -> np.ndarray:
        """Per target and candidate, how well the silhouette of its predicted structures
        (`union`: (targets, candidates, h, w) low-resolution masks of the square input)
        agrees with that of the candidate's turned templates (`orientation.silhouette`,
        the mean over the templates): the masks of a wrong orientation, or the right
        masks matched against a template turned the wrong way, sit elsewhere."""
        n, count, rows, cols = union.shape
        shape = np.zeros((n, count))
        for j, frame in enumerate(frames):
            # the cells' centres in the photo's pixel coordinates, through the frame
            ys = ((np.arange(rows) + 0.5) * frame.size / rows - frame.top) * (
                frame.height / frame.inner_height
            )
            xs = ((np.arange(cols) + 0.5) * frame.size / cols - frame.left) * (
                frame.width / frame.inner_width
            )
            inside = ((ys >= 0) & (ys < frame.height))[:, None] & ((xs >= 0) & (xs < frame.width))[
                None, :
            ]
            # each cell's area in the photo's pixels
            cell = (frame.size / rows * frame.height / frame.inner_height) * (
                frame.size / cols * frame.width / frame.inner_width
            )
            for c in range(count):
                r, k = np.nonzero(union[j, c] & inside)
                target = silhouette(xs[k], ys[r], np.full(len(r), cell))
                shape[j, c] = np.mean([silhouette_iou(target, ref) for ref in self._silhouettes[c]])
        return shape

    def _orientation_record(self, chosen: int, scores, confidence, shape) -> dict:
        winner = self.candidates[chosen]
        return {
            "rotation": winner.rotation,
            "mirrored": winner.mirrored,
            "candidates": [
                {
                    "rotation": c.rotation,
                    "mirrored": c.mirrored,
                    "score": round(float(scores[i]), 6),
                    "confidence": round(float(confidence[i]), 6),
                    "shape": round(float(shape[i]), 6),
                }
                for i, c in enumerate(self.candidates)
            ],
        }

    def _add_chosen(self, pending, group, backbones, feats, low_res, ious, probs, chosen) -> None:
        """Hand each target's structures of `group`, as tracked from its chosen
        orientation, to its PendingPrediction (with their cycle IoU)."""
        n, count = len(pending), len(self.candidates)
        objects = len(group.objects)
        if count == 1:
            won = low_res
        else:
            rows = [
                j * count * objects + int(chosen[j]) * objects + i
                for j in range(n)
                for i in range(objects)
            ]
            won = low_res[torch.as_tensor(rows, device=low_res.device)]
        cycle = None
        if self.cycle_consistency:
            if count == 1:
                cycle = self._cycle_iou(group, 0, feats, won, n)
            else:
                cycle = []
                for j in range(n):
                    cycle += self._cycle_iou(
                        group,
                        int(chosen[j]),
                        stacked_features(self.model, [backbones[j]], objects),
                        won[j * objects : (j + 1) * objects],
                        1,
                    )
        won = won.float().cpu()
        for j in range(n):
            c = int(chosen[j])
            for i, key in enumerate(group.objects):
                b = j * objects + i
                pending[j].add(
                    key,
                    won[b],
                    float(ious[j, c, i]),
                    float(probs[j, c, i]),
                    None if cycle is None else cycle[b],
                )


def _zoom_better(zoomed: tuple, cycle: float | None) -> bool:
    """Whether the zoom pass's result (`PendingPrediction.zoomed`'s tuple) has a higher
    cycle IoU than the whole-photo pass's `cycle`."""
    return zoomed[3] is not None and cycle is not None and zoomed[3] > cycle


class PendingPrediction:
    """The model's output for one image, before its masks are resized to the photo."""

    def __init__(
        self,
        engine: Propagator,
        size: tuple[int, int],
        frame: Frame | None = None,
        candidate: int = 0,
    ):
        self.engine, self.size, self.frame, self.candidate = engine, size, frame, candidate
        self.orientation: dict | None = None
        self.parts: list[tuple] = []
        # per structure, the zoom pass's (mask, predicted IoU, object probability, cycle
        # IoU, placed, stability)
        self.zoomed: dict[ObjectKey, tuple] = {}

    def first_boxes(self) -> dict:
        """Per structure, the box (x, y, w, h) in the photo's pixels of its whole-photo
        prediction (from its low-resolution cells; None when it found nothing)."""
        frame = self.frame or make_frame(*self.size, self.engine.image_size)
        found = {}
        for key, low_res, _, _, _ in self.parts:
            box = low_res_box(low_res[0], frame, self.engine.mask_threshold)
            if box is not None:
                found[key] = box
        return found

    def add(
        self, key: ObjectKey, low_res: torch.Tensor, iou: float, prob: float, cycle: float | None
    ) -> None:
        self.parts.append((key, low_res, iou, prob, cycle))

    def finish(self) -> Predictions:
        """The structures of the image, in the engine's `objects` order (each paired
        structure under its partner's name after a mirrored match with `mirror_swap`)."""
        engine = self.engine
        swap = engine.mirror if engine.candidates[self.candidate].mirrored else {}
        references = engine._references[self.candidate]
        results: dict[ObjectKey, StructurePrediction] = {}
        for key, low_res, iou, prob, cycle in self.parts:
            zoomed = self.zoomed.get(key)
            if zoomed is not None and engine.zoom == "best" and not _zoom_better(zoomed, cycle):
                zoomed = None  # the whole photo's mask reads better: kept
            if zoomed is not None:
                box, iou, prob, cycle, _, stability = zoomed
            else:
                stability = stability_scores(low_res, engine.mask_threshold)[0]
                box = logits_to_boxes(
                    low_res[None], self.size, engine.mask_threshold, engine.exact, self.frame
                )[0]
            box, clamped = clamp_mask(
                box,
                references[key],
                area_growth_limit=engine.area_growth_limit,
                pad=engine.area_clamp_pad,
                always=engine.bbox_clamp,
            )
            named = swap.get(key, key)
            results[named] = StructurePrediction(
                category_id=named[0],
                instance=named[1],
                box=box,
                predicted_iou=float(iou),
                object_score=float(prob),
                cycle_iou=None if cycle is None else float(cycle),
                clamped=clamped,
                zoomed=zoomed is not None,
                zoom_placed=zoomed is not None and bool(zoomed[4]),
                stability=stability,
            )
        order = [key for key in engine.objects if key in results]
        order += [key for key in results if key not in set(engine.objects)]
        predictions = Predictions(results[key] for key in order)
        predictions.orientation = self.orientation
        return predictions
