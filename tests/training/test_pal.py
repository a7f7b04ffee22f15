"""Palindrome fine-tuning: gradients, the memory reset, LoRA leaving the base weights
alone, adapters (save/load, merged checkpoint, base check), seeds, and the loss going
down. Random weights at 64 px (object score biased to "present", see conftest)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from test_engine import EncoderCalls

from sam2pal.errors import InputError
from sam2pal.inference.engine import Propagator
from sam2pal.io.images import list_images, read_image
from sam2pal.io.templates import load_coco_templates
from sam2pal.models.adapters import adapter_kind, load_adapter, read_metadata
from sam2pal.models.build import build_model
from sam2pal.training.palindrome import (
    FinetuneSettings,
    Trainer,
    apart_structures,
    exclusive,
    layout_loss,
    left_untouched,
)

DEMO = REPO / "resources" / "demo"
SIZE = 64
BASE = "random:test"


def fresh_model():
    return build_model("sam2.1_hiera_t", "random", image_size=SIZE)


@pytest.fixture(scope="module")
def templates():
    return load_coco_templates(DEMO / "templates.json", DEMO / "images").select(max_templates=1)


@pytest.fixture(scope="module")
def pool():
    names = list_images(DEMO / "images")[:8]
    return {name: DEMO / "images" / name for name in names}


def make_trainer(templates, pool, model=None, **settings):
    defaults = dict(
        num_epochs=1,
        min_steps=0,
        max_images_per_epoch=4,
        accumulation_steps=2,
        warmup_steps=0,
        holdout_fraction=0.3,
        seed=0,
        template_views=0,  # the views and the anchor term: their own tests
        anchor_weight=0.0,
    )
    model = fresh_model() if model is None else model
    return Trainer(
        model, templates, pool, FinetuneSettings(**{**defaults, **settings}), log=lambda *_: None
    )


def lora_grads(trainer):
    return {
        n: p.grad.clone()
        for n, p in trainer.sam.named_parameters()
        if "lora_" in n and p.grad is not None
    }


def test_gradients_reach_lora_through_the_soft_phase1_mask(templates, pool):
    trainer = make_trainer(templates, pool)
    tmpl, key = trainer.templates[0], trainer.train_keys[0]
    truth = tmpl.mask_input

    def loss_with(mask_fn, seed=1):
        torch.manual_seed(seed)  # same dropout masks in both runs
        trainer.sam.zero_grad(set_to_none=True)
        logits1, _, _, feats1 = trainer.phase1(
            tmpl, trainer._backbone(tmpl.key), trainer._backbone(key)
        )
        logits0, _ = trainer.phase2(
            tmpl, trainer._backbone(tmpl.key), feats1, mask_fn(trainer.soft_mask(logits1))
        )
        high = F.interpolate(logits0, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(high, truth)
        (to_phase1,) = torch.autograd.grad(loss, logits1, retain_graph=True, allow_unused=True)
        loss.backward()
        return (torch.zeros_like(logits1) if to_phase1 is None else to_phase1), lora_grads(trainer)

    soft_g, soft_lora = loss_with(lambda m: m)
    detached_g, detached_lora = loss_with(lambda m: m.detach())
    zero_g, zero_lora = loss_with(lambda m: m * 0)
    assert soft_g.abs().sum() > 0  # the loss on the template reaches the phase-1 prediction
    assert zero_g.abs().sum() == 0  # ... only through the soft mask
    assert any(g.abs().sum() > 0 for n, g in soft_lora.items() if "lora_B" in n)
    # the phase-1 path adds to the LoRA gradients; with the mask zeroed it adds nothing
    assert any(not torch.equal(soft_lora[n], detached_lora[n]) for n in soft_lora)
    zero_detached_g, zero_detached_lora = loss_with(lambda m: m.detach() * 0)
    assert all(torch.allclose(zero_lora[n], zero_detached_lora[n]) for n in zero_lora)


def test_binary_cycle_mask_is_cut_at_a_half_with_the_soft_gradient(templates, pool):
    """binary_cycle_mask: the return half remembers 0/1 masks (the prediction at 0.5),
    while the gradient reaching the phase-1 logits is the soft mask's."""
    soft_trainer = make_trainer(templates, pool)
    binary_trainer = make_trainer(templates, pool, binary_cycle_mask=True)
    logits = torch.randn(2, 1, SIZE // 4, SIZE // 4) * 3
    weights = torch.rand(2, 1, SIZE, SIZE)
    grads, masks = [], []
    for trainer in (soft_trainer, binary_trainer):
        x = logits.clone().requires_grad_(True)
        mask = trainer.soft_mask(x)
        (mask * weights).sum().backward()
        grads.append(x.grad)
        masks.append(mask.detach())
    soft, binary = masks
    assert set(torch.unique(binary).tolist()) == {0.0, 1.0}
    assert torch.equal(binary, (soft > 0.5).float())
    assert torch.allclose(grads[0], grads[1])
    assert grads[1].abs().sum() > 0


def test_stay_term_holds_the_photo_to_the_untouched_model(templates, pool):
    """stay_weight: the reference is the model with the adapter off (a fresh adapter's
    own phase-1 logits), kept per (template, photo); once the adapter has moved, the
    term's gradient reaches the LoRA weights while the reference stays put."""
    trainer = make_trainer(templates, pool, stay_weight=1.0)
    tmpl, key = trainer.templates[0], trainer.train_keys[0]

    def phase1():
        return trainer.phase1(tmpl, trainer._backbone(tmpl.key), trainer._backbone(key))[0]

    start = phase1()
    trainer.stay_loss(tmpl, key, start)
    kept = trainer._untouched_logits[(tmpl.key, key)]
    assert torch.allclose(kept, start.detach(), atol=1e-5)
    with torch.no_grad():
        for name, p in trainer.sam.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    trainer.sam.zero_grad(set_to_none=True)
    moved = phase1()
    assert not torch.allclose(moved, start)
    trainer.stay_loss(tmpl, key, moved).backward()
    assert any(g.abs().sum() > 0 for n, g in lora_grads(trainer).items() if "lora_B" in n)
    assert trainer._untouched_logits[(tmpl.key, key)] is kept
    with torch.no_grad(), trainer.peft_model.disable_adapter():
        assert torch.allclose(phase1(), kept, atol=1e-5)
    with pytest.raises(InputError, match="stay_weight needs mode lora"):
        FinetuneSettings(mode="full", stay_weight=1.0)


def test_layout_loss_sees_merged_swollen_and_vanished_structures():
    """layout_loss: nothing for a prediction laid out as the template (at another
    scale); more when two structures apart on the template merge into one blob, when
    one swells, or when one vanishes; and its gradient reaches the logits."""
    masks = torch.zeros(3, 1, 256, 256)
    masks[0, 0, 32:96, 32:96] = 1  # apart from the next
    masks[1, 0, 160:192, 160:240] = 1
    masks[2, 0, 16:240, 16:240] = 1  # the whole: overlaps both, never apart

    def logits_of(m):  # sharp logits at a quarter of the size, as phase 1's
        return (F.avg_pool2d(m, 4) * 2 - 1) * 30

    half = F.interpolate(masks, scale_factor=0.5)  # the same layout, smaller
    laid_out = layout_loss(logits_of(F.pad(half, (0, 128, 0, 128))), masks)
    assert laid_out.item() < 0.05
    merged = masks.clone()
    merged[0] = merged[1] = torch.maximum(masks[0], masks[1])
    swollen = masks.clone()
    swollen[1, 0, 120:240, 120:248] = 1
    vanished = masks.clone()
    vanished[1] = 0
    for other in (merged, swollen, vanished):
        assert layout_loss(logits_of(other), masks).item() > laid_out.item() + 0.3
    x = logits_of(merged).requires_grad_(True)
    layout_loss(x, masks).backward()
    assert x.grad.abs().sum() > 0
    # one structure on the template: no layout to keep
    assert layout_loss(logits_of(masks[:1]), masks[:1]).item() == 0.0


def test_exclusive_cycle_mask_splits_what_structures_apart_on_the_template_share(templates, pool):
    """exclusive: where two structures apart on the template overlap, the likelier
    keeps the pixel and the other is zeroed there; a structure containing both (not
    apart from either) keeps all of its own; the gradient reaches the kept values. In
    the trainer, the return half remembers the split masks."""
    masks = torch.zeros(3, 1, 8, 8)
    masks[0, 0, :4] = 1
    masks[1, 0, 4:] = 1
    masks[2] = 1  # the whole: overlaps both
    apart = apart_structures(masks)
    assert apart.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    prob = torch.full((3, 1, 8, 8), 0.2)
    prob[0, 0, :6] = 0.9  # swollen over the other's top rows
    prob[1, 0, 4:] = 0.7
    prob[2] = 0.6
    prob.requires_grad_(True)
    out = exclusive(prob, apart)
    assert torch.equal(out[0, 0, 4:6], torch.full((2, 8), 0.9))  # wins the shared rows
    assert torch.equal(out[1, 0, 4:6], torch.zeros(2, 8))  # loses them
    assert torch.equal(out[1, 0, 6:], torch.full((2, 8), 0.7))
    assert torch.equal(out[0, 0, 6:], torch.zeros(2, 8))
    assert torch.equal(out[2], prob[2])
    out.sum().backward()
    assert prob.grad[0, 0, 5, 0] == 1 and prob.grad[1, 0, 5, 0] == 0
    trainer = make_trainer(templates, pool, exclusive_cycle_mask=True)
    tmpl, key = trainer.templates[0], trainer.train_keys[0]
    logits = trainer.phase1(tmpl, trainer._backbone(tmpl.key), trainer._backbone(key))[0]
    split = trainer.soft_mask(logits, tmpl)
    whole = trainer.soft_mask(logits)
    assert apart_structures(tmpl.mask_input).any()  # head, pronotum, elytra... are apart
    assert torch.equal(split, exclusive(whole, apart_structures(tmpl.mask_input)))
    assert not torch.equal(split, whole)


def test_phase2_sees_only_the_target_and_its_soft_mask(templates, pool):
    """The memory reset. Within a training step, phase 2 sees the target and its soft
    phase-1 mask and nothing else of phase 1: changing what phase 1 remembered of the
    template (its memory features and object pointer) after phase 1 ran leaves the
    step's loss unchanged, while changing the soft mask changes it; and phase 2's
    memory attention attends to as many memory tokens (one conditioning frame) as
    phase 1's."""
    trainer = make_trainer(templates, pool)
    tmpl, key = trainer.templates[0], trainer.train_keys[0]
    phase1 = trainer.phase1
    tokens = []  # memory tokens per memory-attention call (memory is sequence-first)
    hook = trainer.sam.memory_attention.register_forward_pre_hook(
        lambda _module, _args, kwargs: tokens.append(kwargs["memory"].shape[0]), with_kwargs=True
    )

    def step(change_memory=False, change_mask=False):
        def phase1_then_change(*args):
            logits, object_logits, memory, feats = phase1(*args)
            if change_memory:
                for frame in memory["cond_frame_outputs"].values():
                    frame["maskmem_features"] = frame["maskmem_features"] + 100.0
                    frame["obj_ptr"] = frame["obj_ptr"] + 100.0
            if change_mask:
                logits = -logits
            return logits, object_logits, memory, feats

        trainer.phase1 = phase1_then_change
        tokens.clear()
        torch.manual_seed(3)
        with torch.no_grad():
            loss, _ = trainer.palindrome_loss(tmpl, key)
        return loss, list(tokens)

    try:
        loss, calls = step()
        changed_memory, _ = step(change_memory=True)
        changed_mask, _ = step(change_mask=True)
    finally:
        hook.remove()
        del trainer.phase1
    assert len(calls) == 2 and calls[1] == calls[0]  # phase 1, phase 2: one frame each
    assert torch.equal(changed_memory, loss)
    assert not torch.equal(changed_mask, loss)  # phase 2 does depend on the soft mask


def test_lora_training_leaves_base_weights_untouched(templates, pool, tmp_path):
    trainer = make_trainer(templates, pool, learning_rate=1e-2)
    base = {n: p.detach().clone() for n, p in trainer.sam.named_parameters() if "lora_" not in n}
    lora_before = {
        n: p.detach().clone() for n, p in trainer.sam.named_parameters() if "lora_B" in n
    }
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    after = dict(trainer.sam.named_parameters())
    assert all(torch.equal(after[n], base[n]) for n in base)
    assert any(not torch.equal(after[n], lora_before[n]) for n in lora_before)


def test_adapter_round_trip_and_merged_checkpoint(templates, pool, tmp_path):
    trainer = make_trainer(templates, pool, learning_rate=1e-2, num_epochs=2, merge_checkpoint=True)
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    last = tmp_path / "ft" / "adapter_last"
    assert adapter_kind(last) == "lora" and read_metadata(last)["epoch"] == 2
    assert (tmp_path / "ft" / "adapter").is_dir() and (
        tmp_path / "ft" / "training_curves.png"
    ).is_file()
    image = read_image(DEMO / "images" / "specimen_009.jpg")

    trainer.sam.eval()
    trained = Propagator(trainer.sam, templates).predict(image)
    loaded = Propagator(load_adapter(fresh_model(), last, BASE, merge=False), templates).predict(
        image
    )
    for a, b in zip(trained, loaded):
        assert (
            np.array_equal(a.mask, b.mask)
            and a.predicted_iou == b.predicted_iou
            and a.cycle_iou == b.cycle_iou
        )

    from sam2.build_sam import build_sam2

    official = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        str(tmp_path / "ft" / "merged.pt"),
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={SIZE}"],
    )
    merged = Propagator(official, templates).predict(image)
    for a, b in zip(trained, merged):
        assert (a.mask != b.mask).mean() < 0.001
        assert abs(a.predicted_iou - b.predicted_iou) < 1e-3


