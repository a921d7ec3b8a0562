"""Roads file validation and image naming: errors name the road and the key / the file."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from conftest import ROADS_FILE

from answersheet.config import load_road, read_roads_file, validate_road
from answersheet.errors import ConfigError
from answersheet.naming import BadImageName, parse_image_name

CAMS = ("front", "rear", "left", "right", "side1", "side2")


def road(**over):
    return {**read_roads_file(ROADS_FILE)[0], **over}


def test_shipped_roads_file_is_valid():
    r = load_road(ROADS_FILE, "daewang_pangyo")
    assert r.name == "대왕판교"
    assert r.detect.cameras == ("side1", "side2")
    assert r.cameras == CAMS and len(r.classes) == 80
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
    assert validate_road(road(schedule={"cron": "0 10 * * *"})).digest() == base.digest()
    assert validate_road(road(detect={**road()["detect"], "conf_thres": 0.3})).digest() != base.digest()


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
