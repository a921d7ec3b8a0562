"""datasheet: publish the day's answer sheet under answersheet/<road>/<YYYYMMDD>/.

Paths inside the sheet (datasheet columns, list files, COCO file names, report links) are relative to the
sheet's root, so a downloaded sheet (`answersheet pull`) resolves them next to the CSV.

Rows are the preprocess manifest's: one per image (and per missing camera), plus the first
rejections one by one and one summary row per kind for the rest — the full list of rejected members
stays in the ingest manifest, so 200k junk members no longer make a 67 MB datasheet.csv (21 KB now).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
from collections import Counter
from typing import Any
from zoneinfo import ZoneInfo

from answersheet import __version__, exports, manifest, stage
from answersheet.day import RoadDay
from answersheet.drift import camera_stats, drift
from answersheet.layout import report_image, sheet_image, sheet_label
from answersheet.naming import ImageName
from answersheet.progress import Progress
from answersheet.report import (
    STATUS_MEANINGS,
    THUMB_FONT_PX,
    THUMB_WIDTH,
    bar_svg,
    confidence_bins,
    draw_boxes,
    render_html,
)
from answersheet.review import (
    confidence_stats,
    load_predictions,
    merged_predictions_jsonl,
    review_priority,
)
from answersheet.storage import S3_WORKERS, run_bounded, sha256_bytes

log = logging.getLogger(__name__)

STAGE = "datasheet"

STATUSES = ("detected", "empty", "not_detected", "missing", "rejected", "failed")
BASE_COLUMNS = ["set_id", "capture_time", "road", "road_name", "camera", "image", "label", "status", "selected",
                "boxes", "mean_conf", "min_conf", "review_priority"]
REJECTED_SHOWN = 50  # rejection rows listed in the report (all are in the datasheet)


def with_offset(local_iso: str, tz: str) -> str:
    """`2026-11-02T09:00:07` in the road's zone -> `2026-11-02T09:00:07+09:00` ('' stays '')."""
    if not local_iso:
        return ""
    return dt.datetime.fromisoformat(local_iso).replace(tzinfo=ZoneInfo(tz)).isoformat()


def status_of(row: dict[str, Any]) -> str:
    """The published status: preprocess's, with days preprocessed before `not_detected`/`failed` existed
    mapped onto the new vocabulary (an unselected `empty` was never looked at; a `detect:` rejection failed)."""
    s = row["status"]
    if s == "empty" and not row.get("selected"):
        return "not_detected"
    if s == "rejected" and str(row.get("note", "")).startswith("detect:"):
        return "failed"
    return s


