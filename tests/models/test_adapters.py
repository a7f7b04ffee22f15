"""Adapter identity: an adapter (LoRA or fully fine-tuned) and a merged checkpoint are
used only with the base checkpoint, image size and model config they were trained with;
anything else is refused with a one-line message naming the folder and what differs.

The adapters are real ones: `pipeline.finetune` (one short epoch) on a small random
SAM2 saved as a checkpoint file, at 64 px."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO

from sam2pal.errors import InputError
from sam2pal.inference import pipeline
from sam2pal.models.adapters import METADATA_FILE, read_metadata
from sam2pal.models.build import build_model, file_sha256, read_checkpoint, resolve_config

DEMO = REPO / "resources" / "demo"
CONFIG = "sam2.1_hiera_t"
SIZE = 64
POOL = ["specimen_003.jpg", "specimen_004.jpg", "specimen_005.jpg"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two random base checkpoints (a, b); a LoRA adapter (with merged.pt) and a full
    adapter trained on a at 64 px; the prepared templates."""
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("a", 0), ("b", 1)):
        model = build_model(CONFIG, "random", image_size=SIZE, seed=seed)
        torch.save({"model": model.state_dict()}, root / f"{name}.pt")
    templates = root / "templates.json"
    pipeline.prepare_templates(
        str(DEMO / "templates.json"), DEMO / "images", templates, max_templates=1
    )
    common = dict(
        num_epochs=1,
        min_steps=0,
        max_images_per_epoch=1,
        accumulation_steps=1,
        holdout_fraction=0,
        warmup_steps=0,
    )
    for kind, settings in (
        ("lora", dict(common, lora_rank=2, merge_checkpoint=True)),
        ("full", dict(common, mode="full", targets=["sam_mask_decoder"])),
    ):
        pipeline.finetune(
            templates,
            DEMO / "images",
            POOL,
            root / kind,
            config=CONFIG,
            checkpoint=str(root / "a.pt"),
            image_size=SIZE,
            device="cpu",
            threads=1,
            settings=settings,
            log=lambda *_: None,
        )
    return root, templates


def _segment(root, templates, adapter, checkpoint="a.pt", image_size=SIZE, config=CONFIG):
    """Segment one photo; returns its run.json."""
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    pipeline.segment(
        templates,
        DEMO / "images",
        ["specimen_009.jpg"],
        out / "r.jsonl",
        out / "run.json",
        config=config,
        checkpoint=str(root / checkpoint),
        image_size=image_size,
        device="cpu",
        threads=1,
        progress=False,
        log=lambda *_: None,
        adapter=adapter,
    )
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adapter_metadata_is_recorded(trained, kind):
    root, _ = trained
    meta = read_metadata(root / kind / "adapter")
    assert meta["kind"] == kind and meta["image_size"] == SIZE
    assert meta["base_id"] == meta["base_checkpoint_sha256"] == file_sha256(root / "a.pt")
    assert meta["model_config_sha256"] == file_sha256(resolve_config(CONFIG))
    if kind == "full":
        _, record = read_checkpoint(root / kind / "adapter" / "model.pt")
        assert (
            record["image_size"] == SIZE
            and record["base_id"] == meta["base_id"]
            and record["kind"] == "full"
        )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adapter_is_used_only_with_its_checkpoint_image_size_and_config(trained, tmp_path, kind):
    root, templates = trained
    adapter = root / kind / "adapter"
    a, b = (file_sha256(root / f"{name}.pt")[:12] for name in ("a", "b"))

    with pytest.raises(InputError) as other_checkpoint:
        _segment(root, templates, adapter, checkpoint="b.pt")
    message = str(other_checkpoint.value)
    assert "\n" not in message and message.startswith(
        f"{adapter}: adapter was trained on checkpoint sha256 {a}"
    )
    assert f"this run uses checkpoint sha256 {b}" in message and str(root / "a.pt") in message

    with pytest.raises(InputError) as other_size:
        _segment(root, templates, adapter, image_size=128)
    message = str(other_size.value)
    assert message.startswith(
        f"{adapter}: adapter was trained on checkpoint sha256 {a}... at image size 64; "
    )
    assert (
        f"this run uses checkpoint sha256 {a}... at image size 128" in message
        and "image size 64 it was" in message
    )

    # the same config file under another name is the same config; an edited one is not
    same = tmp_path / "same.yaml"
    shutil.copy(resolve_config(CONFIG), same)
    edited = tmp_path / "edited.yaml"
    edited.write_text(resolve_config(CONFIG).read_text() + "\n# edited\n")
    with pytest.raises(
        InputError, match=r"adapter was trained on .* with model config sha256 .*this run uses"
    ):
        _segment(root, templates, adapter, config=str(edited))

    run = _segment(root, templates, adapter, config=str(same))
    assert run["counts"]["segmented"] == 1 and run["model"]["adapter_kind"] == kind
    assert (
        run["model"]["base_id"] == file_sha256(root / "a.pt") and run["model"]["image_size"] == SIZE
    )