def test_adapter_on_other_base_weights_fails(templates, pool, tmp_path):
    trainer = make_trainer(templates, pool)
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    with pytest.raises(
        InputError, match="adapter was trained on random weights .* this run uses checkpoint sha256"
    ):
        load_adapter(fresh_model(), tmp_path / "ft" / "adapter", "0123456789abcdef" * 4)


def test_same_seed_same_adapter_on_cpu(templates, pool, tmp_path):
    for run in ("a", "b"):
        make_trainer(templates, pool, learning_rate=1e-2).train(tmp_path / run, {"base_id": BASE})
    make_trainer(templates, pool, learning_rate=1e-2, seed=7).train(
        tmp_path / "c", {"base_id": BASE}
    )
    weights = {
        run: (tmp_path / run / "adapter_last" / "adapter_model.safetensors").read_bytes()
        for run in "abc"
    }
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


def test_short_training_lowers_the_palindrome_loss(templates, pool, tmp_path):
    trainer = make_trainer(
        templates,
        pool,
        learning_rate=2e-3,
        num_epochs=6,
        max_images_per_epoch=5,
        accumulation_steps=1,
        holdout_fraction=0,
    )

    def fixed_loss():
        torch.manual_seed(11)
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        trainer.palindrome_loss(t, k)[0].item()
                        for t in trainer.templates
                        for k in trainer.train_keys
                    ]
                )
            )

    before = fixed_loss()
    result = trainer.train(tmp_path / "ft", {"base_id": BASE})
    after = fixed_loss()
    assert after < before - 0.01, (before, after)
    losses = [row["train_loss"] for row in result["history"][1:]]
    assert losses[-1] < losses[0]


