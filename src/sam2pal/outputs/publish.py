"""Publishing a collection's results: a Darwin Core Archive and ImageJ/Fiji ROI sets.

`write_dwca` turns a results folder (predictions.json, measurements.csv, provenance.json
and, when there, qc.csv) into ``dwca.zip``, the format GBIF and the natural-history
data portals take in:

* the **Occurrence core** (occurrence.txt), one row per photographed specimen (image of
  predictions.json). Its `occurrenceID` comes from a sample sheet (`read_sample_sheet`:
  a CSV of ``file_name`` plus Darwin Core Occurrence terms, passed through as columns),
  else from the file name (the name without its extension, folders kept), which the
  archive's eml.xml then says. `basisOfRecord` is PreservedSpecimen unless the sheet
  gives it.
* the **MeasurementOrFact extension** (measurementorfact.txt), one row per value of
  measurements.csv, linked to its specimen by `coreid`: `measurementType` "<structure>
  <measure>" (e.g. "antenna-2 curve length"), `measurementValue` (the table's cell,
  unchanged), `measurementUnit` (mm or mm2 where the table has the millimetre column
  filled, else px or px2; none for eccentricity and solidity), `measurementMethod`
  (the tool, its version, the model, its checkpoint's SHA-256, and the definition of the
  measure, `MEASURE_DEFINITIONS`), `measurementDeterminedDate` (when the masks were
  made; for a structure a person corrected, when it was corrected) and
  `measurementRemarks` (the structure's QC score, the image's QC score and status from
  qc.csv, and whether a person corrected the mask: the annotation's optional
  ``"corrected": {"when", "source"}``). `measurementID` is "<occurrenceID>:<structure>:
  <measure>", unique in the archive and the same on every rerun.
* meta.xml (the DwC text guide's descriptor) and eml.xml (EML 2.1.1 metadata: title,
  method, how the identifiers were made; creator and contact are left for the publisher
  to fill in, as the GBIF IPT asks for them on upload).

The archive is written with the standard library (zipfile, csv, xml.etree), not with a
registry package: dwcahandler 1.1.5 requires pandas < 3 (pinned 3.1.1 here) and installs
flake8, pytest, pytest-cov and pytest-mock as runtime dependencies; dwca-writer 0.2.0
imports pkg_resources (gone with current setuptools) and xmltodict without declaring
it, and leaves eml.xml to the caller; pydwca 0.5.1 installs a top-level package named
``dwca``, the same as python-dwca-reader's, which it would overwrite.

`write_roi_sets` writes one ImageJ ROI set (a zip the ROI Manager opens) per image: one
ROI per structure, named "<structure>" or, for a structure with several instances in
the collection, "<structure>-<instance>". A ROI follows the mask's pixel edges exactly
(`mask_outlines`), so Fiji measures the mask's own pixel count as its area: a structure
in one piece without holes is a traced polygon (what Fiji's wand or "Create Selection"
make); one in several pieces or with holes is one composite ROI of all its outlines,
filled even-odd as ImageJ fills composite shapes (one ROI, one row in Fiji's Results,
like one row of measurements.csv).

Everything is written atomically: a bad input leaves no archive or ROI folder behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_dir, atomic_path
from sam2pal.io.coco import annotation_mask, scan_coco, stream_annotations
from sam2pal.outputs.measure import MASK_MEASURES
from sam2pal.outputs.qc import structure_score

__all__ = [
    "MEASURE_DEFINITIONS",
    "OCCURRENCE_TERMS",
    "mask_outlines",
    "read_sample_sheet",
    "write_dwca",
    "write_roi_sets",
]

DWC = "http://rs.tdwg.org/dwc/terms/"
DCTERMS = "http://purl.org/dc/terms/"
OCCURRENCE_ROW = DWC + "Occurrence"
MOF_ROW = DWC + "MeasurementOrFact"

#: Terms of the Occurrence core a sample sheet may carry as columns (Darwin Core, and
#: the Dublin Core record-level terms, which live in the purl.org/dc/terms namespace).
DCTERMS_TERMS = (
    "type",
    "modified",
    "language",
    "license",
    "rightsHolder",
    "accessRights",
    "bibliographicCitation",
    "references",
)
OCCURRENCE_TERMS = DCTERMS_TERMS + (
    # record level
    "institutionID",
    "collectionID",
    "datasetID",
    "institutionCode",
    "collectionCode",
    "datasetName",
    "ownerInstitutionCode",
    "basisOfRecord",
    "informationWithheld",
    "dataGeneralizations",
    "dynamicProperties",
    # occurrence
    "occurrenceID",
    "catalogNumber",
    "recordNumber",
    "recordedBy",
    "recordedByID",
    "individualCount",
    "organismQuantity",
    "organismQuantityType",
    "sex",
    "lifeStage",
    "reproductiveCondition",
    "caste",
    "behavior",
    "vitality",
    "establishmentMeans",
    "degreeOfEstablishment",
    "pathway",
    "georeferenceVerificationStatus",
    "occurrenceStatus",
    "preparations",
    "disposition",
    "associatedMedia",
    "associatedOccurrences",
    "associatedReferences",
    "associatedSequences",
    "associatedTaxa",
    "otherCatalogNumbers",
    "occurrenceRemarks",
    # organism, material entity
    "organismID",
    "organismName",
    "organismScope",
    "associatedOrganisms",
    "previousIdentifications",
    "organismRemarks",
    "materialEntityID",
    "materialSampleID",
    "verbatimLabel",
    # event
    "eventID",
    "parentEventID",
    "eventType",
    "fieldNumber",
    "eventDate",
    "eventTime",
    "startDayOfYear",
    "endDayOfYear",
    "year",
    "month",
    "day",
    "verbatimEventDate",
    "habitat",
    "samplingProtocol",
    "sampleSizeValue",
    "sampleSizeUnit",
    "samplingEffort",
    "fieldNotes",
    "eventRemarks",
    # location
    "locationID",
    "higherGeographyID",
    "higherGeography",
    "continent",
    "waterBody",
    "islandGroup",
    "island",
    "country",
    "countryCode",
    "stateProvince",
    "county",
    "municipality",
    "locality",
    "verbatimLocality",
    "minimumElevationInMeters",
    "maximumElevationInMeters",
    "verbatimElevation",
    "verticalDatum",
    "minimumDepthInMeters",
    "maximumDepthInMeters",
    "verbatimDepth",
    "minimumDistanceAboveSurfaceInMeters",
    "maximumDistanceAboveSurfaceInMeters",
    "locationAccordingTo",
    "locationRemarks",
    "decimalLatitude",
    "decimalLongitude",
    "geodeticDatum",
    "coordinateUncertaintyInMeters",
    "coordinatePrecision",
    "pointRadiusSpatialFit",
    "verbatimCoordinates",
    "verbatimLatitude",
    "verbatimLongitude",
    "verbatimCoordinateSystem",
    "verbatimSRS",
    "footprintWKT",
    "footprintSRS",
    "footprintSpatialFit",
    "georeferencedBy",
    "georeferencedDate",
    "georeferenceProtocol",
    "georeferenceSources",
    "georeferenceRemarks",
    # geological context
    "geologicalContextID",
    "earliestEonOrLowestEonothem",
    "latestEonOrHighestEonothem",
    "earliestEraOrLowestErathem",
    "latestEraOrHighestErathem",
    "earliestPeriodOrLowestSystem",
    "latestPeriodOrHighestSystem",
    "earliestEpochOrLowestSeries",
    "latestEpochOrHighestSeries",
    "earliestAgeOrLowestStage",
    "latestAgeOrHighestStage",
    "lowestBiostratigraphicZone",
    "highestBiostratigraphicZone",
    "lithostratigraphicTerms",
    "group",
    "formation",
    "member",
    "bed",
    # identification
    "identificationID",
    "verbatimIdentification",
    "identificationQualifier",
    "typeStatus",
    "identifiedBy",
    "identifiedByID",
    "dateIdentified",
    "identificationReferences",
    "identificationVerificationStatus",
    "identificationRemarks",
    # taxon
    "taxonID",
    "scientificNameID",
    "acceptedNameUsageID",
    "parentNameUsageID",
    "originalNameUsageID",
    "nameAccordingToID",
    "namePublishedInID",
    "taxonConceptID",
    "scientificName",
    "acceptedNameUsage",
    "parentNameUsage",
    "originalNameUsage",
    "nameAccordingTo",
    "namePublishedIn",
    "namePublishedInYear",
    "higherClassification",
    "kingdom",
    "phylum",
    "class",
    "order",
    "superfamily",
    "family",
    "subfamily",
    "tribe",
    "subtribe",
    "genus",
    "genericName",
    "subgenus",
    "infragenericEpithet",
    "specificEpithet",
    "infraspecificEpithet",
    "cultivarEpithet",
    "taxonRank",
    "verbatimTaxonRank",
    "scientificNameAuthorship",
    "vernacularName",
    "nomenclaturalCode",
    "taxonomicStatus",
    "nomenclaturalStatus",
    "taxonRemarks",
)

#: Columns of the MeasurementOrFact extension, after its coreid.
MOF_TERMS = (
    "measurementID",
    "measurementType",
    "measurementValue",
    "measurementUnit",
    "measurementMethod",
    "measurementDeterminedDate",
    "measurementRemarks",
)

#: What each measure of measurements.csv is (the wording of `sam2pal.outputs.measure`):
#: (name in measurementType, definition in measurementMethod).
MEASURE_DEFINITIONS = {
    "area_px": ("area", "area: the number of pixels of the mask"),
    "perimeter_px": (
        "perimeter",
        "perimeter: scikit-image's perimeter estimator (4-neighbourhood): a contour through "
        "the centres of the mask's boundary pixels, holes adding their own boundary",
    ),
    "feret_max_px": (
        "maximum Feret diameter",
        "maximum Feret diameter: the largest caliper diameter of the mask (its widest extent "
        "over all directions), on the convex hull of the pixel squares",
    ),
    "feret_min_px": (
        "minimum Feret diameter",
        "minimum Feret diameter: the smallest caliper diameter of the mask (its narrowest "
        "extent over all directions), on the convex hull of the pixel squares",
    ),
    "major_axis_px": (
        "major axis length",
        "major axis length: the major axis of the ellipse with the same second moments as "
        "the mask's pixels",
    ),
    "minor_axis_px": (
        "minor axis length",
        "minor axis length: the minor axis of the ellipse with the same second moments as "
        "the mask's pixels",
    ),
    "eccentricity": (
        "eccentricity",
        "eccentricity: of the ellipse with the same second moments as the mask's pixels "
        "(0 for a disc, towards 1 for elongated shapes)",
    ),
    "solidity": (
        "solidity",
        "solidity: the mask's pixel count over the pixel count of its convex hull (1 for "
        "convex shapes, lower for concave or fragmented ones)",
    ),
    "curve_length_px": (
        "curve length",
        "curve length: the length of the structure along its midline, on its largest piece: "
        "a band (at least about four times as long as wide) along the longest path through "
        "its skeleton, smoothed and prolonged straight to the outline; a compact piece "
        "along its long axis (its extent along the major axis of its ellipse)",
    ),
}

# the millimetre column of a pixel measure, and its units (px, mm)
_MM_OF = {
    "area_px": ("area_mm2", "px2", "mm2"),
    "perimeter_px": ("perimeter_mm", "px", "mm"),
    "feret_max_px": ("feret_max_mm", "px", "mm"),
    "feret_min_px": ("feret_min_mm", "px", "mm"),
    "major_axis_px": (None, "px", None),
    "minor_axis_px": (None, "px", None),
    "eccentricity": (None, "", None),
    "solidity": (None, "", None),
    "curve_length_px": ("curve_length_mm", "px", "mm"),
}

# Columns of the DwC text files: tab-separated, no quoting (the DwC text guide's
# recommended layout); a tab or line break inside a value becomes a space.
_FIELD_SEP = "\t"
_LINE_END = "\n"


# --------------------------------------------------------------------------------------
# reading the results
# --------------------------------------------------------------------------------------


@dataclass
class _Structure:
    """An annotation of predictions.json without its mask."""

    id: object
    image_id: object
    category: str
    instance: int | None
    predicted_iou: float | None
    cycle_iou: float | None
    stability: float | None
    corrected: dict | None
    label: str = ""

    @property
    def qc_score(self) -> float | None:
        """The structure's QC score as in qc.csv (`sam2pal.outputs.qc.structure_score`)."""
        return structure_score(self.cycle_iou, self.predicted_iou, self.stability)


