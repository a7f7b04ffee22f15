"""The CUDA path (bf16 autocast, device selection, SAM2's hole-filling kernel).
Skipped without a CUDA GPU, so CI (no GPU) never runs them; run with
`python -m pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_image, box_mask, save_jpeg, template_set

from sam2pal.errors import InputError
from sam2pal.inference.engine import Propagator
from sam2pal.io.masks import mask_iou
from sam2pal.models.build import build_model, resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_device_selection():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cuda_engine_agrees_with_cpu(tmp_path):
    rng = np.random.default_rng(0)
    save_jpeg(tmp_path / "t.jpg", blob_image(rng, 120, 160, [(40, 30, 120, 90, (200, 60, 40))]))
    templates = template_set(
        [(tmp_path / "t.jpg", {(1, 1): box_mask(120, 160, 40, 30, 120, 90)})], {1: "body"}
    )
    target = blob_image(rng, 120, 160, [(35, 35, 115, 95, (190, 70, 50))])
    results = {}
    for device in ("cpu", "cuda"):
        model = build_model("sam2.1_hiera_t", "random", image_size=256, device=device)
        engine = Propagator(model, templates)
        assert engine.device.type == device
        results[device] = engine.predict(target)[0]
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu.mask.shape == cpu.mask.shape
    # bf16 autocast on the GPU: close to the float32 CPU result, not bit-identical
    assert mask_iou(gpu.mask, cpu.mask) > 0.9
    assert abs(gpu.predicted_iou - cpu.predicted_iou) < 0.05
    assert 0.0 <= gpu.cycle_iou <= 1.0


def test_cuda_video_tracking_agrees_with_cpu():
    """Propagation through time on the GPU (bf16 autocast, memory kept in bf16) gives
    nearly the CPU's masks, frame after frame."""
    from sam2pal.inference.temporal import VideoPropagator

    rng = np.random.default_rng(1)
    frames = [
        blob_image(rng, 120, 160, [(30 + 4 * t, 30, 110 + 4 * t, 90, (200, 60, 40))])
        for t in range(8)
    ]
    keyframes = {0: {(1, 1): box_mask(120, 160, 30, 30, 110, 90)}}
    results = {}
    for device in ("cpu", "cuda"):
        model = build_model("sam2.1_hiera_t", "random", image_size=256, device=device)
        tracker = VideoPropagator(
            model, keyframes, len(frames), lambda i: frames[i], cycle_consistency=False
        )
        results[device] = [r.predictions[0] for r in tracker.run()]
    for cpu, gpu in zip(results["cpu"][1:], results["cuda"][1:]):
        assert mask_iou(gpu.mask, cpu.mask) > 0.9


def test_hole_filling_equals_sam2_cuda_kernel():
    """SAM2's hole filling with its CUDA kernel, where the extension is built, against
    the engine's `fill_holes` and against the CPU stand-in the CPU tests give the
    official predictor (test_engine.connected_components_8)."""
    pytest.importorskip("sam2._C", reason="SAM2's CUDA extension (sam2._C) is not built")
    from sam2.utils.misc import fill_holes_in_mask_scores, get_connected_components
    from test_engine import connected_components_8

    from sam2pal.inference.engine import fill_holes

    rng = np.random.default_rng(2)
    # blobs and specks of every size on 64 x 64 low-res masks
    logits = torch.from_numpy(rng.normal(0, 1, (6, 1, 64, 64)).astype(np.float32))
    logits = (
        torch.nn.functional.avg_pool2d(logits, 3, 1, 1)
        + torch.linspace(-0.3, 0.3, 6)[:, None, None, None]
    )
    background = (logits <= 0).cuda()
    labels, areas = get_connected_components(background)
    cpu_labels, cpu_areas = connected_components_8(background.cpu())
    assert torch.equal(areas.cpu().long(), cpu_areas.long())
    assert torch.equal(labels.cpu() > 0, cpu_labels > 0)
    official = fill_holes_in_mask_scores(logits.cuda(), 8).cpu()
    assert not torch.equal(official, logits)  # holes were filled
    assert torch.equal(fill_holes(logits.cuda(), 8).cpu(), official)
