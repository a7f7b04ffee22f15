"""propagate.tone: the dark tones of dark-on-dark photos lifted, the same for every photo
the model sees (templates, targets, video frames, the fine-tuning's photos)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import box_mask, save_jpeg, template_set

from sam2pal.errors import InputError
from sam2pal.inference import tone as tone_module
from sam2pal.inference.engine import Propagator
from sam2pal.inference.temporal import VideoPropagator
from sam2pal.inference.tone import MID_GREY, MIN_GAMMA, Tone, lift, needs_lift, photo_gamma
from sam2pal.io.images import read_image

H, W = 96, 128
SPECIMEN = (40, 30, 88, 66)  # x0, y0, x1, y1


def _photo(rng, ground: int, specimen, shift: int = 0) -> np.ndarray:
    """A grey ground with texture and a coloured specimen (a box with a darker stripe)."""
    image = np.clip(rng.normal(ground, 6, (H, W, 3)), 0, 255).astype(np.uint8)
    x0, y0, x1, y1 = SPECIMEN
    image[y0 + shift : y1 + shift, x0 + shift : x1 + shift] = specimen
    image[y0 + shift : y0 + shift + 8, x0 + shift : x1 + shift] //= 2
    return image


def _mask(shift: int = 0) -> np.ndarray:
    x0, y0, x1, y1 = SPECIMEN
    return box_mask(H, W, x0 + shift, y0 + shift, x1 + shift, y1 + shift)


def test_auto_is_the_default_everywhere():
    import inspect

    from sam2pal.settings import Segmentation

    assert Segmentation.tone == "auto"
    for cls in (Propagator, VideoPropagator):
        assert inspect.signature(cls).parameters["tone"].default == "auto"


def test_the_gamma_brings_a_dark_photo_to_mid_grey_and_leaves_a_light_one():
    rng = np.random.default_rng(0)
    light = _photo(rng, 200, (40, 30, 20))
    assert photo_gamma(light) == 1.0
    assert lift(light, photo_gamma(light)) is light  # not even copied
    dark = _photo(rng, 45, (20, 25, 70))
    gamma = photo_gamma(dark)
    assert MIN_GAMMA < gamma < 1.0
    lifted = lift(dark, gamma)
    median = np.median(tone_module.luminance(lifted))
    assert abs(median - MID_GREY) < 0.03 and gamma == round(gamma, 2)
    # the order of the grey levels is kept: what was darker stays darker
    ramp = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, 2)
    assert (np.diff(lift(ramp, gamma)[0, :, 0].astype(int)) >= 0).all()
    # the strongest lift is MIN_GAMMA, however dark the photo
    black = np.full((H, W, 3), 2, np.uint8)
    assert photo_gamma(black) == MIN_GAMMA
    # a 12 MP photo is measured on a thumbnail, and gives the gamma of a reduced copy
    big = np.kron(dark, np.ones((24, 24, 1), np.uint8))
    assert photo_gamma(big) == photo_gamma(big[::4, ::4]) and abs(photo_gamma(big) - gamma) <= 0.02


def test_the_templates_say_whether_the_specimen_stands_out_light_on_its_ground():
    rng = np.random.default_rng(1)
    assert needs_lift([(_photo(rng, 200, (40, 30, 20)), [_mask()])])  # dark on light
    assert needs_lift([(_photo(rng, 70, (25, 30, 80)), [_mask()])])  # dark on dark
    assert needs_lift(
        [(_photo(rng, 40, (30, 72, 40)), [_mask()])]
    )  # a little lighter: low contrast
    assert not needs_lift([(_photo(rng, 40, (220, 200, 150)), [_mask()])])  # pale on dark
    # a large template is measured on a reduced copy, with the same answer
    for ground, colour, lifts in ((70, (25, 30, 80), True), (40, (220, 200, 150), False)):
        photo, ones = _photo(rng, ground, colour), np.ones((8, 8), np.uint8)
        big = np.kron(photo, ones[..., None])
        assert needs_lift([(big, [np.kron(_mask(), ones).astype(bool)])]) is lifts
    # several templates pool their pixels; none with a structure: no lift
    assert not needs_lift([(_photo(rng, 70, (25, 30, 80)), [np.zeros((H, W), bool)])])
    resolved = Tone.resolve("auto", lambda: [(_photo(rng, 40, (220, 200, 150)), [_mask()])])
    assert resolved == Tone("auto", False)
    assert resolved.apply(_photo(rng, 40, (220, 200, 150))) is not None
    # "none" never reads the templates
    assert Tone.resolve("none", lambda: pytest.fail("read")) == Tone()
    with pytest.raises(ValueError, match="tone must be one of none, auto"):
        Tone.resolve("bright", lambda: [])


def _collection(tmp_path, ground, specimen, n=3):
    rng = np.random.default_rng(2)
    paths, photos = [], []
    for i in range(n):
        path = tmp_path / f"p{i}.jpg"
        photos.append(save_jpeg(path, _photo(rng, ground, specimen, shift=3 * i)))
        paths.append(path)
    templates = template_set([(paths[0], {(1, 1): _mask()})], {1: "body"})
    return templates, paths, photos


def _masks(predictions):
    return [p.mask for p in predictions]


def test_the_engine_tones_templates_and_targets_as_if_the_photos_were_lifted(tiny_model, tmp_path):
    templates, paths, photos = _collection(tmp_path, 60, (22, 28, 80))
    auto = Propagator(tiny_model, templates, tone="auto", cycle_consistency=True)
    assert auto.tone == Tone("auto", True)
    # the same engine without a tone, given the lifted photos
    lifted_reader = Tone("auto", True).reader(read_image)
    by_hand = Propagator(
        tiny_model, templates, read_image=lifted_reader, cycle_consistency=True, tone="none"
    )
    plain = Propagator(tiny_model, templates, cycle_consistency=True, tone="none")
    differs = False
    for photo in photos[1:]:
        ours = auto.predict(photo)
        theirs = by_hand.predict(Tone("auto", True).apply(photo))
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.predicted_iou == b.predicted_iou and a.cycle_iou == b.cycle_iou
        differs |= any(
            a.predicted_iou != b.predicted_iou for a, b in zip(ours, plain.predict(photo))
        )
    assert differs  # the lift changes what the model sees
    # given backbones, the caller tones: a mode to resolve is refused
    with pytest.raises(ValueError, match="resolved tone"):
        Propagator(tiny_model, templates, backbones=[{}], tone="auto")
    with pytest.raises(InputError, match="tone must be one of"):
        Propagator(tiny_model, templates, tone="bright")


def test_light_grounds_and_light_specimens_keep_their_pixels(tiny_model, tmp_path):
    for ground, specimen, lifts in ((200, (40, 30, 20), True), (40, (220, 200, 150), False)):
        folder = tmp_path / str(ground)
        templates, _, photos = _collection(folder, ground, specimen)
        auto = Propagator(tiny_model, templates, tone="auto", cycle_consistency=False)
        assert auto.tone.lifts is lifts  # dark on light would lift, but the photo is light
        plain = Propagator(tiny_model, templates, cycle_consistency=False, tone="none")
        for a, b in zip(auto.predict(photos[1]), plain.predict(photos[1])):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.predicted_iou == b.predicted_iou


def test_video_frames_are_toned_from_the_keyframes(tiny_model, tmp_path):
    _, _, photos = _collection(tmp_path, 60, (22, 28, 80), n=4)
    keyframes = {0: {(1, 1): _mask()}}
    auto = VideoPropagator(
        tiny_model, keyframes, 4, lambda i: photos[i], fill_hole_area=0, tone="auto"
    )
    assert auto.tone.lifts
    lifted = [Tone("auto", True).apply(p) for p in photos]
    by_hand = VideoPropagator(
        tiny_model, keyframes, 4, lambda i: lifted[i], fill_hole_area=0, tone="none"
    )
    ours = {r.index: r for r in auto.run()}
    theirs = {r.index: r for r in by_hand.run()}
    assert sorted(ours) == [0, 1, 2, 3]
    for index in ours:
        for a, b in zip(ours[index].predictions, theirs[index].predictions):
            np.testing.assert_array_equal(a.mask, b.mask)
    # deciding reads the keyframes, but only the tracking's reads are counted
    assert auto.frames_read == by_hand.frames_read


def test_the_fine_tuning_reads_its_photos_toned(tmp_path):
    from conftest import IMAGE_SIZE

    from sam2pal.models.build import build_model
    from sam2pal.training.palindrome import FinetuneSettings, Trainer

    # the trainer adds LoRA to its model: a model of its own, not the shared one
    model = build_model("sam2.1_hiera_t", "random", image_size=IMAGE_SIZE, device="cpu")

    templates, paths, photos = _collection(tmp_path, 60, (22, 28, 80), n=5)
    pool = {p.name: p for p in paths[1:]}
    settings = FinetuneSettings(num_epochs=1, min_steps=0, holdout_fraction=0, lora_rank=2)
    trainer = Trainer(model, templates, pool, settings, log=lambda *_: None, tone="auto")
    assert trainer.tone == Tone("auto", True)
    np.testing.assert_array_equal(trainer.read_image(paths[2]), Tone("auto", True).apply(photos[2]))
    with pytest.raises(InputError, match="tone must be one of"):
        Trainer(model, templates, pool, settings, log=lambda *_: None, tone="bright")