def _predictions(results_dir: Path) -> Path:
    path = results_dir / "predictions.json"
    if not path.is_file():
        raise InputError(f"{path}: no predictions.json in the results folder")
    return path


def _corrected(path: Path, ann: dict) -> dict | None:
    """The annotation's optional ``corrected`` entry (``{"when", "source"}``), checked."""
    value = ann.get("corrected")
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("when"), str):
        raise InputError(
            f"{path}: annotation {ann['id']!r}: 'corrected' must be an object with 'when' "
            "(ISO time) and 'source' (file name)"
        )
    return value


def _label_structures(structures: list[_Structure]) -> None:
    """Name each structure "<category>" or, when its category has an instance other than
    1 anywhere in the file, "<category>-<instance>". Annotations without an `instance`
    are numbered 1, 2 ... on their image in annotation order. Two structures of one image
    with the same name are an InputError (raised by the caller, which knows the file)."""
    ranks: dict = {}
    for s in structures:
        if s.instance is None:
            key = (s.image_id, s.category)
            ranks[key] = ranks.get(key, 0) + 1
            s.instance = ranks[key]
    several = {s.category for s in structures if s.instance != 1}
    for s in structures:
        s.label = f"{s.category}-{s.instance}" if s.category in several else s.category


def _read_structures(path: Path) -> tuple[dict, dict, list[_Structure]]:
    """({image id: image}, {category id: category}, structures) of a predictions file,
    streamed (no masks kept)."""
    images, categories = scan_coco(path, role="predictions file")
    names = {cid: c["name"] for cid, c in categories.items()}
    structures = []
    for ann in stream_annotations(path, images, categories, role="predictions file"):
        structures.append(
            _Structure(
                id=ann["id"],
                image_id=ann["image_id"],
                category=names[ann["category_id"]],
                instance=ann.get("instance"),
                predicted_iou=ann.get("predicted_iou"),
                cycle_iou=ann.get("cycle_iou"),
                stability=ann.get("stability"),
                corrected=_corrected(path, ann),
            )
        )
    _label_structures(structures)
    seen: dict = {}
    for s in structures:
        other = seen.setdefault((s.image_id, s.label), s.id)
        if other != s.id:
            raise InputError(
                f"{path}: image {images[s.image_id]['file_name']!r}: annotations {other!r} and "
                f"{s.id!r} are both {s.label!r}; give each structure its own instance"
            )
    return images, categories, structures


