"""Roads file validation and image naming: errors name the road and the key / the file."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from conftest import ROADS_FILE

from answersheet.config import load_road, read_roads_file, validate_road
from answersheet.errors import ConfigError
from answersheet.naming import BadImageName, parse_image_name

pytestmark = pytest.mark.fast

CAMS = ("front", "rear", "left", "right", "side1", "side2")


def road(**over):
    return {**read_roads_file(ROADS_FILE)[0], **over}


def test_shipped_roads_file_is_valid():
    r = load_road(ROADS_FILE, "daewang_pangyo")
    assert r.name == "대왕판교"
    assert r.detect.cameras == ("side1", "side2")
    assert r.cameras == CAMS and r.classes == ("person", "bicycle", "car", "motorcycle", "bus", "truck")
    assert r.detect.class_map == (("train", None),) and r.detect.imgsz == 1280
    assert r.schedule["cron"] == "0 9 * * 1-5" and r.schedule["timezone"] == "Asia/Seoul"


@pytest.mark.parametrize("over, key", [
    ({"colour": "red"}, "'colour'"),
    ({"short_set_policy": "ignore"}, "'short_set_policy'"),
    ({"detect": {**road()["detect"], "cameras": ["side3"]}}, "'detect.cameras'"),
    ({"detect": {**road()["detect"], "sha256": "abc"}}, "'detect.sha256'"),
    ({"detect": {**road()["detect"], "imgsz": 650}}, "'detect.imgsz'"),
    ({"detect": {**road()["detect"], "conf_thres": 2}}, "'detect.conf_thres'"),
    ({"ingest": {"max_ratio": "x"}}, "'ingest.max_ratio'"),
    ({"ingest": {"max_rate": 3}}, "'ingest.max_rate'"),
    ({"cameras": ["front", "front"]}, "'cameras'"),
    ({"cameras": ["side_1"]}, "'cameras'"),
])
def test_bad_key_is_named_with_the_road(over, key):
    with pytest.raises(ConfigError) as err:
        validate_road(road(**over))
    assert "road 'daewang_pangyo'" in str(err.value) and key in str(err.value)


def test_detect_all_cameras():
    r = validate_road(road(detect={**road()["detect"], "cameras": "all"}))
    assert r.detect.cameras == CAMS


def test_missing_road_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="road 'nope' not found"):
        load_road(ROADS_FILE, "nope")
    bad = tmp_path / "roads.yaml"
    bad.write_text("roads: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_road(bad, "x")
    bad.write_text(yaml.safe_dump({"roads": [], "extra": 1}))
    with pytest.raises(ConfigError, match="unknown top-level"):
        load_road(bad, "x")


def test_digest_ignores_schedule_but_not_thresholds():
    base = validate_road(road())
    assert validate_road(road(schedule={**road()["schedule"], "cron": "0 10 * * *"})).digest() == base.digest()
    assert validate_road(road(detect={**road()["detect"], "conf_thres": 0.3})).digest() != base.digest()
    # ... except its time zone: the datasheet's capture times carry the road's UTC offset
    assert validate_road(road(schedule={**road()["schedule"], "timezone": "UTC"})).digest() != base.digest()


def test_sheet_settings_and_unlabelled_labels_are_validated_naming_the_key():
    r = validate_road(road())
    assert (r.unlabelled_labels, r.sheet.image_urls, r.timezone) == ("none", "s3", "Asia/Seoul")
    for over, key in [({"unlabelled_labels": "blank"}, "'unlabelled_labels'"),
                      ({"sheet": {"image_urls": "http"}}, "'sheet.image_urls'"),
                      ({"sheet": {"presign_expiry_s": 10**7}}, "'sheet.presign_expiry_s'"),
                      ({"sheet": {"drift": 3}}, "'sheet.drift'"),
                      ({"schedule": {"timezone": "Mars/Olympus"}}, "'schedule.timezone'")]:
        with pytest.raises(ConfigError, match=f"road 'daewang_pangyo': key {key}"):
            validate_road(road(**over))


def test_image_names_parse_from_the_right():
    day = dt.date(2026, 11, 2)
    n = parse_image_name("daewang_pangyo_20261102_091305_side1.jpg", "daewang_pangyo", day, CAMS)
    assert (n.road, n.set_id, n.camera, n.capture_time) == (
        "daewang_pangyo", "daewang_pangyo_20261102_091305", "side1", "2026-11-02T09:13:05")
    for bad, why in [
        ("daewang_pangyo_20261102_091305_side1.png", "does not match"),
        ("other_road_20261102_091305_side1.jpg", "another road"),
        ("daewang_pangyo_20261103_091305_side1.jpg", "another date"),
        ("daewang_pangyo_20261102_991305_side1.jpg", "invalid capture time"),
        ("daewang_pangyo_20261102_091305_roof.jpg", "unknown camera"),
    ]:
        with pytest.raises(BadImageName, match=why):
            parse_image_name(bad, "daewang_pangyo", day, CAMS)


# -- issue 8 item 6: numbers that switch safety off, unreadable roads files --------------------------------

NUMBER_KEYS = [("detect", k) for k in ("conf_thres", "iou_thres", "imgsz", "max_det", "batch_size", "shards")] + [
    ("ingest", k) for k in ("max_member_bytes", "max_total_bytes", "max_ratio", "max_members", "workers")]


@pytest.mark.parametrize("section, key", NUMBER_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_item6_every_number_must_be_finite(tmp_path, section, key, value):
    """`.nan` / `.inf` in the roads file (as YAML writes them) are refused with file, road and key."""
    raw = read_roads_file(ROADS_FILE)[0]
    doc = {"roads": [{**raw, section: {**(raw.get(section) or {}), key: value}}]}
    path = tmp_path / "roads.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    assert (".nan" if value != value else ".inf") in path.read_text(encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_road(path, "daewang_pangyo")
    msg = str(err.value)
    assert msg.startswith(f"{path}: road 'daewang_pangyo': key '{section}.{key}':"), msg
    assert "\n" not in msg


@pytest.mark.parametrize("key, value", [("conf_thres", 1.5), ("iou_thres", -0.1), ("max_det", 10**9)])
def test_item6_detect_numbers_have_ranges(key, value):
    with pytest.raises(ConfigError, match=f"'detect.{key}': must be in"):
        validate_road(road(detect={**road()["detect"], key: value}))


def test_item6_ingest_max_ratio_inf_cannot_disable_the_bomb_guard():
    with pytest.raises(ConfigError, match="'ingest.max_ratio': must be a finite number"):
        validate_road(road(ingest={"max_ratio": float("inf")}))


def test_item6_cp949_roads_file_is_one_line(tmp_path):
    """The shipped roads file saved as cp949 (Korean Windows' default encoding): one line with file and line."""
    text = yaml.safe_dump(yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8")), allow_unicode=True, sort_keys=False)
    path = tmp_path / "roads.yaml"
    path.write_bytes(text.encode("cp949"))
    with pytest.raises(ConfigError) as err:
        load_road(path, "daewang_pangyo")
    msg = str(err.value)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "대왕판교" in x)
    assert msg.startswith(f"{path}: line {line}: not UTF-8 text") and "\n" not in msg, msg


def test_item6_directory_as_roads_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r": is a directory, not a roads file$"):
        load_road(tmp_path, "daewang_pangyo")


