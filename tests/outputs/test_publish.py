"""Publishing: the Darwin Core Archive read back with python-dwca-reader, the ROI sets
with roifile, from a small results folder written by the project's own writers."""

from __future__ import annotations

import csv
import json
import zipfile

import numpy as np
import pytest
import roifile
from dwca.read import DwCAReader
from matplotlib.path import Path as MplPath
from review_tools import structure_record

from sam2pal.cli import main
from sam2pal.errors import InputError
from sam2pal.io.atomic import write_json
from sam2pal.io.coco import merge_predictions
from sam2pal.io.masks import decode_segmentation
from sam2pal.outputs.measure import MASK_MEASURES, measure_coco
from sam2pal.outputs.publish import (
    MEASURE_DEFINITIONS,
    MOF_TERMS,
    mask_outlines,
    write_dwca,
    write_roi_sets,
)
from sam2pal.outputs.qc import write_qc

DWC = "http://rs.tdwg.org/dwc/terms/"
CATEGORIES = {1: "head", 2: "elytra", 3: "antenna", 4: "legs"}
H, W = 60, 80
SHA = "ab" * 32
FINISHED = "2026-01-02T03:04:05+00:00"
CORRECTED = {"when": "2026-02-03T10:00:00+00:00", "source": "review_2026-02-03.json"}