def test_each_image_is_encoded_once_in_training_and_validation(templates, pool, tmp_path):
    """Image-encoder passes counted at the encoder (a forward hook), from the trainer's
    set-up to the end of training, the validations (before training and after every
    epoch) included. With the frozen encoder's features cached, each template,
    training and held-out photo is encoded exactly once; without the cache, each step
    encodes its template and its target (and the stay term both again, once per pair),
    and each validation the templates and the held-out photos. Both give the same
    validation numbers."""
    counts, trainers = {}, {}
    for cached in (True, False):
        model = fresh_model()
        calls = EncoderCalls(model)
        try:
            trainer = make_trainer(
                templates, pool, model=model, num_epochs=3 if cached else 1, cache_features=cached
            )
            trainer.train(tmp_path / str(cached), {"base_id": BASE})
        finally:
            calls.close()
        counts[cached], trainers[cached] = calls.count, trainer
    n_templates, n_holdout = len(trainers[True].templates), len(trainers[True].holdout)
    assert n_templates == 1 and n_holdout == 2
    assert counts[True] == n_templates + len(trainers[True].train_keys) + n_holdout
    steps = min(len(trainers[False].train_keys), 4)  # one epoch of max_images_per_epoch=4
    validations = 2  # before training and after the epoch
    # the stay term (on by default with one template) encodes its template and photo
    # once more for the untouched model's reference, once per pair (then kept)
    references = len(trainers[False]._untouched_logits)
    assert trainers[False].settings.stay_weight == 1.0 and references == steps
    assert counts[False] == 2 * steps + validations * (n_templates + n_holdout) + 2 * references
    assert trainers[True].history[0]["val_cycle_iou"] == trainers[False].history[0]["val_cycle_iou"]


def test_full_fine_tuning_writes_a_checkpoint(templates, pool, tmp_path):
    trainer = make_trainer(
        templates, pool, mode="full", targets=["sam_mask_decoder"], learning_rate=1e-3
    )
    frozen = {
        n: p.detach().clone()
        for n, p in trainer.sam.named_parameters()
        if not n.startswith("sam_mask_decoder")
    }
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    assert adapter_kind(tmp_path / "ft" / "adapter_last") == "full"
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.sam.named_parameters() if n in frozen)
    model = load_adapter(fresh_model(), tmp_path / "ft" / "adapter_last", BASE)
    for n, p in trainer.sam.named_parameters():
        assert torch.equal(p, model.state_dict()[n])


