"""Propagation through time: SAM2's video memory over the frames of one video.

The photo engine (`sam2pal.inference.engine`) segments every image from the templates alone. A
video is different: neighbouring frames look alike, so each frame is also conditioned
on the frames just tracked before it, the way SAM2's video predictor works:

* every keyframe (an annotated frame) is a conditioning frame, and every tracked frame
  attends to all of them, so where two keyframes bracket a frame, both condition it;
* each tracked frame also attends to the memory of the last `num_maskmem - 1` frames
  tracked before it and to the object pointers of the last `max_obj_ptrs_in_encoder - 1`;
* frames from the first keyframe on are tracked forwards; the frames before it are
  tracked backwards from it (SAM2's `track_in_reverse`), so they get masks too.

This reproduces `SAM2VideoPredictor.propagate_in_video` run forwards from the first
keyframe and, on a fresh state, backwards from it (up to floating-point rounding, since
the official predictor runs objects one at a time and this module batches them).

Memory is bounded whatever the video's length: frames are read one at a time (a few
ahead, in a background thread), each is encoded and dropped, and of the tracked frames
only the window SAM2 looks back on is kept (older entries are pruned; beyond the
mask-memory window only the small object pointer is kept). Results come out frame by
frame, as a generator, so callers write them as they come.

Structures (category id, instance rank) are grouped by the set of keyframes that
annotate them; each group is tracked as one batch over the shared frame encoding and
has its own conditioning frames. A structure not annotated on a keyframe is tracked on
that frame like on any other. On its own keyframes a structure's output is the
annotation itself.

When structures are first annotated on different keyframes, the frames between the
earliest and the latest first keyframe are tracked twice: backwards for the structures
first annotated later, then forwards for the others. The backward results of those
frames are written to a spill file on disk (JSON lines, masks as COCO RLE) and read back,
one frame at a time, when the forward sweep reaches the frame, so memory stays flat
however far apart the keyframes are. Those frames are also encoded twice (once per
sweep): the two sweeps run in opposite directions, and keeping each frame's image
encoding for the other sweep would take 16 MiB per frame at 1024 px (30 GiB for 1,900
frames), memory that grows with the distance again or as much disk traffic, where
encoding the frame again costs one image-encoder pass.

Drift guards (`area_growth_limit`, `bbox_clamp`) compare each frame with the previous
frame in tracking order. When one cuts a structure to the previous frame's box, the
same cut is applied to the mask SAM2 encodes into its memory (the mask logits outside
the box are set to background before the memory encoder sees them), so the next
frames are conditioned on the cut mask, not on the leak. SAM2's object pointer (a
summary vector of the prediction) is kept as predicted.

A run can be resumed exactly: `VideoPropagator.state()` is everything the sweep needs
to go on (where it is, its look-back window, the drift guards' references, the spill
file's length), and `run(resume=...)` goes on from it with the same results as an
uninterrupted run. `track_video` writes the results to a JSON-lines file with such
checkpoints, like photos are written by `sam2pal.inference.propagate`.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from sam2pal.errors import ImageReadError, InputError
from sam2pal.inference.engine import (
    ObjectKey,
    StructurePrediction,
    binary_mask_input,
    conditioning_frame,
    cycle_ious,
    encode_image,
    expand_features,
    fill_holes,
    logits_to_boxes,
    stability_scores,
    track_step,
)
from sam2pal.inference.framing import FRAMINGS, Frame, make_frame, parse_fill
from sam2pal.inference.postprocess import StructureReference, clamp_mask
from sam2pal.inference.tone import Tone
from sam2pal.io.atomic import atomic_path
from sam2pal.io.masks import BoxMask, decode_segmentation
from sam2pal.io.records import ImageRecord, PartialRecords, RecordAppender
from sam2pal.models.adapters import untouched_model, untouched_structures
from sam2pal.models.build import autocast
from sam2pal.settings import Segmentation, engine_defaults

#: the defaults of the engine settings (`sam2pal.settings.Segmentation`)
ENGINE_DEFAULTS = engine_defaults(Segmentation)

STATE_FORMAT = 1  # version of `VideoPropagator.state()`


@dataclass
class FrameResult:
    """All structures on one frame, in `VideoPropagator.objects` order; `skipped` is the
    reason when the frame could not be read (then `predictions` is empty)."""

    index: int
    size: tuple[int, int]  # (height, width)
    predictions: list[StructurePrediction]
    keyframe_objects: frozenset = frozenset()  # structures whose output is their annotation here
    skipped: str | None = None


@dataclass
class _Group:
    objects: list[ObjectKey]
    keyframes: list[int]  # sorted
    cond: dict[int, dict] = field(default_factory=dict)  # conditioning outputs per keyframe
    untouched: bool = False  # tracked with the untouched model (base weights)

    @property
    def first(self) -> int:
        return self.keyframes[0]


def cut_logits_to_boxes(
    high_res: torch.Tensor, boxes: list, frame_size: tuple[int, int], frame=None
) -> torch.Tensor:
    """Mask logits (B, 1, S, S) with every object's logits outside its box set to
    SAM2's "no object" score (-1024, background after the sigmoid).

    `boxes`: per object (x0, y0, x1, y1) in pixels of the frame (`frame_size` (height,
    width); x1, y1 exclusive), or None to leave that object as it is. The frame was
    resized to the S x S model input, so a cell of the logit grid is kept when its
    centre falls inside the box, the rule by which the box cuts the frame's pixels.
    With a letterbox `frame` (`sam2pal.inference.framing.Frame`) the cells are mapped
    through its inner rectangle; the padding's cells are cut.
    """
    if all(box is None for box in boxes):
        return high_res
    size = high_res.shape[-1]
    height, width = frame_size
    centres = torch.arange(size, dtype=torch.float64, device=high_res.device) + 0.5
    if frame is None or frame.stretched:
        xs, ys = centres * (width / size), centres * (height / size)
    else:  # outside the inner rectangle the coordinates fall outside every box
        scale = size / frame.size
        xs = (centres * scale - frame.left) * (width / frame.inner_width)
        ys = (centres * scale - frame.top) * (height / frame.inner_height)
    cut = high_res.clone()
    background = torch.full_like(cut[0, 0], NO_OBJ_SCORE)
    for b, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = box
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        cut[b, 0] = torch.where(inside, cut[b, 0], background)
    return cut


def remember(
    model,
    feats,
    high_res_masks: torch.Tensor,
    object_score_logits: torch.Tensor,
    obj_ptr: torch.Tensor,
) -> dict:
    """A tracked frame's compact memory entry, encoded from `high_res_masks` (B, 1, S, S
    logits) as the official predictor's `_run_single_frame_inference` does for a
    non-conditioning frame (soft mask, memory features stored in bfloat16)."""
    vision_feats, _, sizes = feats
    maskmem_features, maskmem_pos_enc = model._encode_new_memory(
        current_vision_feats=vision_feats,
        feat_sizes=sizes,
        pred_masks_high_res=high_res_masks,
        object_score_logits=object_score_logits,
        is_mask_from_pts=False,
    )
    return {
        "maskmem_features": maskmem_features.to(torch.bfloat16),
        "maskmem_pos_enc": maskmem_pos_enc,
        "obj_ptr": obj_ptr,
        "object_score_logits": object_score_logits,
    }


def memory_window(model) -> tuple[int, int]:
    """How far back (in frames) SAM2 looks: (mask-memory span, object-pointer span)."""
    stride = max(1, int(getattr(model, "memory_temporal_stride_for_eval", 1)))
    mem_span = (int(model.num_maskmem) - 1) * stride + 1
    ptr_span = int(model.max_obj_ptrs_in_encoder) if model.use_obj_ptrs_in_encoder else 0
    return mem_span, ptr_span


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (the memory a state holds)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass
class _Sweep:
    """Where a sweep stands: all a run needs to go on from here with the same results."""

    phase: str  # "backward" or "forward"
    done: int  # frames of this sweep finished
    windows: list[dict]  # per group: {frame: compact output}, the frames SAM2 looks back on
    previous: list[dict]  # per group: {key: StructureReference}, the drift guards' reference


class _Spill:
    """Backward-sweep results of frames the forward sweep completes, on disk: one JSON
    line per frame (masks as COCO RLE), read back one frame at a time.

    `path` None: an anonymous temporary file. A named file is kept (for a resumed run
    to go on from); `end` cuts it to the length a checkpoint recorded.
    """

    def __init__(self, path=None, end: int = 0, offsets: dict | None = None):
        if path is None:
            self.handle = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        else:
            self.handle = open(path, "a+b")  # noqa: SIM115 (closed by close())
        self.handle.truncate(end)
        self.offsets: dict[int, int] = {int(k): int(v) for k, v in (offsets or {}).items()}
        self.written = 0

    def write(
        self, index: int, size, results: dict | None, annotated, skipped: str | None = None
    ) -> None:
        record = {"index": index, "skipped": skipped}
        if skipped is None:
            record.update(
                size=[int(size[0]), int(size[1])],
                annotated=sorted([int(c), int(i)] for c, i in annotated),
                structures=[
                    {
                        "key": [int(key[0]), int(key[1])],
                        "counts": p.box.rle()["counts"],
                        "predicted_iou": p.predicted_iou,
                        "object_score": p.object_score,
                        "cycle_iou": p.cycle_iou,
                        "clamped": bool(p.clamped),
                        "stability": p.stability,
                    }
                    for key, p in results.items()
                ],
            )
        self.offsets[index] = self.handle.seek(0, os.SEEK_END)
        self.handle.write(json.dumps(record).encode() + b"\n")
        self.written += 1

    def has(self, index: int) -> bool:
        return index in self.offsets

    def read(self, index: int):
        """(size, {key: prediction}, annotated keys, skipped reason) of a spilled frame."""
        self.handle.flush()
        self.handle.seek(self.offsets.pop(index))
        record = json.loads(self.handle.readline())
        if record["skipped"] is not None:
            return None, {}, frozenset(), record["skipped"]
        height, width = record["size"]
        results = {}
        for entry in record["structures"]:
            key = (entry["key"][0], entry["key"][1])
            mask = decode_segmentation(
                {"size": [height, width], "counts": entry["counts"]}, height, width
            )
            results[key] = StructurePrediction(
                category_id=key[0],
                instance=key[1],
                box=BoxMask.from_full(mask),
                predicted_iou=entry["predicted_iou"],
                object_score=entry["object_score"],
                cycle_iou=entry["cycle_iou"],
                clamped=entry["clamped"],
                stability=entry["stability"],
            )
        return (height, width), results, frozenset((c, i) for c, i in record["annotated"]), None

    def end(self) -> int:
        """Length of the file, every write on disk."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return self.handle.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.handle.close()


