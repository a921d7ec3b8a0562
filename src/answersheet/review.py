"""What a reviewer needs per image: the detector's boxes with confidences, and a review priority.

The predictions file (README "The predictions file") is the one source of confidences: one JSON line per image
the detector looked at, `{"image", "width", "height", "boxes": [{"class_id", "class", "confidence", "box":
[cx, cy, w, h], "source"}]}`, the boxes exactly those of the label file in the same order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)

# Review priority weights (sum 1). Near-threshold boxes are the detector's coin flips; a low mean confidence
# says the whole image is hard (night, glare); tiny boxes are where YOLOv5n at 640 px misses and mislabels most;
# class disagreement between passes (full image vs slices vs flip) is a direct sign of confusion.
W_NEAR, W_LOWMEAN, W_TINY, W_DISAGREE = 0.4, 0.3, 0.2, 0.1
NEAR_MARGIN = 0.15  # a box within this of its threshold is "near the threshold"
TINY_PX = 16 * 16  # boxes under 16x16 px of the original image are "tiny"
EMPTY_PRIORITY = 0.25  # "looked and found nothing" is worth a glance: a missed car is a false negative


def load_predictions(rd: RoadDay) -> dict[str, dict[str, Any]]:
    """Every detect shard's predictions file merged by image name. A shard without one (detected by a version
    before predictions files) is one error line: re-run detect for the day."""
    n = rd.road.detect.shards
    out: dict[str, dict[str, Any]] = {}
    for key in (rd.layout.detect_predictions(i, n) for i in range(n)):
        try:
            text = rd.store.get(key).decode("utf-8")
        except AnswersheetError as exc:
            if "NoSuchKey" not in str(exc):
                raise
            raise AnswersheetError(f"{rd.store.uri(key)}: missing — this day was detected without predictions "
                                   "files; re-run detect (--force) for this day") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["image"]] = rec
            except (ValueError, KeyError, TypeError):
                raise AnswersheetError(f"{rd.store.uri(key)}: line {lineno}: not a predictions record") from None
    return out


def merged_predictions_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    """The answer sheet's predictions.jsonl: every record, sorted by image, one compact JSON line each."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
             for r in sorted(records, key=lambda r: r["image"])]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def confidence_stats(rec: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(mean, min) confidence of an image's boxes; None without boxes or without scores."""
    confs = [b["confidence"] for b in (rec or {}).get("boxes", []) if b.get("confidence") is not None]
    if not confs:
        return None, None
    return round(sum(confs) / len(confs), 4), round(min(confs), 4)


def review_priority(status: str, rec: dict[str, Any] | None, conf_thres: float,
                    class_thres: dict[str, float] | None = None) -> float | None:
    """0..1, higher = look at it first; None where there is nothing the detector said (not sent, rejected...).

    A weighted sum (weights above) of: the share of boxes within NEAR_MARGIN of their threshold, 1 - mean
    confidence, the share of tiny boxes, and the share of boxes whose class is not confirmed by another pass
    (only when the day ran several passes: slices or flip TTA). `empty` images get EMPTY_PRIORITY.
    """
    if status == "empty":
        return EMPTY_PRIORITY
    if status != "detected" or not rec or not rec.get("boxes"):
        return None
    boxes = rec["boxes"]
    confs = [b.get("confidence") for b in boxes]
    if any(c is None for c in confs):
        return None
    n = len(boxes)
    thres = [(class_thres or {}).get(b.get("class", ""), conf_thres) for b in boxes]
    near = sum(c < t + NEAR_MARGIN for c, t in zip(confs, thres, strict=True)) / n
    lowmean = 1 - sum(confs) / n
    area = rec.get("width", 0) * rec.get("height", 0)
    tiny = sum(b["box"][2] * b["box"][3] * area < TINY_PX for b in boxes) / n
    sources = {b.get("source", "full") for b in boxes}
    disagree = 0.0
    if len(sources) > 1:
        by_source: dict[str, set[str]] = {}
        for b in boxes:
            by_source.setdefault(b.get("source", "full"), set()).add(b.get("class", ""))
        disagree = sum(sum(b.get("class", "") in cl for s, cl in by_source.items() if s != b.get("source", "full"))
                       == 0 for b in boxes) / n
    return round(W_NEAR * near + W_LOWMEAN * lowmean + W_TINY * tiny + W_DISAGREE * disagree, 4)
