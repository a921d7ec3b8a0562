"""The answer sheet as its users get it: one real day (real S3 server, real yolov5) published and pulled with
`answersheet pull`, then every export opened by the real importer — yolov5's dataset checker and loader,
pycocotools, Datumaro (CVAT's dataset library), label-studio-sdk — and the report opened in headless Chromium.
Also: honest statuses, review priority, drift across days, pull's sha256 verification."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import urllib.request
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import DAY, REAL_WEIGHTS, REPO, ROAD, write_roads_file

from answersheet.cli import main
from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.layout import DayLayout

CAMERAS = ("front", "rear", "left", "right", "side1", "side2")
N_SETS = 5
SHORT = {1: ["rear"]}
LAYOUT = DayLayout(ROAD, DAY)
IMPORTERS_PY = Path(os.environ.get("ANSWERSHEET_IMPORTERS_PYTHON")
                    or REPO / "build" / "importers-venv" / "bin" / "python")
ARTEFACTS = Path(os.environ.get("ANSWERSHEET_TEST_ARTEFACTS") or REPO / "build" / "test-artefacts")


def detect_settings(tiny_weights) -> dict:
    if REAL_WEIGHTS.is_file():
        return {"weights": str(REAL_WEIGHTS), "sha256": hashlib.sha256(REAL_WEIGHTS.read_bytes()).hexdigest(),
                "backend": "torch"}
    path, sha = tiny_weights
    return {"weights": str(path), "sha256": sha, "conf_thres": 1e-6, "max_det": 3, "imgsz": 320, "backend": "torch"}


def run(roads: Path, *stages: str, extra=()) -> list[int]:
    return [main([s, "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads), *extra]) for s in stages]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8-sig"))))


@pytest.fixture(scope="module")
def sheet(s3_endpoint, tmp_path_factory, photos, tiny_weights):
    """One published day (5 sets, set 1 without its rear image), pulled to a local directory."""
    from answersheet.storage import Store

    tmp = tmp_path_factory.mktemp("sheet")
    store = Store(f"test-{uuid.uuid4().hex[:12]}")
    store.client.create_bucket(Bucket=store.bucket)
    roads = write_roads_file(tmp / "roads.yaml", store.bucket, detect=detect_settings(tiny_weights))
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, N_SETS, photos, short_sets=SHORT))
    assert run(roads, "ingest", "detect", "preprocess", "datasheet") == [0, 0, 0, 0]
    out = tmp / "pulled"
    assert main(["pull", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads), "--out", str(out)]) == 0
    rows = read_csv(out / "datasheet.csv")
    return SimpleNamespace(store=store, roads=roads, dir=out, rows=rows, tmp=tmp,
                           manifest=json.loads((out / "manifest.json").read_text()))


def importer(script: str, *args: str) -> dict:
    """Run a check in the importers venv (datumaro, label-studio-sdk: see requirements/importers.txt)."""
    if not IMPORTERS_PY.is_file():
        pytest.fail(f"{IMPORTERS_PY}: no importers venv; run `make importers` (or set ANSWERSHEET_IMPORTERS_PYTHON)")
    proc = subprocess.run([str(IMPORTERS_PY), "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- honest statuses and the datasheet --------------------------------------------------------------------------

def test_statuses_not_detected_images_get_no_label_file(sheet):
    by = {s: [r for r in sheet.rows if r["status"] == s] for s in ("detected", "empty", "not_detected", "missing")}
    assert {r["status"] for r in sheet.rows} <= {"detected", "empty", "not_detected", "missing", "rejected", "failed"}
    assert len(by["not_detected"]) == N_SETS * 4 - 1  # front/rear/left/right, less the missing rear
    assert by["detected"] and len(by["missing"]) == 1
    labels = {p.name for p in (sheet.dir / "labels").iterdir()}
    for r in by["not_detected"]:
        assert r["label"] == "" and Path(r["image"]).stem + ".txt" not in labels
        assert r["camera"] in ("front", "rear", "left", "right") and r["selected"] == "no"
    for r in by["empty"]:
        assert (sheet.dir / r["label"]).read_bytes() == b""
    for r in by["detected"]:
        assert len((sheet.dir / r["label"]).read_text().splitlines()) == int(r["boxes"])
    assert (sheet.dir / by["missing"][0]["label"]).read_bytes() == b""  # fill policy's placeholder
    assert sheet.manifest["counts"]["not_detected"] == len(by["not_detected"])


def test_datasheet_paths_resolve_next_to_the_csv_and_times_carry_the_offset(sheet):
    header = list(sheet.rows[0])
    classes = (sheet.dir / "classes.txt").read_text().splitlines()
    assert [h[2:] for h in header if h.startswith("n_")] == classes
    assert {"mean_conf", "min_conf", "review_priority"} <= set(header)
    for r in sheet.rows:
        for col in ("image", "label"):
            assert r[col] == "" or (sheet.dir / r[col]).is_file(), r[col]
        assert r["capture_time"].endswith("+09:00")  # Asia/Seoul
    detected = [r for r in sheet.rows if r["status"] == "detected"]
    assert all(0 < float(r["min_conf"]) <= float(r["mean_conf"]) <= 1 for r in detected)
    assert all(r["mean_conf"] == "" for r in sheet.rows if r["status"] in ("empty", "not_detected"))


def test_predictions_file_merges_the_shards_and_matches_the_labels(sheet):
    recs = [json.loads(x) for x in (sheet.dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in recs] == sorted(r["image"] for r in recs)
    looked = {Path(r["image"]).name for r in sheet.rows if r["status"] in ("detected", "empty")}
    assert {r["image"] for r in recs} == looked
    for rec in recs:
        label = (sheet.dir / "labels" / (rec["image"][:-4] + ".txt")).read_text().splitlines()
        assert [line.split()[0] for line in label] == [str(b["class_id"]) for b in rec["boxes"]]


# -- exports, each opened by its real importer -----------------------------------------------------------------

def test_data_yaml_loads_with_yolov5_checker_and_loader(sheet, tmp_path, monkeypatch):
    from yolov5.utils import general
    from yolov5.utils.dataloaders import LoadImagesAndLabels
    from yolov5.utils.general import check_dataset

    from answersheet.report import label_font

    # check_dataset fetches Arial.ttf into its config dir for plotting when absent (no internet here): give it a
    # TrueType font there, so the check runs offline as it does on a machine that trained once before.
    font = Path(label_font(12).path) if hasattr(label_font(12), "path") else None
    assert font and font.is_file(), "a TrueType font (fonts-dejavu-core or fonts-noto-cjk) is needed"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        (tmp_path / name).write_bytes(font.read_bytes())
    monkeypatch.setattr(general, "CONFIG_DIR", tmp_path)
    data = check_dataset(str(sheet.dir / "data.yaml"))
    assert data["nc"] == len(data["names"]) == len((sheet.dir / "classes.txt").read_text().splitlines())
    labelled = {r["image"] for r in sheet.rows if r["status"] in ("detected", "empty")}
    boxes = {r["image"]: int(r["boxes"]) for r in sheet.rows}
    seen = set()
    for split in ("train", "val"):
        ds = LoadImagesAndLabels(data[split], img_size=320, batch_size=2)
        files = {str(Path(f).relative_to(sheet.dir)) for f in ds.im_files}
        assert files <= labelled
        seen |= files
        assert sum(len(lb) for lb in ds.labels) == sum(boxes[f] for f in files)
    assert seen == labelled  # every labelled image, no not_detected one (yolov5 would read it as background)


def test_coco_instances_and_results_load_with_pycocotools(sheet):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(sheet.dir / "coco" / "instances.json"))
    labelled = [r for r in sheet.rows if r["status"] in ("detected", "empty")]
    assert sorted(i["file_name"] for i in gt.loadImgs(gt.getImgIds())) == sorted(r["image"] for r in labelled)
    assert all((sheet.dir / i["file_name"]).is_file() for i in gt.loadImgs(gt.getImgIds()))
    assert len(gt.getAnnIds()) == sum(int(r["boxes"]) for r in labelled)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == (sheet.dir / "classes.txt").read_text().splitlines()
    dt = gt.loadRes(str(sheet.dir / "coco" / "results.json"))
    assert len(dt.getAnnIds()) == len(gt.getAnnIds())
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP@0.5 of the boxes against themselves: ids and geometry agree


DATUMARO_CHECK = """
import json, sys, zipfile, tempfile
import datumaro as dm
d = tempfile.mkdtemp()
zipfile.ZipFile(sys.argv[1]).extractall(d)
found = dm.Environment().detect_dataset(d)
ds = dm.Dataset.import_from(d, "coco_instances")
cats = ds.categories()[dm.AnnotationType.label]
print(json.dumps({"formats": found, "items": sorted(i.id for i in ds),
                  "boxes": sum(1 for i in ds for a in i.annotations if a.type == dm.AnnotationType.bbox),
                  "labels": [c.name for c in cats]}))
