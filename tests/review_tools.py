"""Helpers of the review tests: a small results folder written with the project's own
writers, and the real review tools driven from the outside.

The tools live in venvs of their own (`make review-tools`: .venv-tools/labelstudio and
.venv-tools/datumaro; they cannot share .venv's pins). `tools_python` builds them when
they are missing. `LabelStudio` runs a Label Studio server on a free localhost port
with a user and API token made on the command line, and talks to its REST API with
urllib: projects, local-files storage, task import, annotations, exports.
`datumaro_summary` reads a COCO package with Datumaro's `coco_instances` importer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sam2pal.io.coco import merge_predictions
from sam2pal.io.masks import encode_rle, mask_bbox
from sam2pal.io.templates import save_template_set
from sam2pal.outputs.qc import write_qc
from sam2pal.outputs.review import read_qc_ranking

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".venv-tools"
CATEGORIES = {1: "head", 2: "antenna"}
HEIGHT, WIDTH = 96, 128


# -- a results folder -----------------------------------------------------------------


def head_mask(shift: int = 0) -> np.ndarray:
    """A tilted ellipse: a blob."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.ellipse(mask, (60 + shift, 48), (30, 18), 20, 0, 360, 1, -1)
    return mask.astype(bool)


def antenna_mask(side: int, shift: int = 0) -> np.ndarray:
    """A thin (2-pixel) slanted line on the left (side 1) or right (side 2)."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    if side == 1:
        cv2.line(mask, (8 + shift, 6), (40 + shift, 30), 1, 2)
    else:
        cv2.line(mask, (118 - shift, 6), (84 - shift, 30), 1, 2)
    return mask.astype(bool)


def structure_record(cid: int, inst: int, mask: np.ndarray, cycle: float) -> dict:
    """The JSON record of one predicted structure (the scores fixed, `cycle` its cycle IoU)."""
    return {
        "category_id": cid,
        "instance": inst,
        "segmentation": encode_rle(mask),
        "area": int(mask.sum()),
        "bbox": mask_bbox(mask),
        "score": 0.9,
        "predicted_iou": 0.9,
        "object_score": 0.99,
        "cycle_iou": cycle,
        "clamped": False,
    }


def make_results(root: Path, n_images: int = 12) -> dict:
    """A collection's photos and the results `sam2pal segment` writes of them.

    Photos `img00.jpg` ... (image i's worst cycle IoU is 0.5 + i / 40), `template.jpg`
    (the template, also segmented) and `bad.jpg` (unreadable, skipped). Each photo has
    a head (a blob) and two antennae (thin lines, instances 1 and 2); img03's right
    antenna is predicted absent, which makes it the worst (QC score 0), then img00...

    Args:
        root: a folder; images/ and results/ are written in it.
        n_images: how many photos besides the template and the bad one.

    Returns:
        {"results": results folder, "images": image folder, "masks": {file name:
        {(category id, instance): mask}}, "names": the photos' names, worst first}.
    """
    from conftest import template_set

    images, results = root / "images", root / "results"
    images.mkdir(parents=True)
    results.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records, masks = [], {}
    for i in range(n_images + 1):
        name = "template.jpg" if i == n_images else f"img{i:02d}.jpg"
        shift = i % 5
        structures = {
            (1, 1): head_mask(shift),
            (2, 1): antenna_mask(1, shift),
            (2, 2): antenna_mask(2, shift),
        }
        if i == 3:
            structures[(2, 2)] = np.zeros((HEIGHT, WIDTH), bool)
        photo = np.clip(rng.normal(120, 30, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        photo[structures[(1, 1)]] = (200, 80, 40)
        Image.fromarray(photo).save(images / name, quality=95)
        cycle = 0.99 if name == "template.jpg" else 0.5 + i / 40
        records.append(
            {
                "file_name": name,
                "width": WIDTH,
                "height": HEIGHT,
                "structures": [
                    structure_record(cid, inst, m, cycle if (cid, inst) == (2, 1) else 0.99)
                    for (cid, inst), m in sorted(structures.items())
                ],
            }
        )
        masks[name] = {k: m for k, m in structures.items() if m.any()}
    (images / "bad.jpg").write_bytes(b"not a photo")
    records.append({"file_name": "bad.jpg", "skipped": "cannot read image (not an image)"})
    jsonl = results / "predictions.jsonl"  # as `sam2pal segment` names its records
    jsonl.write_text(
        "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["file_name"]))
    )
    (results / "run.json").write_text(json.dumps({"model": {"checkpoint": "random"}}))
    merge_predictions([jsonl], CATEGORIES, results / "predictions.json")
    write_qc([jsonl], CATEGORIES, results / "qc.csv", multi_instance=[2])
    template = masks["template.jpg"]
    save_template_set(
        template_set([(images / "template.jpg", template)], CATEGORIES),
        results / "templates.json",
    )
    names = [r["file_name"] for r in read_qc_ranking(results / "qc.csv")]
    names = [n for n in names if n not in ("template.jpg", "bad.jpg")]
    return {"results": results, "images": images, "masks": masks, "names": names}


# -- the tools' venvs -----------------------------------------------------------------


def tools_python(tool: str) -> Path:
    """The Python of a review tool's venv (`labelstudio` or `datumaro`), built with
    `make review-tools` when missing."""
    venv = TOOLS / tool
    if not (venv / ".installed").exists():
        subprocess.run(
            ["make", "-C", str(REPO), "review-tools", f"PYTHON={sys.executable}"],
            check=True,
            timeout=1800,
        )
    return venv / "bin" / "python"


DATUMARO_SCRIPT = """
import json, sys
import datumaro as dm
dataset = dm.Dataset.import_from(sys.argv[1], "coco_instances")
labels = dataset.categories()[dm.AnnotationType.label]
items = []
for item in dataset:
    anns = []
    for ann in item.annotations:
        if ann.type != dm.AnnotationType.polygon:
            continue
        anns.append({
            "label": labels[ann.label].name,
            "points": [float(v) for v in ann.points],
            "area": float(ann.get_area()),
            "attributes": {k: v for k, v in ann.attributes.items()},
        })
    size = item.media.size if item.media is not None else None
    items.append({"id": item.id, "size": list(size) if size else None, "annotations": anns})
print(json.dumps({"labels": [l.name for l in labels], "items": items}))
"""


def datumaro_summary(package_dir: Path) -> dict:
    """What Datumaro reads of a COCO package (a folder with annotations/ and images/):
    {"labels": [...], "items": [{"id", "size", "annotations": [{"label", "points",
    "area", "attributes"}]}]}."""
    python = tools_python("datumaro")
    done = subprocess.run(
        [str(python), "-c", DATUMARO_SCRIPT, str(package_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"datumaro failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- Label Studio ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A Label Studio server on localhost for one test, serving `document_root`'s files.

    Use as a context manager; `url` is its address, `api(method, path, body)` calls its
    REST API with the token of the user made at start-up.
    """

    USER, PASSWORD, TOKEN = "reviewer@example.org", "review-pass-1", "0123456789abcdef0123"

    def __init__(self, data_dir: Path, document_root: Path, start_timeout: float = 600):
        self.data_dir, self.document_root = Path(data_dir), Path(document_root)
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log = self.data_dir / "label-studio.log"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
        env.update(
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.document_root),
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            # the tests' token authenticates the API calls
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            # nothing leaves this machine: no telemetry, no version check
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
        )
        env.pop("DJANGO_SETTINGS_MODULE", None)
        return env

    def __enter__(self) -> LabelStudio:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = tools_python("labelstudio").parent / "label-studio"
        command = [
            str(binary),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--username",
            self.USER,
            "--password",
            self.PASSWORD,
            "--user-token",
            self.TOKEN,
            "--enable-legacy-api-token",
        ]
        self._log_handle = open(self.log, "w")  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(
            command, env=self._env(), stdout=self._log_handle, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"label-studio did not answer in {self.start_timeout} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log_handle", None) is not None:
            self._log_handle.close()

    def request(self, method: str, path: str, body=None, raw: bool = False):
        """Call the API; returns the decoded JSON (or the bytes when `raw`)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Token {self.TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                content = r.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from None
        if raw:
            return content
        return json.loads(content) if content else None

    def get_file(self, path: str) -> tuple[int, bytes]:
        """(status, bytes) of a GET with the token (e.g. a local-files URL)."""
        req = urllib.request.Request(self.url + path)
        req.add_header("Authorization", f"Token {self.TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def create_project(self, title: str, label_config: str) -> int:
        return self.request(
            "POST", "/api/projects", {"title": title, "label_config": label_config}
        )["id"]

    def add_local_storage(self, project: int, path: Path) -> dict:
        """A local-files source storage (not synced): Label Studio serves files only
        under one."""
        return self.request(
            "POST",
            "/api/storages/localfiles",
            {"project": project, "path": str(path), "title": "photos", "use_blob_urls": False},
        )

    def import_tasks(self, project: int, tasks: list) -> dict:
        return self.request("POST", f"/api/projects/{project}/import", tasks)

    def tasks(self, project: int) -> list:
        found = self.request("GET", f"/api/tasks?project={project}&page_size=1000&fields=all")
        return found["tasks"] if isinstance(found, dict) else found

    def predictions(self, task: int) -> list:
        return self.request("GET", f"/api/predictions?task={task}")

    def annotate(self, task: int, result: list) -> dict:
        return self.request("POST", f"/api/tasks/{task}/annotations", {"result": result})

    def export(self, project: int, export_type: str) -> bytes:
        """The project's export (JSON, COCO...) as Label Studio serves it."""
        return self.request(
            "GET",
            f"/api/projects/{project}/export?exportType={export_type}&download_resources=false",
            raw=True,
        )


def labelstudio_round_trip(review_dir: Path, work: Path, correct=None) -> dict:
    """A review folder's Label Studio project, made, corrected and exported by a real
    Label Studio server, as a reviewer would.

    Args:
        review_dir: what `sam2pal review export --format labelstudio` wrote.
        work: a folder for the server's data and the exports.
        correct: a function (task as read back from the server, with its
            `predictions`) -> the `result` of the reviewer's annotation of that task, or
            None to leave the task unannotated; None: no task is annotated.

    Returns:
        {"project": id, "tasks": the tasks as read back (with their predictions),
        "json": the JSON export's path, "coco": the COCO export's path, "seconds":
        {"start", "calls"}}.
    """
    folder = review_dir / "labelstudio"
    tasks = json.loads((folder / "tasks.json").read_text())
    started = time.monotonic()
    with LabelStudio(work / "label-studio", review_dir) as ls:
        up = time.monotonic()
        project = ls.create_project("review", (folder / "labeling_config.xml").read_text())
        ls.add_local_storage(project, review_dir / "images")
        ls.import_tasks(project, tasks)
        found = ls.tasks(project)
        for task in found:
            task["predictions"] = ls.predictions(task["id"])
            status, content = ls.get_file(task["data"]["image"])
            task["served"] = (status, content)
            result = correct(task) if correct is not None else None
            if result is not None:
                ls.annotate(task["id"], result)
        exports = work / "exports"
        exports.mkdir(parents=True, exist_ok=True)
        (exports / "labelstudio.json").write_bytes(ls.export(project, "JSON"))
        (exports / "labelstudio_coco.zip").write_bytes(ls.export(project, "COCO"))
        done = time.monotonic()
    return {
        "project": project,
        "tasks": found,
        "json": exports / "labelstudio.json",
        "coco": exports / "labelstudio_coco.zip",
        "seconds": {"start": up - started, "calls": done - up},
    }
