"""Sliced inference for small, distant vehicles (SAHI's idea, ported to numpy so the CPU path stays torch-free).

A road camera's far lanes hold vehicles of 10-30 px; letterboxed to 640 the whole frame shrinks them
3x below what yolov5n finds. With `detect.slices` each image is also cut into overlapping tiles
(`slice_boxes`, SAHI's `get_slice_bboxes`), every tile is letterboxed to `slices.imgsz` and the tiles
of one image go through the model as one batch. Each view's boxes get the road's NMS, are shifted
back into the image, and the full frame's and the tiles' boxes are merged per class:
`greedy_nmm` (SAHI's `GreedyNMMPostprocess`: highest score first, every lower box whose IoS/IoU with it
reaches the threshold is merged into the union box, the score is the max) or class-aware `nms`.
A vehicle cut by a tile border is half a box in that tile and a whole box in the neighbouring tile or
the full frame: its IoS is ~1, so the merge leaves one whole box. tests/test_slicing.py checks the
port against sahi 0.12.8 on the same boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from answersheet.config import SliceSettings
from answersheet.detector.postprocess import MAX_WH, nms_boxes
from answersheet.detector.preprocess import Prepared, decode_bgr, letterbox_chw


def slice_boxes(height: int, width: int, size: tuple[int, int], overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) covering the image, row by row — sahi.slicing.get_slice_bboxes with
    slice_width, slice_height = size and both overlap ratios = overlap (the last tile of a row or column is
    shifted back inside the image, so every tile has the full size unless the image is smaller)."""
    tw, th = size
    x_overlap, y_overlap = int(overlap * tw), int(overlap * th)
    tiles: list[tuple[int, int, int, int]] = []
    y_min = y_max = 0
    while y_max < height:
        x_min = x_max = 0
        y_max = y_min + th
        while x_max < width:
            x_max = x_min + tw
            if y_max > height or x_max > width:
                x_max, y_max = min(width, x_max), min(height, y_max)
                x_min, y_min = max(0, x_max - tw), max(0, y_max - th)
            tiles.append((x_min, y_min, x_max, y_max))
            x_min = x_max - x_overlap
        y_min = y_max - y_overlap
    return tiles


@dataclass
class SlicedPrepared(Prepared):
    """An image's full-frame input (`chw`, batched with other images) plus its tiles (batched together)."""

    tiles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 0, 0), np.uint8))  # (k, 3, h, w) uint8
    tile_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1) in the image


def prepare_sliced(name: str, data: bytes, imgsz: int, stride: int, slices: SliceSettings) -> SlicedPrepared:
    """Decode once; letterbox the full frame at imgsz and every tile at slices.imgsz (same shape for all tiles)."""
    bgr = decode_bgr(data)
    h, w = bgr.shape[:2]
    boxes = slice_boxes(h, w, slices.size, slices.overlap)
    tiles = np.stack([letterbox_chw(bgr[y0:y1, x0:x1], slices.imgsz, stride) for x0, y0, x1, y1 in boxes])
    return SlicedPrepared(name=name, shape0=(h, w), chw=letterbox_chw(bgr, imgsz, stride), tiles=tiles,
                          tile_boxes=boxes)


def _overlap(box: np.ndarray, others: np.ndarray, metric: str) -> np.ndarray:
    """IoU or IoS (intersection over the smaller area) of one xyxy box with each of `others` (0 where undefined)."""
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    denom = a + b - inter if metric == "iou" else np.minimum(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def greedy_nmm(det: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """SAHI's greedy non-maximum merging per class (GreedyNMMPostprocess(class_agnostic=False)) on rows
    xyxy, conf, class, ...: in score order (ties by x1, y1, x2, y2), each remaining box absorbs every
    lower one whose overlap with it is >= threshold; absorbed boxes are then merged one by one into the
    keeper (union box, max score) when they still match the grown box. Returns rows sorted by score, high first."""
    out = []
    for c in np.unique(det[:, 5]):
        rows = det[det[:, 5] == c].astype(np.float64)
        order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0], -rows[:, 4]))
        done = np.zeros(len(rows), bool)
        for pos, i in enumerate(order):
            if done[i]:
                continue
            rest = order[pos + 1 :]
            rest = rest[~done[rest]]
            merged = rest[_overlap(rows[i, :4], rows[rest, :4], metric) >= threshold] if len(rest) else rest
            done[merged] = True
            keep = rows[i].copy()
            for m in merged:
                if _overlap(keep[:4], rows[m : m + 1, :4], metric)[0] >= threshold:
                    keep[:2] = np.minimum(keep[:2], rows[m, :2])
                    keep[2:4] = np.maximum(keep[2:4], rows[m, 2:4])
                    keep[4] = max(keep[4], rows[m, 4])
            out.append(keep)
    if not out:
        return np.zeros((0, det.shape[1]), np.float32)
    merged_rows = np.array(out, np.float32)
    return merged_rows[np.argsort(-merged_rows[:, 4], kind="stable")]


def merge_views(det: np.ndarray, slices: SliceSettings, max_det: int) -> np.ndarray:
    """One set of boxes from the full frame's and the tiles' (rows in image pixels), sorted by score."""
    if not len(det):
        return det
    if slices.merge == "greedy_nmm":
        return greedy_nmm(det, slices.match_metric, slices.match_threshold)[:max_det]
    det = det[np.argsort(-det[:, 4], kind="stable")]
    if slices.match_metric == "iou":
        keep = nms_boxes(det[:, :4] + det[:, 5:6] * np.float32(MAX_WH), det[:, 4], slices.match_threshold)
    else:  # NMS by intersection over the smaller box: greedy_nmm's matching without the union
        keep, done = [], np.zeros(len(det), bool)
        for i in range(len(det)):
            if done[i]:
                continue
            keep.append(i)
            rest = np.arange(i + 1, len(det))
            rest = rest[(~done[rest]) & (det[rest, 5] == det[i, 5])]
            done[rest[_overlap(det[i, :4], det[rest, :4], "ios") >= slices.match_threshold]] = True
    return det[np.asarray(keep, np.int64)][:max_det]
