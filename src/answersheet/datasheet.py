"""datasheet: publish the day's answer sheet under answersheet/<road>/<YYYYMMDD>/.

Rows are the preprocess manifest's: one per image (and per missing camera), plus the first
rejections one by one and one summary row per kind for the rest — the full list of rejected members
stays in the ingest manifest, so 200k junk members no longer make a 67 MB datasheet.csv (21 KB now).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import Any

from answersheet import __version__, manifest
from answersheet.day import RoadDay
from answersheet.progress import Progress
from answersheet.report import draw_boxes, pick_samples, render_html
from answersheet.storage import run_bounded, sha256_bytes

log = logging.getLogger(__name__)

REPORT_SAMPLES = 12
BASE_COLUMNS = ["set_id", "capture_time", "road", "road_name", "camera", "image", "label", "status", "selected",
                "boxes"]


def summary_rows(rejections: dict[str, Any]) -> list[dict[str, Any]]:
    """One `rejected` row per kind of rejection not listed one by one (empty name, count in the note)."""
    where = rejections.get("full_list", "the ingest manifest")
    return [{"set_id": "", "capture_time": "", "camera": "", "image_key": None, "label_key": None,
             "status": "rejected", "selected": False, "boxes": 0, "per_class": {},
             "note": f"{n} more rejected member(s) not listed here: {kind} (every rejection is in {where})"}
            for kind, n in (rejections.get("unlisted_by_kind") or {}).items()]


def datasheet_csv(rd: RoadDay, rows: list[dict[str, Any]], out_key: dict[str, str]) -> bytes:
    """One row per image; UTF-8 with BOM and CRLF so Excel opens it with Korean text intact."""
    classes = rd.road.classes
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(BASE_COLUMNS + [f"n_{c}" for c in classes] + ["note"])
    for r in rows:
        per_class = [r["per_class"].get(str(i), 0) for i in range(len(classes))]
        writer.writerow([
            r["set_id"], r["capture_time"], rd.road.id, rd.road.name, r["camera"],
            out_key.get(r["image_key"] or "", ""), out_key.get(r["label_key"] or "", ""), r["status"],
            "yes" if r["selected"] else "no", r["boxes"], *per_class, r["note"],
        ])
    return buf.getvalue().encode("utf-8-sig")


def datasheet_day(rd: RoadDay) -> dict[str, Any]:
    """Copy images and labels into the answer sheet, write classes/datasheet/report, commit manifest."""
    lay, store, road = rd.layout, rd.store, rd.road
    pre = manifest.require(store, lay.preprocess_manifest, "preprocess")
    shards = road.detect.shards
    manifest.check_upstream(store, lay.preprocess_manifest, pre, expect=[
        lay.ingest_manifest, *(lay.detect_manifest(i, shards) for i in range(shards))])
    digest = manifest.inputs_digest("datasheet", pre["inputs_digest"], pre["outputs_digest"],
                                    road.digest("datasheet"))
    done = manifest.current(store, lay.out_manifest, digest, rd.force)
    if done:
        return {"manifest": store.uri(lay.out_manifest), "counts": done["counts"], "skipped": True}
    started = manifest.begin(store, lay.out_manifest)
    rows: list[dict[str, Any]] = pre["rows"]

    outputs: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    out_key: dict[str, str] = {}
    for r in rows:
        if r["image_key"]:
            out_key[r["image_key"]] = dst = f"{lay.out_images}{r['name']}"
            copies.append((r["image_key"], dst))
            outputs[dst] = r["image_sha256"]
        if r["label_key"]:
            out_key[r["label_key"]] = dst = f"{lay.out_labels}{r['name'][:-4]}.txt"
            copies.append((r["label_key"], dst))
            outputs[dst] = r["label_sha256"]
    progress = Progress("datasheet copy", len(copies), unit="obj")
    run_bounded((lambda s=s, d=d: store.copy(s, d) for s, d in copies), road.ingest.workers,
                on_done=lambda _: progress.advance())
    progress.finish()

    def put(key: str, data: bytes, content_type: str) -> None:
        outputs[key] = store.put(key, data, content_type)

    put(f"{lay.out_prefix}classes.txt", ("\n".join(road.classes) + "\n").encode(), "text/plain; charset=utf-8")
    rejections = pre.get("rejections") or {}
    put(f"{lay.out_prefix}datasheet.csv", datasheet_csv(rd, rows + summary_rows(rejections), out_key),
        "text/csv; charset=utf-8")

    per_class_names = {road.classes[int(i)] if int(i) < len(road.classes) else i: n
                       for i, n in pre["counts"].get("per_class", {}).items()}
    samples = []
    for i, r in enumerate(pick_samples(rows, REPORT_SAMPLES)):
        drawn = draw_boxes(store.get(r["image_key"]), store.get(r["label_key"]).decode(), road.classes)
        rel = f"report/{i:02d}_{r['name']}"
        put(f"{lay.out_prefix}{rel}", drawn, "image/jpeg")
        samples.append((rel, r))
    counts = {k: v for k, v in pre["counts"].items() if k != "per_class"}
    page = render_html(f"{road.name} ({road.id}) {rd.day.isoformat()} — answer sheet", counts, per_class_names,
                       pre.get("short_sets", {}), [r for r in rows if r["status"] == "rejected"], samples,
                       rejections=rejections, unusable_sets=pre.get("unusable_sets", []))
    put(f"{lay.out_prefix}report.html", page.encode(), "text/html; charset=utf-8")

    store.delete_stale(lay.out_prefix, set(outputs) | {lay.out_manifest})
    counts = {**counts, "per_class": per_class_names, "objects": len(outputs)}
    timings = {**pre.get("timings", {}), "preprocess": pre.get("seconds"),
               "datasheet": round(time.monotonic() - started, 3)}
    manifest.commit(
        store, lay.out_manifest, "datasheet", digest, outputs, counts, started,
        upstream=manifest.upstream({lay.preprocess_manifest: pre}),
        road={"id": road.id, "name": road.name}, date=rd.day.isoformat(), package_version=__version__,
        config_digest=road.digest(), model=pre.get("model", {}), short_sets=pre.get("short_sets", {}),
        unusable_sets=pre.get("unusable_sets", []), rejections=rejections,
        short_set_policy=pre.get("policy"), timings=timings,
        classes_sha256=sha256_bytes(("\n".join(road.classes) + "\n").encode()),
    )
    return {"manifest": store.uri(lay.out_manifest), "counts": counts, "skipped": False}