def _read_info(results_dir: Path, predictions: Path) -> dict:
    """The run's provenance: provenance.json, else the `info` of predictions.json."""
    path = results_dir / "provenance.json"
    source = path if path.is_file() else predictions
    try:
        if source == path:
            with open(path, encoding="utf-8") as handle:
                info = json.load(handle)
        else:
            import ijson

            with open(predictions, "rb") as handle:
                info = next(ijson.items(handle, "info", use_float=True), None)
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read the provenance ({exc})") from None
    return info if isinstance(info, dict) else {}


def _read_qc(path: Path) -> dict[str, tuple[str, str]]:
    """{file_name: (qc_score, status)} of qc.csv; empty when there is none."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"file_name", "qc_score", "status"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path}: not a qc.csv (no column {', '.join(sorted(missing))})")
        return {row["file_name"]: (row["qc_score"], row["status"]) for row in reader}


def _read_measurements(path: Path, images: dict, structures: dict) -> list[dict]:
    """The rows of measurements.csv, each checked against predictions.json."""
    if not path.is_file():
        raise InputError(f"{path}: no measurements.csv in the results folder (run measure)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [
            c
            for c in ("file_name", "annotation_id", *MASK_MEASURES)
            if c not in (reader.fieldnames or ())
        ]
        if missing:
            raise InputError(f"{path}: not a measurement table (no column {', '.join(missing)})")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        s = structures.get(row["annotation_id"])
        if s is None or images[s.image_id]["file_name"] != row["file_name"]:
            raise InputError(
                f"{path}, line {number}: annotation {row['annotation_id']} of "
                f"{row['file_name']!r} is not in predictions.json; measure the predictions again"
            )
    return rows


# --------------------------------------------------------------------------------------
# the sample sheet and the occurrences
# --------------------------------------------------------------------------------------


def read_sample_sheet(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read a sample sheet: a CSV with a ``file_name`` column and Darwin Core Occurrence
    terms (`OCCURRENCE_TERMS`, e.g. occurrenceID, catalogNumber, institutionCode,
    scientificName) as the other columns.

    Args:
        path: the CSV (UTF-8, comma-separated; Excel's byte order mark is accepted).

    Returns:
        {file_name: {term: value}}, empty cells left out. Raises InputError naming the
        file (and line) when it is missing, not a UTF-8 CSV, has no file_name column or
        a column that is no Occurrence term, an empty or twice-listed file_name, or an
        occurrenceID given twice.
    """
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise InputError(f"{path}: sample sheet not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the sample sheet ({exc.strerror})") from None
    sheet: dict[str, dict[str, str]] = {}
    lines: dict[str, int] = {}
    with handle:
        try:
            reader = csv.DictReader(handle)
            header = [(name or "").strip() for name in (reader.fieldnames or [])]
            if "file_name" not in header:
                raise InputError(
                    f"{path}: not a sample sheet (a CSV whose first line names the columns "
                    f"file_name and Darwin Core terms such as occurrenceID; found {','.join(header)[:80]!r})"
                )
            for column in header:
                if column != "file_name" and column not in OCCURRENCE_TERMS:
                    raise InputError(
                        f"{path}: column {column!r} is not a Darwin Core Occurrence term "
                        "(e.g. occurrenceID, catalogNumber, institutionCode, scientificName)"
                    )
            if len(set(header)) != len(header):
                raise InputError(f"{path}: a column is named twice")
            reader.fieldnames = header
            for row in reader:
                values = {k: (v or "").strip() for k, v in row.items() if isinstance(v, str)}
                if None in row:
                    raise InputError(f"{path}, line {reader.line_num}: more cells than columns")
                if not any(values.values()):
                    continue
                name = values.pop("file_name")
                if not name:
                    raise InputError(f"{path}, line {reader.line_num}: empty file_name")
                if "occurrenceID" in header and not values.get("occurrenceID"):
                    raise InputError(
                        f"{path}, line {reader.line_num}: empty occurrenceID for {name!r}"
                    )
                if name in sheet:
                    raise InputError(
                        f"{path}, line {reader.line_num}: file_name {name!r} is listed twice "
                        f"(first on line {lines[name]})"
                    )
                sheet[name] = {k: v for k, v in values.items() if v}
                lines[name] = reader.line_num
        except UnicodeDecodeError:
            raise InputError(
                f"{path}: not a UTF-8 CSV file (save the sheet as 'CSV UTF-8')"
            ) from None
        except csv.Error as exc:
            raise InputError(f"{path}: not a readable CSV file ({exc})") from None
    return sheet