"""


def test_cvat_zip_imports_with_datumaro(sheet):
    got = importer(DATUMARO_CHECK, str(sheet.dir / "cvat" / "coco-1.0.zip"))
    labelled = [r for r in sheet.rows if r["status"] in ("detected", "empty")]
    assert "coco_instances" in got["formats"] or "coco" in got["formats"]
    assert got["items"] == sorted(Path(r["image"]).stem for r in labelled)  # CVAT matches frames by name
    assert got["boxes"] == sum(int(r["boxes"]) for r in labelled)
    assert got["labels"] == (sheet.dir / "classes.txt").read_text().splitlines()


LABEL_STUDIO_CHECK = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface
li = LabelInterface(open(sys.argv[1]).read())
tasks = json.load(open(sys.argv[2]))
errors = []
for t in tasks:
    if not li.validate_task({"data": t["data"]}):  # (its predictions branch is broken in 2.1.2: checked below)
        errors.append(f"task {t['data']['name']}: invalid")
    for p in t.get("predictions", []):
        errors += li.validate_prediction(p, return_errors=True)
print(json.dumps({"errors": errors[:10], "tasks": len(tasks)}))
"""


def test_label_studio_tasks_validate_with_the_sdk_in_review_order(sheet):
    tasks_path = sheet.dir / "label-studio" / "tasks.json"
    got = importer(LABEL_STUDIO_CHECK, str(sheet.dir / "label-studio" / "config.xml"), str(tasks_path))
    assert got["errors"] == []
    tasks = json.loads(tasks_path.read_text())
    with_image = [r for r in sheet.rows if r["image"]]
    assert got["tasks"] == len(tasks) == len(with_image)
    prio = [t["data"]["review_priority"] for t in tasks]
    scored = [p for p in prio if p is not None]
    assert scored == sorted(scored, reverse=True) and prio[: len(scored)] == scored  # review first
    for t in tasks:
        assert t["data"]["image"].startswith(f"s3://{sheet.store.bucket}/{LAYOUT.out_images}")
        status = t["data"]["status"]
        if status == "not_detected":
            assert "predictions" not in t  # nothing to pre-annotate: not a negative
        elif status == "empty":
            assert t["predictions"][0]["result"] == []
        else:
            pred = t["predictions"][0]
            assert pred["model_version"] and all(0 < r["score"] <= 1 for r in pred["result"])
    by_name = {r["image"]: r for r in sheet.rows}
    for t in tasks:
        row = by_name[f"images/{t['data']['name']}"]
        assert (row["review_priority"] or None) == (None if t["data"]["review_priority"] is None
                                                    else f"{t['data']['review_priority']:.4f}")