def sheet_rows(rd: RoadDay, pre_rows: list[dict[str, Any]], preds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Preprocess rows + what the sheet adds: relative paths, offset capture time, confidences, priority."""
    road = rd.road
    class_thres = dict(getattr(road.detect, "class_conf_thres", ()) or ())  # per-class thresholds (detect)
    out = []
    for r in pre_rows:
        status = status_of(r)
        label_key = r.get("label_key")
        if status == "not_detected" and road.unlabelled_labels == "none":
            label_key = None
        rec = preds.get(r["name"]) if status in exports.LABELLED else None
        mean_conf, min_conf = confidence_stats(rec)
        name = ImageName.in_set(r["set_id"], r["camera"]) if r.get("image_key") or label_key else None
        out.append({
            **r, "status": status, "label_key": label_key,
            "image": sheet_image(name) if name and r.get("image_key") else "",
            "label": sheet_label(name) if name and label_key else "",
            "capture_time": with_offset(r["capture_time"], road.timezone),
            "mean_conf": mean_conf, "min_conf": min_conf,
            "review_priority": review_priority(status, rec, road.detect.conf_thres, class_thres),
        })
    return out


def summary_rows(rejections: dict[str, Any]) -> list[dict[str, Any]]:
    """One `rejected` row per kind of rejection not listed one by one (empty name, count in the note)."""
    where = rejections.get("full_list", "the ingest manifest")
    return [{"set_id": "", "capture_time": "", "camera": "", "image": "", "label": "", "status": "rejected",
             "selected": False, "boxes": 0, "mean_conf": None, "min_conf": None, "review_priority": None,
             "per_class": {}, "note": f"{n} more rejected member(s) not listed here: {kind} (every rejection is in "
                                      f"{where})"}
            for kind, n in (rejections.get("unlisted_by_kind") or {}).items()]


def datasheet_csv(rd: RoadDay, rows: list[dict[str, Any]]) -> bytes:
    """One row per image; UTF-8 with BOM and CRLF so Excel opens it with Korean text intact."""
    classes = rd.road.classes
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(BASE_COLUMNS + [f"n_{c}" for c in classes] + ["note"])

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for r in rows:
        per_class = [r["per_class"].get(str(i), 0) for i in range(len(classes))]
        writer.writerow([
            r["set_id"], r["capture_time"], rd.road.id, rd.road.name, r["camera"], r["image"], r["label"],
            r["status"], "yes" if r["selected"] else "no", r["boxes"], num(r["mean_conf"]), num(r["min_conf"]),
            num(r["review_priority"]), *per_class, r["note"],
        ])
    return buf.getvalue().encode("utf-8-sig")


def _pick(rows: list[dict[str, Any]], key, n: int, cond, seen: set[str | None] | None = None) -> list[dict[str, Any]]:
    """The first n rows by key that meet cond, skipping images whose bytes were already picked (the same
    frame under two names would show twice)."""
    out: list[dict[str, Any]] = []
    seen = set() if seen is None else seen
    for r in sorted((r for r in rows if cond(r)), key=key):
        if r.get("image_sha256") in seen:
            continue
        seen.add(r.get("image_sha256"))
        out.append(r)
        if len(out) == n:
            break
    return out


def sample_sections(rows: list[dict[str, Any]], n: int, cameras: tuple[str, ...]) -> tuple[list, list]:
    """(review-first rows, [(title, rows)]): the stratified samples of the report."""
    looked = [r for r in rows if r["image"]]
    review = _pick(looked, lambda r: (-r["review_priority"], r["name"]), n,
                   lambda r: r["review_priority"] is not None and r["status"] == "detected", set())
    per_camera = []
    for cam in cameras:  # the busiest image of every camera (an unlooked camera: its first image)
        mine = [r for r in looked if r["camera"] == cam]
        if mine:
            per_camera.append(sorted(mine, key=lambda r: (-r["boxes"], r["name"]))[0])
    lowest = _pick(looked, lambda r: (r["mean_conf"], r["name"]), n, lambda r: r["mean_conf"] is not None, set())
    empty = _pick(looked, lambda r: r["name"], n, lambda r: r["status"] == "empty", set())
    short_ids = sorted({r["set_id"] for r in rows if r["status"] == "missing"})[:2]
    short = [r for r in looked if r["set_id"] in short_ids]
    return review, [("Every camera", per_camera), ("Lowest confidence", lowest),
                    ("Empty (the detector looked and found nothing)", empty),
                    ("Short sets (the images that are there)", short[: 2 * n])]


def datasheet_day(rd: RoadDay) -> dict[str, Any]:
    """Copy images and labels into the answer sheet, write the datasheet, exports and report, commit manifest."""
    lay, road = rd.layout, rd.road
    shards = road.detect.shards
    pre = stage.read_upstream(rd, lay.preprocess_manifest, "preprocess", expect=[
        lay.ingest_manifest, *(lay.detect_manifest(i, shards) for i in range(shards))])
    digest = manifest.inputs_digest(STAGE, pre["inputs_digest"], pre["outputs_digest"], road.digest(STAGE))
    this = stage.Stage(STAGE, lay.out_manifest, digest, upstream={lay.preprocess_manifest: pre}, owns=lay.out_prefix)
    return stage.run(rd, this, lambda: _publish(rd, pre))


def _publish(rd: RoadDay, pre: dict[str, Any]) -> stage.StageResult:
    """The answer sheet from the preprocess manifest: copies, datasheet.csv, exports, report."""
    started = time.monotonic()
    lay, store, road = rd.layout, rd.store, rd.road
    preds = load_predictions(rd)
    rows = sheet_rows(rd, pre["rows"], preds)
    looked = {r["name"] for r in rows if r["status"] in exports.LABELLED}
    preds = {k: v for k, v in preds.items() if k in looked}

    outputs: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    for r in rows:
        if r["image"]:
            copies.append((r["image_key"], lay.out(r["image"])))
            outputs[lay.out(r["image"])] = r["image_sha256"]
        if r["label"]:
            copies.append((r["label_key"], lay.out(r["label"])))
            outputs[lay.out(r["label"])] = r["label_sha256"]
    progress = Progress("datasheet copy", len(copies), unit="obj")
    run_bounded((lambda s=s, d=d: store.copy(s, d) for s, d in copies), S3_WORKERS,
                on_done=lambda _: progress.advance())
    progress.finish()

    def put(rel: str, data: bytes, content_type: str) -> None:
        outputs[lay.out(rel)] = store.put(lay.out(rel), data, content_type)

    classes_txt = ("\n".join(road.classes) + "\n").encode()
    put("classes.txt", classes_txt, "text/plain; charset=utf-8")
    rejections = pre.get("rejections") or {}
    put("datasheet.csv", datasheet_csv(rd, rows + summary_rows(rejections)), "text/csv; charset=utf-8")
    put("predictions.jsonl", merged_predictions_jsonl(preds.values()), "application/x-ndjson")
    model_version = _model_version(pre.get("model", {}))
    _put_exports(rd, rows, preds, model_version, put)

    stats = camera_stats(rows, preds)
    drift_block = drift(store, road.id, rd.day, road.sheet.drift_days, stats)
    status_counts = Counter(r["status"] for r in rows)
    # rejected rows are capped (first 50 + counts per kind): the totals come from preprocess's summary
    status_counts["rejected"] = rejections.get("ingest", status_counts["rejected"])
    status_counts["failed"] = rejections.get("detect", status_counts["failed"])
    counts = {
        "images": sum(bool(r["image"]) for r in rows), **{s: status_counts.get(s, 0) for s in STATUSES},
        "labels": sum(bool(r["label"]) for r in rows), "sets": pre["counts"].get("sets"),
        "short_sets": pre["counts"].get("short_sets"), "unusable_sets": pre["counts"].get("unusable_sets", 0),
        "boxes": sum(r["boxes"] for r in rows),
        "per_class": _per_class(rows, road.classes),
    }
    timings = {**pre.get("timings", {}), "preprocess": pre.get("seconds")}
    _put_report(rd, rows, preds, counts, stats, drift_block, pre, timings, put)

    counts["objects"] = len(outputs)
    timings["datasheet"] = round(time.monotonic() - started, 3)
    return stage.StageResult(
        outputs=outputs, counts=counts, summary={"drift_flags": len(drift_block["flags"])},
        records=dict(
            unusable_sets=pre.get("unusable_sets", []), rejections=rejections,
            road={"id": road.id, "name": road.name, "timezone": road.timezone}, date=rd.day.isoformat(),
            package_version=__version__, config_digest=road.digest(), model=pre.get("model", {}),
            short_sets=pre.get("short_sets", {}), short_set_policy=pre.get("policy"),
            unlabelled_labels=road.unlabelled_labels, timings=timings, camera_stats=stats, drift=drift_block,
            classes_sha256=sha256_bytes(classes_txt),
        ),
    )


def _model_version(model: dict[str, Any]) -> str:
    """Label Studio's model_version: weights digest prefix + backend, e.g. `yolov5n-4f180cf23ba0 torch`."""
    sha = str(model.get("onnx_sha256") or model.get("sha256") or "unknown")[:12]
    return f"{model.get('name') or 'yolov5'}-{sha} {model.get('backend') or ''}".strip()


def _per_class(rows: list[dict[str, Any]], classes: tuple[str, ...]) -> dict[str, int]:
    per: Counter[str] = Counter()
    for r in rows:
        for i, n in r["per_class"].items():
            per[classes[int(i)] if int(i) < len(classes) else i] += n
    return dict(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))