def test_item6_invalid_yaml_is_one_line_with_the_line_number(tmp_path):
    path = tmp_path / "roads.yaml"
    path.write_text("roads:\n  - id: a\n    name: [unclosed\n  - id: b\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_road(path, "a")
    msg = str(err.value)
    assert msg.startswith(f"{path}: line ") and "not valid YAML" in msg and "\n" not in msg


def test_item6_dag_settings_refuse_non_finite_numbers(tmp_path):
    """The DAG side (dags/answersheet_dagkit/roads.py) reads the same schema: the same finite check."""
    import sys

    sys.path.insert(0, str(ROADS_FILE.parent))
    from answersheet_dagkit.roads import load_roads

    raw = read_roads_file(ROADS_FILE)[0]
    for value, ok in ((float("nan"), False), (float("inf"), False), (2.5, True)):
        path = tmp_path / "roads.yaml"
        path.write_text(yaml.safe_dump({"roads": [{**raw, "schedule": {**raw["schedule"],
                                                                       "retry_delay_minutes": value}}]}))
        specs, errors = load_roads(path)
        if ok:
            assert errors == [] and specs[0]["schedule"]["retry_delay_minutes"] == 2.5
        else:
            assert errors == [f"road 'daewang_pangyo': key 'schedule.retry_delay_minutes': must be a finite number "
                              f"> 0, got {value!r}"]


# -- issue 8, output hygiene: each stage's digest covers only what changes its own output --------------------

def test_hygiene_stage_digests_are_scoped():
    base = validate_road(road())

    def changed(**over) -> set[str]:
        other = validate_road(road(**over))
        return {s for s in ("ingest", "detect", "preprocess", "datasheet") if other.digest(s) != base.digest(s)}

    det = road()["detect"]
    assert changed(detect={**det, "conf_thres": 0.3}) == {"detect", "datasheet"}  # + review priority
    assert changed(detect={**det, "batch_size": 4, "device": "cpu"}) == set()
    assert changed(detect={**det, "cameras": ["side1"]}) == {"ingest", "detect", "preprocess"}
    assert changed(ingest={"max_ratio": 50}) == {"ingest"}
    assert changed(ingest={"workers": 4}) == set()
    assert changed(short_set_policy="flag") == {"preprocess"}
    assert changed(name="다른 이름") == {"datasheet"}
    assert changed(unlabelled_labels="empty") == {"preprocess", "datasheet"}
    assert changed(sheet={"drift_days": 3}) == {"datasheet"}
    assert changed(schedule={**road()["schedule"], "cron": "0 10 * * *"}) == set()
    assert changed(schedule={**road()["schedule"], "timezone": "UTC"}) == {"datasheet"}  # capture-time offsets
