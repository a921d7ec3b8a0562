"""Drift across days: each camera of today vs the same camera over the road's last N published days.

Per camera the answer sheet's manifest records `camera_stats` (images looked at, boxes/image, empty rate,
mean confidence, class mix). Today's figures are compared with the mean of the last N published days that
have them (their manifests, found by probing earlier dates: no listing of the road's prefix). Outliers —
a camera gone dead or covered (boxes collapse, everything empty), glare or night (confidence drops), a
moved camera (class mix changes) — are flagged in the manifest and at the top of the report. Flags never
fail the run.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from answersheet.layout import published_manifest
from answersheet.storage import Store

log = logging.getLogger(__name__)

LOOKBACK_FACTOR = 3  # probe up to N*3 calendar days back (weekends and holidays publish nothing)
MIN_HISTORY = 2  # fewer comparable days than this: no flags, a note instead
# Thresholds (absolute, so that one noisy day of a quiet camera does not page anyone):
BOXES_RATIO = 0.5  # boxes/image below half (or above double) the usual
BOXES_MIN_USUAL = 1.0  # ... only for cameras that usually see at least one box per image
EMPTY_RATE_JUMP = 0.4  # empty rate up by 40 points
CONF_DROP = 0.1  # mean confidence down by 0.1
CLASS_MIX_L1 = 0.6  # L1 distance between class shares (0 = same mix, 2 = disjoint)


def camera_stats(rows: Sequence[dict[str, Any]], preds: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per camera, over the images the detector looked at: looked, boxes_per_image, empty_rate, mean_conf,
    class_mix (share of boxes per class name)."""
    out: dict[str, dict[str, Any]] = {}
    for cam in sorted({r["camera"] for r in rows if r["status"] in ("detected", "empty")}):
        looked = [r for r in rows if r["camera"] == cam and r["status"] in ("detected", "empty")]
        boxes = [b for r in looked for b in (preds.get(r["name"]) or {}).get("boxes", [])]
        confs = [b["confidence"] for b in boxes if b.get("confidence") is not None]
        mix = Counter(b["class"] for b in boxes)
        out[cam] = {
            "looked": len(looked),
            "boxes_per_image": round(len(boxes) / len(looked), 3),
            "empty_rate": round(sum(r["status"] == "empty" for r in looked) / len(looked), 3),
            "mean_conf": round(sum(confs) / len(confs), 4) if confs else None,
            "class_mix": {c: round(n / len(boxes), 3) for c, n in sorted(mix.items())} if boxes else {},
        }
    return out


def history(store: Store, road: str, day: dt.date, n: int) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """[(date, camera_stats)] of the last n earlier published days that recorded camera stats, newest first."""
    found: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for back in range(1, n * LOOKBACK_FACTOR + 1):
        if len(found) >= n:
            break
        d = day - dt.timedelta(days=back)
        m = store.get_json(published_manifest(road, d))
        if m and isinstance(m.get("camera_stats"), dict):
            found.append((d.isoformat(), m["camera_stats"]))
    return found


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def flags_for(today: dict[str, dict[str, Any]], past: Sequence[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Outlier flags: {camera, metric, today, baseline, note} for each camera and figure out of line."""
    flags = []
    for cam, t in sorted(today.items()):
        hist = [p[cam] for p in past if cam in p]
        if len(hist) < MIN_HISTORY:
            continue

        def flag(metric: str, value: Any, base: Any, note: str, cam: str = cam) -> None:
            flags.append({"camera": cam, "metric": metric, "today": value, "baseline": base, "note": note})

        bpi = round(_mean([h["boxes_per_image"] for h in hist]), 3)
        if bpi >= BOXES_MIN_USUAL and t["boxes_per_image"] < bpi * BOXES_RATIO:
            flag("boxes_per_image", t["boxes_per_image"], bpi, "far fewer boxes: camera dead, covered or moved?")
        elif bpi >= BOXES_MIN_USUAL and t["boxes_per_image"] > bpi / BOXES_RATIO:
            flag("boxes_per_image", t["boxes_per_image"], bpi, "far more boxes: a jam, or false positives (glare)?")
        er = round(_mean([h["empty_rate"] for h in hist]), 3)
        if t["empty_rate"] - er >= EMPTY_RATE_JUMP:
            flag("empty_rate", t["empty_rate"], er, "many more empty images: lens covered, night, or dead camera?")
        confs = [h["mean_conf"] for h in hist if h.get("mean_conf") is not None]
        if confs and t.get("mean_conf") is not None and _mean(confs) - t["mean_conf"] >= CONF_DROP:
            flag("mean_conf", t["mean_conf"], round(_mean(confs), 4), "lower confidence: glare, rain or night?")
        mixes = [h.get("class_mix") or {} for h in hist if h.get("class_mix")]
        if mixes and t.get("class_mix"):
            names = set(t["class_mix"]).union(*mixes)
            usual = {c: _mean([m.get(c, 0.0) for m in mixes]) for c in names}
            l1 = round(sum(abs(t["class_mix"].get(c, 0.0) - usual[c]) for c in names), 3)
            if l1 >= CLASS_MIX_L1:
                flag("class_mix", l1, 0.0, "different class mix (L1 distance of class shares): camera moved?")
    return flags


def drift(store: Store, road: str, day: dt.date, n: int, today: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `drift` block: compared days, flags, and a note when history is too short."""
    if n <= 0:
        return {"days": [], "flags": [], "note": "drift check off (sheet.drift_days: 0)"}
    past = history(store, road, day, n)
    out: dict[str, Any] = {"days": [d for d, _ in past], "flags": flags_for(today, [s for _, s in past])}
    if len(past) < MIN_HISTORY:
        out["note"] = f"{len(past)} earlier published day(s) found; at least {MIN_HISTORY} needed to compare"
    for f in out["flags"]:
        log.warning("drift: camera %s: %s %s vs usual %s (%s)", f["camera"], f["metric"], f["today"],
                    f["baseline"], f["note"])
    return out