class VideoPropagator:
    """Tracks the structures of keyframes through the frames of one video.

    Parameters
    ----------
    model: a SAM2Base in eval mode (see `sam2pal.models.build.build_model`).
    keyframes: {frame index: {(category_id, instance): bool mask (H, W)}}.
    num_frames: the video's frame count.
    read_frame: frame index -> RGB uint8 (H, W, 3); raises ImageReadError when a frame
        cannot be read (that frame is reported as skipped and tracking goes on).
    fill_hole_area: as SAM2's video predictor (8 there); 0 disables.
    cycle_consistency: also compute each frame's cycle IoU from its nearest keyframe
        (one more memory pass per frame).
    area_growth_limit, area_clamp_pad, bbox_clamp: drift guards relative to the
        previous frame's mask in tracking order (see `sam2pal.inference.postprocess`); a cut is
        applied to the output mask and to the mask encoded into SAM2's memory.
    prefetch: frames read ahead in a background thread.
    exact: resize the masks to the frame over the whole frame, as the official
        predictor does, instead of inside each structure's box (`engine.logits_to_boxes`).
    framing, framing_fill: how frames go into the model's square input, as the photo
        engine's (`sam2pal.inference.framing`): keyframes and frames alike.
    categories: {category id: name}; needed when the model's adapter leaves structures
        to the untouched model (`sam2pal.models.adapters.untouched_structures`, by
        name): those are tracked with the untouched model.
    tone: "none" or "auto" (`sam2pal.inference.tone`): every frame the model sees lifted
        out of the dark unless the keyframes' structures are clearly lighter than their ground.
    """

    def __init__(
        self,
        model,
        keyframes: dict[int, dict[ObjectKey, np.ndarray]],
        num_frames: int,
        read_frame: Callable[[int], np.ndarray],
        fill_hole_area: int = ENGINE_DEFAULTS["fill_hole_area"],
        cycle_consistency: bool = ENGINE_DEFAULTS["cycle_consistency"],
        area_growth_limit: float = ENGINE_DEFAULTS["area_growth_limit"],
        area_clamp_pad: int = ENGINE_DEFAULTS["area_clamp_pad"],
        bbox_clamp: bool = ENGINE_DEFAULTS["bbox_clamp"],
        mask_threshold: float = 0.0,
        prefetch: int = 2,
        exact: bool = ENGINE_DEFAULTS["exact"],
        framing: str = ENGINE_DEFAULTS["framing"],
        framing_fill=ENGINE_DEFAULTS["framing_fill"],
        categories: dict | None = None,
        tone: str = ENGINE_DEFAULTS["tone"],
    ):
        if not keyframes:
            raise ValueError("a video needs at least one keyframe")
        bad = sorted(k for k in keyframes if not 0 <= k < num_frames)
        if bad:
            raise ValueError(f"keyframe index {bad[0]} is outside the video's {num_frames} frames")
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
        self.model = model
        self.untouched = untouched_structures(model)
        self.untouched_model = untouched_model(model)
        if self.untouched and categories is None:
            raise ValueError("the model leaves structures to the untouched model: give categories")
        self.categories = dict(categories or {})
        self.exact = bool(exact)
        self.device = model.device
        self.image_size = int(model.image_size)
        self.framing = framing
        self.framing_fill = parse_fill(framing_fill)
        self.num_frames = int(num_frames)
        self.read_frame = read_frame
        self.keyframes = {int(k): dict(v) for k, v in keyframes.items()}
        self.fill_hole_area = int(fill_hole_area)
        self.cycle_consistency = bool(cycle_consistency)
        self.area_growth_limit = float(area_growth_limit or 0.0)
        self.area_clamp_pad = int(area_clamp_pad)
        self.bbox_clamp = bool(bbox_clamp)
        self.mask_threshold = float(mask_threshold)
        self.prefetch = max(1, int(prefetch))
        self.mem_span, self.ptr_span = memory_window(model)
        self.tone = Tone.resolve(
            tone,
            lambda: (
                (self.read_frame(index), list(masks.values()))
                for index, masks in sorted(self.keyframes.items())
            ),
        )
        # statistics a caller (or a test) can check: frames read, peak tensor bytes held,
        # frames whose backward results went to the spill file
        self.frames_read = 0
        self.peak_state_bytes = 0
        self.spilled_frames = 0
        self._keyframe_backbones: dict[int, dict] = {}
        self._sweep_state: _Sweep | None = None
        self._spill: _Spill | None = None
        self._group_structures()
        self._condition_keyframes()

    def _group_structures(self) -> None:
        """Structures grouped by the keyframes that annotate them."""
        self.objects: list[ObjectKey] = sorted(
            {key for masks in self.keyframes.values() for key in masks}
        )
        if not self.objects:
            raise ValueError("the keyframes have no structures")
        by_frames: dict[tuple, list[ObjectKey]] = {}
        for key in self.objects:
            frames = tuple(sorted(k for k, masks in self.keyframes.items() if key in masks))
            untouched = self.categories.get(key[0]) in self.untouched
            by_frames.setdefault((frames, untouched), []).append(key)
        self.groups = [
            _Group(objs, list(frames), untouched=untouched)
            for (frames, untouched), objs in by_frames.items()
        ]

    def _condition_keyframes(self) -> None:
        """Each group's keyframes encoded once into conditioning memory."""
        with torch.inference_mode(), autocast(self.device):
            for index in sorted(self.keyframes):
                groups = [g for g in self.groups if index in g.keyframes]
                rgb = self._read(index)
                frame = self._frame(rgb.shape[:2])
                backbone = self._encode(rgb)
                for group in groups:
                    masks = np.stack([self.keyframes[index][key] for key in group.objects])
                    group.cond[index] = conditioning_frame(
                        self._model_of(group),
                        expand_features(self.model, backbone, len(group.objects)),
                        index,
                        self.num_frames,
                        binary_mask_input(masks, self.image_size, self.device, frame),
                        self.fill_hole_area,
                    )

    # -- helpers ----------------------------------------------------------------------

    def _frame(self, size) -> Frame:
        """Where a frame of `size` (height, width) sits in the model's input."""
        return make_frame(int(size[0]), int(size[1]), self.image_size, self.framing)

    def _encode(self, rgb: np.ndarray) -> dict:
        """One image-encoder pass on a frame, framed."""
        return encode_image(self.model, rgb, self._frame(rgb.shape[:2]), self.framing_fill)

    def _model_of(self, group: _Group):
        """The model that tracks `group` (the untouched model for the structures the
        adapter leaves to it; the image encoder is the same in both)."""
        return self.untouched_model if group.untouched else self.model

    def _read(self, index: int) -> np.ndarray:
        self.frames_read += 1
        return self.tone.apply(self.read_frame(index))

    def _prune(self, window: dict, next_frame: int, step: int) -> None:
        """Drop what the next frame will not look back on."""
        for t in list(window):
            distance = (next_frame - t) * step
            if distance > max(self.mem_span, self.ptr_span):
                del window[t]
            elif distance > self.mem_span and "maskmem_features" in window[t]:
                window[t] = {"obj_ptr": window[t]["obj_ptr"]}

    def _reference_backbone(self, index: int) -> dict:
        """Image encoding of a keyframe for the cycle IoU (the two most recent kept)."""
        if index not in self._keyframe_backbones:
            if len(self._keyframe_backbones) >= 2:
                self._keyframe_backbones.pop(next(iter(self._keyframe_backbones)))
            self._keyframe_backbones[index] = self._encode(self._read(index))
        return self._keyframe_backbones[index]

    def _nearest_keyframe(self, group: _Group, index: int) -> int:
        return min(group.keyframes, key=lambda k: (abs(k - index), k))

    def _annotation(self, group: _Group, index: int) -> dict[ObjectKey, StructurePrediction]:
        return {
            key: StructurePrediction(
                category_id=key[0],
                instance=key[1],
                box=BoxMask.from_full(self.keyframes[index][key]),
                predicted_iou=1.0,
                object_score=1.0,
            )
            for key in group.objects
        }

    def _track_group(
        self,
        group: _Group,
        backbone: dict,
        index: int,
        size,
        window: dict,
        step: int,
        previous: dict,
    ) -> dict[ObjectKey, StructurePrediction]:
        model = self._model_of(group)
        feats = expand_features(self.model, backbone, len(group.objects))
        memory = {"cond_frame_outputs": group.cond, "non_cond_frame_outputs": window}
        _, sam_outputs = track_step(model, feats, index, self.num_frames, memory, step < 0)
        _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
        low_res = fill_holes(low_res_masks.float(), self.fill_hole_area)
        frame = self._frame(size)
        masks = logits_to_boxes(low_res, size, self.mask_threshold, self.exact, frame)
        clamped, boxes = self._guard_drift(group, masks, size, previous)
        window[index] = remember(
            model,
            feats,
            cut_logits_to_boxes(high_res_masks, boxes, size, frame),
            object_score_logits,
            obj_ptr,
        )
        cycle = (
            self._cycle_ious(group, index, feats, low_res, frame)
            if self.cycle_consistency
            else None
        )
        probs = torch.sigmoid(object_score_logits.float()[:, 0]).cpu().tolist()
        ious = ious.float().max(dim=1).values.cpu().tolist()
        stability = stability_scores(low_res, self.mask_threshold)
        return {
            key: StructurePrediction(
                category_id=key[0],
                instance=key[1],
                box=masks[i],
                predicted_iou=float(ious[i]),
                object_score=float(probs[i]),
                cycle_iou=None if cycle is None else float(cycle[i]),
                clamped=clamped[i],
                stability=stability[i],
            )
            for i, key in enumerate(group.objects)
        }

    def _guard_drift(self, group: _Group, masks: list, size, previous: dict):
        """The drift guards: the output masks are cut (in place), and so is the mask the
        memory is built from; returns (clamped per object, box to cut the memory's
        mask to per object, or None)."""
        clamped = [False] * len(group.objects)
        boxes: list = [None] * len(group.objects)
        for i, key in enumerate(group.objects):
            if key in previous:
                masks[i], clamped[i] = clamp_mask(
                    masks[i],
                    previous[key],
                    area_growth_limit=self.area_growth_limit,
                    pad=self.area_clamp_pad,
                    always=self.bbox_clamp,
                )
                if clamped[i] or self.bbox_clamp:
                    boxes[i] = previous[key].pixel_box(size[0], size[1], self.area_clamp_pad)
        return clamped, boxes

    def _cycle_ious(self, group: _Group, index: int, feats, low_res, frame=None):
        """Cycle IoU of each object of the group from its nearest keyframe."""
        nearest = self._nearest_keyframe(group, index)
        references = [
            (
                self._reference_backbone(nearest),
                [self.keyframes[nearest][key] for key in group.objects],
            )
        ]
        # keyframes and frames have one size: the keyframe's frame is the frame's
        return cycle_ious(
            self._model_of(group),
            feats,
            low_res,
            references,
            self.fill_hole_area,
            self.mask_threshold,
            frames=[frame],
        )

    def _state_bytes(self, windows: list) -> int:
        held = tensor_bytes([g.cond for g in self.groups]) + tensor_bytes(windows)
        held += tensor_bytes(list(self._keyframe_backbones.values()))
        return held

    def _fresh(self, phase: str) -> _Sweep:
        """A sweep's start: empty windows, drift guards from each group's first keyframe."""
        return _Sweep(
            phase=phase,
            done=0,
            windows=[{} for _ in self.groups],
            previous=[
                {
                    key: StructureReference.from_masks([self.keyframes[g.first][key]])
                    for key in g.objects
                }
                for g in self.groups
            ],
        )

    def _sweep(
        self,
        frames: list[int],
        step: int,
        groups_at: Callable[[int], list[int]],
        state: _Sweep,
        skip_bad_frames: bool = True,
    ):
        """Track `frames[state.done:]` in order (step +1 forwards, -1 backwards), updating
        `state`; yields (index, size, {key: prediction}, keyframe keys) or, for a frame
        that cannot be read, (index, None, reason, empty set), or raises its InputError
        when not `skip_bad_frames`. `groups_at`: frame -> indices of the groups tracked
        there."""

        def load(index: int):
            try:
                return self._read(index), None
            except ImageReadError as exc:
                return None, str(exc)

        todo = frames[state.done :]
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = {i: pool.submit(load, todo[i]) for i in range(min(self.prefetch, len(todo)))}
            for position, index in enumerate(todo):
                rgb, error = pending.pop(position).result()
                ahead = position + self.prefetch
                if ahead < len(todo):
                    pending[ahead] = pool.submit(load, todo[ahead])
                active = groups_at(index)
                if error is not None and not skip_bad_frames:
                    raise InputError(error)
                if error is not None:
                    for g in active:
                        self._prune(state.windows[g], index + step, step)
                    state.done += 1
                    yield index, None, error, frozenset()
                    continue
                size = rgb.shape[:2]
                tracked = [g for g in active if index not in self.groups[g].cond]
                with torch.inference_mode(), autocast(self.device):
                    backbone = self._encode(rgb) if tracked else None
                    del rgb
                    results, from_annotation = self._track_frame(
                        backbone, index, size, active, step, state
                    )
                    del backbone
                self.peak_state_bytes = max(self.peak_state_bytes, self._state_bytes(state.windows))
                state.done += 1
                yield index, size, results, frozenset(from_annotation)

    def _track_frame(self, backbone, index: int, size, active: list[int], step: int, state):
        """({key: prediction}, keys output as annotated) of one frame (its image
        encoding `backbone`), for the groups `active` there."""
        results: dict[ObjectKey, StructurePrediction] = {}
        from_annotation: set[ObjectKey] = set()
        for g in active:
            group = self.groups[g]
            if index in group.cond:
                found = self._annotation(group, index)
                from_annotation.update(found)
            else:
                found = self._track_group(
                    group, backbone, index, size, state.windows[g], step, state.previous[g]
                )
            results.update(found)
            state.previous[g] = {
                key: StructureReference.from_masks([p.box])
                for key, p in found.items()
                if p.box.area
            } or state.previous[g]
            self._prune(state.windows[g], index + step, step)
        return results, from_annotation

    # -- resuming ---------------------------------------------------------------------

    def _identity(self) -> list:
        return [[[list(k) for k in g.objects], list(g.keyframes)] for g in self.groups]

    def state(self) -> dict:
        """Everything the run needs to go on from the last frame it finished, exactly:
        plain Python values and tensors (save it with `torch.save`, load it with
        `torch.load(..., weights_only=True)`). Call it between two results of `run`, or
        from its `on_safe_point` callback."""
        if self._sweep_state is None or self._spill is None:
            raise RuntimeError("state() is only defined while run() is going on")
        sweep = self._sweep_state
        return {
            "format": STATE_FORMAT,
            "num_frames": self.num_frames,
            "groups": self._identity(),
            "phase": sweep.phase,
            "done": sweep.done,
            "windows": [
                {int(t): dict(entry) for t, entry in window.items()} for window in sweep.windows
            ],
            "previous": [
                [
                    [int(k[0]), int(k[1]), float(ref.area_fraction), *map(float, ref.box)]
                    for k, ref in prev.items()
                ]
                for prev in sweep.previous
            ],
            "spill_end": self._spill.end(),
            "spilled": dict(self._spill.offsets),
        }

    def _restore(self, saved: dict) -> _Sweep:
        if (
            saved.get("format") != STATE_FORMAT
            or saved.get("num_frames") != self.num_frames
            or saved.get("groups") != self._identity()
        ):
            raise ValueError(
                "this saved state is of another video run (frames, keyframes or structures differ)"
            )

        def to_device(value):
            if isinstance(value, torch.Tensor):
                return value.to(self.device)
            return [to_device(v) for v in value]

        windows = [
            {
                int(t): {name: to_device(v) for name, v in entry.items()}
                for t, entry in window.items()
            }
            for window in saved["windows"]
        ]
        previous = [
            {
                (int(c), int(i)): StructureReference(area, (x0, y0, x1, y1))
                for c, i, area, x0, y0, x1, y1 in prev
            }
            for prev in saved["previous"]
        ]
        return _Sweep(
            phase=saved["phase"], done=int(saved["done"]), windows=windows, previous=previous
        )

    # -- public -----------------------------------------------------------------------

    def run(
        self,
        spill=None,
        resume: dict | None = None,
        on_safe_point: Callable[[], None] | None = None,
        skip_bad_frames: bool = True,
    ) -> Iterator[FrameResult]:
        """Track every frame; yields one `FrameResult` per frame as soon as it is done:
        first the frames before the first keyframe (backwards, last to first), then
        the rest in order.

        spill: the file for the backward results of frames between the earliest and
            the latest first keyframe (None: an anonymous temporary file). A named file
            is left in place for a resumed run (the caller removes it at the end).
        resume: a `state()` of an earlier run of the same video, keyframes and model,
            with the same `spill` file: goes on after the frame it was saved at.
        on_safe_point: called after each finished frame once every result before it
            has been taken, the moments at which `state()` can be saved.
        skip_bad_frames: False raises the InputError of the first frame that cannot be
            read, in whichever sweep reads it first (True reports it as skipped).
        """
        if resume is None:
            sweep, self._spill = self._fresh("backward"), _Spill(spill)
        else:
            sweep = self._restore(resume)
            self._spill = _Spill(spill, int(resume["spill_end"]), resume["spilled"])
        self._sweep_state = sweep
        safe_point = on_safe_point or (lambda: None)
        try:
            if sweep.phase == "backward":
                yield from self._backward(sweep, safe_point, skip_bad_frames)
                sweep = self._sweep_state = self._fresh("forward")
            yield from self._forward(sweep, safe_point, skip_bad_frames)
        finally:
            self._spill.close()
            self._sweep_state = None

    def _backward(self, sweep: _Sweep, safe_point, skip_bad_frames: bool):
        """The backward sweep, from the latest first keyframe: yields the results of
        frames before the first keyframe, spills those of the frames after it."""
        first = min(g.first for g in self.groups)
        last_first = max(g.first for g in self.groups)
        every = range(len(self.groups))
        backwards = list(range(last_first - 1, -1, -1))
        for index, size, results, annotated in self._sweep(
            backwards,
            -1,
            lambda f: [i for i in every if self.groups[i].first > f],
            sweep,
            skip_bad_frames,
        ):
            if index < first:
                if size is None:
                    yield FrameResult(index, (0, 0), [], skipped=results)
                else:
                    yield self._result(index, size, results, annotated)
            elif size is None:
                self._spill.write(index, None, None, (), skipped=results)
                self.spilled_frames += 1
            else:
                self._spill.write(index, size, results, annotated)
                self.spilled_frames += 1
            safe_point()

    def _forward(self, sweep: _Sweep, safe_point, skip_bad_frames: bool):
        """The forward sweep, from the first keyframe, completed by the spilled
        backward results."""
        first = min(g.first for g in self.groups)
        every = range(len(self.groups))
        for index, size, results, annotated in self._sweep(
            list(range(first, self.num_frames)),
            1,
            lambda f: [i for i in every if self.groups[i].first <= f],
            sweep,
            skip_bad_frames,
        ):
            if self._spill.has(index):
                _, earlier, earlier_annotated, skipped = self._spill.read(index)
                if size is not None and skipped is not None:
                    # the frame was unreadable in the backward sweep
                    size, results = None, skipped
                elif size is not None:
                    results = {**earlier, **results}
                    annotated = annotated | earlier_annotated
            if size is None:
                yield FrameResult(index, (0, 0), [], skipped=results)
            else:
                yield self._result(index, size, results, annotated)
            safe_point()

    def _result(self, index, size, results, annotated) -> FrameResult:
        return FrameResult(
            index, tuple(size), [results[key] for key in self.objects], frozenset(annotated)
        )