def _put_exports(rd: RoadDay, rows: list[dict[str, Any]], preds: dict[str, dict[str, Any]], model_version: str,
                 put) -> None:
    """data.yaml + lists, COCO instances and results, CVAT's COCO 1.0 zip, Label Studio tasks and config."""
    road, lay = rd.road, rd.layout
    labelled = exports.labelled_rows(rows)
    train, val = exports.train_val_split(labelled)
    put("data.yaml", exports.data_yaml(road.classes, road.name, rd.day.isoformat()), "application/yaml")
    put("train.txt", exports.path_list(train), "text/plain; charset=utf-8")
    put("val.txt", exports.path_list(val), "text/plain; charset=utf-8")
    title = f"{road.name} ({road.id}) {rd.day.isoformat()}"
    instances, results = exports.coco(rows, preds, road.classes, lambda r: r["image"], title)
    put("coco/instances.json", exports.dumps(instances), "application/json")
    put("coco/results.json", exports.dumps(results), "application/json")
    cvat, _ = exports.coco(rows, preds, road.classes, lambda r: r["name"], title)
    put("cvat/coco-1.0.zip", exports.cvat_coco_zip(cvat), "application/zip")
    if road.sheet.image_urls == "presigned":
        def url(r: dict[str, Any]) -> str:
            return rd.store.presign(lay.out(r["image"]), road.sheet.presign_expiry_s)
    else:
        def url(r: dict[str, Any]) -> str:
            return rd.store.uri(lay.out(r["image"]))
    tasks = exports.label_studio_tasks(rows, preds, model_version, url)
    put("label-studio/tasks.json", exports.dumps(tasks), "application/json")
    put("label-studio/config.xml", exports.label_studio_config(road.classes), "application/xml")


