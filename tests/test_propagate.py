"""Collection runs: per-image results written as they finish, resume after a crash,
unreadable images skipped (or failing the run), output in file-name order."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import blob_image, box_mask, save_jpeg, template_set
from sam2pal.engine import Propagator
from sam2pal.errors import ImageReadError
from sam2pal.images import read_image
from sam2pal.propagate import PARTIAL_SUFFIX, read_records, run_propagation, write_skipped


@pytest.fixture()
def collection(tmp_path):
    rng = np.random.default_rng(5)
    images = tmp_path / "images"
    for i in range(5):
        save_jpeg(images / f"spec_{i}.jpg", blob_image(rng, 80, 100, [(20, 20, 70, 60, (190, 70, 40))]))
    save_jpeg(tmp_path / "template.jpg", blob_image(rng, 80, 100, [(20, 20, 70, 60, (190, 70, 40))]))
    templates = template_set([(tmp_path / "template.jpg", {(1, 1): box_mask(80, 100, 20, 20, 70, 60)})], {1: "body"})
    return tmp_path, images, templates


class Crash(RuntimeError):
    pass


def test_resume_after_crash_loses_nothing(collection, tiny_model):
    tmp_path, images, templates = collection
    names = sorted(p.name for p in images.iterdir())
    engine = Propagator(tiny_model, templates)
    calls = []

    def crashing_reader(path):
        calls.append(path.name)
        if path.name == "spec_3.jpg":
            raise Crash("power cut")
        return read_image(path)

    out = tmp_path / "run" / "predictions.jsonl"
    with pytest.raises(Crash):
        run_propagation(engine, images, names, out, read_image=crashing_reader, settings_key="k1",
                        progress=False, prefetch=1)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    assert not out.exists() and partial.exists()
    done = [json.loads(line)["file_name"] for line in partial.read_text().splitlines()[1:]]
    assert done == ["spec_0.jpg", "spec_1.jpg", "spec_2.jpg"]

    # a half-written last line (the crash hit mid-write) is dropped on resume
    with open(partial, "a") as handle:
        handle.write('{"file_name": "spec_9.jp')
    predicted = []

    class Counting:
        def predict(self, image):
            predicted.append(image.shape)
            return engine.predict(image)

    counts = run_propagation(Counting(), images, names, out, settings_key="k1", progress=False)
    assert counts["resumed"] == 3 and counts["segmented"] == 2 and len(predicted) == 2
    assert not partial.exists()
    resumed = list(read_records(out))
    assert [r["file_name"] for r in resumed] == names

    clean = tmp_path / "clean" / "predictions.jsonl"
    run_propagation(engine, images, list(reversed(names)), clean, settings_key="k1", progress=False)
    assert list(read_records(clean)) == resumed  # same records, same (file-name) order


def test_other_settings_start_over(collection, tiny_model):
    tmp_path, images, templates = collection
    names = sorted(p.name for p in images.iterdir())
    out = tmp_path / "p.jsonl"
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    partial.write_text(json.dumps({"settings": "old"}) + "\n" + json.dumps({"file_name": "spec_0.jpg", "structures": []}) + "\n")
    counts = run_propagation(Propagator(tiny_model, templates), images, names, out, settings_key="new", progress=False)
    assert counts["resumed"] == 0 and counts["segmented"] == 5
    assert all(r["structures"] for r in read_records(out))


def test_unreadable_images_are_skipped_or_fail(collection, tiny_model):
    tmp_path, images, templates = collection
    good = (images / "spec_0.jpg").read_bytes()
    (images / "spec_1.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (images / "notes.png").write_text("not an image")
    names = sorted(p.name for p in images.iterdir())
    engine = Propagator(tiny_model, templates)
    out = tmp_path / "p.jsonl"
    counts = run_propagation(engine, images, names, out, settings_key="k", progress=False)
    assert counts["skipped"] == 2 and counts["segmented"] == 4
    skipped_csv = tmp_path / "skipped.csv"
    assert write_skipped([out], skipped_csv) == 2
    rows = list(csv.DictReader(open(skipped_csv)))
    assert [r["file_name"] for r in rows] == ["notes.png", "spec_1.jpg"]
    assert all(r["reason"] and "\n" not in r["reason"] for r in rows)

    with pytest.raises(ImageReadError, match="notes.png"):
        run_propagation(engine, images, names, tmp_path / "q.jsonl", settings_key="k",
                        on_bad_image="fail", progress=False)
    assert not (tmp_path / "q.jsonl").exists()


def test_record_fields(collection, tiny_model):
    tmp_path, images, templates = collection
    out = tmp_path / "p.jsonl"
    run_propagation(Propagator(tiny_model, templates), images, ["spec_0.jpg"], out, progress=False)
    (record,) = read_records(out)
    assert (record["width"], record["height"]) == (100, 80)
    (s,) = record["structures"]
    assert set(s) == {"category_id", "instance", "segmentation", "area", "bbox", "score",
                      "predicted_iou", "object_score", "cycle_iou", "clamped"}
    from sam2pal.masks import decode_segmentation

    mask = decode_segmentation(s["segmentation"], 80, 100)
    assert mask.sum() == s["area"]
