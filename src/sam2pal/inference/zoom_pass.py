"""The zoom-in pass: small structures segmented again on crops at the model's full input.

SAM2 sees a photo at its input size (1024, or the small model's 384) and predicts masks
at a quarter of that: an antenna 12 pixels wide in a 12-megapixel photo is under one
pixel of the mask logits. After the whole-photo pass, the zoom pass segments each small
structure again on a window of the photo around it, at the model's full input:

* templates: each small structure's window (`zoom.crop_around`: its box with a margin,
  square), nearby structures sharing one window (`zoom.clusters`); each template's
  window and the masks in it are encoded into the memory of the cluster, once, like the
  whole-photo memory (and once per orientation of the orientation search);
* targets: the window that frames the first pass's prediction as the template's window
  frames the template's structure (`zoom.same_framing`); where the first pass found
  nothing, the structure is placed from where it sits on the template relative to the
  specimen (`zoom.placed_from_reference`, recorded as `zoom_placed`); the window, cut
  from the photo at full resolution, is tracked from the cluster's memory, and the mask
  is pasted back into the photo's pixel grid (`zoom.paste_logits`).

`auto` zooms the structures whose box on every template is under `zoom_below` of the
template photo's longer side; `on` zooms every structure. The zoom pass's predicted IoU,
object score and cycle IoU (the window's mask tracked back to the template's window)
replace the first pass's. `best` zooms every structure and keeps, per target and
structure, the pass whose mask has the higher cycle IoU (the first pass's on a tie; it
needs the cycle-consistency score): on held-out collections in poses the zoom pass
frames badly, `on` loses IoU where the whole photo read the structure better
(`benchmarks/quality.py --zoom`), and the cycle IoU tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sam2pal.errors import InputError
from sam2pal.inference.framing import make_frame
from sam2pal.inference.zoom import (
    Crop,
    clusters,
    crop_around,
    crop_image,
    crop_masks,
    paste_logits,
    placed_from_reference,
    same_framing,
    union_crop,
)
from sam2pal.io.masks import BoxMask, mask_bbox
from sam2pal.settings import ZOOMS  # the modes, one list for the settings and the engine

# the smallest window, in photo pixels (a structure of a few pixels keeps some context)
MIN_SIDE = 32


@dataclass
class _Cluster:
    """Small structures of one template group that share a window."""

    objects: list  # (category_id, instance), in the group's order
    templates: list[int]  # the group's template indices
    # per orientation candidate, per template (in `templates` order):
    windows: list[list[Crop]] = field(default_factory=list)
    boxes: list[list[tuple]] = field(default_factory=list)  # the structures' union box
    references: list[list[tuple]] = field(default_factory=list)  # all structures' box
    memories: list[dict] = field(default_factory=list)  # per candidate
    backbones: list[list[dict]] = field(default_factory=list)  # the windows' encodings
    truths: list[list[list]] = field(default_factory=list)  # masks in the windows (boxes)
    untouched: bool = False  # its group's (`engine._Group.untouched`)
    # per object the candidate mask it gets (`engine.template_slots`, chosen on the
    # template windows), -1: SAM2's pick; None: SAM2's pick for all
    slots: torch.Tensor | None = None
    # the structures whose boxes frame the window: `objects` and those of the same
    # window segmented with the other weights (adapter or untouched model)
    framed_by: list = field(default_factory=list)

    def __post_init__(self):
        self.framed_by = list(self.framed_by or self.objects)


def _union_box(boxes) -> tuple | None:
    boxes = [b for b in boxes if b is not None and b[2] > 0 and b[3] > 0]
    if not boxes:
        return None
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return (x0, y0, x1 - x0, y1 - y0)


def low_res_box(logits: torch.Tensor, frame, threshold: float) -> tuple | None:
    """The box (x, y, w, h) in the photo's pixels of the low-resolution cells above the
    threshold (mapped through the photo's frame), or None when there are none."""
    above = (logits > threshold).cpu().numpy()
    rows = np.flatnonzero(above.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(above.any(axis=0))
    cell_y = frame.size / above.shape[0] * frame.height / frame.inner_height
    cell_x = frame.size / above.shape[1] * frame.width / frame.inner_width
    top = frame.top * frame.height / frame.inner_height
    left = frame.left * frame.width / frame.inner_width
    y0 = max(0.0, rows[0] * cell_y - top)
    y1 = min(float(frame.height), (rows[-1] + 1) * cell_y - top)
    x0 = max(0.0, cols[0] * cell_x - left)
    x1 = min(float(frame.width), (cols[-1] + 1) * cell_x - left)
    if y1 <= y0 or x1 <= x0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


class ZoomPass:
    """The zoom pass of a `sam2pal.inference.engine.Propagator` (built by it).

    Args:
        engine: the Propagator (its model, template views, groups and settings).
        images: per template image (in the template set's order), its RGB photo.
        mode: "auto", "on" or "best" (see the module docstring).
        below: `auto` zooms a structure under this share of the photo's longer side.
        margin: each window's margin, as a share of the structure's longer side.
    """

    def __init__(self, engine, images: list[np.ndarray], mode: str, below: float, margin: float):
        from sam2pal.inference.orientation import transform_image

        if mode not in ZOOMS or mode == "off":
            raise InputError(f"zoom must be one of {', '.join(ZOOMS)}, not {mode!r}")
        if not 0.0 < float(below) <= 1.0:
            raise InputError(f"zoom_below must be above 0 and at most 1, not {below!r}")
        if not float(margin) >= 0.0:
            raise InputError(f"zoom_margin must be at least 0, not {margin!r}")
        self.engine = engine
        self.mode, self.below, self.margin = mode, float(below), float(margin)
        self.clusters: list[_Cluster] = []
        first = engine._views[0]
        # the small structures per set of templates that show them (structures the
        # adapter leaves to the untouched model are in groups of their own, but share
        # windows with the others as without the choice)
        small: dict[tuple[int, ...], list] = {}
        for group in engine.groups:
            small.setdefault(tuple(group.templates), []).extend(
                (key, group.untouched) for key in group.objects if self._small(key, group, first)
            )
        for templates, members in small.items():
            members.sort()
            windows = [self.window(first[templates[0]].masks[key]) for key, _ in members]
            for indices in clusters(windows):
                framed_by = [members[i][0] for i in indices]
                for untouched in (False, True):
                    keys = [members[i][0] for i in indices if members[i][1] == untouched]
                    if keys:
                        self.clusters.append(
                            _Cluster(
                                keys, list(templates), untouched=untouched, framed_by=framed_by
                            )
                        )
        if not self.clusters:
            return
        with torch.inference_mode():
            for c, view in enumerate(engine._views):
                turned = [transform_image(rgb, engine.candidates[c]) for rgb in images]
                for cluster in self.clusters:
                    self._build(cluster, view, turned)

    def _small(self, key, group, view) -> bool:
        if self.mode in ("on", "best"):
            return True
        for t in group.templates:
            height, width = view[t].size
            _, _, w, h = mask_bbox(view[t].masks[key])
            if max(w, h) >= self.below * max(height, width):
                return False
        return True

    def window(self, mask: np.ndarray) -> Crop:
        """The zoom window around one structure's (H, W) mask on its photo."""
        return crop_around(mask_bbox(mask), mask.shape[:2], self.margin, MIN_SIDE)

    def _build(self, cluster: _Cluster, view, turned: list[np.ndarray]) -> None:
        """The cluster's template windows, encodings and memory in one orientation."""
        from sam2pal.inference.engine import (
            binary_mask_input,
            conditioning_frame,
            encode_image,
            expand_features,
            new_memory,
            template_slots,
        )

        engine = self.engine
        model = engine.model
        windows, boxes, references, backbones, truths, cond = [], [], [], [], [], {}
        num_frames = len(cluster.templates) + 1
        for frame_idx, t in enumerate(cluster.templates):
            tmpl = view[t]
            window = union_crop([self.window(tmpl.masks[k]) for k in cluster.framed_by])
            masks = crop_masks(np.stack([tmpl.masks[k] for k in cluster.objects]), window)
            backbone = encode_image(model, crop_image(turned[t], window, engine.framing_fill))
            cond[frame_idx] = conditioning_frame(
                engine.model_of(cluster),
                expand_features(model, backbone, len(cluster.objects)),
                frame_idx,
                num_frames,
                binary_mask_input(masks, engine.image_size, engine.device),
                engine.fill_hole_area,
            )
            windows.append(window)
            boxes.append(_union_box([mask_bbox(tmpl.masks[k]) for k in cluster.framed_by]))
            references.append(_union_box([mask_bbox(m) for m in tmpl.masks.values()]))
            backbones.append(backbone)
            truths.append([BoxMask.from_full(m) for m in masks])
        cluster.windows.append(windows)
        cluster.boxes.append(boxes)
        cluster.references.append(references)
        cluster.backbones.append(backbones)
        cluster.truths.append(truths)
        cluster.memories.append(new_memory(cond))
        if engine.mask_choice == "templates" and len(cluster.memories) == 1:
            # chosen on the first orientation's windows; it holds for every orientation
            cluster.slots = template_slots(
                engine.model_of(cluster),
                cluster.memories[0],
                list(zip(backbones, truths)),
                num_frames,
                engine.mask_threshold,
            )

    # -- per target ------------------------------------------------------------------

    def _target_window(self, cluster: _Cluster, c: int, boxes: dict, size) -> tuple:
        """(window on the target, placed from the reference) or (None, False)."""
        template_box, template_window = cluster.boxes[c][0], cluster.windows[c][0]
        found = _union_box([boxes.get(k) for k in cluster.framed_by])
        placed = False
        if found is None:
            reference = _union_box(list(boxes.values()))
            template_reference = cluster.references[c][0]
            if reference is None or template_reference is None:
                return None, False
            found = placed_from_reference(template_box, template_reference, reference)
            placed = True
        if found[2] <= 0 or found[3] <= 0:
            return None, False
        return same_framing(template_box, template_window, found, size), placed

    def target_windows(self, boxes: dict, size, candidate: int = 0) -> list[tuple]:
        """The zoom windows of one target.

        Args:
            boxes: per structure, the box (x, y, w, h) of its whole-photo prediction
                (`PendingPrediction.first_boxes`).
            size: the photo's (height, width).
            candidate: the orientation candidate chosen for the target.

        Returns:
            [(cluster index, window, placed from the reference)] for the clusters that
            get a window.
        """
        found = []
        for k, cluster in enumerate(self.clusters):
            window, placed = self._target_window(cluster, candidate, boxes, size)
            if window is not None:
                found.append((k, window, placed))
        return found

    @staticmethod
    def cut(image: np.ndarray, window: Crop) -> np.ndarray:
        """The window's pixels from the photo (or from a reduced copy of it, scaled)."""
        import cv2

        height, width = window.height, window.width
        if image.shape[:2] == (height, width):
            return crop_image(image, window)
        # a reduced copy: cut the window on its grid, then scale it to the window's side
        sy, sx = image.shape[0] / height, image.shape[1] / width
        small = Crop(
            int(round(window.top * sy)),
            int(round(window.left * sx)),
            max(1, int(round(window.side * max(sy, sx)))),
            image.shape[0],
            image.shape[1],
        )
        return cv2.resize(
            crop_image(image, small), (window.side, window.side), interpolation=cv2.INTER_LINEAR
        )

    @torch.inference_mode()
    def run(self, pending: list, images: list, chosen) -> None:
        """Zoom each target's small structures: hands each result (mask on the photo,
        predicted IoU, object probability, cycle IoU, placed, stability) to the
        target's PendingPrediction (`zoomed`)."""
        from sam2pal.inference.engine import (
            cycle_ious,
            repeat_memory,
            stability_scores,
            stacked_features,
            track_frame,
        )

        if not self.clusters:
            return
        engine = self.engine
        model = engine.model
        jobs: dict[tuple[int, int], list] = {}  # (cluster, candidate) -> [(target, window, placed)]
        for j, item in enumerate(pending):
            c = int(chosen[j])
            for k, window, placed in self.target_windows(item.first_boxes(), item.size, c):
                jobs.setdefault((k, c), []).append((j, window, placed))
        for (k, c), items in jobs.items():
            cluster = self.clusters[k]
            objects = len(cluster.objects)
            # the windows of the bucket through the image encoder in one call
            backbones = engine._encode_targets(
                [self.cut(images[j], window) for j, window, _ in items],
                [make_frame(window.side, window.side, engine.image_size) for _, window, _ in items],
            )
            feats = stacked_features(model, backbones, objects)
            num_frames = len(cluster.templates) + 1
            memory = repeat_memory(cluster.memories[c], len(items))
            tracker = engine.model_of(cluster)
            low_res, ious, obj_logits = track_frame(
                tracker,
                feats,
                num_frames - 1,
                num_frames,
                memory,
                engine.fill_hole_area,
                cluster.slots,
                engine.keep_absent,
            )
            cycle = None
            if engine.cycle_consistency:
                references = list(zip(cluster.backbones[c], cluster.truths[c]))
                cycle = cycle_ious(
                    tracker,
                    feats,
                    low_res,
                    references,
                    engine.fill_hole_area,
                    engine.mask_threshold,
                    repeat=len(items),
                    slots=cluster.slots,
                    keep_absent=engine.keep_absent,
                )
            probs = torch.sigmoid(obj_logits).cpu().tolist()
            ious = ious.cpu().tolist()
            low_res = low_res.float().cpu()
            stability = stability_scores(low_res, engine.mask_threshold)
            for n, (j, window, placed) in enumerate(items):
                for i, key in enumerate(cluster.objects):
                    b = n * objects + i
                    box = paste_logits(
                        low_res[b, 0], window, engine.image_size, engine.mask_threshold
                    )
                    pending[j].zoomed[key] = (
                        box,
                        ious[b],
                        probs[b],
                        None if cycle is None else cycle[b],
                        placed,
                        stability[b],
                    )