# -- writing a video's results, with checkpoints to resume from ----------------------------


def _checkpoint_paths(partial: PartialRecords) -> tuple[Path, Path]:
    """The tracker's state and spill files next to a run's partial file."""
    path = partial.path
    return path.with_name(path.name + ".state"), path.with_name(path.name + ".spill")


def _load_checkpoint(
    partial: PartialRecords, state_path: Path, spill_path: Path, log
) -> dict | None:
    """The last checkpoint of an interrupted run with the same settings, with the
    partial file cut back to the records it had then; None when there is none to use."""
    if not state_path.exists() or not partial.matches():
        return None
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        log(
            f"cannot read the checkpoint {state_path} ({type(exc).__name__}: {exc}); tracking from the start"
        )
        return None
    if (
        not isinstance(saved, dict)
        or saved.get("settings") != partial.key
        or not {"partial_end", "records", "tracker"} <= set(saved)
    ):
        return None
    spill_size = spill_path.stat().st_size if spill_path.exists() else 0
    if partial.size() < saved["partial_end"] or spill_size < saved["tracker"]["spill_end"]:
        log(f"{partial.path} is shorter than its checkpoint says; tracking from the start")
        return None
    partial.truncate(saved["partial_end"])
    return saved


def _resume_or_start(
    partial: PartialRecords, state_path: Path, spill_path: Path, frames: int, log
) -> dict | None:
    """The checkpoint to go on from (`_load_checkpoint`), or None after starting the
    partial file anew (stale state and spill files removed)."""
    saved = _load_checkpoint(partial, state_path, spill_path, log)
    if saved is None:
        for stale in (state_path, spill_path):
            stale.unlink(missing_ok=True)
        partial.start()
    else:
        log(f"resuming: {int(saved['records'])} of {frames} frames already done in {partial.path}")
    return saved