def test_bad_settings():
    with pytest.raises(InputError, match="mode must be lora or full"):
        FinetuneSettings(mode="half")
    with pytest.raises(InputError, match="unknown targets"):
        FinetuneSettings(targets=["memory_attention", "legs"])
    with pytest.raises(InputError, match="unknown finetune setting"):
        FinetuneSettings.from_dict({"epochs": 3})
    assert FinetuneSettings().lr == 1e-3 and FinetuneSettings(mode="full").lr == 5e-6


def test_training_pool_is_a_bounded_seeded_sample(templates, pool):
    a = make_trainer(templates, pool, max_pool_images=3, holdout_fraction=0.2)
    b = make_trainer(templates, pool, max_pool_images=3, holdout_fraction=0.2)
    assert len(a.train_keys) == 3 and len(a.holdout) == 1
    assert a.train_keys == b.train_keys and a.holdout == b.holdout
    assert not set(a.train_keys) & set(a.holdout)
    assert "specimen_000.jpg" not in a.train_keys + a.holdout  # the template photo
    assert len(a.cache.store) == 3 + 1 + 1  # training, held-out and template images only


def test_gradient_checkpointing_gives_the_same_gradients(templates, pool):
    grads = {}
    for flag in (False, True):
        trainer = make_trainer(templates, pool, gradient_checkpointing=flag, attention_dropout=0.1)
        torch.manual_seed(5)
        loss, _ = trainer.palindrome_loss(trainer.templates[0], trainer.train_keys[0])
        loss.backward()
        grads[flag] = lora_grads(trainer)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def _demo_truth(names):
    from sam2pal.io.coco import category_masks, load_coco

    _, masks = category_masks(load_coco(DEMO / "ground_truth.json"), DEMO / "ground_truth.json")
    return {n: masks[n] for n in names if n in masks}