def _bare(file_name: str) -> str:
    return file_name.replace("\\", "/").rsplit("/", 1)[-1]


def _sheet_rows(sheet: dict, file_names: list[str], sheet_path) -> dict[str, dict]:
    """The sheet's row of each image: the row of its file_name, else of its bare name
    (without folders) when that is unique in the sheet. An image without a row is an
    InputError: a published dataset does not mix the sheet's identifiers with ones made
    from file names."""
    by_bare: dict[str, list[str]] = {}
    for name in sheet:
        by_bare.setdefault(_bare(name), []).append(name)
    rows, missing = {}, []
    for name in file_names:
        if name in sheet:
            rows[name] = sheet[name]
        elif len(by_bare.get(_bare(name), ())) == 1:
            rows[name] = sheet[by_bare[_bare(name)][0]]
        else:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(
            f"{sheet_path}: no row for image {missing[0]!r}{more}; add a row per image of "
            "the collection"
        )
    return rows


def _derived_id(file_name: str) -> str:
    """An occurrenceID made from a file name: the name without its extension."""
    path = PurePosixPath(file_name.replace("\\", "/"))
    return str(path.with_suffix("")) if path.suffix else str(path)


def _occurrences(images: list[dict], sheet: dict | None, sheet_path) -> tuple[list[dict], bool]:
    """One core row per image ({term: value}), in file-name order, with occurrenceID
    unique; and whether the occurrenceIDs were made from the file names (no sheet, or a
    sheet without that column)."""
    names = [image["file_name"] for image in images]
    rows = _sheet_rows(sheet, names, sheet_path) if sheet is not None else {}
    where = sheet_path if sheet is not None else "predictions.json"
    occurrences, seen, derived = [], {}, False
    for name in names:
        row = dict(rows.get(name, {}))
        if "occurrenceID" not in row:
            row["occurrenceID"], derived = _derived_id(name), True
        row.setdefault("basisOfRecord", "PreservedSpecimen")
        row.setdefault("occurrenceRemarks", f"measured on the image {name} by sam2-pal")
        other = seen.setdefault(row["occurrenceID"], name)
        if other != name:
            raise InputError(
                f"{where}: images {other!r} and {name!r} both give occurrenceID "
                f"{row['occurrenceID']!r}; each specimen needs its own"
            )
        occurrences.append(row)
    return occurrences, derived


