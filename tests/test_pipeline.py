"""The four stages end to end on a real S3 server with real yolov5 inference: preprocess and datasheet
behaviour, the answer sheet's layout and checksums, policies, idempotence."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import pytest
import yaml
from conftest import DAY, REAL_WEIGHTS, ROAD, write_roads_file

from answersheet.cli import main
from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.layout import DayLayout

CAMERAS = ("front", "rear", "left", "right", "side1", "side2")
N_SETS = 4
SHORT = {1: ["rear"]}  # set 1 has no rear camera
LAYOUT = DayLayout(ROAD, DAY)


@pytest.fixture(scope="session")
def detect_overrides(tiny_weights):
    """Real COCO weights when present; else the tiny random model with thresholds that still yield boxes."""
    if REAL_WEIGHTS.is_file():
        return {"weights": str(REAL_WEIGHTS), "sha256": hashlib.sha256(REAL_WEIGHTS.read_bytes()).hexdigest()}
    path, sha = tiny_weights
    return {"weights": str(path), "sha256": sha, "conf_thres": 1e-6, "max_det": 3, "imgsz": 320}


def make_day(store, tmp_path, photos, detect_overrides, **road):
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket,
                             detect={**detect_overrides, "backend": "torch"}, **road)
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, N_SETS, photos, short_sets=SHORT))
    return roads


def run(roads, *stages, extra=()):
    codes = [main([s, "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads), *extra]) for s in stages]
    return codes


def sheet_objects(store) -> dict[str, bytes]:
    return {o.key[len(LAYOUT.out_prefix):]: store.get(o.key) for o in store.list(LAYOUT.out_prefix)}


def without_timings(page: bytes) -> bytes:
    head, rest = page.split(b'<section id="timings">')
    return head + rest.split(b"</section>", 1)[1]


@pytest.fixture
def done_day(store, tmp_path, photos, detect_overrides):
    roads = make_day(store, tmp_path, photos, detect_overrides)
    assert run(roads, "run") == [0]
    return store, roads


def test_answer_sheet_layout_and_checksums(done_day):
    store, _ = done_day
    objs = sheet_objects(store)
    images = sorted(k for k in objs if k.startswith("images/"))
    labels = sorted(k for k in objs if k.startswith("labels/"))
    assert len(images) == N_SETS * 6 - 1  # the short set lacks its rear image
    # labels only where the detector looked (side1, side2), plus fill policy's placeholder for the missing rear:
    # the other cameras' images have no label file (an empty one would say "no objects")
    assert len(labels) == N_SETS * 2 + 1
    side = {k[len("images/"):-4] for k in images if k.endswith(("_side1.jpg", "_side2.jpg"))}
    assert {k[len("labels/"):-4] for k in labels} == side | {f"{ROAD}_20261102_090007_rear"}
    assert objs["classes.txt"].decode().splitlines()[:3] == ["person", "bicycle", "car"]
    manifest = json.loads(objs["manifest.json"])
    # every output object is listed with its real sha256, and nothing else is there
    assert set(manifest["outputs"]) == {LAYOUT.out_prefix + k for k in objs if k != "manifest.json"}
    for key, sha in manifest["outputs"].items():
        assert hashlib.sha256(objs[key[len(LAYOUT.out_prefix):]]).hexdigest() == sha, key
    assert manifest["counts"]["short_sets"] == 1
    assert manifest["short_sets"] == {f"{ROAD}_20261102_090007": ["rear"]}
    assert manifest["model"]["sha256"]
    assert set(manifest["timings"]) >= {"ingest", "detect", "preprocess", "datasheet"}


def test_datasheet_csv_opens_in_excel_with_korean(done_day):
    store, _ = done_day
    raw = store.get(LAYOUT.out_prefix + "datasheet.csv")
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM: Excel picks UTF-8
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    assert len(rows) == N_SETS * 6
    assert {r["road_name"] for r in rows} == {"대왕판교"}
    by_status = {s: [r for r in rows if r["status"] == s]
                 for s in ("detected", "empty", "not_detected", "missing", "rejected")}
    assert len(by_status["missing"]) == 1 and by_status["missing"][0]["camera"] == "rear"
    assert by_status["missing"][0]["image"] == ""
    assert by_status["detected"], "the side cameras of real photos must yield boxes"
    for r in rows:
        assert r["label"] == "" or r["label"].startswith("labels/")  # relative to the sheet
        assert int(r["boxes"]) == sum(int(v) for k, v in r.items() if k.startswith("n_"))
        if r["camera"] in ("front", "rear", "left", "right"):
            assert r["selected"] == "no" and r["status"] in ("not_detected", "missing")
    assert all(r["label"] == "" for r in by_status["not_detected"])
    # label files agree with the box counts
    for r in by_status["detected"]:
        text = store.get(LAYOUT.out(r["label"])).decode()
        assert len(text.splitlines()) == int(r["boxes"])
    for r in by_status["empty"]:
        assert store.get(LAYOUT.out(r["label"])) == b""


def test_report_shows_samples_with_boxes(done_day):
    store, _ = done_day
    objs = sheet_objects(store)
    page = objs["report.html"].decode()
    assert "대왕판교" in page
    thumbs = sorted(k for k in objs if k.startswith("report/thumbs/"))
    assert thumbs and all(f'src="{k}"' in page for k in thumbs)
    assert all(f'href="{k.replace("/thumbs/", "/full/")}"' in page for k in thumbs)
    assert all(objs[k].startswith(b"\xff\xd8") for k in objs if k.startswith("report/"))


def test_rerun_is_byte_identical_and_force_recomputes(done_day, caplog):
    store, roads = done_day
    before = sheet_objects(store)
    work_before = {o.key: o.etag for o in store.list(LAYOUT.work_prefix)}
    with caplog.at_level("INFO"):
        assert run(roads, "run") == [0]
    assert sum("is current" in r.message for r in caplog.records) == 4  # every stage skipped
    assert {o.key: o.etag for o in store.list(LAYOUT.work_prefix)} == work_before
    assert run(roads, "run", extra=["--force"]) == [0]
    after = sheet_objects(store)
    assert set(after) == set(before)
    for key in before:
        if key == "report.html":  # its timings section holds this run's timings
            assert without_timings(after[key]) == without_timings(before[key])
        elif key != "manifest.json":  # the manifest holds timings
            assert after[key] == before[key], key
    for key in (k for k in after if k.startswith("labels/")):  # no appended duplicate lines
        lines = after[key].decode().splitlines()
        assert len(lines) == len(set(lines)), key


def test_flag_policy_marks_without_placeholders(store, tmp_path, photos, detect_overrides):
    roads = make_day(store, tmp_path, photos, detect_overrides, short_set_policy="flag")
    assert run(roads, "run") == [0]
    objs = sheet_objects(store)
    # side cameras only; flag policy: no placeholder for the missing rear
    assert len([k for k in objs if k.startswith("labels/")]) == N_SETS * 2
    rows = list(csv.DictReader(io.StringIO(objs["datasheet.csv"].decode("utf-8-sig"))))
    missing = [r for r in rows if r["status"] == "missing"]
    assert len(missing) == 1 and missing[0]["label"] == ""


def test_fail_policy_names_the_short_set_and_publishes_nothing(store, tmp_path, photos, detect_overrides, capsys):
    roads = make_day(store, tmp_path, photos, detect_overrides, short_set_policy="fail")
    assert run(roads, "ingest", "detect") == [0, 0]
    assert run(roads, "preprocess") == [1]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("answersheet: error:") and f"{ROAD}_20261102_090007 missing ['rear']" in err
    assert store.get_json(LAYOUT.preprocess_manifest) is None
    assert run(roads, "datasheet") == [1]
    assert "run the preprocess stage" in capsys.readouterr().err
    assert store.list(LAYOUT.out_prefix) == []


def test_preprocess_names_a_missing_detect_shard(store, tmp_path, photos, detect_overrides, capsys):
    roads = make_day(store, tmp_path, photos, detect_overrides)
    assert run(roads, "ingest") == [0]
    assert run(roads, "preprocess") == [1]
    err = capsys.readouterr().err
    assert "detect/manifest-000-of-001.json: missing" in err
    assert store.get_json(LAYOUT.preprocess_manifest) is None


def summary(capsys) -> dict:
    """The JSON summary `answersheet run` printed last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_item1_stale_labels_are_refused_after_a_reingest(done_day, photos, capsys):
    """New photos under the same names, then ingest, preprocess and datasheet without detect: the old
    photos' labels must not be paired with the new images. One line names the stage to re-run; nothing
    is (re)published; after detect the chain goes through."""
    store, roads = done_day
    published = sheet_objects(store)
    new = build_day_archives(ROAD, DAY, CAMERAS, N_SETS, list(reversed(photos)), short_sets=SHORT)
    upload_day(store, ROAD, DAY, new)
    capsys.readouterr()
    assert run(roads, "ingest") == [0]
    assert run(roads, "preprocess") == [1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"answersheet: error: {store.uri(LAYOUT.detect_manifest(0, 1))} was built from an "
                              "older ingest (outputs "), err[-1]
    assert err[-1].endswith("re-run detect for this day")
    assert run(roads, "datasheet") == [1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"answersheet: error: {store.uri(LAYOUT.preprocess_manifest)} was built from an "
                              "older ingest"), err[-1]
    assert err[-1].endswith("re-run detect and preprocess for this day")
    assert sheet_objects(store) == published  # nothing published
    assert run(roads, "detect", "preprocess", "datasheet") == [0, 0, 0]
    after = sheet_objects(store)
    images = {o.key.rsplit("/", 1)[-1]: store.get(o.key) for o in store.list(LAYOUT.ingest_images)}
    assert {k[len("images/"):]: v for k, v in after.items() if k.startswith("images/")} == images
    assert any(after[k] != published[k] for k in after if k.startswith("images/"))


