"""Which of SAM2's candidate masks a structure gets (`mask_choice`) and whether a structure
SAM2 judges absent keeps its mask (`absent`): the decoder's own candidates, the
templates' reading of them, and SAM2's rule left exactly as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, blob_image, box_mask, save_jpeg, template_set

from sam2pal.errors import InputError
from sam2pal.inference.engine import (
    NO_OBJ_SCORE,
    Propagator,
    decoder_outputs,
    template_slots,
    track_frame,
)
from sam2pal.io.masks import mask_iou
from sam2pal.models.build import build_model, set_object_present_bias

H, W = 90, 140


@pytest.fixture
def model():
    """Its own model: some tests turn its object-score head."""
    return build_model("sam2.1_hiera_t", "random", image_size=IMAGE_SIZE, device="cpu")


def _engine(model, tmp_path, **kw):
    rng = np.random.default_rng(3)
    path = tmp_path / "t.jpg"
    save_jpeg(path, blob_image(rng, H, W, [(30, 20, 100, 70, (200, 60, 40))]))
    masks = {(1, 1): box_mask(H, W, 30, 20, 100, 70), (2, 1): box_mask(H, W, 40, 30, 60, 50)}
    target = blob_image(rng, H, W, [(25, 25, 95, 75, (190, 70, 50))])
    engine = Propagator(
        model,
        template_set([(path, masks)], {1: "body", 2: "spot"}),
        cycle_consistency=False,
        tone="none",
        **kw,
    )
    return engine, target, masks


def _track(engine, target, **kw):
    group = engine.groups[0]
    with torch.inference_mode():
        feats = engine._features(engine._encode(target), len(group.objects))
        with decoder_outputs(engine.model) as calls:
            out = track_frame(engine.model, feats, 1, 2, group.memory, **kw)
    return out, calls[-1]


def test_sam2_rule_is_sam2s_own(model, tmp_path):
    """No slots, absent blanked: the same logits through the decoder's candidates as
    through SAM2's own pick (the plain path); SAM2's pick is the candidate of highest
    predicted IoU."""
    engine, target, _ = _engine(model, tmp_path, mask_choice="sam2", absent="blank")
    assert engine.groups[0].slots is None
    (plain, plain_iou, plain_obj), (masks, ious, _, _) = _track(engine, target)
    # slots of -1 take the other path (the decoder's candidates) to the same result
    (picked, picked_iou, picked_obj), _ = _track(
        engine, target, slots=torch.tensor([-1, -1]), keep_absent=False
    )
    torch.testing.assert_close(picked, plain)
    torch.testing.assert_close(picked_iou, plain_iou)
    torch.testing.assert_close(picked_obj, plain_obj)
    best = ious.float().argmax(dim=1)
    assert masks.shape[1] == 3
    torch.testing.assert_close(plain[:, 0], masks.float()[torch.arange(2), best])


def test_slots_take_that_candidate(model, tmp_path):
    engine, target, _ = _engine(model, tmp_path, mask_choice="sam2", absent="blank")
    (low_res, ious_kept, _), (masks, ious, _, _) = _track(
        engine, target, slots=torch.tensor([0, 2])
    )
    torch.testing.assert_close(low_res[0, 0], masks.float()[0, 0])
    torch.testing.assert_close(low_res[1, 0], masks.float()[1, 2])
    torch.testing.assert_close(ious_kept, ious.float()[[0, 1], [0, 2]])


def test_absent_kept_or_blanked(model, tmp_path):
    """An object score under 0 (the head turned to 'absent'): SAM2 blanks the mask,
    `keep_absent` keeps the candidate it would have picked."""
    set_object_present_bias(model, -10.0)
    engine, target, _ = _engine(model, tmp_path, mask_choice="sam2", absent="blank")
    (blank, _, objects), (masks, ious, _, _) = _track(engine, target)
    assert (objects < 0).all()
    assert (blank == NO_OBJ_SCORE).all()
    (kept, _, _), _ = _track(engine, target, keep_absent=True)
    best = ious.float().argmax(dim=1)
    torch.testing.assert_close(kept[:, 0], masks.float()[torch.arange(2), best])
    assert (kept > 0).any()


def test_absent_keep_gives_masks_where_blank_gives_none(model, tmp_path):
    set_object_present_bias(model, -10.0)
    blank, target, _ = _engine(model, tmp_path, mask_choice="sam2", absent="blank")
    keep, _, _ = _engine(model, tmp_path, mask_choice="sam2", absent="keep")
    assert not any(p.mask.any() for p in blank.predict(target))
    kept = keep.predict(target)
    assert any(p.mask.any() for p in kept)
    # the object score is the model's either way
    assert all(p.object_score < 0.5 for p in kept)


def test_template_slots_read_the_templates(model, tmp_path):
    """Each template tracked from the memory as a target: per object the candidate with
    the highest IoU against the template's own mask, kept where it beats SAM2's pick
    by the margin."""
    engine, _, masks = _engine(model, tmp_path, mask_choice="sam2", absent="blank")
    group = engine.groups[0]
    tmpl = engine._templates[0]
    references = [(tmpl.backbone, [tmpl.masks[key] for key in group.objects])]
    with torch.inference_mode():
        feats = engine._features(tmpl.backbone, len(group.objects))
        with decoder_outputs(model) as calls:
            track_frame(model, feats, 1, 2, group.memory)
        always = template_slots(model, group.memory, references, 2, margin=-1.0)
        never = template_slots(model, group.memory, references, 2, margin=1.0)
    candidates, ious = calls[-1][0].float(), calls[-1][1].float()
    up = F.interpolate(candidates, size=(H, W), mode="bilinear", align_corners=False) > 0
    for i, key in enumerate(group.objects):
        fits = [mask_iou(up[i, k].numpy(), masks[key]) for k in range(3)]
        assert int(always[i]) == int(np.argmax(fits))
        gain = max(fits) - fits[int(ious[i].argmax())]
        assert int(never[i]) == -1 and gain <= 1.0
    assert always.dtype == torch.long and always.shape == (len(group.objects),)


def test_engine_keeps_the_templates_choice(model, tmp_path):
    """`mask_choice: templates`: the group's slots come from `template_slots` and the
    targets are tracked with them."""
    engine, target, _ = _engine(model, tmp_path, mask_choice="templates", absent="keep", exact=True)
    group = engine.groups[0]
    tmpl = engine._templates[0]
    with torch.inference_mode():
        expected = template_slots(
            model, group.memory, [(tmpl.backbone, [tmpl.masks[k] for k in group.objects])], 2
        )
    assert torch.equal(group.slots, expected)
    (low_res, _, _), _ = _track(
        engine, target, slots=expected, keep_absent=True, fill_hole_area=engine.fill_hole_area
    )
    ours = engine.predict(target)
    low = F.interpolate(low_res.float(), size=(H, W), mode="bilinear", align_corners=False)
    for i, pred in enumerate(ours):
        assert np.array_equal(pred.mask, (low[i, 0] > 0).numpy())


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mask_choice": "best"}, "mask_choice must be one of templates, sam2, not 'best'"),
        ({"absent": "drop"}, "absent must be one of keep, blank, not 'drop'"),
    ],
)
def test_bad_values_are_one_line_errors(model, tmp_path, kw, message):
    with pytest.raises(InputError) as err:
        _engine(model, tmp_path, **kw)
    assert str(err.value) == message


def test_concurrent_predictions_keep_their_own_masks(model, tmp_path):
    """`run_propagation` calls `predict` from several threads at once for a propagator
    without `start_batch`: each call collects its own decoder outputs."""
    from concurrent.futures import ThreadPoolExecutor

    engine, _, _ = _engine(model, tmp_path, mask_choice="templates", absent="keep")
    rng = np.random.default_rng(11)
    targets = [
        blob_image(rng, H, W, [(10 + 6 * i, 15, 80 + 5 * i, 70, (190, 70, 50))]) for i in range(6)
    ]
    alone = [[p.mask for p in engine.predict(t)] for t in targets]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda t: [p.mask for p in engine.predict(t)], targets * 8))
    for i, masks in enumerate(together):
        for ours, expected in zip(masks, alone[i % len(targets)]):
            assert np.array_equal(ours, expected)
