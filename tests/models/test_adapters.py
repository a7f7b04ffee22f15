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
from sam2pal.models.adapters import read_metadata
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