def test_item2_deleted_outputs_are_restored(done_day, capsys):
    """Delete one object of the published sheet and one intermediate label: a re-run restores both,
    byte-identical, instead of skipping on manifests that list them."""
    store, roads = done_day
    published = sheet_objects(store)
    work = {o.key: store.get(o.key) for o in store.list(LAYOUT.work_prefix)}
    label = next(k for k in work if k.startswith(LAYOUT.detect_labels))
    sheet_label = next(k for k in published if k.startswith("labels/"))
    store.delete([label, LAYOUT.out_prefix + sheet_label])
    capsys.readouterr()
    assert run(roads, "run") == [0]
    skipped = {stage: s["skipped"] for stage, s in summary(capsys).items()}
    assert skipped == {"ingest": True, "detect": False, "preprocess": True, "datasheet": False}
    assert {o.key: store.get(o.key) for o in store.list(LAYOUT.work_prefix) if not o.key.endswith(".json")} == {
        k: v for k, v in work.items() if not k.endswith(".json")}
    after = sheet_objects(store)
    assert set(after) == set(published)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in published.items() if k != "manifest.json"}
    # a replaced object (same key, other bytes) is caught too
    store.put(LAYOUT.out_prefix + sheet_label, b"0 0.5 0.5 0.1 0.1\n", "text/plain")
    assert run(roads, "datasheet") == [0]
    assert summary(capsys)["skipped"] is False
    assert store.get(LAYOUT.out_prefix + sheet_label) == published[sheet_label]