# --------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------


def _method_prefix(info: dict) -> str:
    """ "sam2-pal <version>, model <name> (checkpoint SHA-256 <hash>)[, adapter ...]"."""
    model = info.get("model") or {}
    checkpoint = str(model.get("checkpoint") or "unknown")
    name = Path(checkpoint).name if checkpoint not in ("", "random") else checkpoint
    text = f"sam2-pal {info.get('version') or 'unknown version'} segmentation mask, model {name}"
    if model.get("checkpoint_sha256"):
        text += f" (checkpoint SHA-256 {model['checkpoint_sha256']})"
    adapter = info.get("adapter") or {}
    if adapter.get("sha256"):
        text += f", fine-tuned adapter SHA-256 {adapter['sha256']}"
    return text


def _remarks(s: _Structure, image_qc: tuple[str, str] | None) -> str:
    score = s.qc_score
    parts = []
    if score is not None:
        source = "cycle IoU" if s.cycle_iou is not None else "predicted IoU"
        if s.stability is not None:
            source += " x stability"
        parts.append(f"QC score {score:.4f} ({source})")
    if image_qc is not None:
        parts.append(f"image QC score {image_qc[0] or 'none'}, status {image_qc[1]} (qc.csv)")
    if s.corrected:
        source = s.corrected.get("source")
        parts.append(
            f"corrected by a person: yes ({s.corrected['when']}"
            + (f", {source})" if source else ")")
        )
    else:
        parts.append("corrected by a person: no")
    return "; ".join(parts)