def _box(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _masks(shift: int) -> dict:
    """(category, instance) -> mask: a one-piece head, elytra with a hole, an antenna in
    two pieces, two legs."""
    elytra = _box(30, 50, 10 + shift, 40 + shift)
    elytra[36:42, 20 + shift : 28 + shift] = False
    antenna = _box(5, 8, 40, 60) | _box(12, 15, 62, 75)
    return {
        (1, 1): _box(10, 25, 10 + shift, 30 + shift),
        (2, 1): elytra,
        (3, 1): antenna,
        (4, 1): _box(40, 55, 50, 53),
        (4, 2): _box(40, 52, 60, 64),
    }


NAMES = ("sp_001.jpg", "sp_002.jpg", "tray/sp_003.png")


def make_results(folder, px_per_mm=None, corrected=True):
    """A results folder as `sam2pal segment` writes it: predictions.json (annotation 1
    corrected by a person), provenance.json, qc.csv and measurements.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "predictions.jsonl"
    lines = []
    for k, name in enumerate(NAMES):
        structures = [
            structure_record(*key, mask, 0.5 + 0.1 * k + 0.01 * key[0])
            for key, mask in _masks(k).items()
        ]
        lines.append({"file_name": name, "width": W, "height": H, "structures": structures})
    records.write_text("".join(json.dumps(r) + "\n" for r in lines))
    info = {
        "description": "sam2-pal predictions",
        "version": "0.1.0",
        "collection": "beetles",
        "finished": FINISHED,
        "model": {"checkpoint": "/models/sam2.1_hiera_large.pt", "checkpoint_sha256": SHA},
        "adapter": None,
    }
    predictions = folder / "predictions.json"
    merge_predictions([records], CATEGORIES, predictions, info=info)
    if corrected:
        data = json.loads(predictions.read_text())
        data["annotations"][0]["corrected"] = CORRECTED
        predictions.write_text(json.dumps(data))
    write_json(folder / "provenance.json", info, indent=2)
    write_qc([records], CATEGORIES, folder / "qc.csv", multi_instance=[4])
    measure_coco(predictions, folder / "measurements.csv", px_per_mm=px_per_mm)
    return folder


@pytest.fixture()
def results(tmp_path):
    return make_results(tmp_path / "out", px_per_mm=10.0)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _expected_values(measurements):
    """{(file_name stem, label, measure key): (value, unit)} of measurements.csv."""
    predictions = json.loads((measurements.parent / "predictions.json").read_text())
    instance = {str(a["id"]): a["instance"] for a in predictions["annotations"]}
    expected = {}
    for row in _rows(measurements):
        stem = row["file_name"].rsplit(".", 1)[0]
        label = row["category"]
        if label == "legs":
            label = f"legs-{instance[row['annotation_id']]}"
        for measure in MASK_MEASURES:
            key = measure.removesuffix("_px")
            mm = {
                "area_px": ("area_mm2", "mm2"),
                "perimeter_px": ("perimeter_mm", "mm"),
                "feret_max_px": ("feret_max_mm", "mm"),
                "feret_min_px": ("feret_min_mm", "mm"),
                "curve_length_px": ("curve_length_mm", "mm"),
            }.get(measure)
            if mm and row.get(mm[0]):
                expected[(stem, label, key)] = (row[mm[0]], mm[1])
            elif row[measure]:
                unit = "" if measure in ("eccentricity", "solidity") else "px"
                expected[(stem, label, key)] = (row[measure], unit)
    return expected


def test_the_archive_reads_back_with_the_measurements(results, tmp_path):
    out = tmp_path / "dwca.zip"
    counts = write_dwca(results, out)
    expected = _expected_values(results / "measurements.csv")
    assert counts == {"occurrences": 3, "measurements": len(expected)}
    with DwCAReader(out) as archive:
        assert archive.descriptor.core.type == DWC + "Occurrence"
        assert [e.type for e in archive.descriptor.extensions] == [DWC + "MeasurementOrFact"]
        assert archive.orphaned_extension_rows() == {"measurementorfact.txt": {}}
        ids = [row.id for row in archive]
        assert ids == ["sp_001", "sp_002", "tray/sp_003"]
        found, measurement_ids = {}, []
        for row in archive:
            assert row.data[DWC + "occurrenceID"] == row.id
            assert row.data[DWC + "basisOfRecord"] == "PreservedSpecimen"
            for ext in row.extensions:
                data = ext.data
                assert set(data) == {DWC + term for term in MOF_TERMS}
                occurrence, label, key = data[DWC + "measurementID"].split(":")
                assert occurrence == row.id
                measurement_ids.append(data[DWC + "measurementID"])
                name, definition = MEASURE_DEFINITIONS[
                    key if key in ("eccentricity", "solidity") else key + "_px"
                ]
                assert data[DWC + "measurementType"] == f"{label} {name}"
                method = data[DWC + "measurementMethod"]
                assert "sam2-pal 0.1.0" in method and "sam2.1_hiera_large.pt" in method
                assert SHA in method and method.endswith(definition)
                found[(row.id, label, key)] = (
                    data[DWC + "measurementValue"],
                    data[DWC + "measurementUnit"],
                )
                remarks = data[DWC + "measurementRemarks"]
                assert "QC score 0." in remarks and "(cycle IoU)" in remarks
                assert "status ok (qc.csv)" in remarks
                first = row.id == "sp_001" and label == "head"
                if first:
                    assert f"corrected by a person: yes ({CORRECTED['when']}" in remarks
                    assert data[DWC + "measurementDeterminedDate"] == CORRECTED["when"]
                else:
                    assert remarks.endswith("corrected by a person: no")
                    assert data[DWC + "measurementDeterminedDate"] == FINISHED
        assert found == expected
        assert len(set(measurement_ids)) == len(measurement_ids)
        assert {label for _, label, _ in found} == {"head", "elytra", "antenna", "legs-1", "legs-2"}
        assert found[("sp_001", "head", "area")] == ("3.0", "mm2")  # 15 x 20 px at 10 px/mm
        assert found[("sp_001", "head", "major_axis")][1] == "px"
        eml = archive.metadata
        assert "file name without its extension" in "".join(eml.itertext())


def test_without_a_scale_the_units_are_pixels(tmp_path):
    results = make_results(tmp_path / "out", px_per_mm=None, corrected=False)
    (results / "provenance.json").unlink()  # the predictions' info says the same
    write_dwca(results, tmp_path / "dwca.zip")
    with DwCAReader(tmp_path / "dwca.zip") as archive:
        units = {
            ext.data[DWC + "measurementType"].split(" ", 1)[1]: ext.data[DWC + "measurementUnit"]
            for row in archive
            for ext in row.extensions
        }
        assert units["area"] == "px2" and units["curve length"] == "px"
        assert units["eccentricity"] == "" and units["solidity"] == ""
        remarks = [
            ext.data[DWC + "measurementRemarks"] for row in archive for ext in row.extensions
        ]
        assert all(r.endswith("corrected by a person: no") for r in remarks)
        methods = {ext.data[DWC + "measurementMethod"] for row in archive for ext in row.extensions}
        assert all(SHA in method for method in methods)


def test_the_sample_sheet_gives_the_occurrences(results, tmp_path):
    sheet = tmp_path / "specimens.csv"
    sheet.write_text(
        "file_name,occurrenceID,catalogNumber,institutionCode,scientificName\n"
        "sp_001.jpg,urn:catalog:NHM:ENT:1,ENT-1,NHM,Carabus auratus\n"
        "sp_002.jpg,urn:catalog:NHM:ENT:2,ENT-2,NHM,Carabus auratus\n"
        "sp_003.png,urn:catalog:NHM:ENT:3,ENT-3,NHM,Carabus violaceus\n",  # by bare name
        encoding="utf-8-sig",
    )
    write_dwca(results, tmp_path / "dwca.zip", sample_sheet=sheet)
    with DwCAReader(tmp_path / "dwca.zip") as archive:
        rows = {row.id: row for row in archive}
        assert list(rows) == [f"urn:catalog:NHM:ENT:{k}" for k in (1, 2, 3)]
        third = rows["urn:catalog:NHM:ENT:3"]
        assert third.data[DWC + "catalogNumber"] == "ENT-3"
        assert third.data[DWC + "institutionCode"] == "NHM"
        assert third.data[DWC + "scientificName"] == "Carabus violaceus"
        assert "tray/sp_003.png" in third.data[DWC + "occurrenceRemarks"]
        ids = {ext.data[DWC + "measurementID"] for ext in third.extensions}
        assert "urn:catalog:NHM:ENT:3:legs-2:curve_length" in ids
        assert "from the sample sheet" in "".join(archive.metadata.itertext())


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "file_name,occurrenceID,colour\nsp_001.jpg,a,red\n",
            "column 'colour' is not a Darwin Core",
        ),
        (
            "file_name,occurrenceID\nsp_001.jpg,a\nsp_002.jpg,b\n",
            "no row for image 'tray/sp_003.png'",
        ),
        ("file_name,occurrenceID\nsp_001.jpg,a\nsp_001.jpg,b\n", "listed twice"),
        ("file_name,occurrenceID\nsp_001.jpg,a\nsp_002.jpg,\n", "line 3: empty occurrenceID"),
        (
            "file_name,occurrenceID\nsp_001.jpg,a\nsp_002.jpg,a\ntray/sp_003.png,c\n",
            "both give occurrenceID 'a'",
        ),
        ("specimen;id\nsp_001.jpg;a\n", "not a sample sheet"),
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb2\xff\xfe", "not a UTF-8 CSV"),
    ],
)
def test_a_bad_sample_sheet_is_one_line_and_writes_nothing(results, tmp_path, text, message):
    sheet = tmp_path / "specimens.csv"
    if isinstance(text, bytes):
        sheet.write_bytes(text)
    else:
        sheet.write_text(text)
    out = tmp_path / "publish" / "dwca.zip"
    with pytest.raises(InputError) as error:
        write_dwca(results, out, sample_sheet=sheet)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert text.startswith(str(sheet))
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary left


def test_missing_inputs_are_one_line_errors(results, tmp_path):
    (results / "measurements.csv").unlink()
    with pytest.raises(InputError, match="no measurements.csv"):
        write_dwca(results, tmp_path / "dwca.zip")
    with pytest.raises(InputError, match="no predictions.json"):
        write_dwca(tmp_path / "nowhere", tmp_path / "dwca.zip")
    assert not (tmp_path / "dwca.zip").exists()


def test_two_images_that_differ_in_extension_are_refused(tmp_path):
    results = make_results(tmp_path / "out", corrected=False)
    data = json.loads((results / "predictions.json").read_text())
    data["images"][1]["file_name"] = "sp_001.png"
    (results / "predictions.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="share the ROI set sp_001.zip"):
        write_roi_sets(results / "predictions.json", tmp_path / "roi")
    assert not (tmp_path / "roi").exists()


def _fill(outlines, height=H, width=W):
    """The pixels whose centre lies inside the outlines, filled even-odd (as ImageJ
    fills composite ROIs)."""
    yy, xx = np.mgrid[:height, :width]
    centres = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    inside = np.zeros(len(centres), bool)
    for outline in outlines:
        inside ^= MplPath(np.asarray(outline, float)).contains_points(centres)
    return inside.reshape(height, width)


def test_the_roi_sets_are_the_masks(results, tmp_path):
    n = write_roi_sets(results / "predictions.json", tmp_path / "roi")
    assert n == 15
    zips = sorted(
        p.relative_to(tmp_path / "roi").as_posix() for p in (tmp_path / "roi").rglob("*.zip")
    )
    assert zips == ["sp_001.zip", "sp_002.zip", "tray/sp_003.zip"]
    data = json.loads((results / "predictions.json").read_text())
    by_name = {im["file_name"]: im for im in data["images"]}
    for k, name in enumerate(NAMES):
        path = tmp_path / "roi" / (name.rsplit(".", 1)[0] + ".zip")
        with zipfile.ZipFile(path) as archive:
            assert sorted(archive.namelist()) == sorted(
                f"{label}.roi" for label in ("head", "elytra", "antenna", "legs-1", "legs-2")
            )
        rois = {roi.name: roi for roi in roifile.roiread(path)}
        assert len(rois) == 5  # one ROI per structure
        image = by_name[name]
        for ann in data["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            label = CATEGORIES[ann["category_id"]]
            label = f"legs-{ann['instance']}" if label == "legs" else label
            roi = rois[label]
            mask = decode_segmentation(ann["segmentation"], H, W)
            outlines = roi.coordinates(multi=True)
            for outline in outlines:
                assert outline[:, 0].min() >= 0 and outline[:, 0].max() <= W
                assert outline[:, 1].min() >= 0 and outline[:, 1].max() <= H
            np.testing.assert_array_equal(_fill(outlines), mask)
            if label in ("head", "legs-1", "legs-2"):
                assert roi.roitype == roifile.ROI_TYPE.TRACED and not roi.composite
                np.testing.assert_array_equal(outlines[0], mask_outlines(mask)[0])
            else:  # a hole, or two pieces: one composite ROI
                assert roi.composite and len(outlines) == 2
        head = rois["head"].coordinates()
        assert {tuple(p) for p in head} == {(10 + k, 10), (30 + k, 10), (30 + k, 25), (10 + k, 25)}


@pytest.mark.parametrize("seed", range(6))
def test_mask_outlines_cover_exactly_the_mask(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < 0.45
    outlines = mask_outlines(mask)
    np.testing.assert_array_equal(_fill(outlines, 23, 31), mask)
    for outline in outlines:  # only the corners where the outline turns
        steps = np.diff(np.vstack([outline, outline[:1]]), axis=0)
        assert np.all((steps[:, 0] == 0) ^ (steps[:, 1] == 0))
        turns = np.sign(steps)
        assert not np.any(np.all(turns == np.roll(turns, 1, axis=0), axis=1))


def test_pieces_touching_at_a_corner_are_one_outline():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 2] = True
    (outline,) = mask_outlines(mask)
    assert len(outline) == 8
    np.testing.assert_array_equal(_fill([outline], 4, 4), mask)
    assert mask_outlines(np.zeros((3, 3), bool)) == []


def test_the_command_line_publishes_a_results_folder(results, tmp_path, capsys):
    assert main(["publish", "--results", str(results)]) == 0
    assert (results / "publish" / "dwca.zip").is_file()
    assert (results / "publish" / "roi" / "tray" / "sp_003.zip").is_file()
    assert "3 occurrences" in capsys.readouterr().out
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("file_name,colour\nsp_001.jpg,red\n")
    out = tmp_path / "elsewhere"
    assert (
        main(
            ["publish", "--results", str(results), "--sample-sheet", str(sheet), "--out", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam2pal: error:") and "'colour'" in err and "\n" not in err
    assert not (out / "dwca.zip").exists()