def test_item9_rejected_member_invents_no_set(store, tmp_path, photos, detect_overrides):
    """A member rejected for its path names a set no accepted image has: under `fill` that set gets no
    placeholder labels and is not counted; the rejection is still listed."""
    roads = make_day(store, tmp_path, photos, detect_overrides)  # policy fill (the shipped default)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"../{ROAD}_20261102_095959_front.jpg", photos[0].read_bytes())
    store.put(LAYOUT.raw_prefix + "zz-slip.zip", buf.getvalue(), "application/zip")
    assert run(roads, "run") == [0]
    objs = sheet_objects(store)
    assert not [k for k in objs if "_095959_" in k]
    assert len([k for k in objs if k.startswith("labels/")]) == N_SETS * 2 + 1  # side cameras + the placeholder
    pre = store.get_json(LAYOUT.preprocess_manifest)
    assert pre["counts"]["sets"] == N_SETS and f"{ROAD}_20261102_095959" not in pre["short_sets"]
    rows = list(csv.DictReader(io.StringIO(objs["datasheet.csv"].decode("utf-8-sig"))))
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["set_id"] == "" and "unsafe path" in rejected[0]["note"]


def test_item9_set_without_a_usable_image_is_reported_not_filled(store, tmp_path, photos, detect_overrides):
    """Every image of one set fails in detect (its bytes changed after ingest): the set is reported in
    `unusable_sets`, and gets no placeholder labels."""
    roads = make_day(store, tmp_path, photos, {**detect_overrides, "cameras": "all"})
    assert run(roads, "ingest") == [0]
    victim = f"{ROAD}_20261102_090000"
    for cam in CAMERAS:
        store.put(f"{LAYOUT.ingest_images}{victim}_{cam}.jpg", photos[-1].read_bytes(), "image/jpeg")
    assert run(roads, "detect", "preprocess", "datasheet") == [0, 0, 0]
    pre = store.get_json(LAYOUT.preprocess_manifest)
    assert pre["unusable_sets"] == [victim] and victim not in pre["short_sets"]
    objs = sheet_objects(store)
    assert not [k for k in objs if k.startswith(f"labels/{victim}_")]
    assert store.get_json(LAYOUT.out_manifest)["unusable_sets"] == [victim]
    assert "Sets without a usable image (1)" in objs["report.html"].decode()