def _measurement_rows(
    rows: list[dict],
    structures: dict,
    images: dict,
    occurrence_ids: dict,
    info: dict,
    qc: dict,
) -> list[list[str]]:
    """The MeasurementOrFact rows (coreid first, then `MOF_TERMS`) of measurements.csv:
    one per filled cell; a length or area in mm where its _mm cell is filled, else in
    pixels."""
    prefix = _method_prefix(info)
    made = str(info.get("finished") or info.get("date_created") or "")
    out = []
    for row in rows:
        s = structures[row["annotation_id"]]
        file_name = images[s.image_id]["file_name"]
        occurrence = occurrence_ids[file_name]
        remarks = _remarks(s, qc.get(file_name))
        date = s.corrected["when"] if s.corrected else made
        for measure in MASK_MEASURES:
            mm_column, px_unit, mm_unit = _MM_OF[measure]
            value, unit = row.get(measure, ""), px_unit
            if mm_column and row.get(mm_column):
                value, unit = row[mm_column], mm_unit
            if not value:
                continue  # not measurable (an empty mask's shape measures)
            name, definition = MEASURE_DEFINITIONS[measure]
            key = measure.removesuffix("_px")
            out.append(
                [
                    occurrence,
                    f"{occurrence}:{s.label}:{key}",
                    f"{s.label} {name}",
                    value,
                    unit,
                    f"{prefix}; {definition}",
                    date,
                    remarks,
                ]
            )
    return out


# --------------------------------------------------------------------------------------
# the archive files
# --------------------------------------------------------------------------------------


def _clean(value) -> str:
    """A cell of a DwC text file, which has no quoting: tabs and line breaks become
    spaces."""
    text = "" if value is None else str(value)
    return (
        " ".join(text.replace("\t", " ").splitlines())
        if ("\t" in text or "\n" in text or "\r" in text)
        else text
    )


def _table(header: list[str], rows: list[list[str]]) -> bytes:
    lines = [_FIELD_SEP.join(header)]
    lines += [_FIELD_SEP.join(_clean(v) for v in row) for row in rows]
    return (_LINE_END.join(lines) + _LINE_END).encode("utf-8")


def _term_uri(term: str) -> str:
    return (DCTERMS if term in DCTERMS_TERMS else DWC) + term


def _file_element(tag: str, location: str, row_type: str, id_tag: str, terms: list[str]):
    element = ET.Element(
        tag,
        {
            "encoding": "UTF-8",
            "fieldsTerminatedBy": "\\t",
            "linesTerminatedBy": "\\n",
            "fieldsEnclosedBy": "",
            "ignoreHeaderLines": "1",
            "rowType": row_type,
        },
    )
    ET.SubElement(ET.SubElement(element, "files"), "location").text = location
    ET.SubElement(element, id_tag, {"index": "0"})
    for index, term in enumerate(terms, start=1):
        ET.SubElement(element, "field", {"index": str(index), "term": _term_uri(term)})
    return element


def _meta_xml(core_terms: list[str]) -> bytes:
    archive = ET.Element(
        "archive", {"xmlns": "http://rs.tdwg.org/dwc/text/", "metadata": "eml.xml"}
    )
    archive.append(_file_element("core", "occurrence.txt", OCCURRENCE_ROW, "id", core_terms))
    archive.append(
        _file_element("extension", "measurementorfact.txt", MOF_ROW, "coreid", list(MOF_TERMS))
    )
    return _xml_bytes(archive)


def _xml_bytes(root) -> bytes:
    tree = ET.ElementTree(root)
    ET.indent(tree)
    buffer = io.BytesIO()
    tree.write(buffer, encoding="UTF-8", xml_declaration=True)
    return buffer.getvalue() + b"\n"


def _party(dataset, role: str) -> None:
    """A creator or contact for the publisher to fill in (EML requires both)."""
    party = ET.SubElement(dataset, role)
    ET.SubElement(party, "positionName").text = f"{role} (fill in before publishing)"


def _eml_xml(info: dict, collection: str, n_images: int, derived_ids: bool) -> bytes:
    """EML 2.1.1 metadata (GBIF profile): title, dates, abstract and method."""
    ET.register_namespace("eml", "eml://ecoinformatics.org/eml-2.1.1")
    eml = ET.Element(
        "{eml://ecoinformatics.org/eml-2.1.1}eml",
        {
            "packageId": f"sam2pal-{collection}",
            "system": "sam2-pal",
            "scope": "system",
            "{http://www.w3.org/XML/1998/namespace}lang": "en",
        },
    )
    dataset = ET.SubElement(eml, "dataset")
    ET.SubElement(dataset, "title").text = f"Morphometric measurements of {collection} (sam2-pal)"
    _party(dataset, "creator")
    made = str(info.get("finished") or info.get("date_created") or "")
    if made:
        ET.SubElement(dataset, "pubDate").text = made[:10]
    ET.SubElement(dataset, "language").text = "en"
    ids = (
        "occurrenceID is the image file name without its extension (the sample sheet, if "
        "any, gave none): unique within this dataset only."
        if derived_ids
        else "occurrenceID and the other occurrence terms come from the sample sheet."
    )
    abstract = ET.SubElement(dataset, "abstract")
    ET.SubElement(abstract, "para").text = (
        f"Size and shape measurements of the structures of {n_images} specimen photos of "
        f"the collection {collection}, segmented with SAM2 from annotated templates by "
        f"sam2-pal. {ids}"
    )
    _party(dataset, "contact")  # EML's order: title, creator, pubDate ... contact, methods
    methods = ET.SubElement(dataset, "methods")
    step = ET.SubElement(ET.SubElement(methods, "methodStep"), "description")
    ET.SubElement(step, "para").text = (
        f"{_method_prefix(info)}. Each measurement's measurementMethod defines it; "
        "measurementRemarks gives the structure's QC score (cycle IoU, a label-free "
        "estimate of the mask's IoU, else SAM2's predicted IoU, times the mask's "
        "stability where recorded) and whether a person "
        f"corrected the mask. {ids}"
    )
    return _xml_bytes(eml)