def track_video(
    propagator: VideoPropagator,
    out_jsonl,
    record_of: Callable[[FrameResult], ImageRecord],
    settings_key: str,
    on_bad_image: str = "skip",
    progress: bool = True,
    log=None,
    checkpoint_seconds: float = 60.0,
    desc: str = "video",
) -> dict:
    """Track every frame and write `out_jsonl`, one record per frame, in file-name
    order at the end, atomically.

    While running, records are appended to ``<out>.partial``
    (`sam2pal.io.records.PartialRecords`, first line: the settings `settings_key`) and,
    every `checkpoint_seconds`, the tracker's state goes to ``<out>.partial.state``
    with the length of the partial file at that moment; backward-sweep results wait in
    ``<out>.partial.spill``. A rerun with the same key keeps the records up to the last
    checkpoint and goes on from its state: the output is the same as that of an
    uninterrupted run.

    Args:
        propagator: the tracker of the video.
        out_jsonl: the result file.
        record_of: turns a frame's result into its record.
        settings_key: the key of the model, keyframes and settings.
        on_bad_image: "skip" records an unreadable frame as skipped; "fail" raises its
            error as an InputError (the files are kept for the rerun).
        progress: show a progress bar (`desc` names it).
        log: where messages go (default: standard error).
        checkpoint_seconds: time between two checkpoints.
        desc: the name of the video on the progress bar.

    Returns:
        The counts: images, segmented and skipped in this run, resumed (records kept).
    """
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    partial = PartialRecords(out_jsonl, settings_key)
    partial.out.parent.mkdir(parents=True, exist_ok=True)
    state_path, spill_path = _checkpoint_paths(partial)
    saved = _resume_or_start(partial, state_path, spill_path, propagator.num_frames, log)
    counts = {"images": propagator.num_frames, "segmented": 0, "skipped": 0, "resumed": 0}
    if saved is not None:
        counts["resumed"] = int(saved["records"])
    with partial.appender() as out:
        checkpoints = _Checkpoints(out, propagator, settings_key, state_path, checkpoint_seconds)
        checkpoints.records = counts["resumed"]
        _write_frames(
            propagator,
            out,
            record_of,
            counts,
            checkpoints,
            resume=None if saved is None else saved["tracker"],
            spill=spill_path,
            skip_bad_frames=on_bad_image == "skip",
            log=log,
            bar_args=dict(desc=f"track {desc}", unit="frame", disable=not progress),
        )
    partial.finalise()
    state_path.unlink(missing_ok=True)
    spill_path.unlink(missing_ok=True)
    return counts