def test_item8_rejections_are_counted_not_listed(store, tmp_path, photos, detect_overrides):
    """Many junk members: the datasheet and report list the first REJECTIONS_LISTED and count the rest per
    kind; every rejection stays in the ingest manifest."""
    from answersheet.preprocess import REJECTIONS_LISTED

    junk = 3 * REJECTIONS_LISTED
    roads = make_day(store, tmp_path, photos, detect_overrides)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(junk):
            zf.writestr(f"junk/{i:05d}.txt", b"x")
    store.put(LAYOUT.raw_prefix + "junk.zip", buf.getvalue(), "application/zip")
    assert run(roads, "run") == [0]
    assert len(store.get_json(LAYOUT.ingest_manifest)["rejections"]) == junk
    objs = sheet_objects(store)
    rows = list(csv.DictReader(io.StringIO(objs["datasheet.csv"].decode("utf-8-sig"))))
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == REJECTIONS_LISTED + 1
    assert rejected[-1]["note"].startswith(f"{junk - REJECTIONS_LISTED} more rejected member(s) not listed here: "
                                           "bad_name (every rejection is in s3://")
    assert len(rows) == N_SETS * 6 + REJECTIONS_LISTED + 1
    page = objs["report.html"].decode()
    assert f"<h2>Rejected ({junk})</h2>" in page and f'<td>bad_name</td><td class="num">{junk}</td>' in page
    assert page.count("junk/") == REJECTIONS_LISTED
    pre = store.get_json(LAYOUT.preprocess_manifest)
    assert pre["counts"]["rejected"] == junk and pre["rejections"]["by_kind"] == {"bad_name": junk}


def test_hygiene_changing_conf_thres_reruns_detect_not_ingest(done_day, capsys):
    store, roads = done_day
    doc = yaml.safe_load(roads.read_text(encoding="utf-8"))
    doc["roads"][0]["detect"]["conf_thres"] = 0.5 if doc["roads"][0]["detect"].get("conf_thres") != 0.5 else 0.6
    roads.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    capsys.readouterr()
    assert run(roads, "run") == [0]
    skipped = {stage: s["skipped"] for stage, s in summary(capsys).items()}
    assert skipped == {"ingest": True, "detect": False, "preprocess": False, "datasheet": False}