def write_dwca(
    results_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    sample_sheet: str | os.PathLike | None = None,
) -> dict:
    """Write the Darwin Core Archive of a results folder (see the module docstring).

    Args:
        results_dir: the folder `sam2pal segment` or the workflow wrote: predictions.json,
            measurements.csv, provenance.json (else the predictions' info) and, when
            there, qc.csv.
        out_path: the archive (dwca.zip), written atomically.
        sample_sheet: CSV of file_name and Darwin Core Occurrence terms
            (`read_sample_sheet`); None: occurrenceIDs from the file names.

    Returns:
        {"occurrences", "measurements"}: the rows of each file. Raises InputError (one
        line naming the file) on a bad input, writing nothing.
    """
    results_dir = Path(results_dir)
    predictions = _predictions(results_dir)
    sheet = read_sample_sheet(sample_sheet) if sample_sheet is not None else None
    images_by_id, _, structures = _read_structures(predictions)
    images = sorted(images_by_id.values(), key=lambda im: im["file_name"])
    info = _read_info(results_dir, predictions)
    by_id = {str(s.id): s for s in structures}
    rows = _read_measurements(results_dir / "measurements.csv", images_by_id, by_id)
    qc = _read_qc(results_dir / "qc.csv")
    occurrences, derived_ids = _occurrences(images, sheet, sample_sheet)
    occurrence_ids = {
        image["file_name"]: row["occurrenceID"] for image, row in zip(images, occurrences)
    }
    measurements = _measurement_rows(rows, by_id, images_by_id, occurrence_ids, info, qc)
    used = {term for row in occurrences for term in row}
    core_terms = ["occurrenceID"] + [
        t for t in OCCURRENCE_TERMS if t in used and t != "occurrenceID"
    ]
    core_rows = [
        [row["occurrenceID"]] + [row.get(t, "") for t in core_terms] for row in occurrences
    ]
    collection = str(info.get("collection") or results_dir.resolve().name)
    files = {
        "meta.xml": _meta_xml(core_terms),
        "eml.xml": _eml_xml(info, collection, len(images), derived_ids),
        "occurrence.txt": _table(["id", *core_terms], core_rows),
        "measurementorfact.txt": _table(["coreid", *MOF_TERMS], measurements),
    }
    # the zip is closed before atomic_path renames it into place
    with (
        atomic_path(out_path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive,
    ):
        for name, data in files.items():
            archive.writestr(name, data)
    return {"occurrences": len(core_rows), "measurements": len(measurements)}


# --------------------------------------------------------------------------------------
# ImageJ / Fiji ROI sets
# --------------------------------------------------------------------------------------

# directions of a pixel edge, clockwise in image coordinates (y down): east, south,
# west, north; a left turn is one step anticlockwise
_STEPS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def _edges(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The boundary edges of the pixel squares of a mask, each directed with the mask
    on its right: (start corner (x, y), end corner, direction 0-3 of `_STEPS`)."""
    p = np.pad(crop.astype(bool), 1)
    inside, above = p[1:, 1:-1], p[:-1, 1:-1]  # pixel (y, x) and pixel (y - 1, x)
    here, left = p[1:-1, 1:], p[1:-1, :-1]  # pixel (y, x) and pixel (y, x - 1)
    found = [
        (np.argwhere(inside & ~above), 0),  # top edges: (x, y) -> (x + 1, y)
        (np.argwhere(~inside & above), 2),  # bottom edges: (x + 1, y) -> (x, y)
        (np.argwhere(~here & left), 1),  # right edges: (x, y) -> (x, y + 1)
        (np.argwhere(here & ~left), 3),  # left edges: (x, y + 1) -> (x, y)
    ]
    starts, directions = [], []
    for yx, direction in found:
        xy = yx[:, ::-1]
        if direction == 2:
            xy = xy + [1, 0]
        elif direction == 3:
            xy = xy + [0, 1]
        starts.append(xy)
        directions.append(np.full(len(xy), direction))
    start = np.concatenate(starts)
    direction = np.concatenate(directions)
    return start, start + _STEPS[direction], direction


def mask_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The outlines of a mask along its pixel edges: every piece's outer outline and
    every hole's, as closed polygons of pixel corners.

    Pixel (row r, column c) is the square [c, c + 1] x [r, r + 1]; filled even-odd, the
    outlines cover exactly the mask's pixels. Pieces that touch only at a corner are one
    piece (8-connected, as `sam2pal.outputs.measure` counts pieces).

    Args:
        mask: a 2-D bool array.

    Returns:
        A list of int arrays (n, 2) of (x, y) corners, the first corner not repeated at
        the end, only the corners where the outline turns; outer outlines run clockwise
        on the image (y down), holes anticlockwise. Empty for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    start, end, direction = _edges(crop)
    width = crop.shape[1] + 1
    start_key = start[:, 1] * width + start[:, 0]
    end_key = (end[:, 1] * width + end[:, 0]).tolist()
    outgoing: dict[int, list[int]] = {}
    for index, key in enumerate(start_key.tolist()):
        outgoing.setdefault(key, []).append(index)
    directions = direction.tolist()
    used = [False] * len(directions)
    outlines = []
    for first in range(len(directions)):
        if used[first]:
            continue
        corners, edge = [], first
        while True:
            used[edge] = True
            corners.append(edge)
            choices = [e for e in outgoing[end_key[edge]] if not used[e] or e == first]
            if len(choices) > 1:  # two pieces meet at a corner: turn left, keep them one
                turn = (directions[edge] + 3) % 4
                choices = [e for e in choices if directions[e] == turn]
            edge = choices[0]
            if edge == first:
                break
        # keep the corners where the direction changes
        turns = [e for k, e in enumerate(corners) if directions[e] != directions[corners[k - 1]]]
        outline = start[turns] + [x0, y0]
        outlines.append(outline.astype(np.int64))
    return outlines


def _roi(label: str, outlines: list[np.ndarray]):
    """The ImageJ ROI of a structure: a traced polygon for one outline, else a
    composite (shape) ROI of all of them."""
    from roifile import ROI_TYPE, ImagejRoi

    if len(outlines) == 1:
        roi = ImagejRoi.frompoints(outlines[0].astype(np.int32), name=label)
        roi.roitype = ROI_TYPE.TRACED
        return roi
    path: list[float] = []
    for outline in outlines:
        path += [0.0, float(outline[0, 0]), float(outline[0, 1])]  # MOVETO
        for x, y in outline[1:]:
            path += [1.0, float(x), float(y)]  # LINETO
        path.append(4.0)  # CLOSE
    corners = np.concatenate(outlines)
    roi = ImagejRoi(roitype=ROI_TYPE.RECT, name=label)
    roi.multi_coordinates = np.asarray(path, dtype=np.float32)
    roi.shape_roi_size = len(path)
    roi.left, roi.top = (int(v) for v in corners.min(axis=0))
    roi.right, roi.bottom = (int(v) for v in corners.max(axis=0))
    return roi


def _roi_zip_name(file_name: str) -> str:
    """The ROI set of an image: its file name with .zip for its extension (folders
    kept)."""
    return _derived_id(file_name) + ".zip"


def write_roi_sets(predictions: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Write one ImageJ/Fiji ROI set per image: ``<out_dir>/<image name without its
    extension>.zip`` (subfolders of the collection kept), one ROI per structure (see the
    module docstring). The folder is replaced as a whole, atomically.

    Args:
        predictions: the COCO predictions file (predictions.json).
        out_dir: the folder of the ROI sets.

    Images where no structure was found get no ROI set.

    Returns:
        The number of ROIs written. Raises InputError (one line naming the file) on a bad
        predictions file, or when two images would share a ROI set (photo.jpg and
        photo.png).
    """
    from roifile import roiwrite

    predictions = Path(predictions)
    if not predictions.is_file():
        raise InputError(f"{predictions}: predictions file not found")
    images, categories, structures = _read_structures(predictions)
    zips: dict[str, str] = {}
    for image in sorted(images.values(), key=lambda im: im["file_name"]):
        name = _roi_zip_name(image["file_name"])
        other = zips.setdefault(name, image["file_name"])
        if other != image["file_name"]:
            raise InputError(
                f"{predictions}: images {other!r} and {image['file_name']!r} differ only in "
                f"their extension and would share the ROI set {name}; rename one"
            )
    labels = {s.id: s.label for s in structures}
    count = 0
    with atomic_dir(out_dir) as tmp:
        written: set = set()
        for ann in stream_annotations(predictions, images, categories, role="predictions file"):
            image = images[ann["image_id"]]
            outlines = mask_outlines(annotation_mask(predictions, image, ann))
            if not outlines:
                continue
            target = tmp / _roi_zip_name(image["file_name"])
            target.parent.mkdir(parents=True, exist_ok=True)
            # a set is started fresh, then appended to (annotations of an image usually
            # come together, but need not)
            mode = "a" if target in written else "w"
            roiwrite(target, [_roi(labels[ann["id"]], outlines)], mode=mode)
            written.add(target)
            count += 1
    return count
