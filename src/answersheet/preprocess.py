"""preprocess: pair every image with a label, write empty labels, check sets against the policy.

Sets come only from accepted images: a member rejected at ingest (say `../<road>_<ymd>_090000_front.jpg`)
never creates a set, and a set none of whose images is usable (all failed in detect) is reported in
`unusable_sets`, never filled with placeholders. Rejections are summarised: the manifest carries the
count per kind and the first REJECTIONS_LISTED of them as rows; the full list stays in the ingest
manifest. (A day with 200k junk members made a 90 MB preprocess manifest, a 67 MB datasheet.csv and a
38 MB report at 791 MiB peak in preprocess before this; 30 KB, 21 KB, 11 KB at 243 MiB after: BENCHMARKS.md.)
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from typing import Any

from answersheet import manifest, stage
from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError
from answersheet.naming import BadImageName, ImageName, parse_image_name
from answersheet.records import DetectionRecord, ImageRecord, SheetRow
from answersheet.storage import S3_WORKERS, run_bounded, sha256_bytes

log = logging.getLogger(__name__)

STAGE = "preprocess"
EMPTY_SHA256 = sha256_bytes(b"")
REJECTIONS_LISTED = 50  # ingest rejections shown one by one (manifest rows, datasheet, report)
_QUOTED_RE = re.compile(r"'[^']*'|\"[^\"]*\"")


def rejection_kind(reason: str) -> str:
    """What a rejection reason says without its particulars (names, sizes), to count rejections per kind:
    'corrupt JPEG: OSError: …' -> 'corrupt JPEG'. For detect failures, and ingest records without a `kind`."""
    head = _QUOTED_RE.sub("…", str(reason).split(": ", 1)[0])
    return " ".join(re.sub(r"\d+", "N", head).split()) or "other"


def _ingest_kind(rejection: dict) -> str:
    """The kind ingest recorded (`bad_name`, `unsafe_path`, …), else one derived from the reason."""
    return str(rejection.get("kind") or rejection_kind(rejection.get("reason", "")))


def _detect_manifests(rd: RoadDay) -> dict[str, dict]:
    """Every shard's detect manifest (key -> manifest) for the configured shard count, or an error
    naming the missing ones."""
    n = rd.road.detect.shards
    keys = [rd.layout.detect_manifest(i, n) for i in range(n)]
    found = {k: rd.store.get_json(k) for k in keys}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise AnswersheetError(
            f"{rd.store.uri(missing[0])}: missing — detect shard(s) "
            f"{[keys.index(k) for k in missing]} of {n} have not finished for this day"
        )
    return {k: found[k] for k in keys}


def _rejected_row(rd: RoadDay, rej: dict, sets: set[str]) -> SheetRow:
    """A datasheet row for a member rejected at ingest; it names a set only if accepted images made one."""
    member = rej.get("member") or ""
    base = member.replace("\\", "/").rsplit("/", 1)[-1]
    set_id, camera, when = "", "", ""
    try:
        name = parse_image_name(base, rd.road.id, rd.day, rd.road.cameras)
        if name.set_id in sets:
            set_id, camera, when = name.set_id, name.camera, name.capture_time
    except BadImageName:
        pass
    return SheetRow(name=base or rej["object"].rsplit("/", 1)[-1], set_id=set_id, camera=camera,
                    capture_time=when, status="rejected", selected=False,
                    note=f"{rej['object']}{'!' + member if member else ''}: {rej['reason']}")


def preprocess_day(rd: RoadDay) -> dict[str, Any]:
    """Pair images and labels, write empty labels, apply the short-set policy; returns counts."""
    lay, road = rd.layout, rd.road
    ingest = stage.read_upstream(rd, lay.ingest_manifest, "ingest")
    detect_by_key = _detect_manifests(rd)
    # the digest chain: labels of the images ingest holds now
    stage.check_chain(rd.store, detect_by_key, expect=[lay.ingest_manifest], known={lay.ingest_manifest: ingest})
    detects = list(detect_by_key.values())
    digest = manifest.inputs_digest(
        STAGE, ingest["outputs_digest"], ingest.get("inputs_digest"), [d["outputs_digest"] for d in detects],
        [d.get("inputs_digest") for d in detects], road.digest(STAGE), REJECTIONS_LISTED,
    )
    this = stage.Stage(STAGE, lay.preprocess_manifest, digest, upstream={lay.ingest_manifest: ingest, **detect_by_key},
                       owns=lay.preprocess_labels)
    return stage.run(rd, this, lambda: _preprocess(rd, ingest, detects))


def _image_row(rd: RoadDay, img: ImageRecord, det: DetectionRecord | None, failure: str | None,
               detects: list[dict], listed_labels: set[str]) -> SheetRow:
    """The row of an accepted image: failed in detect, detected, not sent to the detector, or empty (its
    label_key then names the empty label this stage writes)."""
    row = SheetRow(name=img.name, set_id=img.set_id, camera=img.camera, capture_time=img.capture_time,
                   status="", selected=img.selected, image_key=img.key, image_sha256=img.sha256)
    if failure is not None:
        row.status, row.image_key, row.image_sha256, row.note = "failed", None, None, f"detect: {failure}"
    elif det and det.label:
        if det.label not in listed_labels:
            raise AnswersheetError(f"{rd.store.uri(det.label)}: in the detect manifest but missing from S3")
        shard_outputs = next(d["outputs"] for d in detects if det.label in d["outputs"])
        row.status, row.label_key, row.label_sha256 = "detected", det.label, shard_outputs[det.label]
        row.boxes, row.per_class = det.boxes, det.per_class
    elif not img.selected:
        # Never looked at: no label file, since an empty one means "no objects" to every YOLO trainer.
        # `unlabelled_labels: empty` opts in to the old empty files.
        row.status, row.note = "not_detected", "camera not sent to the detector"
        if rd.road.unlabelled_labels == "empty":
            row.label_key, row.label_sha256 = rd.layout.preprocess_label(img.image_name), EMPTY_SHA256
            row.note += " (empty label by config)"
    else:
        row.status, row.label_key, row.label_sha256 = "empty", rd.layout.preprocess_label(img.image_name), EMPTY_SHA256
    return row


def _preprocess(rd: RoadDay, ingest: dict[str, Any], detects: list[dict[str, Any]]) -> stage.StageResult:
    lay, store, road = rd.layout, rd.store, rd.road
    # Image list vs label list: one paginated listing each, no per-object HEADs.
    listed_images = {o.key for o in store.list(lay.ingest_images)}
    listed_labels = {o.key for o in store.list(lay.detect_labels)}
    detected: dict[str, DetectionRecord] = {}
    failed: dict[str, str] = {}
    for d in detects:
        detected.update((name, DetectionRecord.from_json(rec)) for name, rec in d["images"].items())
        failed.update({f["name"]: f["reason"] for f in d.get("failed", [])})
    images = [ImageRecord.from_json(img) for img in ingest["images"]]
    selected = {img.name for img in images if img.selected}
    if set(detected) | set(failed) != selected:
        stray = sorted((set(detected) | set(failed)) ^ selected)[:5]
        raise AnswersheetError(
            f"{store.uri(lay.work_prefix + 'detect/')}: detect outputs do not match the ingested images "
            f"(e.g. {stray}); re-run detect for this day"
        )

    rows: list[SheetRow] = []
    for img in images:
        if img.key not in listed_images:
            raise AnswersheetError(f"{store.uri(img.key)}: listed in the ingest manifest but missing from S3")
        rows.append(_image_row(rd, img, detected.get(img.name), failed.get(img.name), detects, listed_labels))
    empty_labels = [r.label_key for r in rows if r.label_key and r.status != "detected"]  # this stage writes them

    # Sets: defined by accepted images only; each needs one usable image per expected camera.
    usable: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        usable.setdefault(row.set_id, set())
        if row.status not in ("rejected", "failed"):
            usable[row.set_id].add(row.camera)
    unusable = sorted(s for s, cams in usable.items() if not cams)
    short = {s: [c for c in road.cameras if c not in cams] for s, cams in sorted(usable.items()) if cams}
    short = {s: missing for s, missing in short.items() if missing}
    for row in rows:
        if row.set_id in unusable:
            row.note += " (set has no usable image: reported, not filled)"
    if (short or unusable) and road.short_set_policy == "fail":
        listed = "; ".join([f"{s} has no usable image" for s in unusable[:10]]
                           + [f"{s} missing {m}" for s, m in list(short.items())[:10]])
        raise AnswersheetError(
            f"{store.uri(lay.raw_prefix)}: {len(short) + len(unusable)} short set(s) under "
            f"short_set_policy=fail: {listed}"
        )

    # Rejected members: counted per kind; the first REJECTIONS_LISTED get rows (all are in the ingest manifest).
    ingest_rejections = ingest.get("rejections", [])
    by_kind = Counter(_ingest_kind(r) for r in ingest_rejections)
    by_kind.update(f"detect: {rejection_kind(reason)}" for reason in failed.values())
    sets = set(usable)
    rows.extend(_rejected_row(rd, rej, sets) for rej in ingest_rejections[:REJECTIONS_LISTED])
    listed_kinds = Counter(_ingest_kind(r) for r in ingest_rejections[:REJECTIONS_LISTED])
    ranked = sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0]))
    rejections = {
        "total": len(ingest_rejections) + len(failed), "ingest": len(ingest_rejections), "detect": len(failed),
        "listed": min(len(ingest_rejections), REJECTIONS_LISTED),
        "by_kind": dict(ranked),
        "unlisted_by_kind": {k: n - listed_kinds.get(k, 0) for k, n in ranked
                             if not k.startswith("detect: ") and n > listed_kinds.get(k, 0)},
        "full_list": store.uri(lay.ingest_manifest),
    }

    for set_id, missing in short.items():
        for cam in missing:
            name = ImageName.in_set(set_id, cam)
            row = SheetRow(name=name.filename, set_id=set_id, camera=cam, capture_time=name.capture_time,
                           status="missing", selected=cam in road.detect.cameras,
                           note=f"short set: no usable {cam} image")
            if road.short_set_policy == "fill":
                row.label_key, row.label_sha256 = lay.preprocess_label(name), EMPTY_SHA256
                row.note += " (placeholder label)"
                empty_labels.append(row.label_key)
            rows.append(row)

    cam_order = {c: i for i, c in enumerate(road.cameras)}
    rows.sort(key=lambda r: (r.set_id, cam_order.get(r.camera, 99), r.name, r.status))

    run_bounded((lambda k=k: store.put(k, b"", "text/plain") for k in empty_labels), S3_WORKERS)

    per_class: dict[str, int] = defaultdict(int)
    for row in rows:
        for cls, n in row.per_class.items():
            per_class[cls] += n
    status_counts = {s: sum(r.status == s for r in rows) for s in ("detected", "empty", "not_detected", "missing")}
    counts = {
        "images": sum(r.image_key is not None for r in rows), **status_counts,
        "rejected": rejections["ingest"], "failed": rejections["detect"],
        "sets": len(usable), "short_sets": len(short), "unusable_sets": len(unusable),
        "boxes": sum(r.boxes for r in rows),
        "per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))),
    }
    log.info("preprocess: %d images, %d detected, %d empty, %d short set(s), %d set(s) without a usable image, "
             "%d rejection(s) (policy %s)", counts["images"], counts["detected"], counts["empty"],
             counts["short_sets"], len(unusable), rejections["total"], road.short_set_policy)
    return stage.StageResult(
        outputs={k: EMPTY_SHA256 for k in empty_labels}, counts=counts,
        records={"rows": [r.json() for r in rows], "short_sets": short, "unusable_sets": unusable,
                 "rejections": rejections, "policy": road.short_set_policy, "model": detects[0].get("model", {}),
                 "timings": {"ingest": ingest.get("seconds"),
                             "detect": max((d.get("seconds") or 0) for d in detects)}},
    )
