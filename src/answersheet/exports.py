"""The answer sheet's exports for training and review tools, built from the datasheet rows and predictions.

Each is proven by the real importer in tests/test_sheet.py:
- `data.yaml`, `train.txt`, `val.txt`: yolov5/ultralytics training (yolov5's `check_dataset`, `LoadImagesAndLabels`);
- `coco/instances.json`: COCO 1.0 ground truth, the labels (pycocotools `COCO`);
- `coco/results.json`: COCO results, the same boxes with scores (pycocotools `COCO.loadRes`, `COCOeval`);
- `cvat/coco-1.0.zip`: CVAT "Upload annotations", COCO 1.0, into a task made from `images/` (Datumaro);
- `label-studio/tasks.json` + `config.xml`: Label Studio import with pre-annotations (label-studio-sdk).

Only images the detector looked at (`detected`, `empty`) are in the training and COCO exports: an image that
was never sent to the detector has no labels, and any of these tools would read "no annotations" as "no
objects". Label Studio gets every image (status in the task data), with predictions only where the detector
looked, so unlabelled images are annotated from scratch instead of being taken as negatives.

Written by hand against the formats rather than with a converter library: datumaro and label-studio-sdk pin
numpy/pillow/pandas/opencv versions that conflict with yolov5's (so they live in a separate importers venv,
used by the tests), globox has no results-file or Label Studio writer and brings numpy/rich into the slim
preprocess image, supervision brings opencv/scipy/matplotlib. Each writer is a few dozen lines; the real
importers in the tests are the check that they are right.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import yaml

LABELLED = ("detected", "empty")  # statuses whose label file says what the detector saw
ZIP_DATE = (2026, 1, 1, 0, 0, 0)  # fixed member timestamps: re-runs give the same zip bytes


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False) + "\n").encode()


def labelled_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with an image whose label file is the detector's answer (what training and COCO may use)."""
    return [r for r in rows if r["status"] in LABELLED and r.get("image")]


def train_val_split(rows: Sequence[dict[str, Any]], every: int = 5) -> tuple[list[str], list[str]]:
    """Image paths split by *set* (the cameras of one instant never straddle train and val): every `every`-th
    set (sorted) is val, at least one set when there are two or more. Deterministic."""
    sets = sorted({r["set_id"] for r in rows})
    val_sets = {s for i, s in enumerate(sets) if i % every == every - 1}
    if not val_sets and len(sets) > 1:
        val_sets = {sets[-1]}
    train = [f"./{r['image']}" for r in rows if r["set_id"] not in val_sets]
    val = [f"./{r['image']}" for r in rows if r["set_id"] in val_sets]
    return train, val


def data_yaml(classes: Sequence[str], road_name: str, day: str) -> bytes:
    """yolov5/ultralytics dataset file. No `path`: ultralytics resolves the lists next to this file;
    yolov5 resolves a relative `path` against its own package, so `answersheet pull` writes the absolute
    download directory into `path` (README: train on the sheet)."""
    doc = {"train": "train.txt", "val": "val.txt", "nc": len(classes),
           "names": dict(enumerate(classes))}
    head = f"# answer sheet {road_name} {day}: only images the detector looked at (train.txt / val.txt)\n"
    return (head + yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)).encode()


def path_list(paths: Sequence[str]) -> bytes:
    return ("\n".join(paths) + "\n").encode() if paths else b""


def _xywh(box: Sequence[float], w: int, h: int) -> list[float]:
    cx, cy, bw, bh = box
    return [round((cx - bw / 2) * w, 2), round((cy - bh / 2) * h, 2), round(bw * w, 2), round(bh * h, 2)]


