"""Propagation through time: SAM2's video memory over the frames of one video.

The photo engine (`sam2pal.engine`) segments every image from the templates alone. A
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
ahead, in a background thread), each is encoded once and dropped, and of the tracked
frames only the window SAM2 looks back on is kept (older entries are pruned; beyond the
mask-memory window only the small object pointer is kept). Results come out frame by
frame, as a generator, so callers write them as they come.

Structures (category id, instance rank) are grouped by the set of keyframes that
annotate them; each group is tracked as one batch over the shared frame encoding and
has its own conditioning frames. A structure not annotated on a keyframe is tracked on
that frame like on any other. On its own keyframes a structure's output is the
annotation itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .engine import (
    ObjectKey,
    StructurePrediction,
    binary_mask_input,
    conditioning_frame,
    cycle_ious,
    encode_image,
    expand_features,
    fill_holes,
    logits_to_masks,
    track_step,
)
from .errors import ImageReadError
from .model import autocast
from .postprocess import StructureReference, clamp_mask


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

    @property
    def first(self) -> int:
        return self.keyframes[0]


def track_and_remember(model, feats, frame_idx: int, num_frames: int, memory: dict, reverse: bool,
                       fill_hole_area: int = 0):
    """Track one frame from `memory` and encode its own memory, as the official
    predictor's `_run_single_frame_inference` does for a non-conditioning frame.

    Returns (low-res logits (B, 1, h, w) after hole filling, predicted IoU (B,),
    object-score logits (B,), the frame's compact output to keep in memory).
    """
    vision_feats, _, sizes = feats
    current_out, sam_outputs = track_step(model, feats, frame_idx, num_frames, memory, reverse)
    _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
    model._encode_memory_in_output(
        vision_feats, sizes, None, True, high_res_masks, object_score_logits, current_out
    )
    compact = {
        "maskmem_features": current_out["maskmem_features"].to(torch.bfloat16),
        "maskmem_pos_enc": current_out["maskmem_pos_enc"],
        "obj_ptr": obj_ptr,
        "object_score_logits": object_score_logits,
    }
    low_res = fill_holes(low_res_masks.float(), fill_hole_area)
    return low_res, ious.float().max(dim=1).values, object_score_logits.float()[:, 0], compact


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


class VideoPropagator:
    """Tracks the structures of keyframes through the frames of one video.

    Parameters
    ----------
    model: a SAM2Base in eval mode (see `sam2pal.model.build_model`).
    keyframes: {frame index: {(category_id, instance): bool mask (H, W)}}.
    num_frames: the video's frame count.
    read_frame: frame index -> RGB uint8 (H, W, 3); raises ImageReadError when a frame
        cannot be read (that frame is reported as skipped and tracking goes on).
    fill_hole_area: as SAM2's video predictor (8 there); 0 disables.
    cycle_consistency: also compute each frame's cycle IoU from its nearest keyframe
        (one more memory pass per frame).
    area_growth_limit, area_clamp_pad, bbox_clamp: drift guards relative to the
        previous frame's mask in tracking order (see `sam2pal.postprocess`).
    prefetch: frames read ahead in a background thread.
    """

    def __init__(
        self,
        model,
        keyframes: dict[int, dict[ObjectKey, np.ndarray]],
        num_frames: int,
        read_frame: Callable[[int], np.ndarray],
        fill_hole_area: int = 8,
        cycle_consistency: bool = False,
        area_growth_limit: float = 0.0,
        area_clamp_pad: int = 10,
        bbox_clamp: bool = False,
        mask_threshold: float = 0.0,
        prefetch: int = 2,
    ):
        if not keyframes:
            raise ValueError("a video needs at least one keyframe")
        bad = sorted(k for k in keyframes if not 0 <= k < num_frames)
        if bad:
            raise ValueError(f"keyframe index {bad[0]} is outside the video's {num_frames} frames")
        self.model = model
        self.device = model.device
        self.image_size = int(model.image_size)
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

        self.objects: list[ObjectKey] = sorted({key for masks in self.keyframes.values() for key in masks})
        if not self.objects:
            raise ValueError("the keyframes have no structures")
        by_frames: dict[tuple[int, ...], list[ObjectKey]] = {}
        for key in self.objects:
            frames = tuple(sorted(k for k, masks in self.keyframes.items() if key in masks))
            by_frames.setdefault(frames, []).append(key)
        self.groups = [_Group(objs, list(frames)) for frames, objs in by_frames.items()]
        # statistics a caller (or a test) can check: frames read, peak tensor bytes held
        self.frames_read = 0
        self.peak_state_bytes = 0
        self._keyframe_backbones: dict[int, dict] = {}

        with torch.inference_mode(), autocast(self.device):
            for index in sorted(self.keyframes):
                groups = [g for g in self.groups if index in g.keyframes]
                backbone = encode_image(self.model, self._read(index))
                for group in groups:
                    masks = np.stack([self.keyframes[index][key] for key in group.objects])
                    group.cond[index] = conditioning_frame(
                        self.model, expand_features(self.model, backbone, len(group.objects)), index,
                        self.num_frames, binary_mask_input(masks, self.image_size, self.device),
                        self.fill_hole_area,
                    )

    # -- helpers ----------------------------------------------------------------------

    def _read(self, index: int) -> np.ndarray:
        self.frames_read += 1
        return self.read_frame(index)

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
            self._keyframe_backbones[index] = encode_image(self.model, self._read(index))
        return self._keyframe_backbones[index]

    def _nearest_keyframe(self, group: _Group, index: int) -> int:
        return min(group.keyframes, key=lambda k: (abs(k - index), k))

    def _annotation(self, group: _Group, index: int) -> dict[ObjectKey, StructurePrediction]:
        return {
            key: StructurePrediction(category_id=key[0], instance=key[1], mask=self.keyframes[index][key],
                                     predicted_iou=1.0, object_score=1.0)
            for key in group.objects
        }

    def _track_group(self, group: _Group, backbone: dict, index: int, size, window: dict, step: int,
                     previous: dict) -> dict[ObjectKey, StructurePrediction]:
        feats = expand_features(self.model, backbone, len(group.objects))
        memory = {"cond_frame_outputs": group.cond, "non_cond_frame_outputs": window}
        low_res, ious, obj_logits, compact = track_and_remember(
            self.model, feats, index, self.num_frames, memory, step < 0, self.fill_hole_area
        )
        window[index] = compact
        cycle = None
        if self.cycle_consistency:
            nearest = self._nearest_keyframe(group, index)
            masks = [self.keyframes[nearest][key] for key in group.objects]
            cycle = cycle_ious(self.model, feats, low_res, [(self._reference_backbone(nearest), masks)],
                               self.fill_hole_area, self.mask_threshold)
        masks = logits_to_masks(low_res, size, self.mask_threshold)
        probs = torch.sigmoid(obj_logits).cpu().tolist()
        ious = ious.cpu().tolist()
        results = {}
        for i, key in enumerate(group.objects):
            mask, clamped = masks[i], False
            if key in previous:
                mask, clamped = clamp_mask(mask, previous[key], area_growth_limit=self.area_growth_limit,
                                           pad=self.area_clamp_pad, always=self.bbox_clamp)
            results[key] = StructurePrediction(
                category_id=key[0], instance=key[1], mask=mask, predicted_iou=float(ious[i]),
                object_score=float(probs[i]), cycle_iou=None if cycle is None else float(cycle[i]),
                clamped=clamped,
            )
        return results

    def _state_bytes(self, windows: dict) -> int:
        held = tensor_bytes([g.cond for g in self.groups]) + tensor_bytes(list(windows.values()))
        held += tensor_bytes(list(self._keyframe_backbones.values()))
        return held

    def _sweep(self, frames: list[int], step: int, groups_at: Callable[[int], list[_Group]]):
        """Track `frames` in order (step +1 forwards, -1 backwards); yields
        (index, size, {key: prediction}, keyframe keys) or (index, None, reason)."""
        windows: dict[int, dict] = {id(g): {} for g in self.groups}
        # drift guards start from each group's first keyframe
        previous: dict[int, dict[ObjectKey, StructureReference]] = {
            id(g): {key: StructureReference.from_masks([self.keyframes[g.first][key]]) for key in g.objects}
            for g in self.groups
        }

        def load(index: int):
            try:
                return self._read(index), None
            except ImageReadError as exc:
                return None, str(exc)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = {i: pool.submit(load, frames[i]) for i in range(min(self.prefetch, len(frames)))}
            for position, index in enumerate(frames):
                rgb, error = pending.pop(position).result()
                ahead = position + self.prefetch
                if ahead < len(frames):
                    pending[ahead] = pool.submit(load, frames[ahead])
                groups = groups_at(index)
                if error is not None:
                    for group in groups:
                        self._prune(windows[id(group)], index + step, step)
                    yield index, None, error, frozenset()
                    continue
                size = rgb.shape[:2]
                results: dict[ObjectKey, StructurePrediction] = {}
                from_annotation: set[ObjectKey] = set()
                tracked = [g for g in groups if index not in g.cond]
                with torch.inference_mode(), autocast(self.device):
                    backbone = encode_image(self.model, rgb) if tracked else None
                    del rgb
                    for group in groups:
                        if index in group.cond:
                            found = self._annotation(group, index)
                            from_annotation.update(found)
                        else:
                            found = self._track_group(group, backbone, index, size, windows[id(group)], step,
                                                      previous[id(group)])
                        results.update(found)
                        previous[id(group)] = {
                            key: StructureReference.from_masks([p.mask]) for key, p in found.items() if p.mask.any()
                        } or previous[id(group)]
                        self._prune(windows[id(group)], index + step, step)
                    del backbone
                self.peak_state_bytes = max(self.peak_state_bytes, self._state_bytes(windows))
                yield index, size, results, frozenset(from_annotation)

    # -- public -----------------------------------------------------------------------

    def run(self) -> Iterator[FrameResult]:
        """Track every frame; yields one `FrameResult` per frame as soon as it is done:
        first the frames before the first keyframe (backwards, last to first), then
        the rest in order."""
        first = min(g.first for g in self.groups)
        last_first = max(g.first for g in self.groups)
        # frames some group has reached only backwards are held until the forward sweep
        # completes them (only when structures have different first keyframes)
        held: dict[int, tuple] = {}
        backwards = list(range(last_first - 1, -1, -1))
        for index, size, results, annotated in self._sweep(
            backwards, -1, lambda f: [g for g in self.groups if g.first > f]
        ):
            if size is None:
                if index < first:
                    yield FrameResult(index, (0, 0), [], skipped=results)
                continue
            if index < first:
                yield self._result(index, size, results, annotated)
            else:
                held[index] = (results, annotated)
        forwards = list(range(first, self.num_frames))
        for index, size, results, annotated in self._sweep(
            forwards, 1, lambda f: [g for g in self.groups if g.first <= f]
        ):
            if size is None:
                held.pop(index, None)
                yield FrameResult(index, (0, 0), [], skipped=results)
                continue
            if index in held:
                earlier, earlier_annotated = held.pop(index)
                results = {**earlier, **results}
                annotated = annotated | earlier_annotated
            yield self._result(index, size, results, annotated)

    def _result(self, index, size, results, annotated) -> FrameResult:
        return FrameResult(index, tuple(size), [results[key] for key in self.objects], frozenset(annotated))
