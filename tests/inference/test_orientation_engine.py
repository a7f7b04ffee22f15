"""The engine's orientation search (`orientation: rot4 | rot4_mirror`), mirror pairs
(`mirror_swap`) and aspect-true framing (`framing: letterbox`): whichever orientation
wins, the masks and scores are those of the engine run on templates turned that way by
hand (so they come back on the target's own pixel grid exactly); a target that is the
template turned is found turned; paired structures swap names on a mirrored match only
when asked; a letterboxed square photo is a stretched one, and a letterboxed photo's
masks land on its own grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blob_image, box_mask, template_set
from PIL import Image

from sam2pal.inference.engine import Propagator
from sam2pal.inference.orientation import Candidate, candidates, transform_image
from sam2pal.io.masks import mask_iou

H, W = 96, 144
CATEGORIES = {1: "body", 2: "left_horn", 3: "right_horn"}
# synthetic beetles in one pose: heads up, leaning 20 degrees (a mirror image is no turn)
ONE_POSE = {
    "palettes": ("dark_brown",),
    "backgrounds": ("paper",),
    "flip_prob": 0.0,
    "heading": True,
    "rotation_range": (110.0, 110.0),
    "scale_range": (0.6, 0.8),
    "clutter_prob": 0.0,
}


def _specimen(rng, height=H, width=W):
    """An asymmetric specimen (its mirror image is none of its turns) and its masks."""
    image = blob_image(
        rng,
        height,
        width,
        [
            (30, 20, 110, 80, (200, 60, 40)),  # body
            (14, 24, 30, 40, (40, 200, 60)),  # left horn, large
            (110, 56, 120, 66, (40, 60, 220)),  # right horn, small, lower
        ],
    )
    masks = {
        (1, 1): box_mask(height, width, 30, 20, 110, 80),
        (2, 1): box_mask(height, width, 14, 24, 30, 40),
        (3, 1): box_mask(height, width, 110, 56, 120, 66),
    }
    return image, masks


def _save(path, image):
    Image.fromarray(image).save(path)  # PNG: the engine reads these very pixels
    return path


def _turned_templates(tmp_path, image, masks, candidate: Candidate):
    """The template set turned (and mirrored) by hand as `candidate` says."""
    path = _save(tmp_path / f"t_{candidate.rotation}_{int(candidate.mirrored)}.png", image)
    turned = transform_image(np.array(Image.open(path)), candidate)
    path = _save(tmp_path / f"turned_{candidate.rotation}_{int(candidate.mirrored)}.png", turned)
    turned_masks = {key: transform_image(mask, candidate) for key, mask in masks.items()}
    return template_set([(path, turned_masks)], CATEGORIES)


@pytest.fixture
def specimen(tmp_path):
    rng = np.random.default_rng(5)
    image, masks = _specimen(rng)
    path = _save(tmp_path / "template.png", image)
    return template_set([(path, masks)], CATEGORIES), image, masks


def test_candidates_of_each_mode():
    assert [(c.rotation, c.mirrored) for c in candidates("none")] == [(0, False)]
    assert len(candidates("rot4")) == 4 and len(candidates("rot4_mirror")) == 8
    with pytest.raises(ValueError, match="orientation"):
        candidates("rot8")


@pytest.mark.parametrize("mode", ["rot4", "rot4_mirror"])
def test_search_gives_the_turned_templates_masks(tmp_path, tiny_model, specimen, mode):
    """Whatever orientation wins, the masks and scores are exactly those of the engine
    on templates turned that way by hand; the record lists every candidate and the
    winner has the best score."""
    templates, image, masks = specimen
    rng = np.random.default_rng(11)
    targets = [blob_image(rng, H, W, [(20, 10, 100, 70, (190, 70, 50))]), image.copy()]
    targets.append(np.ascontiguousarray(np.rot90(image, -1)))  # a 3:2 photo turned to 2:3
    search = Propagator(tiny_model, templates, orientation=mode, batch_size=2)
    found = search.predict_batch(targets)
    for target, preds in zip(targets, found):
        record = preds.orientation
        assert len(record["candidates"]) == len(candidates(mode))
        best = max(record["candidates"], key=lambda c: c["score"])
        assert best["score"] == pytest.approx(
            next(
                c["score"]
                for c in record["candidates"]
                if (c["rotation"], c["mirrored"]) == (record["rotation"], record["mirrored"])
            )
        )
        chosen = Candidate(record["rotation"], record["mirrored"])
        by_hand = Propagator(tiny_model, _turned_templates(tmp_path, image, masks, chosen))
        expected = by_hand.predict(target)
        assert expected.orientation is None
        assert [(p.category_id, p.instance) for p in preds] == [
            (p.category_id, p.instance) for p in expected
        ]
        for p, q in zip(preds, expected):
            assert p.mask.shape == target.shape[:2]
            assert (p.mask != q.mask).sum() <= max(2, 1e-3 * q.mask.sum())
            assert p.predicted_iou == pytest.approx(q.predicted_iou, abs=1e-5)
            assert p.object_score == pytest.approx(q.object_score, abs=1e-5)
            assert p.cycle_iou == pytest.approx(q.cycle_iou, abs=1e-3)


def test_no_search_records_no_orientation(tiny_model, specimen):
    templates, image, _ = specimen
    assert Propagator(tiny_model, templates).predict(image).orientation is None


def test_mirror_swap_names_the_other_side(tmp_path, tiny_model, specimen):
    """On a mirrored match, mirror_swap reports left_horn's mask as right_horn and the
    reverse; without it, or on a match that is not mirrored, the names stay."""
    templates, image, _ = specimen
    mirrored = np.ascontiguousarray(image[:, ::-1])
    kept = Propagator(tiny_model, templates, orientation="rot4_mirror")
    swapped = Propagator(tiny_model, templates, orientation="rot4_mirror", mirror_swap=True)
    assert swapped.mirror == {(2, 1): (3, 1), (3, 1): (2, 1)}
    for target in (mirrored, image):
        plain, named = kept.predict(target), swapped.predict(target)
        assert plain.orientation == named.orientation
        by_key = {(p.category_id, p.instance): p for p in named}
        partner = swapped.mirror if plain.orientation["mirrored"] else {}
        for p in plain:
            q = by_key[partner.get((p.category_id, p.instance), (p.category_id, p.instance))]
            assert np.array_equal(p.mask, q.mask)
            assert p.score == q.score


def test_mirror_pairs_from_the_config(tmp_path, tiny_model):
    rng = np.random.default_rng(2)
    image, masks = _specimen(rng)
    path = _save(tmp_path / "template.png", image)
    categories = {1: "body", 2: "horn_a", 3: "horn_b"}
    templates = template_set([(path, masks)], categories)
    engine = Propagator(
        tiny_model,
        templates,
        orientation="rot4_mirror",
        mirror_swap=True,
        mirror_pairs=[["horn_a", "horn_b"]],
    )
    assert engine.mirror == {(2, 1): (3, 1), (3, 1): (2, 1)}
    with pytest.raises(ValueError, match="horn_c"):
        Propagator(
            tiny_model,
            templates,
            orientation="rot4_mirror",
            mirror_swap=True,
            mirror_pairs=[["horn_a", "horn_c"]],
        )


def test_trained_model_finds_turned_and_mirrored_beetles(tmp_path):
    """With the shipped model, synthetic beetles (in the template's pose, leaning 20
    degrees) turned and mirrored are found in their orientation, and their masks follow
    them: the template photo itself turned, and another beetle."""
    from sam2pal.inference.pipeline import _run_model
    from sam2pal.io.coco import category_masks, load_coco
    from sam2pal.io.images import read_image
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.registry import choose_config
    from sam2pal.synth.quality import held_out_masks
    from sam2pal.synth.specimens import make_collection

    model, _, _ = _run_model(
        choose_config(None, "sam2pal-micro"), "sam2pal-micro", None, 0, "cpu", 2, None, None
    )
    names = held_out_masks()
    make_collection(
        tmp_path / "c", n_images=2, n_templates=1, seed=3, mask_names=names[:2], style=ONE_POSE
    )
    templates = load_coco_templates(tmp_path / "c" / "templates.json", tmp_path / "c" / "images")
    gt = tmp_path / "c" / "ground_truth.json"
    _, truth = category_masks(load_coco(gt), gt)
    engine = Propagator(model, templates, orientation="rot4_mirror", cycle_consistency=False)
    body = next(cid for cid, name in templates.categories.items() if name == "elytra")
    cases = [
        (name, pose)
        for name in sorted(truth)
        for pose in (Candidate(90, False), Candidate(180, True), Candidate(270, True))
    ]
    for name, pose in cases:
        photo = transform_image(read_image(tmp_path / "c" / "images" / name), pose)
        preds = engine.predict(photo)
        assert (preds.orientation["rotation"], preds.orientation["mirrored"]) == (
            pose.rotation,
            pose.mirrored,
        ), name
        mask = next(p.mask for p in preds if p.category_id == body)
        assert mask_iou(mask, transform_image(truth[name]["elytra"], pose)) > 0.5


def test_letterbox_of_a_square_photo_is_the_stretch(tmp_path, tiny_model):
    rng = np.random.default_rng(4)
    image, masks = _specimen(rng, 128, 128)
    path = _save(tmp_path / "square.png", image)
    templates = template_set([(path, masks)], CATEGORIES)
    target = blob_image(rng, 128, 128, [(25, 20, 105, 80, (200, 60, 40))])
    a = Propagator(tiny_model, templates).predict(target)
    b = Propagator(tiny_model, templates, framing="letterbox").predict(target)
    for p, q in zip(a, b):
        assert np.array_equal(p.mask, q.mask)
        assert p.predicted_iou == q.predicted_iou and p.cycle_iou == q.cycle_iou


@pytest.mark.parametrize("fill", ["border", 0, "255,255,255"])
def test_letterbox_masks_land_on_the_photo(tmp_path, tiny_model, specimen, fill):
    """A 3:2 template and a 2:3 target, letterboxed: masks on the target's own grid,
    with their cycle IoU; the model sees another input than stretched."""
    templates, image, _ = specimen
    rng = np.random.default_rng(8)
    target = blob_image(rng, 150, 100, [(20, 30, 80, 120, (200, 60, 40))])
    engine = Propagator(tiny_model, templates, framing="letterbox", framing_fill=fill)
    preds = engine.predict(target)
    assert all(p.mask.shape == (150, 100) for p in preds)
    assert all(p.cycle_iou is not None for p in preds)
    stretched = Propagator(tiny_model, templates).predict(target)
    # the inputs differ, so do the logits
    assert any(p.predicted_iou != q.predicted_iou for p, q in zip(preds, stretched))


def test_bad_settings_are_refused(tiny_model, specimen):
    templates, _, _ = specimen
    with pytest.raises(ValueError, match="framing"):
        Propagator(tiny_model, templates, framing="pad")
    with pytest.raises(ValueError, match="framing_fill"):
        Propagator(tiny_model, templates, framing="letterbox", framing_fill="blue")
    with pytest.raises(ValueError, match="orientation"):
        Propagator(tiny_model, templates, orientation="rot8")
