"""Road classes, per-class thresholds and sliced inference (issue 9), checked without a model: the class map
(drop, rename, merge, identity, unknown names), per-class thresholds, and the SAHI port (tiles, greedy
non-maximum merging) against sahi 0.12.8 itself on the same boxes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROADS_FILE

from answersheet.config import SliceSettings, read_roads_file, validate_road
from answersheet.detector.postprocess import image_boxes, nms, resolve_classes, road_nms, to_original
from answersheet.detector.slicing import greedy_nmm, merge_views, slice_boxes
from answersheet.errors import AnswersheetError, ConfigError

pytestmark = pytest.mark.fast


def coco_names() -> dict[int, str]:
    import yaml

    return dict(enumerate(yaml.safe_load(ROADS_FILE.read_text())["defaults"]["classes"]))


def road(classes=None, **detect):
    raw = read_roads_file(ROADS_FILE)[0]
    base = {"class_conf_thres": None, "agnostic_nms": None, "slices": None}  # not the example road's own
    raw = {**raw, "detect": {**raw["detect"], **base, **detect}}
    if classes is not None:
        raw["classes"] = classes
    return validate_road(raw)


def cand(box, obj, scores: dict[int, float], nc: int = 80) -> np.ndarray:
    """One raw yolov5 row: cx, cy, w, h (letterbox pixels), objectness, nc class scores."""
    row = np.zeros(5 + nc, np.float32)
    row[:4], row[4] = box, obj
    for c, s in scores.items():
        row[5 + c] = s
    return row


NAMES = coco_names()
CAR, BUS, TRAIN, TRUCK, KITE, PERSON = 2, 5, 6, 7, 33, 0
ROAD6 = ["person", "bicycle", "car", "motorcycle", "bus", "truck"]


def classes_of(detect_kw: dict, classes=ROAD6):
    r = road(classes=classes, **detect_kw)
    return resolve_classes(r.id, r.classes, r.detect, NAMES, "yolov5n.pt")


# -- class map ----------------------------------------------------------------------------------

def test_class_map_identity_is_yolov5_nms_exactly():
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.uniform(0, 600, (300, 4)), rng.uniform(0, 1, (300, 81))], 1).astype(np.float32)
    rows[:, 2:4] = rng.uniform(5, 80, (300, 2))
    rc = classes_of({"class_map": "identity"}, classes=list(NAMES.values()))
    assert rc.plain and rc.lut is None
    assert np.array_equal(road_nms(rows, rc, 0.45, 1000), nms(rows, 0.25, 0.45, 1000))


def test_class_map_drops_off_road_classes():
    rc = classes_of({"class_map": {"train": "truck"}})
    rows = np.stack([
        cand((100, 100, 40, 40), 0.9, {KITE: 0.8}),  # a kite: dropped
        cand((300, 100, 40, 40), 0.9, {KITE: 0.6, CAR: 0.5}),  # the model's best guess is kite: dropped too
        cand((500, 100, 40, 40), 0.9, {PERSON: 0.9}),  # person is a road class of its own
        cand((700, 100, 40, 40), 0.9, {CAR: 0.5}),
    ])
    det = road_nms(rows, rc, 0.45, 1000)
    assert [rc.names[int(c)] for c in det[:, 5]] == ["person", "car"]
    assert det[1, 4] == pytest.approx(0.45)
    # The kite does not suppress the car under it either (it is gone before NMS).
    over = np.stack([cand((100, 100, 40, 40), 0.9, {KITE: 0.9}), cand((101, 100, 40, 40), 0.9, {CAR: 0.5})])
    assert [rc.names[int(c)] for c in road_nms(over, rc, 0.45, 1000)[:, 5]] == ["car"]


def test_class_map_merges_train_into_truck_before_nms():
    rc = classes_of({"class_map": {"train": "truck"}})
    lorry = [cand((200, 200, 100, 60), 0.9, {TRAIN: 0.7, TRUCK: 0.2}),
             cand((202, 201, 100, 60), 0.8, {TRUCK: 0.6})]  # the same lorry, two guesses
    det = road_nms(np.stack(lorry), rc, 0.45, 1000)
    assert len(det) == 1 and rc.names[int(det[0, 5])] == "truck" and det[0, 4] == pytest.approx(0.63)
    # Identity keeps both (class-aware NMS never compares a train with a truck).
    ident = nms(np.stack(lorry), 0.25, 0.45, 1000)
    assert sorted(NAMES[int(c)] for c in ident[:, 5]) == ["train", "truck"]


def test_class_map_renames_and_null_drops():
    rc = classes_of({"class_map": {"car": "vehicle", "truck": "vehicle", "bus": None}},
                    classes=["vehicle", "person"])
    rows = np.stack([cand((100, 100, 40, 40), 0.9, {CAR: 0.9}), cand((300, 100, 40, 40), 0.9, {TRUCK: 0.9}),
                     cand((500, 100, 40, 40), 0.9, {BUS: 0.9})])
    det = road_nms(rows, rc, 0.45, 1000)
    assert [rc.names[int(c)] for c in det[:, 5]] == ["vehicle", "vehicle"]


def test_class_map_unknown_names_are_one_line_config_errors():
    with pytest.raises(ConfigError) as err:
        road(classes=ROAD6, class_map={"train": "lorry"})
    msg = str(err.value)
    assert "road 'daewang_pangyo'" in msg and "'detect.class_map'" in msg and "'lorry'" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as err:
        classes_of({"class_map": {"trian": "truck"}})
    msg = str(err.value)
    assert "'detect.class_map'" in msg and "'trian' is not a class of the model yolov5n.pt" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="must be `identity` or a mapping"):
        road(class_map="coco")
    with pytest.raises(AnswersheetError, match="the model has 80 classes but road 'daewang_pangyo' lists 6"):
        classes_of({"class_map": "identity"})


# -- per-class thresholds -------------------------------------------------------------------------

def test_per_class_thresholds_raise_and_lower_the_bar_per_class():
    rc = classes_of({"class_map": {"train": "truck"}, "conf_thres": 0.25,
                     "class_conf_thres": {"bus": 0.5, "motorcycle": 0.1}})
    assert rc.min_conf == pytest.approx(0.1) and not rc.plain
    rows = np.stack([cand((100, 100, 40, 40), 0.9, {BUS: 0.4}),  # bus 0.36 < 0.5: dropped
                     cand((300, 100, 40, 40), 0.5, {3: 0.3}),  # motorcycle 0.15 > 0.1: kept
                     cand((500, 100, 40, 40), 0.9, {CAR: 0.25})])  # car 0.225 < 0.25: dropped
    det = road_nms(rows, rc, 0.45, 1000)
    assert [rc.names[int(c)] for c in det[:, 5]] == ["motorcycle"]
    with pytest.raises(ConfigError, match="'detect.class_conf_thres'.*'kite' is not one of the road's classes"):
        road(classes=ROAD6, class_map={"car": "car"}, class_conf_thres={"kite": 0.3})
    with pytest.raises(ConfigError, match="'detect.class_conf_thres.bus'"):
        road(classes=ROAD6, class_map={"car": "car"}, class_conf_thres={"bus": 1.5})


# -- slices: SAHI's tiles and merging ported, checked against sahi ---------------------------------

@pytest.mark.parametrize("h, w, size, overlap", [
    (1080, 1920, (640, 640), 0.2), (720, 1280, (640, 640), 0.2), (1080, 1920, (960, 960), 0.25),
    (720, 1280, (1280, 720), 0.0), (500, 400, (640, 640), 0.2), (1440, 2560, (800, 600), 0.1),
])
def test_slice_boxes_equal_sahi(h, w, size, overlap):
    from sahi.slicing import get_slice_bboxes

    ref = get_slice_bboxes(h, w, slice_height=size[1], slice_width=size[0], overlap_height_ratio=overlap,
                           overlap_width_ratio=overlap)
    assert slice_boxes(h, w, size, overlap) == [tuple(b) for b in ref]


def random_boxes(rng, n: int, classes: int = 3) -> np.ndarray:
    """Integer boxes in clusters (as the views of one image give them), scores, classes."""
    centres = rng.uniform(50, 950, (max(1, n // 4), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 8, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    boxes = np.round(np.concatenate([c - wh / 2, c + wh / 2], 1))
    return np.concatenate([boxes, rng.uniform(0.05, 1, (n, 1)).round(4), rng.integers(0, classes, (n, 1)),
                           np.zeros((n, 1))], 1).astype(np.float32)


def sahi_greedy_nmm(det: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    from sahi.postprocess.combine import GreedyNMMPostprocess
    from sahi.prediction import ObjectPrediction

    preds = [ObjectPrediction(bbox=[float(v) for v in r[:4]], category_id=int(r[5]), category_name=str(int(r[5])),
                              score=float(r[4])) for r in det]
    out = GreedyNMMPostprocess(match_threshold=threshold, match_metric=metric.upper(), class_agnostic=False)(preds)
    return np.array([[*p.bbox.to_xyxy(), p.score.value, p.category.id] for p in out], np.float64)


def as_set(rows: np.ndarray) -> list[tuple]:
    return sorted(tuple(round(float(v), 4) for v in r[:6]) for r in rows)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric, threshold", [("ios", 0.5), ("iou", 0.5), ("ios", 0.8)])
def test_greedy_nmm_equals_sahi_greedy_nmm_postprocess(seed, metric, threshold):
    det = random_boxes(np.random.default_rng(seed), 120)
    ours = greedy_nmm(det, metric, threshold)
    ref = sahi_greedy_nmm(det, metric, threshold)
    assert len(ours) < len(det), "the clusters must actually merge"
    assert as_set(ours) == as_set(ref)
    assert np.all(np.diff(ours[:, 4]) <= 0), "sorted by score, high first"


def test_box_cut_by_a_tile_border_is_merged_into_one_box():
    slices = SliceSettings(size=(640, 640), overlap=0.2, imgsz=640)
    # A car across the border x=640 of tile (0, 0, 640, 640): the full frame sees it whole (600..700), that tile
    # sees its left part (600..640), the next tile (512..1152) sees it whole again with a slightly other box.
    frame = (1080, 1920)  # letterboxed at its own size: gain 1
    full = to_original(np.array([[600, 300, 700, 350, 0.8, 2]], np.float32), frame, frame)
    left = to_original(np.array([[600, 301, 640, 349, 0.6, 2]], np.float32), (640, 640), (640, 640), (0, 0), 1)
    right = to_original(np.array([[89, 299, 189, 351, 0.7, 2]], np.float32), (640, 640), (640, 640), (512, 0), 1)
    merged = merge_views(np.concatenate([full, left, right]), slices, 1000)
    assert len(merged) == 1
    assert merged[0, :6].tolist() == [600, 299, 701, 351, pytest.approx(0.8), 2]
    assert int(merged[0, 6]) == 0, "the keeper (highest score) was the full frame's box"
    # Class-aware: a truck at the same place is not merged into the car.
    truck = to_original(np.array([[600, 300, 700, 350, 0.5, 5]], np.float32), frame, frame)
    assert len(merge_views(np.concatenate([full, left, truck]), slices, 1000)) == 2
    # nms instead of greedy_nmm keeps the best box as it is.
    nms_slices = SliceSettings(size=(640, 640), overlap=0.2, imgsz=640, merge="nms")
    kept = merge_views(np.concatenate([full, left, right]), nms_slices, 1000)
    assert kept[:, :5].tolist() == [[600, 300, 700, 350, pytest.approx(0.8)]]


def test_prediction_record_has_the_label_lines_numbers():
    det = np.array([[10, 20, 110, 70, 0.912345, 2, 0], [300, 40, 330, 60, 0.40001, 4, 1]], np.float32)
    out = image_boxes("a.jpg", det, (720, 1280), tuple(ROAD6))
    lines = out.text.splitlines()
    assert lines == ["4 0.246094 0.0694444 0.0234375 0.0277778", "2 0.046875 0.0625 0.078125 0.0694444"]
    assert out.record["image"] == "a.jpg" and (out.record["width"], out.record["height"]) == (1280, 720)
    boxes = out.record["boxes"]
    assert [(b["class_id"], b["class"], b["confidence"], b["source"]) for b in boxes] == [
        (4, "bus", 0.40001, "slice"), (2, "car", round(float(np.float32(0.912345)), 5), "full")]
    for line, b in zip(lines, boxes, strict=True):
        assert [float(v) for v in line.split()[1:]] == b["box"]


def test_slices_config_is_validated():
    r = road(slices={"size": [960, 540], "overlap": 0.25, "imgsz": 640, "merge": "nms", "match_metric": "iou"})
    assert r.detect.slices == SliceSettings(size=(960, 540), overlap=0.25, imgsz=640, merge="nms",
                                            match_metric="iou")
    assert road(slices=None).detect.slices is None
    for bad, key in (({"size": 10}, "detect.slices.size"), ({"overlap": 0.95}, "detect.slices.overlap"),
                     ({"imgsz": 650}, "detect.slices.imgsz"), ({"merge": "wbf"}, "detect.slices.merge"),
                     ({"tile": 640}, "detect.slices.tile")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            road(slices=bad)


def test_agnostic_nms_gives_one_box_per_vehicle_but_keeps_the_rider():
    rows = np.stack([cand((200, 200, 100, 60), 0.9, {CAR: 0.8}),  # a van: car ...
                     cand((203, 201, 100, 60), 0.9, {TRUCK: 0.6}),  # ... and truck
                     cand((400, 200, 30, 60), 0.9, {PERSON: 0.8}),  # a rider on ...
                     cand((400, 215, 30, 40), 0.9, {3: 0.7})])  # ... a motorcycle (IoU 0.67 with the rider)
    plain = classes_of({"class_map": {"train": "truck"}})
    assert len(road_nms(rows, plain, 0.45, 1000)) == 4
    grouped = classes_of({"class_map": {"train": "truck"}, "agnostic_nms": ["car", "bus", "truck", "motorcycle"]})
    det = road_nms(rows, grouped, 0.45, 1000)
    assert sorted(grouped.names[int(c)] for c in det[:, 5]) == ["car", "motorcycle", "person"]
    with pytest.raises(ConfigError, match="'detect.agnostic_nms'.*'lorry'"):
        road(classes=ROAD6, class_map={"car": "car"}, agnostic_nms=["car", "lorry"])


def test_class_mappings_digest_the_same_in_any_key_order(tmp_path):
    """Helm's YAML round trip sorts mapping keys: the same road must keep its stage digests (else every deploy
    would redo detect)."""
    import yaml
    from conftest import ROADS_FILE

    from answersheet.config import load_road

    doc = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    det = doc["roads"][0].setdefault("detect", {})
    det["class_conf_thres"] = {"truck": 0.3, "car": 0.3, "bus": 0.6, "motorcycle": 0.1}
    det["class_map"] = {"train": None, "airplane": None}
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=True), encoding="utf-8")
    ra, rb = load_road(a, doc["roads"][0]["id"]), load_road(b, doc["roads"][0]["id"])
    assert ra.digest() == rb.digest() and ra.digest("detect") == rb.digest("detect")
