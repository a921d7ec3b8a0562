"""How far two sets of YOLO label files agree: the share of boxes matched (same class, IoU > 0.9).

Used by the detector benchmark (ours vs `yolov5 detect`) and the tests (backend vs backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

Box = tuple[int, float, float, float, float]  # cls, cx, cy, w, h (normalised)


def parse_label(text: str) -> list[Box]:
    """YOLO `cls cx cy w h` lines -> boxes."""
    boxes: list[Box] = []
    for line in text.splitlines():
        if line.strip():
            c, *xywh = line.split()
            boxes.append(cast(Box, (int(float(c)), *map(float, xywh))))
    return boxes


def iou(a: Box, b: Box) -> float:
    """IoU of two normalised cx,cy,w,h boxes."""
    ax1, ay1, ax2, ay2 = a[1] - a[3] / 2, a[2] - a[4] / 2, a[1] + a[3] / 2, a[2] + a[4] / 2
    bx1, by1, bx2, by2 = b[1] - b[3] / 2, b[2] - b[4] / 2, b[1] + b[3] / 2, b[2] + b[4] / 2
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[3] * a[4] + b[3] * b[4] - inter
    return inter / union if union > 0 else float(a == b)


@dataclass
class Agreement:
    """Boxes of `reference` matched in `other` (one-to-one, same class, IoU > threshold)."""

    reference_boxes: int
    other_boxes: int
    matched: int
    identical_files: int
    files: int

    @property
    def matched_share(self) -> float:
        """Matched boxes over the larger box count (1.0 when both are empty)."""
        total = max(self.reference_boxes, self.other_boxes)
        return self.matched / total if total else 1.0


def agreement(reference: dict[str, str], other: dict[str, str], min_iou: float = 0.9) -> Agreement:
    """Compare label texts keyed by image stem (a missing key = no boxes)."""
    ref_n = oth_n = matched = identical = 0
    stems = set(reference) | set(other)
    for stem in stems:
        a, b = reference.get(stem, ""), other.get(stem, "")
        identical += a == b
        ra, rb = parse_label(a), parse_label(b)
        ref_n, oth_n = ref_n + len(ra), oth_n + len(rb)
        used: set[int] = set()
        for box in ra:
            best, best_j = min_iou, None
            for j, cand in enumerate(rb):
                if j not in used and cand[0] == box[0]:
                    v = iou(box, cand)
                    if v > best:
                        best, best_j = v, j
            if best_j is not None:
                used.add(best_j)
                matched += 1
    return Agreement(ref_n, oth_n, matched, identical, len(stems))