def _put_report(rd: RoadDay, rows: list[dict[str, Any]], preds: dict[str, dict[str, Any]], counts: dict[str, Any],
                stats: dict[str, Any], drift_block: dict[str, Any], pre: dict[str, Any],
                timings: dict[str, Any], put) -> None:
    """report.html and its images: a thumbnail (boxes drawn) and a full-size drawn copy per sampled image."""
    road = rd.road
    review, sections = sample_sections(rows, road.sheet.report_samples, road.cameras)
    drawn: dict[str, dict[str, Any]] = {}
    for r in [*review, *(r for _, items in sections for r in items)]:
        if r["name"] in drawn:
            continue
        jpeg = rd.store.get(r["image_key"])
        boxes = (preds.get(r["name"]) or {}).get("boxes", [])
        name = ImageName.in_set(r["set_id"], r["camera"])
        thumb, full = report_image("thumbs", name), report_image("full", name)
        put(thumb, draw_boxes(jpeg, boxes, width=THUMB_WIDTH, font_px=THUMB_FONT_PX), "image/jpeg")
        put(full, draw_boxes(jpeg, boxes), "image/jpeg")
        drawn[r["name"]] = {**r, "thumb": thumb, "full": full}

    cams = []
    for cam in road.cameras:
        mine = [r for r in rows if r["camera"] == cam]
        st = stats.get(cam, {})
        cams.append({"camera": cam, "images": sum(bool(r["image"]) for r in mine),
                     **{s: sum(r["status"] == s for r in mine) for s in ("detected", "empty", "not_detected")},
                     "boxes_per_image": st.get("boxes_per_image"), "mean_conf": st.get("mean_conf")})
    confs = [b["confidence"] for p in preds.values() for b in p["boxes"] if b.get("confidence") is not None]
    rejected = [r for r in rows if r["status"] in ("rejected", "failed")]
    rejections = pre.get("rejections") or {}
    reasons = (list(rejections["by_kind"].items()) if rejections.get("by_kind")
               else Counter(str(r["note"]).rsplit(": ", 1)[-1] for r in rejected).most_common())
    model = pre.get("model", {})
    ctx = {
        "title": f"{road.name} ({road.id}) {rd.day.isoformat()} — answer sheet",
        "road_name": road.name, "road_id": road.id, "day": rd.day.isoformat(),
        "drift": drift_block, "drift_flags": drift_block["flags"],
        "review": [drawn[r["name"]] for r in review],
        "statuses": [{"name": s, "count": counts[s], "meaning": STATUS_MEANINGS[s]} for s in STATUSES],
        "counts": counts, "cameras": cams,
        "class_svg": bar_svg(list(counts["per_class"].items())),
        "conf_svg": bar_svg(confidence_bins(confs, road.detect.conf_thres)) if confs else "",
        "samples": [{"title": t, "rows": [drawn[r["name"]] for r in items]} for t, items in sections],
        "short_sets": pre.get("short_sets", {}),
        "rejected_total": rejections.get("total", len(rejected)), "rejected": rejected[:REJECTED_SHOWN],
        "rejected_reasons": reasons, "rejected_full_list": rejections.get("full_list", ""),
        "unusable_sets": pre.get("unusable_sets", []),
        "model": sorted({**{f"model.{k}": v for k, v in model.items()},
                         "detect.cameras": ", ".join(road.detect.cameras),
                         "short_set_policy": road.short_set_policy,
                         "unlabelled_labels": road.unlabelled_labels,
                         "timezone": road.timezone, "answersheet": __version__}.items()),
        "timings": [(k, f"{v:.1f} s" if isinstance(v, (int, float)) else "–") for k, v in timings.items()],
    }
    put("report.html", render_html(ctx).encode(), "text/html; charset=utf-8")