class _Checkpoints:
    """Saves the tracker's state with the length of the partial file, at most every
    `seconds`."""

    def __init__(self, out: RecordAppender, propagator, key: str, path: Path, seconds: float):
        self.out = out
        self.propagator = propagator
        self.key = key
        self.path = path
        self.seconds = seconds
        self.records = 0
        self.last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last < self.seconds:
            return
        state = {
            "settings": self.key,
            "partial_end": self.out.sync(),
            "records": self.records,
            "tracker": self.propagator.state(),
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last = time.monotonic()


def _write_frames(
    propagator, out, record_of, counts, checkpoints, resume, spill, skip_bad_frames, log, bar_args
) -> None:
    """Track the frames, appending each record to `out` and counting it."""
    from sam2pal.progress import progress as progress_bar

    bar = progress_bar(total=propagator.num_frames, **bar_args)
    bar.update(checkpoints.records)
    for result in propagator.run(
        spill=spill, resume=resume, on_safe_point=checkpoints, skip_bad_frames=skip_bad_frames
    ):
        record = record_of(result)
        if result.skipped is not None:
            counts["skipped"] += 1
            log(f"skipped {record.file_name}: {result.skipped}")
        else:
            counts["segmented"] += 1
        out.append(record)
        checkpoints.records += 1
        bar.update(1)
    bar.close()
