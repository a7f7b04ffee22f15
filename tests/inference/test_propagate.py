"""Collection runs: per-image results written as they finish, resume after a crash,
bad image files skipped (or failing the run), files that cannot be read at all
stopping it, too many skipped images stopping it, output in file-name order."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import blob_image, box_mask, save_jpeg, template_set

from sam2pal.errors import ImageReadError
from sam2pal.inference.engine import Propagator
from sam2pal.inference.propagate import (
    SkipLimit,
    TooManySkipped,
    check_skipped,
    processing_order,
    run_propagation,
    write_skipped,
)
from sam2pal.io.images import ImageAccessError, read_image
from sam2pal.io.records import PARTIAL_SUFFIX, read_records


def json_records(path) -> list[dict]:
    """The records of a result file, as the JSON objects written."""
    return [record.to_json() for record in read_records(path)]


@pytest.fixture()
def collection(tmp_path):
    rng = np.random.default_rng(5)
    images = tmp_path / "images"
    for i in range(5):
        save_jpeg(
            images / f"spec_{i}.jpg", blob_image(rng, 80, 100, [(20, 20, 70, 60, (190, 70, 40))])
        )
    save_jpeg(
        tmp_path / "template.jpg", blob_image(rng, 80, 100, [(20, 20, 70, 60, (190, 70, 40))])
    )
    templates = template_set(
        [(tmp_path / "template.jpg", {(1, 1): box_mask(80, 100, 20, 20, 70, 60)})], {1: "body"}
    )
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
        run_propagation(
            engine,
            images,
            names,
            out,
            read_image=crashing_reader,
            settings_key="k1",
            progress=False,
            prefetch=1,
        )
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    assert not out.exists() and partial.exists()
    done = [json.loads(line)["file_name"] for line in partial.read_text().splitlines()[1:]]
    order = processing_order(names)
    assert done == order[: order.index("spec_3.jpg")]

    # a half-written last line (the crash hit mid-write) is dropped on resume
    with open(partial, "a") as handle:
        handle.write('{"file_name": "spec_9.jp')
    predicted = []

    class Counting:
        def predict(self, image):
            predicted.append(image.shape)
            return engine.predict(image)

    counts = run_propagation(Counting(), images, names, out, settings_key="k1", progress=False)
    assert (
        counts["resumed"] == len(done)
        and counts["segmented"] == 5 - len(done)
        and len(predicted) == 5 - len(done)
    )
    assert not partial.exists()
    resumed = list(json_records(out))
    assert [r["file_name"] for r in resumed] == names

    clean = tmp_path / "clean" / "predictions.jsonl"
    run_propagation(engine, images, list(reversed(names)), clean, settings_key="k1", progress=False)
    assert list(json_records(clean)) == resumed  # same records, same (file-name) order


def test_other_settings_start_over(collection, tiny_model):
    tmp_path, images, templates = collection
    names = sorted(p.name for p in images.iterdir())
    out = tmp_path / "p.jsonl"
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    partial.write_text(
        json.dumps({"settings": "old"})
        + "\n"
        + json.dumps({"file_name": "spec_0.jpg", "structures": []})
        + "\n"
    )
    counts = run_propagation(
        Propagator(tiny_model, templates), images, names, out, settings_key="new", progress=False
    )
    assert counts["resumed"] == 0 and counts["segmented"] == 5
    assert all(r["structures"] for r in json_records(out))


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

    first_bad = next(
        name for name in processing_order(names) if name in ("notes.png", "spec_1.jpg")
    )
    with pytest.raises(ImageReadError, match=first_bad):
        run_propagation(
            engine,
            images,
            names,
            tmp_path / "q.jsonl",
            settings_key="k",
            on_bad_image="fail",
            progress=False,
        )
    assert not (tmp_path / "q.jsonl").exists()


def test_record_fields(collection, tiny_model):
    tmp_path, images, templates = collection
    out = tmp_path / "p.jsonl"
    run_propagation(Propagator(tiny_model, templates), images, ["spec_0.jpg"], out, progress=False)
    (record,) = json_records(out)
    assert (record["width"], record["height"]) == (100, 80)
    (s,) = record["structures"]
    assert set(s) == {
        "category_id",
        "instance",
        "segmentation",
        "area",
        "bbox",
        "score",
        "predicted_iou",
        "object_score",
        "cycle_iou",
        "clamped",
        "stability",
    }
    assert 0.0 <= s["stability"] <= 1.0
    from sam2pal.io.masks import decode_segmentation

    mask = decode_segmentation(s["segmentation"], 80, 100)
    assert mask.sum() == s["area"]


def test_files_that_cannot_be_read_stop_the_run(collection, tiny_model):
    """A broken link (a photo moved away) or a folder named like a photo is not a bad
    image: the run stops naming the file, even with on_bad_image skip."""
    tmp_path, images, templates = collection
    engine = Propagator(tiny_model, templates)
    (images / "spec_9.jpg").symlink_to(tmp_path / "elsewhere" / "spec_9.jpg")
    names = sorted(p.name for p in images.iterdir())
    out = tmp_path / "p.jsonl"
    with pytest.raises(
        ImageAccessError, match=r"spec_9\.jpg: cannot read the file \(file not found: a broken link"
    ):
        run_propagation(engine, images, names, out, settings_key="k", progress=False)
    assert not out.exists() and out.with_name(out.name + PARTIAL_SUFFIX).exists()

    (images / "spec_9.jpg").unlink()
    (images / "spec_9.jpg").mkdir()
    with pytest.raises(
        ImageAccessError, match=r"spec_9\.jpg: cannot read the file \(is a folder\)"
    ):
        run_propagation(engine, images, names, out, settings_key="k", progress=False)
    assert not out.exists()


def test_skipped_images_are_tried_again_on_resume(collection, tiny_model):
    tmp_path, images, templates = collection
    engine = Propagator(tiny_model, templates)
    names = sorted(p.name for p in images.iterdir())
    order = processing_order(names)
    bad = images / order[0]  # read first, skipped, then the run is cut short
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    out = tmp_path / "p.jsonl"

    def crash_at_the_end(path):
        if path.name == order[-1]:
            raise Crash("power cut")
        return read_image(path)

    with pytest.raises(Crash):
        run_propagation(
            engine,
            images,
            names,
            out,
            read_image=crash_at_the_end,
            settings_key="k",
            progress=False,
            prefetch=1,
        )
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    assert any('"skipped"' in line for line in partial.read_text().splitlines())
    bad.write_bytes(good)  # the photo copied again
    counts = run_propagation(engine, images, names, out, settings_key="k", progress=False)
    assert counts["skipped"] == 0 and counts["segmented"] == 2
    records = list(json_records(out))
    assert [r["file_name"] for r in records] == names and all("structures" in r for r in records)


def make_bad(path, kind: str) -> None:
    """A bad image file: truncated, text named like a photo, or empty."""
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "text":
        path.write_text("specimen notes, not a photo")
    else:
        path.write_bytes(b"")


def write_collection(folder, n_images: int, bad: dict[str, str]) -> list[str]:
    rng = np.random.default_rng(7)
    for i in range(n_images):
        save_jpeg(
            folder / f"img_{i:02d}.jpg", blob_image(rng, 80, 100, [(20, 20, 70, 60, (190, 70, 40))])
        )
    for name, kind in bad.items():
        make_bad(folder / name, kind)
    return sorted(p.name for p in folder.iterdir())


def test_three_bad_files_of_four_stop_the_collection_with_their_list(collection, tiny_model):
    tmp_path, _, templates = collection
    folder = tmp_path / "four"
    bad = {"img_00.jpg": "truncated", "img_01.jpg": "text", "img_03.jpg": "empty"}
    names = write_collection(folder, 4, bad)
    out = tmp_path / "four.jsonl"
    counts = run_propagation(
        Propagator(tiny_model, templates, cycle_consistency=False),
        folder,
        names,
        out,
        progress=False,
        max_skipped_fraction=0.2,
    )
    assert (
        counts["skipped"] == 3
    )  # too few images read to stop early: the collection check stops it
    with pytest.raises(TooManySkipped) as info:
        check_skipped([out], 0.2, "collection four")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("collection four: 3 of 4 images are bad image files (75%")
    assert all(name in message for name in bad) and "img_02.jpg" not in message
    assert sorted(name for name, _ in info.value.skipped) == sorted(bad)
    assert check_skipped([out], 0.8, "collection four") == (4, 3)  # within a higher limit


def test_one_bad_file_of_ten_does_not_stop_a_run(collection, tiny_model):
    tmp_path, _, templates = collection
    folder = tmp_path / "ten"
    names = write_collection(folder, 10, {"img_04.jpg": "truncated"})
    out = tmp_path / "ten.jsonl"
    counts = run_propagation(
        Propagator(tiny_model, templates, cycle_consistency=False),
        folder,
        names,
        out,
        progress=False,
        max_skipped_fraction=0.2,
    )
    assert counts == {"images": 10, "segmented": 9, "skipped": 1, "resumed": 0, "reused": 0}
    assert check_skipped([out], 0.2, "ten") == (10, 1)
    # one bad photo never stops a run, however small the collection
    small = tmp_path / "two"
    names = write_collection(small, 2, {"img_01.jpg": "text"})
    run_propagation(
        Propagator(tiny_model, templates, cycle_consistency=False),
        small,
        names,
        tmp_path / "two.jsonl",
        progress=False,
    )
    assert check_skipped([tmp_path / "two.jsonl"], 0.0, "two") == (2, 1)


def test_a_folder_of_bad_files_stops_early(collection, tiny_model):
    """A systematic failure (here every photo of a shard unreadable) stops within a
    few dozen images; the images read so far are listed."""
    tmp_path, _, templates = collection
    folder = tmp_path / "broken"
    folder.mkdir()
    names = [f"scan_{i:03d}.jpg" for i in range(60)]
    for name in names:
        (folder / name).write_text("not a photo")
    out = tmp_path / "broken.jsonl"
    with pytest.raises(TooManySkipped) as info:
        run_propagation(
            Propagator(tiny_model, templates, cycle_consistency=False),
            folder,
            names,
            out,
            progress=False,
            max_skipped_fraction=0.2,
        )
    message = str(info.value)
    assert (
        "13 of the first 13 images read are bad image files" in message and "stops early" in message
    )
    assert sorted(n for n, _ in info.value.skipped) == sorted(processing_order(names)[:13])
    assert not out.exists()
    # with the limit off, the same run goes through and lists every file
    counts = run_propagation(
        Propagator(tiny_model, templates, cycle_consistency=False),
        folder,
        names,
        out,
        progress=False,
        max_skipped_fraction=1.0,
    )
    assert counts["skipped"] == 60 and write_skipped([out], tmp_path / "s.csv") == 60


def test_early_stop_needs_overwhelming_evidence():
    """The early stop never fires on a collection within the limit, however its bad
    files are spread, and fires soon on one far above it."""
    rng = np.random.default_rng(0)
    for fraction in (0.05, 0.15, 0.2):
        for _ in range(20):
            limit = SkipLimit(0.2, "x")
            for i, bad in enumerate(rng.random(5000) < fraction):
                limit.add(f"{i}.jpg", "truncated" if bad else None)
    stops = []
    for fraction in (0.5, 1.0):
        limit = SkipLimit(0.2, "x")
        with pytest.raises(TooManySkipped):
            for i, bad in enumerate(rng.random(5000) < fraction):
                limit.add(f"{i}.jpg", "truncated" if bad else None)
        stops.append(limit.read)
    assert stops[1] == 13 and stops[0] < 200
    off = SkipLimit(1.0, "x")
    for i in range(100):
        off.add(f"{i}.jpg", "truncated")
    assert len(off.skipped) == 100


def test_processing_order_does_not_follow_names():
    names = [f"drawer_{d}/img_{i:03d}.jpg" for d in range(4) for i in range(250)]
    order = processing_order(names)
    assert sorted(order) == sorted(names) and order == processing_order(list(reversed(names)))
    first = order[:100]  # a fair sample: every drawer is in the first hundred, about evenly
    counts = [sum(name.startswith(f"drawer_{d}/") for name in first) for d in range(4)]
    assert min(counts) >= 10