def coco(rows: Sequence[dict[str, Any]], preds: dict[str, dict[str, Any]], classes: Sequence[str],
         file_name: Callable[[dict[str, Any]], str], description: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(COCO 1.0 instances, COCO results list). Category id = road class id + 1 (COCO ids start at 1;
    pycocotools and CVAT treat 0 as "no category"); image ids 1..n in datasheet order."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for image_id, r in enumerate(labelled_rows(rows), 1):
        rec = preds.get(r["name"]) or {}
        w, h = rec.get("width"), rec.get("height")
        images.append({"id": image_id, "file_name": file_name(r), "width": w, "height": h,
                       "camera": r["camera"], "capture_time": r["capture_time"], "status": r["status"]})
        for b in rec.get("boxes", []):
            bbox = _xywh(b["box"], rec["width"], rec["height"])  # a record with boxes has its size
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": b["class_id"] + 1, "bbox": bbox,
                   "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "segmentation": []}
            anns.append(ann)
            if b.get("confidence") is not None:
                results.append({"image_id": image_id, "category_id": b["class_id"] + 1, "bbox": bbox,
                                "score": b["confidence"]})
    doc = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "categories": [{"id": i + 1, "name": c, "supercategory": ""} for i, c in enumerate(classes)],
        "images": images,
        "annotations": anns,
    }
    return doc, results


def cvat_coco_zip(instances: dict[str, Any]) -> bytes:
    """CVAT's COCO 1.0 annotation upload: a zip holding `annotations/instances_default.json` whose file names
    are the bare image names, as CVAT names the frames of a task created from the sheet's `images/`. The
    images are not repeated (a day is gigabytes); the empty `images/default/` entry is the COCO layout's image
    folder, which Datumaro >= 1.x requires to exist before it reads the annotations."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("images/default/", ZIP_DATE), b"")
        info = zipfile.ZipInfo("annotations/instances_default.json", ZIP_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, _json(instances))
    return buf.getvalue()


def label_studio_config(classes: Sequence[str]) -> bytes:
    """The labeling config matching tasks.json (`from_name` label, `to_name` image)."""
    from xml.sax.saxutils import quoteattr

    labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <RectangleLabels name="label" toName="image">\n'
            f"{labels}\n  </RectangleLabels>\n</View>\n").encode()


def label_studio_tasks(rows: Sequence[dict[str, Any]], preds: dict[str, dict[str, Any]], model_version: str,
                       image_url: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Label Studio tasks, review priority first (then datasheet order). Every image is a task; the
    detector's boxes are a `predictions` entry (score = mean confidence, per-box `score`) where it looked —
    an empty result for `empty` images — and no prediction where it did not (`not_detected`)."""
    tasks = []
    for r in rows:
        if not r.get("image"):
            continue
        data = {"image": image_url(r), "name": r["name"], "camera": r["camera"], "set_id": r["set_id"],
                "capture_time": r["capture_time"], "status": r["status"],
                "review_priority": r.get("review_priority")}
        task: dict[str, Any] = {"data": data}
        rec = preds.get(r["name"])
        if r["status"] in LABELLED and rec:
            result = []
            for i, b in enumerate(rec["boxes"]):
                cx, cy, bw, bh = b["box"]
                region = {
                    "id": f"{r['name'][:-4]}-{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                    "original_width": rec["width"], "original_height": rec["height"], "image_rotation": 0,
                    "value": {"x": round((cx - bw / 2) * 100, 4), "y": round((cy - bh / 2) * 100, 4),
                              "width": round(bw * 100, 4), "height": round(bh * 100, 4), "rotation": 0,
                              "rectanglelabels": [b["class"]]},
                }
                if b.get("confidence") is not None:
                    region["score"] = b["confidence"]
                result.append(region)
            pred: dict[str, Any] = {"model_version": model_version, "result": result}
            if r.get("mean_conf") is not None:
                pred["score"] = r["mean_conf"]
            task["predictions"] = [pred]
        tasks.append(task)
    order = {id(t): i for i, t in enumerate(tasks)}
    tasks.sort(key=lambda t: (-(t["data"]["review_priority"] if t["data"]["review_priority"] is not None else -1),
                              order[id(t)]))
    return tasks


def dumps(obj: Any) -> bytes:
    """JSON bytes as the sheet writes them (UTF-8, Korean as is)."""
    return _json(obj)