def test_fine_tuned_checkpoints_are_used_at_their_image_size_and_config(trained, tmp_path):
    """merged.pt (LoRA folded in) and a full adapter's model.pt are full checkpoints:
    usable as the base of a run or with SAM2's own loader, at the size they were
    trained at."""
    root, templates = trained
    merged = root / "lora" / "merged.pt"
    _, record = read_checkpoint(merged)
    assert record["kind"] == "merged" and record["image_size"] == SIZE
    assert record["base_id"] == file_sha256(root / "a.pt")
    for checkpoint in (merged, root / "full" / "adapter" / "model.pt"):
        assert build_model(CONFIG, checkpoint, image_size=SIZE).image_size == SIZE
        with pytest.raises(InputError) as refused:
            build_model(CONFIG, checkpoint, image_size=128)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(
            f"{checkpoint}: checkpoint fine-tuned by sam2-pal at image size 64 (this run: 128)"
        )
        edited = tmp_path / "edited.yaml"
        edited.write_text(resolve_config(CONFIG).read_text() + "\n# edited\n")
        with pytest.raises(InputError, match="fine-tuned by sam2-pal with sam2.1_hiera_t, sha256"):
            build_model(edited, checkpoint, image_size=SIZE)
    # a run on merged.pt records it as its checkpoint
    run = _segment(root, templates, None, checkpoint="lora/merged.pt")
    assert run["counts"]["segmented"] == 1 and run["model"]["checkpoint_sha256"] == file_sha256(
        merged
    )