# -- the report in a real browser -------------------------------------------------------------------------------

def test_report_opens_in_chromium_every_image_loads_and_korean_renders(sheet, capsys):
    from browser import Chromium

    report = sheet.dir / "report.html"
    page = report.read_text()
    assert "}}" not in page.split("</style>")[0]  # the old broken CSS
    with Chromium() as browser:
        browser.open(report.as_uri())
        images = browser.eval("[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        links = browser.eval("[...document.querySelectorAll('figure a')].map(a => a.getAttribute('href'))")
        css = browser.eval("getComputedStyle(document.querySelector('td')).borderTopStyle")
        fonts = browser.fonts_for("#road-name")
        shot = browser.screenshot(ARTEFACTS / "report.png")
        errors = browser.console_errors()
    with capsys.disabled():  # always shown: the screenshot is the test's artefact
        print(f"\nreport screenshot: {shot}")
    assert images and all(w > 0 for _, w in images), [s for s, w in images if w <= 0]
    assert errors == []
    assert css == "solid"  # the td,th rule applies
    assert all((sheet.dir / href).is_file() for href in links)  # thumbnails open full-size images
    assert any(h.startswith("report/full/") for h in links) and any(h.startswith("images/") for h in links)
    # "대왕판교": all four glyphs from a CJK font, none from a fallback that lacks Hangul
    assert sum(f["glyphCount"] for f in fonts if "CJK" in f["familyName"]) >= len("대왕판교"), fonts
    assert shot.stat().st_size > 10_000
    for section in ("review-first", "timings"):
        assert f'id="{section}"' in page
    for title in ("Every camera", "Lowest confidence", "Empty", "Short sets"):
        assert title in page
    assert "<svg" in page


# -- pull -------------------------------------------------------------------------------------------------------

def test_pull_verifies_sha256_and_resumes(sheet, tmp_path, capsys):
    out = tmp_path / "sheet"
    args = ["pull", "--road", ROAD, "--date", DAY.isoformat(), "--bucket", sheet.store.bucket, "--out", str(out)]
    victim = LAYOUT.out("labels/" + next(Path(r["label"]).name for r in sheet.rows if r["status"] == "detected"))
    original = sheet.store.get(victim)
    sheet.store.put(victim, original + b"0 0.5 0.5 0.1 0.1\n")
    try:
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("answersheet: error: ") and victim in err and "does not match the manifest" in err
        assert not list(out.rglob("*.part"))
    finally:
        sheet.store.put(victim, original)
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["verified"] == summary["objects"] and 0 < summary["downloaded"] < summary["objects"]  # resumed
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["path"] == str(out.resolve())


def test_pull_of_an_unpublished_day_is_one_line(sheet, tmp_path, capsys):
    assert main(["pull", "--road", ROAD, "--date", "2026-11-03", "--bucket", sheet.store.bucket,
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("answersheet: error: ") and "20261103/manifest.json: missing" in err[0]


def test_pull_refuses_a_manifest_that_points_outside_the_sheet(sheet, tmp_path, capsys):
    import datetime as dt

    other = DayLayout(ROAD, dt.date(2026, 11, 5))
    sheet.store.put_json(other.out_manifest, {"outputs": {other.out("../../../../etc/x"): "0" * 64}})
    out = tmp_path / "x"
    assert main(["pull", "--road", ROAD, "--date", "2026-11-05", "--bucket", sheet.store.bucket,
                 "--out", str(out)]) == 1
    assert "lists objects outside the sheet" in capsys.readouterr().err and not out.exists()
    sheet.store.delete([other.out_manifest])


# -- drift across days and the presigned option (re-publish the day: keep these last) -----------------------------

def test_unlabelled_labels_empty_opts_in_to_empty_files_but_exports_still_leave_them_out(sheet, tmp_path):
    detect = yaml.safe_load(sheet.roads.read_text())["roads"][0]["detect"]
    roads = write_roads_file(tmp_path / "roads.yaml", sheet.store.bucket, detect=detect, unlabelled_labels="empty")
    assert run(roads, "preprocess", "datasheet") == [0, 0]
    rows = [r for r in csv.DictReader(io.StringIO(sheet.store.get(LAYOUT.out("datasheet.csv")).decode("utf-8-sig")))]
    not_detected = [r for r in rows if r["status"] == "not_detected"]
    assert not_detected and all(sheet.store.get(LAYOUT.out(r["label"])) == b"" for r in not_detected)
    train = sheet.store.get(LAYOUT.out("train.txt")).decode() + sheet.store.get(LAYOUT.out("val.txt")).decode()
    assert not any(r["image"] in train for r in not_detected)
    coco = json.loads(sheet.store.get(LAYOUT.out("coco/instances.json")))
    assert not {r["image"] for r in not_detected} & {i["file_name"] for i in coco["images"]}
    assert run(sheet.roads, "preprocess", "datasheet") == [0, 0]  # back to the default: the files are gone again
    assert not any(o.key.endswith("_front.txt") for o in sheet.store.list(LAYOUT.out_labels))


def test_drift_flags_a_camera_against_earlier_days_without_failing(sheet):
    import datetime as dt

    m = sheet.store.get_json(LAYOUT.out_manifest)
    stats = m["camera_stats"]
    assert set(stats) == {"side1", "side2"}
    for back in (1, 3, 4):  # the earlier published days: side1 used to see many more boxes, at high confidence
        past = json.loads(json.dumps(stats))
        past["side1"]["boxes_per_image"] = max(2.0, stats["side1"]["boxes_per_image"] * 4)
        sheet.store.put_json(DayLayout(ROAD, DAY - dt.timedelta(days=back)).out_manifest, {"camera_stats": past})
    assert run(sheet.roads, "datasheet", extra=["--force"]) == [0]
    m = sheet.store.get_json(LAYOUT.out_manifest)
    assert m["drift"]["days"] == ["2026-11-01", "2026-10-30", "2026-10-29"]
    flagged = {(f["camera"], f["metric"]) for f in m["drift"]["flags"]}
    assert ("side1", "boxes_per_image") in flagged and not any(c == "side2" for c, _ in flagged)
    page = sheet.store.get(LAYOUT.out("report.html")).decode()
    assert page.index('id="drift"') < page.index('id="review-first"') and "side1" in page.split('id="review-first"')[0]


def test_presigned_image_urls_open_with_an_expiry(sheet, tmp_path):
    roads = write_roads_file(tmp_path / "roads.yaml", sheet.store.bucket, detect=yaml.safe_load(
        sheet.roads.read_text())["roads"][0]["detect"], sheet={"image_urls": "presigned", "presign_expiry_s": 600})
    assert run(roads, "datasheet") == [0]
    tasks = json.loads(sheet.store.get(LAYOUT.out("label-studio/tasks.json")))
    url = tasks[0]["data"]["image"]
    assert url.startswith("http") and "X-Amz-Expires=600" in url
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read()
    assert hashlib.sha256(body).hexdigest() == sheet.store.get_json(LAYOUT.out_manifest)["outputs"][
        LAYOUT.out(f"images/{tasks[0]['data']['name']}")]


def test_a_day_without_predictions_files_is_one_line_naming_the_file(sheet, capsys):
    key = LAYOUT.detect_predictions(0, 1)
    body = sheet.store.get(key)
    sheet.store.delete([key])
    try:
        assert run(sheet.roads, "datasheet", extra=["--force"]) == [1]
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("answersheet: error: ") and key in err[-1] and "re-run detect" in err[-1]
    finally:
        sheet.store.put(key, body)


@pytest.mark.fast
def test_review_priority_ranks_near_threshold_low_confidence_tiny_boxes_first():
    from answersheet.review import review_priority

    def rec(*confs, size=0.2):
        return {"width": 1000, "height": 1000,
                "boxes": [{"class": "car", "confidence": c, "box": [0.5, 0.5, size, size], "source": "full"}
                          for c in confs]}

    sure, unsure, tiny = rec(0.95, 0.9), rec(0.3, 0.35), rec(0.95, 0.9, size=0.01)
    p = {k: review_priority("detected", v, 0.25) for k, v in (("sure", sure), ("unsure", unsure), ("tiny", tiny))}
    assert p["unsure"] > p["tiny"] > p["sure"]
    assert review_priority("not_detected", None, 0.25) is None
    assert review_priority("empty", {"boxes": []}, 0.25) > p["sure"]


@pytest.mark.fast
def test_drift_needs_history_and_ignores_quiet_cameras():
    from answersheet.drift import flags_for

    today = {"cam": {"boxes_per_image": 0.0, "empty_rate": 1.0, "mean_conf": None, "class_mix": {}}}
    busy = {"cam": {"boxes_per_image": 8.0, "empty_rate": 0.0, "mean_conf": 0.7, "class_mix": {"car": 1.0}}}
    quiet = {"cam": {"boxes_per_image": 0.2, "empty_rate": 0.8, "mean_conf": 0.5, "class_mix": {"car": 1.0}}}
    assert flags_for(today, [busy]) == []  # one day is no baseline
    assert {f["metric"] for f in flags_for(today, [busy, busy])} == {"boxes_per_image", "empty_rate"}
    assert flags_for(today, [quiet, quiet]) == []


@pytest.mark.fast
def test_zip_is_byte_stable():
    from answersheet.exports import cvat_coco_zip

    a, b = cvat_coco_zip({"images": []}), cvat_coco_zip({"images": []})
    assert a == b
    assert zipfile.ZipFile(io.BytesIO(a)).namelist() == ["images/default/", "annotations/instances_default.json"]


@pytest.mark.fast
def test_report_samples_cover_every_camera_and_skip_repeated_frames():
    from answersheet.datasheet import sample_sections

    def row(name, cam, sha, status="detected", prio=0.5, conf=0.5, boxes=3, set_id="s1"):
        return {"name": name, "camera": cam, "image": f"images/{name}", "image_sha256": sha, "status": status,
                "review_priority": prio, "mean_conf": conf, "boxes": boxes, "set_id": set_id}

    rows = [row("a_side1.jpg", "side1", "x", prio=0.9, conf=0.3), row("b_side2.jpg", "side2", "x", prio=0.8, conf=0.3),
            row("c_side1.jpg", "side1", "y", prio=0.1, conf=0.9),
            row("d_front.jpg", "front", "z", status="not_detected", prio=None, conf=None, boxes=0),
            row("e_side2.jpg", "side2", "w", status="empty", prio=0.25, conf=None, boxes=0)]
    review, sections = sample_sections(rows, 6, ("front", "side1", "side2"))
    assert [r["name"] for r in review] == ["a_side1.jpg", "c_side1.jpg"]  # b is the same frame as a
    titles = dict(sections)
    assert [r["camera"] for r in titles["Every camera"]] == ["front", "side1", "side2"]
    assert [r["name"] for r in titles["Lowest confidence"]] == ["a_side1.jpg", "c_side1.jpg"]
    assert [r["name"] for r in titles["Empty (the detector looked and found nothing)"]] == ["e_side2.jpg"]
