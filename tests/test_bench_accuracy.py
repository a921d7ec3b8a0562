"""bench/accuracy.py's threshold sweep: what it computes from one conf 0.001 pass is what scoring a sheet cut at
those thresholds gives (pycocotools on both sides), and its pick is the grid's best under the floors.

Ground truth: real road-dev labels (../shared/datasets/road-dev, 8 images of two scenes). Detections: those
boxes jittered, some with the wrong class, some missed, plus unlabelled ones large and small (< 15 px), with
seeded random confidences — so matches, confusions, small and large false positives all occur.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
ROAD_DEV = SHARED / "datasets" / "road-dev"
pytestmark = pytest.mark.skipif(not (ROAD_DEV / "images").is_dir(), reason=f"needs road-dev ({ROAD_DEV})")

sys.path.insert(0, str(REPO / "bench"))
import accuracy  # noqa: E402

GRID = (0.1, 0.3, 0.5, 0.7)


@pytest.fixture(scope="module")
def case() -> tuple[dict, list[dict]]:
    names = accuracy.day_names(accuracy.dataset_images())
    gt = accuracy.coco_ground_truth(names)
    scene = accuracy.scenes(names)
    picked = {n for n in sorted(names) if scene[n] == "urban-road-merge"}
    picked = set(sorted(picked)[:4]) | set(sorted(n for n in names if scene[n] == "freeway-night")[:4])
    gt = accuracy.gt_subset(gt, picked)
    rng = random.Random(9)
    classes = list(accuracy.EVAL_IDS)
    by_id = {v: k for k, v in accuracy.EVAL_IDS.items()}
    records = []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        boxes = []
        for a in (a for a in gt["annotations"] if a["image_id"] == im["id"]):
            if rng.random() < 0.2:
                continue  # missed
            x, y, bw, bh = a["bbox"]
            cls = by_id[a["category_id"]] if rng.random() < 0.8 else rng.choice(classes)
            j = rng.uniform(-0.15, 0.15) * bw  # sometimes under IoU 0.5 with the jitter in both axes
            boxes.append((cls, rng.random(), x + j, y + rng.uniform(-0.15, 0.15) * bh, bw, bh))
        for _ in range(6):  # unlabelled: large, and small (under 15 px on the short side)
            side = rng.choice((8.0, 12.0, 40.0, 90.0))
            boxes.append((rng.choice(classes), rng.random(), rng.uniform(0, w - side), rng.uniform(0, h - side),
                          side, side * 0.8))
        records.append({"image": im["file_name"], "boxes": [
            {"class": c, "confidence": round(s, 5), "box": [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]}
            for c, s, x, y, bw, bh in boxes]})
    return gt, records


def cut(records: list[dict], t: dict[str, float]) -> list[dict]:
    return [{**r, "boxes": [b for b in r["boxes"] if b["confidence"] > t[b["class"]]]} for r in records]


def test_sweep_counts_equal_scoring_the_cut_sheet(case):
    gt, records = case
    rows = accuracy.match_table(records, gt)
    assert any(not m and small for *_, m, small in rows) and any(not m and not small for *_, m, small in rows)
    ap = accuracy.class_ap(records, gt, GRID)
    n_gt = len(gt["annotations"])
    for combo in [(0.1, 0.1, 0.1, 0.1), (0.3, 0.7, 0.1, 0.5), (0.5, 0.1, 0.7, 0.3), (0.7, 0.5, 0.3, 0.1)]:
        t = dict(zip(accuracy.VEHICLES, combo, strict=True))
        direct = accuracy.score(cut(records, t), gt)
        swept = accuracy.f1_at(rows, t, n_gt)
        assert swept["precision"] == pytest.approx(direct["precision_ignore_small"], abs=1e-4)
        assert swept["recall"] == pytest.approx(direct["recall"], abs=1e-4)
        assert swept["f1"] == pytest.approx(direct["f1_ignore_small"], abs=1e-4)
        assert accuracy.sheet_map(ap, t, GRID) == pytest.approx(direct["ap50"], abs=1e-9)


def test_best_thresholds_is_the_grid_optimum_under_both_floors(case):
    gt, records = case
    rows = accuracy.match_table(records, gt)
    ap = accuracy.class_ap(records, gt, GRID)
    n_gt = len(gt["annotations"])
    scored, checked = [], 0
    for combo in itertools.product(GRID, repeat=4):
        t = dict(zip(accuracy.VEHICLES, combo, strict=True))
        s = accuracy.f1_at(rows, t, n_gt)
        scored.append((s["f1"], s["precision"], accuracy.sheet_map(ap, t, GRID)))
    best_free = max(scored)
    assert accuracy.f1_at(rows, accuracy.best_thresholds(rows, n_gt, 0.0, ap, 0.0, GRID), n_gt)["f1"] == best_free[0]
    # floors just above the unconstrained best's precision, then its mAP: each rules it out
    for min_p, min_map in ((best_free[1] + 1e-6, 0.0), (0.0, best_free[2] + 1e-6)):
        feasible = [f for f, p, m in scored if p >= min_p and m >= min_map]
        if not feasible:
            continue
        picked = accuracy.best_thresholds(rows, n_gt, min_p, ap, min_map, GRID)
        got = accuracy.f1_at(rows, picked, n_gt)
        assert got["f1"] == max(feasible) < best_free[0]
        assert got["precision"] >= min_p and accuracy.sheet_map(ap, picked, GRID) >= min_map
        checked += 1
    assert checked
    with pytest.raises(SystemExit, match="no thresholds on the grid reach precision 0.990"):
        accuracy.best_thresholds(rows, n_gt, 0.99, ap, 0.99, GRID)