def _boosted(root, folder, untouched):
    """A copy of the trained LoRA adapter with its B weights drawn at random (one
    training step leaves them near zero) and `untouched` as the structures it leaves
    to the untouched model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "lora" / "adapter", folder)
    weights = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, value in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(value.shape, generator=generator) * 0.5
    save_file(weights, folder / "adapter_model.safetensors")
    meta = read_metadata(folder)
    meta["selection"]["untouched_structures"] = list(untouched)
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("zoom", ["off", "on"])
def test_structures_left_to_the_untouched_model_are_segmented_without_the_adapter(
    trained, tmp_path, zoom
):
    """An adapter whose record leaves structures to the untouched model: their masks
    and scores are the base model's, the others' the adapter's (the engine tracks their group
    and their zoom windows with the untouched model's weights). With the zoom pass a
    window may hold structures of both kinds: it is framed as without the choice, and
    every structure is left to the untouched model there to compare exactly."""
    from sam2pal.inference.engine import Propagator
    from sam2pal.io.images import read_image
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.adapters import load_adapter, untouched_structures

    root, templates_json = trained
    templates = load_coco_templates(templates_json)
    names = sorted(set(templates.categories.values()))
    left = set(names[:1]) if zoom == "off" else set(names)
    base_id = file_sha256(root / "a.pt")

    def model(adapter=None):
        sam = build_model(CONFIG, str(root / "a.pt"), image_size=SIZE).eval()
        return sam if adapter is None else load_adapter(sam, adapter, base_id)

    every = _boosted(root, tmp_path / "every", [])
    some = _boosted(root, tmp_path / "some", left)
    assert not untouched_structures(model(every))
    assert untouched_structures(model(some)) == left
    image = read_image(DEMO / "images" / "specimen_009.jpg")

    def engine(sam):
        return Propagator(sam, templates, zoom=zoom, cycle_consistency=True)

    def predict(sam):
        return {
            (templates.categories[p.category_id], p.instance): p for p in engine(sam).predict(image)
        }

    base, adapted, chosen = predict(model()), predict(model(every)), predict(model(some))
    assert set(base) == set(adapted) == set(chosen)
    differs = 0
    for key, p in chosen.items():
        expected = base[key] if key[0] in left else adapted[key]
        assert p.predicted_iou == pytest.approx(expected.predicted_iou, abs=1e-4)
        assert p.object_score == pytest.approx(expected.object_score, abs=1e-4)
        assert p.cycle_iou == pytest.approx(expected.cycle_iou, abs=1e-3)
        assert (p.mask != expected.mask).mean() < 1e-3
        differs += abs(base[key].predicted_iou - adapted[key].predicted_iou) > 1e-3
    assert differs  # the adapter changes the masks: the test tells the two apart
    if zoom == "on":  # one structure left: it shares its window with its neighbours
        mixed = engine(model(_boosted(root, tmp_path / "one", names[:1]))).zoom_pass
        alone = engine(model(every)).zoom_pass
        assert sorted(map(tuple, (c.framed_by for c in alone.clusters))) == sorted(
            {tuple(c.framed_by) for c in mixed.clusters}
        )
        for cluster in mixed.clusters:
            assert {templates.categories[k[0]] == names[0] for k in cluster.objects} == {
                cluster.untouched
            }


def test_video_tracks_structures_left_to_the_untouched_model_without_the_adapter(trained, tmp_path):
    """Video mode too: a structure the adapter leaves to the untouched model is tracked
    with the untouched model (the base model's masks), the others with the adapter."""
    import numpy as np

    from sam2pal.inference.temporal import VideoPropagator
    from sam2pal.io.images import read_image
    from sam2pal.io.templates import load_coco_templates
    from sam2pal.models.adapters import load_adapter

    root, templates_json = trained
    templates = load_coco_templates(templates_json)
    template = templates.images[0]
    names = sorted(set(templates.categories.values()))
    photo = read_image(template.path)
    frames = [np.roll(photo, shift, axis=1) for shift in (0, 3, 6)]
    keyframes = {0: {(i.category_id, i.instance): i.mask for i in template.instances}}
    base_id = file_sha256(root / "a.pt")

    def track(adapter=None):
        sam = build_model(CONFIG, str(root / "a.pt"), image_size=SIZE).eval()
        if adapter is not None:
            sam = load_adapter(sam, adapter, base_id)
        propagator = VideoPropagator(
            sam, keyframes, 3, lambda i: frames[i], categories=templates.categories
        )
        return {
            (r.index, templates.categories[p.category_id], p.instance): p
            for r in propagator.run()
            for p in r.predictions
        }

    base = track()
    adapted = track(_boosted(root, tmp_path / "every", []))
    chosen = track(_boosted(root, tmp_path / "some", names[:1]))
    assert set(base) == set(adapted) == set(chosen)
    differs = 0
    for key, p in chosen.items():
        expected = base[key] if key[1] == names[0] else adapted[key]
        assert p.predicted_iou == pytest.approx(expected.predicted_iou, abs=1e-4)
        assert (p.mask != expected.mask).mean() < 1e-3
        differs += abs(base[key].predicted_iou - adapted[key].predicted_iou) > 1e-3
    assert differs
    with pytest.raises(ValueError, match="give categories"):
        VideoPropagator(
            load_adapter(
                build_model(CONFIG, str(root / "a.pt"), image_size=SIZE).eval(),
                tmp_path / "some",
                base_id,
            ),
            keyframes,
            3,
            lambda i: frames[i],
        )


def test_a_run_records_the_structures_left_to_the_untouched_model(trained, tmp_path):
    root, templates = trained
    left = [json.loads(templates.read_text())["categories"][0]["name"]]
    run = _segment(root, templates, _boosted(root, tmp_path / "some", left))
    assert run["counts"]["segmented"] == 1
    assert run["model"]["untouched_structures"] == left
    assert (
        "untouched_structures" not in _segment(root, templates, root / "lora" / "adapter")["model"]
    )


def _refused_record(root, folder, edit) -> str:
    """The one-line message `load_adapter` refuses `folder` with once `edit` has
    changed its record."""
    from sam2pal.models.adapters import load_adapter

    meta = read_metadata(folder)
    edit(meta)
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    sam = build_model(CONFIG, str(root / "a.pt"), image_size=SIZE)
    with pytest.raises(InputError) as refused:
        load_adapter(sam, folder, file_sha256(root / "a.pt"))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_an_adapter_that_trained_the_encoder_cannot_leave_structures_untouched(trained, tmp_path):
    """The untouched model shares the adapted model's image features: a record that
    leaves structures to it from an adapter that trained the image encoder is refused."""
    root, _ = trained
    folder = _boosted(root, tmp_path / "some", ["head"])
    message = _refused_record(
        root,
        folder,
        lambda meta: meta["settings"].update(targets=["image_encoder", "sam_mask_decoder"]),
    )
    assert message.startswith(f"{folder}: the adapter trained the image")


def test_a_bad_untouched_structures_record_is_refused(trained, tmp_path):
    root, _ = trained
    folder = _boosted(root, tmp_path / "bad", [])
    message = _refused_record(
        root, folder, lambda meta: meta["selection"].update(untouched_structures="head")
    )
    assert message.startswith(f"{folder / METADATA_FILE}: selection.")