def test_min_steps_repeats_epochs_on_a_small_collection(templates, pool, tmp_path):
    trainer = make_trainer(templates, pool, num_epochs=1, min_steps=5, lora_rank=2)
    per_epoch = -(-min(len(trainer.train_keys), 4) // 2)  # 4 images an epoch, 2 per optimizer step
    result = trainer.train(tmp_path / "ft", {"base_id": BASE})
    assert trainer.num_epochs == -(-5 // per_epoch) > 1
    assert result["history"][-1]["optimizer_steps"] >= 5
    assert len(result["history"]) == trainer.num_epochs + 1


def test_training_targets_iou_is_logged_beside_the_loss(templates, pool, tmp_path):
    truth = _demo_truth(pool)
    trainer = Trainer(
        fresh_model(),
        templates,
        pool,
        FinetuneSettings(
            num_epochs=1,
            min_steps=0,
            max_images_per_epoch=3,
            accumulation_steps=1,
            warmup_steps=0,
            holdout_fraction=0.3,
            lora_rank=2,
        ),
        ground_truth=truth,
        log=lambda *_: None,
        select_by="cycle_iou",
    )
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    rows = (tmp_path / "ft" / "training_steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,target_iou" and len(rows) == 4
    ious = [float(r.split(",")[2]) for r in rows[1:]]
    assert all(0.0 <= v <= 1.0 for v in ious)
    # the truth is logged but does not pick the epoch
    assert trainer.labels_record()["selection"]["by"] == "cycle_iou"
    assert trainer.score({"val_iou": 0.9, "val_cycle_iou": 0.2}) == 0.2


def test_supervised_objective_needs_truth_and_learns_the_targets(templates, pool, tmp_path):
    with pytest.raises(InputError, match="supervised training needs ground truth"):
        Trainer(
            fresh_model(),
            templates,
            pool,
            FinetuneSettings(),
            log=lambda *_: None,
            objective="supervised",
        )
    with pytest.raises(InputError, match="objective must be one of"):
        Trainer(fresh_model(), templates, pool, FinetuneSettings(), objective="oracle")
    truth = _demo_truth(pool)
    trainer = Trainer(
        fresh_model(),
        templates,
        pool,
        FinetuneSettings(
            accumulation_steps=1,
            warmup_steps=0,
            holdout_fraction=0,
            lora_rank=4,
            learning_rate=3e-3,
        ),
        ground_truth=truth,
        log=lambda *_: None,
        objective="supervised",
    )
    tmpl, key = trainer.templates[0], trainer.train_keys[0]
    optimizer = torch.optim.AdamW(trainer.params, lr=3e-3)
    trainer.sam.train()
    torch.manual_seed(0)
    first = None
    for _ in range(12):
        loss, parts = trainer.supervised_loss(tmpl, key)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first  # the loss on the target's own masks falls


def test_letterbox_framing_in_training(templates, pool, tmp_path):
    """framing: letterbox in fine-tuning: the templates' masks and the cached image
    features are framed as the engine frames them (aspect kept, padded), and training
    and validation run on them."""
    from sam2pal.inference.engine import binary_mask_input, encode_image
    from sam2pal.inference.framing import make_frame

    model = fresh_model()
    settings = FinetuneSettings(
        num_epochs=1,
        min_steps=0,
        max_images_per_epoch=2,
        accumulation_steps=1,
        warmup_steps=0,
        holdout_fraction=0.3,
    )
    trainer = Trainer(
        model, templates, pool, settings, log=lambda *_: None, framing="letterbox", framing_fill=0
    )
    tmpl = templates.images[0]
    frame = make_frame(tmpl.height, tmpl.width, SIZE, "letterbox")
    assert not frame.stretched  # the demo photos are 4:3
    masks = np.stack([i.mask for i in tmpl.instances])
    assert torch.equal(
        trainer.templates[0].mask_input, binary_mask_input(masks, SIZE, "cpu", frame)
    )
    key = trainer.templates[0].key
    with torch.no_grad():
        expected = encode_image(trainer.sam, read_image(tmpl.path), frame, (0, 0, 0))
    for cached, fresh in zip(trainer.cache.store[key], expected["backbone_fpn"]):
        assert torch.allclose(cached, fresh, atol=1e-5)
    result = trainer.train(tmp_path, {"base_id": BASE})
    assert result["best_epoch"] is not None
    assert all(h["val_cycle_iou"] is not None for h in trainer.history)
    with pytest.raises(InputError, match="framing"):
        Trainer(fresh_model(), templates, pool, settings, framing="pad")


def test_zoom_crops_in_training(templates, pool, tmp_path):
    """With the zoom pass on, the training cuts the zoom pass's windows as the
    segmentation cuts them (templates around their small structures, training photos
    framed from their whole-photo prediction), trains a cycle on each, cuts the ground
    truth alike, and scores the held-out photos with the zoom pass."""
    from sam2pal.inference.engine import encode_image
    from sam2pal.inference.framing import make_frame
    from sam2pal.inference.zoom import crop_image, crop_masks

    truth = _demo_truth(pool)
    settings = FinetuneSettings(
        num_epochs=1,
        min_steps=0,
        max_images_per_epoch=3,
        accumulation_steps=2,
        warmup_steps=0,
        holdout_fraction=0.3,
        lora_rank=2,
    )
    zoom = {"zoom": "auto", "zoom_below": 0.3, "zoom_margin": 0.5}
    trainer = Trainer(
        fresh_model(),
        templates,
        pool,
        settings,
        ground_truth=truth,
        log=lambda *_: None,
        select_by="cycle_iou",
        **zoom,
    )
    engine = Propagator(trainer.sam, templates, **zoom)
    clusters = engine.zoom_pass.clusters
    assert clusters and set(trainer.crop_templates) == set(range(len(clusters)))
    tmpl = templates.images[0]
    for k, cluster in enumerate(clusters):
        crop = trainer.crop_templates[k][0]
        assert crop.objects == list(cluster.objects)
        window = cluster.windows[0][0]
        by_key = {(i.category_id, i.instance): i.mask for i in tmpl.instances}
        masks = crop_masks(np.stack([by_key[o] for o in cluster.objects]), window)
        assert torch.equal(crop.mask_input, trainer._mask_input(masks))
    # every training photo's windows: those the segmentation's zoom pass cuts
    assert set(trainer.crop_targets) == set(trainer.train_keys)
    key = trainer.train_keys[0]
    image = read_image(pool[key])
    pending = engine.start_batch([image], zoom=False)[0]
    windows = engine.zoom_pass.target_windows(pending.first_boxes(), pending.size)
    assert [(k, f"{key}#zoom{k}") for k, _, _ in windows] == trainer.crop_targets[key]
    k, window, _ = windows[0]
    crop_key = f"{key}#zoom{k}"
    cut = engine.zoom_pass.cut(image, window)
    assert np.array_equal(cut, crop_image(image, window))
    with torch.no_grad():
        expected = encode_image(trainer.sam, cut, make_frame(*cut.shape[:2], SIZE))
    for cached, fresh in zip(trainer.cache.store[crop_key], expected["backbone_fpn"]):
        assert torch.allclose(cached, fresh, atol=1e-5)
    for name, mask in trainer.ground_truth[crop_key].items():
        assert np.array_equal(mask, crop_masks(truth[key][name][None], window)[0])
    # a cycle per photo and per window of it, each with the target IoU logged
    trainer.train(tmp_path / "ft", {"base_id": BASE})
    steps = (tmp_path / "ft" / "training_steps.csv").read_text().splitlines()[1:]
    windows_per_photo = len(clusters)
    assert len(steps) == 3 * (1 + windows_per_photo)
    assert all(row.split(",")[2] != "" for row in steps)
    assert all(h["val_cycle_iou"] is not None for h in trainer.history)
    # zoom_crops false: no windows, the held-out photos still scored with the zoom pass
    off = Trainer(
        fresh_model(),
        templates,
        pool,
        dataclasses.replace(settings, zoom_crops=False),
        log=lambda *_: None,
        **zoom,
    )
    assert not off.crop_templates and not off.crop_targets and off.zoom["zoom"] == "auto"


def test_zoom_best_trains_on_the_windows_of_on(templates, pool):
    """`zoom: best` zooms every structure as `on` does (it chooses between the passes
    after): the training cuts the same windows, and scores its held-out photos with
    `best`."""
    settings = FinetuneSettings(
        num_epochs=1, min_steps=0, max_images_per_epoch=3, holdout_fraction=0.3, lora_rank=2
    )
    made = {
        mode: Trainer(
            fresh_model(), templates, pool, settings, log=lambda *_: None, zoom=mode, zoom_below=0.3
        )
        for mode in ("on", "best")
    }
    on, best = made["on"], made["best"]
    assert best.zoom["zoom"] == "best" and best.crop_targets
    assert best.crop_targets == on.crop_targets
    for k, crops in on.crop_templates.items():
        for a, b in zip(crops, best.crop_templates[k], strict=True):
            assert a.objects == b.objects and torch.equal(a.mask_input, b.mask_input)


def test_second_template_is_held_out_and_picks_the_epoch(pool, tmp_path):
    """With two templates, the last in file-name order is kept out of the training: its
    photo is neither a training template nor a pool image, its true masks segmented
    from the other template are scored every epoch, and that score picks the epoch
    (recorded as such); `holdout_template: false` trains on both."""
    both = load_coco_templates(DEMO / "templates.json", DEMO / "images")
    names = sorted(t.file_name for t in both.images)
    assert len(names) == 2
    trainer = make_trainer(both, pool, num_epochs=2, holdout_fraction=0.2)
    assert [t.key for t in trainer.templates] == [f"template:{names[0]}"]
    assert [t.file_name for t in trainer.validation_templates] == [names[1]]
    assert not set(names) & set(trainer.train_keys + trainer.holdout)
    result = trainer.train(tmp_path / "ft", {"base_id": BASE})
    scores = [h["val_template_iou"] for h in trainer.history]
    assert all(0.0 <= s <= 1.0 for s in scores) and len(scores) == 3
    assert all(h["val_cycle_iou"] is not None for h in trainer.history)  # still logged
    # per structure, the adapter or, where the held-out template says it is surely
    # worse, the untouched model (epoch 0) is what the segmentation uses: that picks
    # the epoch, and the structures left to the untouched model are recorded
    per_name = [h["val_template_ious"] for h in trainer.history]
    assert all(np.mean(list(p.values())) == pytest.approx(s) for p, s in zip(per_name, scores))
    assert all(
        len(v) == 1 + Trainer.VALIDATION_VIEWS and np.mean(v) == pytest.approx(per_name[e][n])
        for e, h in enumerate(trainer.history)
        for n, v in h["val_template_view_ious"].items()
    )
    chosen = [
        np.mean(
            [per_name[0][n] if n in trainer.untouched_structures(e) else v for n, v in p.items()]
        )
        for e, p in enumerate(per_name)
    ]
    best = result["best_epoch"]
    assert best == int(np.argmax(chosen))
    assert result["untouched_structures"] == trainer.untouched_structures(best)
    record = read_metadata(tmp_path / "ft" / "adapter")["selection"]
    assert record["by"] == "template_iou" and record["validation_templates"] == [names[1]]
    assert record["untouched_structures"] == result["untouched_structures"]
    last = read_metadata(tmp_path / "ft" / "adapter_last")["selection"]
    assert last["untouched_structures"] == trainer.untouched_structures(2)
    plain = make_trainer(both, pool, num_epochs=2, per_structure_choice=False)
    plain.history = trainer.history
    assert plain.untouched_structures(2) == [] and plain.score(trainer.history[1]) == scores[1]
    log = (tmp_path / "ft" / "training_log.csv").read_text().splitlines()
    assert "val_template_iou" in log[0].split(",")

    kept = make_trainer(both, pool, holdout_template=False)
    assert len(kept.templates) == 2 and kept.validation_templates == []
    assert not kept.validation_truths
    assert kept.labels_record()["selection"]["by"] == "cycle_iou"


def three_templates(tmp_path, solo=None):
    """The demo's two templates and a third (the first's masks on specimen_002.jpg);
    `solo`: a structure name only the third shows (dropped from the other two)."""
    coco = json.loads((DEMO / "templates.json").read_text())
    third = {**coco["images"][0], "id": 3, "file_name": "specimen_002.jpg"}
    copies = [
        {**a, "id": 100 + i, "image_id": 3}
        for i, a in enumerate(coco["annotations"])
        if a["image_id"] == 1
    ]
    solo_id = next((c["id"] for c in coco["categories"] if c["name"] == solo), None)
    kept = [a for a in coco["annotations"] if a["category_id"] != solo_id]
    coco = {**coco, "images": coco["images"] + [third], "annotations": kept + copies}
    (tmp_path / "three.json").write_text(json.dumps(coco))
    return load_coco_templates(tmp_path / "three.json", DEMO / "images")


def test_several_templates_are_held_out_and_judge_together(pool, tmp_path):
    """`holdout_templates: 2` of three: the last two in file-name order are held out,
    each with its views, and every epoch's template score is the mean over all of
    them, per structure; the record names both. At least one template trains, and a
    template showing a structure the training templates lack is not held out."""
    three = three_templates(tmp_path)
    names = sorted(t.file_name for t in three.images)
    trainer = make_trainer(three, pool, holdout_templates=2, holdout_fraction=0.0)
    assert [t.key for t in trainer.templates] == [f"template:{names[0]}"]
    assert [t.file_name for t in trainer.validation_templates] == names[1:]
    keys = [f"validation-template:{n}" for n in names[1:]]
    assert list(trainer.validation_truths) == [
        f"{key}{view}" for key in keys for view in ["", *(f"#view{v}" for v in range(6))]
    ]
    scores = trainer.validate()
    per_view = scores["val_template_view_ious"]
    assert all(len(v) == 2 * (1 + Trainer.VALIDATION_VIEWS) for v in per_view.values())
    assert scores["val_template_ious"] == {
        n: pytest.approx(np.mean(v)) for n, v in per_view.items()
    }
    assert trainer.labels_record()["selection"]["validation_templates"] == names[1:]
    # more than there are: all but the first; one: the last, as before
    assert (
        make_trainer(three, pool, holdout_templates=5).templates[0].key == trainer.templates[0].key
    )
    default = make_trainer(three, pool).validation_templates
    assert [t.file_name for t in default] == names[1:]
    one = make_trainer(three, pool, holdout_templates=1)
    assert [t.file_name for t in one.validation_templates] == names[2:]
    # the last shows "legs" alone: it trains, the two before it are held out
    solo = make_trainer(three_templates(tmp_path, solo="legs"), pool, holdout_templates=2)
    assert [t.file_name for t in solo.validation_templates] == names[:2]
    assert [t.key for t in solo.templates] == [f"template:{names[2]}"]


def test_each_held_out_template_is_judged_from_every_other_template(pool, tmp_path):
    """`judge_memory: others` (the default): a held-out template and its views are
    segmented from the training template and the other held-out one, as the
    segmentation after the fine-tuning has all three in memory; the held-out photos
    from the training template. Its template IoU is the IoU of a `Propagator` with those
    two templates in memory. `training`: every judge from the training template alone,
    which scores the held-out templates otherwise."""
    three = three_templates(tmp_path)
    first, second, third = sorted(t.file_name for t in three.images)
    model = fresh_model()
    twin = copy.deepcopy(model)
    trainer = make_trainer(three, pool, model=model, holdout_templates=2)
    assert trainer.judge_memory(f"validation-template:{second}") == (first, third)
    assert trainer.judge_memory(f"validation-template:{third}#view2") == (first, second)
    assert trainer.judge_memory(trainer.holdout[0]) == (first,)
    others = trainer.validate()
    key = f"validation-template:{third}"
    engine = Propagator(
        trainer.sam.eval(),
        three.select([first, second]),
        fill_hole_area=0,
        cycle_consistency=True,
        tone="none",
    )
    path = next(t.path for t in three.images if t.file_name == third)
    preds = engine.predict(read_image(path))
    expected = trainer._truth_ious(preds, trainer.validation_truths[key])
    names = list(trainer.validation_truths[key])
    # the third template is the second judge: its IoU follows the first's and its views'
    at = 1 + Trainer.VALIDATION_VIEWS
    got = [others["val_template_view_ious"][n][at] for n in names]
    assert got == pytest.approx(expected, abs=1e-6)
    alone = make_trainer(three, pool, model=twin, holdout_templates=2, judge_memory="training")
    assert {alone.judge_memory(k) for k in alone.validation_truths} == {(first,)}
    assert alone.validate()["val_template_view_ious"] != others["val_template_view_ious"]
    with pytest.raises(InputError, match="judge_memory must be one of others, training"):
        FinetuneSettings(judge_memory="all")


def test_the_held_out_template_is_judged_with_its_views(pool):
    """The held-out template comes with `VALIDATION_VIEWS` augmented views, the same
    every run (a fixed seed), their true masks warped with them; the template IoU is
    the same whether the features are cached or the views are read back as pixels."""
    both = load_coco_templates(DEMO / "templates.json", DEMO / "images")
    held = sorted(both.images, key=lambda t: t.file_name)[-1]
    model = fresh_model()
    twin = copy.deepcopy(model)  # the same weights for the second trainer
    cached = make_trainer(both, pool, model=model, holdout_fraction=0.0)
    key = f"validation-template:{held.file_name}"
    truths = cached.validation_truths
    assert list(truths) == [key] + [f"{key}#view{v}" for v in range(Trainer.VALIDATION_VIEWS)]
    names = {cached.categories[i.category_id] for i in held.instances}
    assert all(set(truth) == names for truth in truths.values())
    first = truths[key]
    # each view moves the masks (scaled, turned, shifted, maybe mirrored)
    assert all(
        any(not np.array_equal(truth[n], first[n]) for n in names)
        for k, truth in truths.items()
        if k != key
    )
    again = make_trainer(both, pool, model=twin, holdout_fraction=0.0, cache_features=False)
    assert list(again.validation_pixels) == list(truths)[1:]
    for k, truth in truths.items():
        assert all(np.array_equal(truth[n], again.validation_truths[k][n]) for n in names)
    assert not cached.validation_pixels
    a, b = cached.validate(), again.validate()
    assert a["val_template_iou"] == pytest.approx(b["val_template_iou"], abs=1e-6)
    assert a["val_cycle_iou"] is None and a["val_iou"] is None


def test_a_structure_goes_to_the_untouched_model_only_when_surely_worse(pool):
    """The held-out template and its views vote: a structure whose IoU falls on every
    view goes to the untouched model, one that falls a little on some and rises on
    others (noise) stays with the adapter, and so does one that rises."""
    both = load_coco_templates(DEMO / "templates.json", DEMO / "images")
    trainer = make_trainer(both, pool, holdout_fraction=0.0)
    before = {"a": [0.5] * 7, "b": [0.5] * 7, "c": [0.5] * 7}
    after = {
        "a": [0.30, 0.32, 0.28, 0.31, 0.29, 0.30, 0.33],  # worse everywhere
        "b": [0.52, 0.47, 0.50, 0.53, 0.46, 0.51, 0.48],  # noise around 0.5
        "c": [0.60] * 7,  # better
    }

    def row(views):
        return {
            "val_template_iou": float(np.mean([v for x in views.values() for v in x])),
            "val_template_ious": {n: float(np.mean(v)) for n, v in views.items()},
            "val_template_view_ious": views,
        }

    trainer.history = [row(before), row(after)]
    assert trainer.untouched_structures(1) == ["a"]
    # the epoch's score: what the segmentation will use (a from the untouched model)
    assert trainer.score(row(after)) == pytest.approx(np.mean([0.5, np.mean(after["b"]), 0.6]))
    # the rule with other margins (benchmarks/selection.py scores them): no margin sends
    # the noise to the untouched model when its mean falls; a negative margin keeps
    # the adapter only where it is surely better
    assert left_untouched(before, after, Trainer.UNTOUCHED_MARGIN) == ["a"]
    assert left_untouched(before, after, 0.0) == ["a", "b"]
    assert left_untouched(before, after, -2.0) == ["a", "b"]
    assert left_untouched(before, {**after, "c": [0.5] * 6 + [0.6]}, -2.0) == ["a", "b", "c"]


def test_a_template_with_a_structure_of_its_own_is_not_held_out():
    """The held-out template is the last whose structures the others all show: the
    training never loses a structure to the hold-out."""
    both = load_coco_templates(DEMO / "templates.json", DEMO / "images")
    first, last = sorted(both.images, key=lambda t: t.file_name)
    cats = sorted({i.category_id for i in first.instances})

    def only(image, keep):
        return dataclasses.replace(
            image, instances=[i for i in image.instances if i.category_id in keep]
        )

    def held(a, b):
        kept, out = Trainer._hold_out_templates(
            dataclasses.replace(both, images=[a, b]), FinetuneSettings()
        )
        return (out[0].file_name if out else None), [t.file_name for t in kept.images]

    assert held(first, last) == (last.file_name, [first.file_name])
    # the last shows a structure the first does not: the first is held out
    assert held(only(first, cats[:1]), last) == (first.file_name, [last.file_name])
    # each shows one of its own: none is held out
    assert held(only(first, cats[:1]), only(last, cats[1:2])) == (
        None,
        [first.file_name, last.file_name],
    )


def test_anchor_term_is_supervised_on_a_template_view(templates, pool, tmp_path):
    """`anchor_weight`: each cycle also segments another view of its template from
    it, against that view's true masks; the term reaches the LoRA weights, the
    training runs with it, and it needs template views."""
    model = fresh_model()
    twin = copy.deepcopy(model)  # the same weights for the uncached trainer
    trainer = make_trainer(templates, pool, model=model, template_views=2, anchor_weight=1.0)
    template = trainer.templates[0]
    view = trainer.views[template.key][0]
    trainer.sam.zero_grad(set_to_none=True)
    loss = trainer.anchor_loss(template, view)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(g.abs().sum() > 0 for g in lora_grads(trainer).values())
    assert not torch.equal(view.mask_input, template.mask_input)  # the view moved the masks
    # without the feature cache the views are kept as pixels and encoded at every use:
    # the same views (the same seed), the same term
    uncached = make_trainer(
        templates,
        pool,
        model=twin,
        template_views=2,
        anchor_weight=1.0,
        cache_features=False,
    )
    assert set(uncached.crop_images) == {v.key for v in uncached.views[template.key]}
    again = uncached.anchor_loss(uncached.templates[0], uncached.views[template.key][0])
    assert again.item() == pytest.approx(loss.item(), rel=1e-4)
    result = trainer.train(tmp_path / "ft", {"base_id": BASE})
    assert len(result["history"]) == 2 and all(np.isfinite(trainer.step_losses))
    # the anchor term alone: views of its own, the cycles start from the template itself
    alone = make_trainer(templates, pool, anchor_weight=1.0)
    assert all(len(v) == Trainer.ANCHOR_VIEWS for v in alone.views.values())
    picked, anchor = [], alone.anchor_loss
    alone.anchor_loss = lambda template, view: (
        picked.append((template, view)) or anchor(template, view)
    )
    optimizer = torch.optim.AdamW(alone.params, lr=1e-4)
    scheduler = alone._scheduler(optimizer, 1)
    alone._train_epoch(2, optimizer, scheduler, alone.palindrome_loss)
    assert len(picked) == 2
    assert all(t in alone.templates and v in alone.views[t.key] for t, v in picked)
    assert FinetuneSettings().template_views == 8 and FinetuneSettings().anchor_weight == 1.0


def test_training_without_a_held_out_template_says_the_cycle_iou_judges(templates, pool):
    """With one template (and no ground truth) the log says that the label-free cycle
    IoU picks the epoch and that a second template (or, with it turned off, the stay
    term) would help; with two, not."""
    settings = FinetuneSettings(template_views=0, anchor_weight=0.0, holdout_fraction=0.3)

    def said(template_set, settings=settings):
        lines = []
        Trainer(fresh_model(), template_set, pool, settings, log=lines.append)
        return next((line for line in lines if "no template held out" in line), None)

    assert "stay_weight" not in said(templates)  # on by default there
    off = dataclasses.replace(settings, stay_weight=0.0)
    assert "stay_weight: 1" in said(templates, off)  # and what else would help
    assert not said(load_coco_templates(DEMO / "templates.json", DEMO / "images"))


def test_stay_term_is_on_by_default_only_where_no_template_judges(templates, pool):
    """stay_weight unset: 1 with one template (the cycle IoU picks the epoch), 0 where a
    template is held out to judge, for full fine-tuning and for the supervised
    objective; a weight that is set is kept."""
    settings = FinetuneSettings(template_views=0, anchor_weight=0.0, holdout_fraction=0.3)
    assert settings.stay_weight is None

    def weight(template_set, objective="palindrome", **changes):
        trainer = Trainer(
            fresh_model(),
            template_set,
            pool,
            dataclasses.replace(settings, **changes),
            log=lambda *_: None,
            objective=objective,
            ground_truth=_demo_truth(pool) if objective == "supervised" else None,
        )
        return trainer.settings.stay_weight

    demo = load_coco_templates(DEMO / "templates.json", DEMO / "images")
    assert weight(templates) == 1.0
    assert weight(demo) == 0.0  # one of the two is held out
    assert weight(demo, holdout_template=False) == 1.0
    assert weight(templates, mode="full") == 0.0
    assert weight(templates, objective="supervised") == 0.0
    assert weight(templates, stay_weight=0.0) == 0.0
    assert weight(demo, stay_weight=0.5) == 0.5


def test_cycle_memory_training_reads_each_photo_from_every_training_template(pool, tmp_path):
    """`cycle_memory: training`: the first half of each cycle segments the photo with
    every training template in memory (the cycle's own first, each other one's masks in
    its order of structures), as the segmentation does with those templates; the
    return half and the loss stay on the cycle's template. `template` (the default):
    the cycle's template alone."""
    three = three_templates(tmp_path)
    first, second, _ = sorted(t.file_name for t in three.images)
    trainer = make_trainer(three, pool, holdout_templates=1, cycle_memory="training")
    one, two = trainer.templates
    cycle = trainer.with_companions(one)
    assert [key for key, _ in cycle.companions] == [two.key]
    order = [two.objects.index(o) for o in one.objects]
    assert torch.equal(cycle.companions[0][1], two.mask_input[order])
    assert [key for key, _ in trainer.with_companions(two).companions] == [one.key]
    assert make_trainer(three, pool, holdout_templates=1).with_companions(one) is one

    trainer.sam.eval()
    key = trainer.train_keys[0]
    backbones = [trainer._backbone(t.key) for t in (one, two)]
    with torch.no_grad():
        both = trainer.phase1(cycle, backbones[0], trainer._backbone(key))[0]
        alone = trainer.phase1(one, backbones[0], trainer._backbone(key))[0]
        engine = Propagator(
            trainer.sam,
            three.select([first, second]),
            fill_hole_area=0,
            backbones=backbones,
            tone="none",
        )
        (group,) = engine.groups
        feats = engine._features(trainer._backbone(key), len(group.objects))
        expected = engine._track(group, feats, 2, 3, engine._memory(group, 1))[0]
    expected = expected[[engine.objects.index(o) for o in one.objects]]
    # the engine keeps its memory in bfloat16, the training in float32
    assert (both > 0).eq(expected > 0).float().mean() > 0.99
    assert (both - expected).abs().max() < 0.01 * expected.abs().max()
    assert (alone - expected).abs().max() > 10 * (both - expected).abs().max()

    # a training step runs and the stay term's untouched logits are kept per companions
    lone = make_trainer(
        three, pool, holdout_template=False, cycle_memory="training", stay_weight=1.0
    )
    assert len(lone.templates) == 3
    lone.train(tmp_path / "ft", {"base_id": BASE})
    assert all(len(k) == 4 for k in lone._untouched_logits)  # template, two others, photo
    with pytest.raises(InputError, match="cycle_memory must be one of template, training"):
        FinetuneSettings(cycle_memory="all")
