"""Per-image result records: the JSON written and read back, the same text as the
records of a real run, and a clear error for a line that is no record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam2pal.errors import InputError
from sam2pal.inference.engine import StructurePrediction
from sam2pal.io.masks import BoxMask
from sam2pal.io.records import (
    ImageRecord,
    PartialRecords,
    StructureRecord,
    read_records,
    skipped_of,
)

# records written by the demo run (results/demo and results/demo_video): a photo, and
# a video keyframe (annotated structures flagged, frame index and time)
PHOTO_LINE = '{"file_name": "specimen_000.jpg", "width": 480, "height": 360, "structures": [{"category_id": 1, "instance": 1, "segmentation": {"size": [360, 480], "counts": "jZg13U;000O1O1C=O1000O10L06F9O0O1O1N^F2n70PH0R8OmG1S80lG0T80lG0T80iFMg03a8OfF0i01b81`F0n0Od89[GGf88ZGFh8:YGEC3[88QHEE3_83lGIF4a80iGLF4b8OhGMF4b8OhGMF4c8N^H2c7M]H3c7M]H3c7M]H3c7M]H3c7M]H3c7M]H3c7M]H3c7M]H3c7M]H3\\\\90000OcN0\\\\F7k0Ic8f0nFCZ97gFH[96gFAb9=f0O00;E3M02N4^EJj96nEKKOW:7UFID0P:7cFI]97bFJ^99^FHb9;[FEk94WFKj93XFLh93h0O00Z]1NhbN0N3N10000001O1O0010VR1NhmN32N1O00QRb2"}, "area": 764, "bbox": [157.0, 126.0, 89.0, 83.0], "score": 0.013961, "predicted_iou": 0.017077, "object_score": 0.81753, "cycle_iou": 0.097259, "clamped": false}, {"category_id": 2, "instance": 1, "segmentation": {"size": [360, 480], "counts": "kZg11W;1N1O1GNZE4d::O0O010O10000002NKC_E=a:C`E<l0Dg8=YGCf8>[GAd8`0\\\\GCa8=_GCa80`F8n0Hc8<^GDe89[GDh8<WGEi8;WGEi8:XGFi8OZF6l0JQ95R1O1O1O1O001OP=0QC2M1O001O00O0100cNM]F8j0Kg8>WGCl8:TGFn87SGIn86SGIm86VGHj88WGGV:O00be01aoN7X:KgE2\\\\:NdE2\\\\:OcE0]:1cEO5Lj95RFN4MY:3gEMX:3\\\\EO8O[:1_E30Oa:N_E3N1]:JgE2N;b:D^E4N1d:L]E3O1d:4_EIa:7`EHa:6aEI_:7aEI`:6_EKb:4\\\\ENe:1ZEOh:0XEOh:3WENh:901NLZEHf:1ZE11MS;01OaUd2"}, "area": 891, "bbox": [157.0, 129.0, 83.0, 81.0], "score": 0.110677, "predicted_iou": 0.125669, "object_score": 0.880705, "cycle_iou": 0.119117, "clamped": false}, {"category_id": 3, "instance": 1, "segmentation": {"size": [360, 480], "counts": "jg`01^bV11Q^iN16NY90bF25Nj92UFO^:4ALhE7V:d0J000O101O0O1IQOTFP1k9ROTFn0f9POZF4Nn0f9QOZF2Om0h9oNZF4Nm0m9ROTFn0l9ROUFm0k9SOVFl0j9SOXFl0i9SOXFm0g9ROZFn0P:00001dFVOX8j0hGVOX8i0iGWOW8i0iGWOX8h0gGZOX8f0hGZOW8g0iGZOVOHl8m0oG@P8`0PH@P8`0PHAn7`0RHAm7?SHAm7?SHBl7>THDj7;WHGg79YHHg77YHJf76ZHKf73[H1d7XO`GO01P1k0`7QOdG0U1R1i800010O3M6J2M4M5K3M1O1O010O001O0O10000YOSNQHP2d8O1N10]OSNkGm1U8SNkGm1h80HTNTGl1k8UNTGm1d8RN\\\\G2Nm1f8RN[G1Nn1h8PNZG2Nn1h8oMZG5Ml1n8TNRGl1n87O13iMQGP21nMo8Q2PGPNP9P2oFQNQ9S2001O010O00001O00001O2N2N7I1O1O1O0O3J6M3M6J3E`0G9I2M\\\\dZ2"}, "area": 5365, "bbox": [47.0, 129.0, 220.0, 148.0], "score": 0.674968, "predicted_iou": 0.676341, "object_score": 0.997971, "cycle_iou": 0.626814, "clamped": false}, {"category_id": 4, "instance": 1, "segmentation": {"size": [360, 480], "counts": "cRi14T;000O1KMUE3k:NTE2Q;O100Ol<2SC0_NLnG4R8MnG2R8NnG2R8OmG1S8NnG2d900000^EMa85kHO\\\\7L^H4b7L^H4b7L^H4b7MfGOF3d8OfGNF3e8N\\\\H2d7N\\\\H2d7N\\\\H3c7M^H2b7N^H2b7N^H2b7N]H3c7M]H3\\\\9000002Mkd0h0^POZOc9a0]F^Oe9?^F_Od9`0b0O2OaEB^:4>N01N2N1O00000000OQR1KUnN0^f63aYIN1O000000a[a2"}, "area": 402, "bbox": [162.0, 125.0, 86.0, 84.0], "score": 0.003824, "predicted_iou": 0.004439, "object_score": 0.861349, "cycle_iou": 0.0, "clamped": false}, {"category_id": 5, "instance": 1, "segmentation": {"size": [360, 480], "counts": "cRi14T;000O1KMUE3k:NTE2Q;O100OX;NW[O4`90_NLnG4R8MnG2R8NnG2R8OmG1S8NnG2d900000^EMa85kHOR7LYG0_14b7L^H4b7M]H3b7NgGNF3d8OfGNF3e8N\\\\H2d7N\\\\H2d7N\\\\H3c7M^H2b7N^H2b7N^H2b7N]H3c7M]H3\\\\9000002Mkd0h0^POZOc9a0]F^Oe9?^F_Od9`0b0O2OaEB^:4>N01N2N1O00000000OQR1KUnN0^f63aYIN1O000000a[a2"}, "area": 406, "bbox": [162.0, 125.0, 86.0, 84.0], "score": 0.003882, "predicted_iou": 0.004512, "object_score": 0.860423, "cycle_iou": 0.035336, "clamped": false}]}'
KEYFRAME_LINE = '{"file_name": "00008.jpg", "width": 320, "height": 240, "structures": [{"category_id": 1, "instance": 1, "segmentation": {"size": [240, 320], "counts": "i[j0110Y77O0hHIT7:00O3N1O1M3M2000N110O1_OUI=l6BSI:0GP795M4IjH0[7010O010cW[1"}, "area": 261, "bbox": [112.0, 112.0, 23.0, 22.0], "score": 1.0, "predicted_iou": 1.0, "object_score": 1.0, "cycle_iou": null, "clamped": false, "keyframe": true}, {"category_id": 2, "instance": 1, "segmentation": {"size": [240, 320], "counts": "dkf05Z72M4L3O1M3O0O3N002M2N2OO102N2M2O2N002M1O3N0N3O0N3M3Mji]1"}, "area": 430, "bbox": [97.0, 122.0, 27.0, 27.0], "score": 1.0, "predicted_iou": 1.0, "object_score": 1.0, "cycle_iou": null, "clamped": false, "keyframe": true}, {"category_id": 3, "instance": 1, "segmentation": {"size": [240, 320], "counts": "_Y=1[75J8K2N4M1O2M2N3OOO3N002N010N20OO200N110O0010OO2000O00O20O10N110O01O010O1O1O3N1M4N3K212K112L202L2DnH:T7N3O1M3MYRa1"}, "area": 1492, "bbox": [56.0, 134.0, 54.0, 50.0], "score": 1.0, "predicted_iou": 1.0, "object_score": 1.0, "cycle_iou": null, "clamped": false, "keyframe": true}, {"category_id": 4, "instance": 1, "segmentation": {"size": [240, 320], "counts": "XTj03\\\\7N`72bHN10_80oN0`H10O11OOO1O0gHOP70TI0K2R70PI0U72U]\\\\1"}, "area": 38, "bbox": [111.0, 116.0, 19.0, 33.0], "score": 1.0, "predicted_iou": 1.0, "object_score": 1.0, "cycle_iou": null, "clamped": false, "keyframe": true}, {"category_id": 5, "instance": 1, "segmentation": {"size": [240, 320], "counts": "_f:4\\\\7N2Oa71^HO20O1_70aH1ON1002ON11O0dH0Y70gH0X732O00iINQ51PKOlNOQ63SKNP51QKNn43RKNn41W10mIOk4O[11kI0i4OXK1h41oINV10k46SKKl46TKJm44SKLn44RKKo43RKNQ5OoJ1W602OO1O11NfM0nJ0O000Q22m21RKM10O013[7O`JNd33YLNf35VLKo32oKOT42YJ0V1LkN1i58YKInNOl55VK0k4NTK2P5JRK6k4MUK3k4KYK2V6MX?0g@1MOhH0T70jH2V7OkH0l60YIOK3l6OZI2f61WIOl60RI0i6NXI1NOONm62WI2n6170gHLV772M111N1LeH0Tg^1"}, "area": 379, "bbox": [45.0, 99.0, 76.0, 92.0], "score": 1.0, "predicted_iou": 1.0, "object_score": 1.0, "cycle_iou": null, "clamped": false, "keyframe": true}], "frame_index": 8, "time_s": 1.0}'


@pytest.mark.parametrize("line", [PHOTO_LINE, KEYFRAME_LINE])
def test_stored_record_reads_back_to_the_same_text(line):
    record = ImageRecord.from_json(json.loads(line))
    assert record.to_line() == line + "\n"
    assert ImageRecord.from_json(record.to_json()) == record


def test_keyframe_record_fields():
    record = ImageRecord.from_json(json.loads(KEYFRAME_LINE))
    assert (record.frame_index, record.time_s) == (8, 1.0)
    assert any(s.keyframe for s in record.structures)
    assert all(isinstance(s, StructureRecord) for s in record.structures)


def _prediction(**scores) -> StructurePrediction:
    """A prediction of a 3 x 5 box on a 6 x 8 image, with `scores`."""
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    return StructurePrediction(category_id=2, instance=1, box=BoxMask.from_full(mask), **scores)


def test_round_trip_of_records_made_here():
    pred = _prediction(predicted_iou=0.91234567, object_score=0.5, cycle_iou=None)
    structure = StructureRecord.from_prediction(pred)
    assert structure.predicted_iou == 0.912346 and structure.cycle_iou is None
    assert structure.area == 15 and "keyframe" not in structure.to_json()
    record = ImageRecord("a/b.jpg", width=8, height=6, structures=[structure])
    skipped = ImageRecord.skip("c.jpg", "cannot read image (truncated)")
    frame = ImageRecord.skip("00001.jpg", "empty file")
    frame.frame_index, frame.time_s = 1, None
    for each in (record, skipped, frame):
        assert ImageRecord.from_json(json.loads(each.to_line())) == each
    assert list(skipped.to_json()) == ["file_name", "skipped"]
    assert list(frame.to_json()) == ["file_name", "skipped", "frame_index", "time_s"]
    assert list(record.to_json()) == ["file_name", "width", "height", "structures"]
    assert "stability" not in structure.to_json()  # not recorded: left out


def test_the_stability_is_recorded_after_the_other_scores_and_reads_back():
    """A prediction's stability is written (rounded) after `clamped`; a record written
    before it was recorded reads with none (`test_stored_record_reads_back_...`)."""
    pred = _prediction(predicted_iou=0.9, object_score=0.5, cycle_iou=0.4, stability=0.87654321)
    structure = StructureRecord.from_prediction(pred)
    data = structure.to_json()
    assert structure.stability == 0.876543
    assert list(data)[list(data).index("clamped") + 1] == "stability"
    record = ImageRecord("a.jpg", width=8, height=6, structures=[structure])
    assert ImageRecord.from_json(json.loads(record.to_line())) == record
    assert ImageRecord.from_json(json.loads(PHOTO_LINE)).structures[0].stability is None


ORIENTATION = {
    "rotation": 90,
    "mirrored": True,
    "candidates": [
        {"rotation": r, "mirrored": m, "score": round(0.1 + r / 1000 + 0.5 * m, 6)}
        for m in (False, True)
        for r in (0, 90, 180, 270)
    ],
}


def test_the_orientation_found_round_trips_and_is_left_out_when_not_searched(tmp_path):
    searched = ImageRecord.from_json(json.loads(PHOTO_LINE))
    assert searched.orientation is None and "orientation" not in searched.to_json()
    searched.orientation = ORIENTATION
    line = searched.to_line()
    data = json.loads(line)
    assert list(data) == ["file_name", "width", "height", "structures", "orientation"]
    assert data["orientation"] == ORIENTATION
    again = ImageRecord.from_json(data)
    assert again == searched and again.to_line() == line
    # through a result file, and a skipped image has none
    path = tmp_path / "r.jsonl"
    path.write_text(line + ImageRecord.skip("c.jpg", "empty file").to_line())
    read = list(read_records(path))
    assert read[0].orientation == ORIENTATION and read[1].orientation is None
    with pytest.raises(ValueError, match="unknown orientation"):
        ImageRecord.from_json({"file_name": "c.jpg", "skipped": "x", "orientation": ORIENTATION})


def test_read_records_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(PHOTO_LINE + "\n" + '{"file_name": "x.jpg", "width": 3}\n')
    with pytest.raises(InputError, match=r"r\.jsonl, line 2: not a result record .*no height"):
        list(read_records(path))
    path.write_text("not json\n")
    with pytest.raises(InputError, match=r"r\.jsonl, line 1: not a result record"):
        list(read_records(path))


def test_skipped_of_counts_records_and_lists_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    skipped = ImageRecord.skip("b.jpg", "empty file")
    path.write_text(PHOTO_LINE + "\n" + skipped.to_line())
    assert skipped_of([path]) == (2, [("b.jpg", "empty file")])


def test_partial_records_resume_and_finalise_in_file_name_order(tmp_path):
    out = tmp_path / "r.jsonl"
    partial = PartialRecords(out, "key")
    partial.start()
    photo = ImageRecord.from_json(json.loads(PHOTO_LINE))
    with partial.appender() as appender:
        appender.append(ImageRecord.skip("z.jpg", "empty file"))
        appender.append(photo)
    with open(partial.path, "a", encoding="utf-8") as handle:
        handle.write('{"file_name": "cut')  # a crash in the middle of a line
    assert PartialRecords(out, "other").resume() == set()
    assert partial.resume() == {photo.file_name}  # the skipped image is tried again
    with partial.appender() as appender:
        appender.append(ImageRecord("z.jpg", 1, 1))
    partial.finalise()
    assert not partial.path.exists()
    assert [r.file_name for r in read_records(out)] == [photo.file_name, "z.jpg"]
    assert out.read_text().splitlines()[0] == PHOTO_LINE
