"""Postprocessing shared by every backend: from the model's raw predictions to a road's boxes and label lines.

yolov5 7.0's `non_max_suppression` (conf = obj * cls, best class only, boxes offset by class * 7680,
greedy IoU NMS as torchvision.ops.nms, max_det), `scale_boxes(...).round()` and `xyxy2xywh / gain`
written in reverse confidence order with '%g', ported to numpy in float32 — so a label file is
byte-for-byte what `yolov5 detect --save-txt` writes (tests/test_detect_inference.py checks the ports
against yolov5's own functions). Only the candidates above the confidence threshold leave the GPU.

`class_map: identity` goes through `nms` unchanged, so the labels stay byte-identical to
`yolov5 detect --save-txt`. A mapped road applies its class map *before* NMS: every candidate keeps the
model's best class (as the CLI), takes that class's road class, and candidates of dropped classes are
gone. Merged classes then share one class-aware NMS: a lorry the model calls `train` in one anchor and
`truck` in the next is one `truck` box, not the two that NMS over the model's classes keeps and a
mapping after NMS would label `truck` twice (measured on road-dev: BENCHMARKS.md "Accuracy").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from answersheet.config import DetectSettings
from answersheet.errors import AnswersheetError, ConfigError

MAX_WH = 7680  # yolov5: class offset for batched NMS (maximum box width/height)
MAX_NMS = 30000  # yolov5: most boxes sorted into NMS
SOURCES = ("full", "slice", "flip")  # column 6 of a box row: which view found it


# -- yolov5's non_max_suppression and scale_boxes, ported ----------------------------------------------

def candidates(pred: Any, conf_thres: float) -> list[np.ndarray]:
    """Per image, the float32 prediction rows with objectness > conf_thres (filtered on the model's device)."""
    out = []
    for p in pred:
        if hasattr(p, "cpu"):  # a torch tensor (fp16 on CUDA): compare in float32, as yolov5 on CPU does
            p = p.float()
            out.append(p[p[:, 4] > conf_thres].cpu().numpy())
        else:
            p = np.asarray(p, np.float32)
            out.append(p[p[:, 4] > conf_thres])
    return out


def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    y = np.copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2  # top left x
    y[..., 1] = x[..., 1] - x[..., 3] / 2  # top left y
    y[..., 2] = x[..., 0] + x[..., 2] / 2  # bottom right x
    y[..., 3] = x[..., 1] + x[..., 3] / 2  # bottom right y
    return y


def xyxy2xywh(x: np.ndarray) -> np.ndarray:
    y = np.copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2  # x center
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2  # y center
    y[..., 2] = x[..., 2] - x[..., 0]  # width
    y[..., 3] = x[..., 3] - x[..., 1]  # height
    return y


def nms_boxes(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """torchvision.ops.nms (CPU kernel): stable descending score order, greedy, suppress IoU > iou_thres."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if not len(rest):
            continue
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for empty boxes: NaN, kept (as torchvision)
            ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr.astype(np.float64) > iou_thres]] = True
    return np.asarray(keep, np.int64)


def best_class(cands: np.ndarray, min_conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The head of yolov5's non_max_suppression, shared by `nms` and the road-class NMS: candidates with
    objectness > min_conf as (xyxy boxes, conf = obj_conf * best cls_conf, best class index); None if none."""
    x = cands[cands[:, 4] > min_conf]  # confidence (candidates() usually did this on the device)
    if not x.shape[0]:
        return None
    x = x.copy()
    x[:, 5:] *= x[:, 4:5]  # conf = obj_conf * cls_conf
    j = x[:, 5:].argmax(1)
    return xywh2xyxy(x[:, :4]), x[np.arange(len(x)), 5 + j], j


def nms(cands: np.ndarray, conf_thres: float, iou_thres: float, max_det: int) -> np.ndarray:
    """yolov5's non_max_suppression for one image (defaults of `yolov5 detect`): (n, 6) xyxy, conf, cls."""
    scored = best_class(cands, conf_thres)
    if scored is None:
        return np.zeros((0, 6), np.float32)
    box, conf, j = scored
    x = np.concatenate((box, conf[:, None], j[:, None].astype(np.float32)), 1)[conf > conf_thres]
    if not x.shape[0]:
        return np.zeros((0, 6), np.float32)
    x = x[np.argsort(-x[:, 4], kind="stable")[:MAX_NMS]]  # sort by confidence, remove excess boxes
    c = x[:, 5:6] * np.float32(MAX_WH)  # classes
    i = nms_boxes(x[:, :4] + c, x[:, 4], iou_thres)[:max_det]
    return x[i]


def scale_boxes(img1_shape: tuple[int, int], boxes: np.ndarray, img0_shape: tuple[int, int]) -> np.ndarray:
    """yolov5's scale_boxes + clip_boxes: xyxy from the letterboxed shape back to the original image."""
    gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])  # gain  = old / new
    pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2  # wh padding
    boxes[..., [0, 2]] -= np.float32(pad[0])
    boxes[..., [1, 3]] -= np.float32(pad[1])
    boxes[..., :4] /= np.float32(gain)
    boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, img0_shape[1])
    boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, img0_shape[0])
    return boxes


# -- the road's classes and thresholds ------------------------------------------------------------------

@dataclass(frozen=True)
class RoadClasses:
    """How model classes become a road's classes, and the confidence each road class needs."""

    names: tuple[str, ...]  # road class id i = names[i]
    lut: np.ndarray | None  # model class id -> road class id, -1 = dropped; None = identity
    thresholds: np.ndarray  # float32 per road class: keep a box when its confidence is above this
    conf_thres: float  # the road's operating threshold (detect.conf_thres)
    nms_group: np.ndarray | None = None  # per road class, the class whose NMS it shares (detect.agnostic_nms)

    @property
    def min_conf(self) -> float:
        """The lowest threshold: candidates at or below it cannot become a box of any class."""
        return float(self.thresholds.min()) if len(self.thresholds) else self.conf_thres

    @property
    def plain(self) -> bool:
        """Exactly `yolov5 detect`: identity classes and one threshold."""
        same = bool(np.all(self.thresholds == np.float32(self.conf_thres)))
        return self.lut is None and self.nms_group is None and same


def resolve_classes(road_id: str, classes: tuple[str, ...], settings: DetectSettings, model_names: dict[int, str],
                    model_file: str) -> RoadClasses:
    """The road's class mapping against the loaded model; one-line errors naming the road and key or the file.

    Identity: the road lists as many classes as the model (ids unchanged). A mapping: each model class
    whose name is a road class maps to it unless `class_map` says otherwise; a model class listed with
    `null`, or neither listed nor a road class, is dropped.
    """
    names = [model_names[i] for i in sorted(model_names)]
    if settings.class_map is None:
        if len(names) != len(classes):
            raise AnswersheetError(
                f"{model_file}: the model has {len(names)} classes but road {road_id!r} lists {len(classes)} "
                "(key 'classes'); use weights trained for the road's classes, or a detect.class_map")
        lut = None
    else:
        explicit = dict(settings.class_map)
        unknown = [n for n in explicit if n not in names]
        if unknown:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"road {road_id!r}: key 'detect.class_map': {unknown[0]!r} is not a class of the model "
                              f"{model_file} ({len(names)} classes: {shown})")
        target = {n: explicit.get(n, n if n in classes else None) for n in names}
        lut = np.array([classes.index(target[n]) if target[n] is not None else -1 for n in names], np.int64)
    per_class = dict(settings.class_conf_thres)
    thresholds = np.array([per_class.get(c, settings.conf_thres) for c in classes], np.float32)
    group = None
    if settings.agnostic_nms:
        first = classes.index(settings.agnostic_nms[0])
        group = np.array([first if c in settings.agnostic_nms else i for i, c in enumerate(classes)], np.float32)
    return RoadClasses(names=tuple(classes), lut=lut, thresholds=thresholds, conf_thres=settings.conf_thres,
                       nms_group=group)


def road_nms(cands: np.ndarray, rc: RoadClasses, iou_thres: float, max_det: int) -> np.ndarray:
    """yolov5's non_max_suppression with the road's classes and thresholds: (n, 6) xyxy, conf, road class id.

    A candidate keeps the model's best class (as the CLI) and then takes that class's road class; one whose
    best class is dropped is gone before NMS. Letting it take its best *road* class instead (max over the
    kept classes) was measured worse on road-dev: mAP@0.5 0.357 vs 0.380 at imgsz 1280 — the boxes the
    model calls `umbrella` or `kite` become low-confidence cars and people that match nothing.
    """
    if rc.plain:
        return nms(cands, rc.conf_thres, iou_thres, max_det)
    scored = best_class(cands, rc.min_conf)
    if scored is None:
        return np.zeros((0, 6), np.float32)
    box, conf, j = scored
    road = j if rc.lut is None else rc.lut[j]
    keep = road >= 0
    keep[keep] = conf[keep] > rc.thresholds[road[keep]]
    x = np.concatenate((box, conf[:, None], road[:, None].astype(np.float32)), 1)[keep]
    if not x.shape[0]:
        return np.zeros((0, 6), np.float32)
    x = x[np.argsort(-x[:, 4], kind="stable")[:MAX_NMS]]
    c = x[:, 5:6] if rc.nms_group is None else rc.nms_group[x[:, 5].astype(np.int64)][:, None]
    i = nms_boxes(x[:, :4] + c * np.float32(MAX_WH), x[:, 4], iou_thres)[:max_det]
    return x[i]


def to_original(det: np.ndarray, shape1: tuple[int, int], shape0: tuple[int, int],
                offset: tuple[int, int] = (0, 0), source: int = 0) -> np.ndarray:
    """(n, 7) float32 rows xyxy (whole pixels of the original image), conf, class, source — as the CLI scales
    and rounds; a tile's boxes are scaled to the tile (shape0) and shifted by its top-left `offset`."""
    out = np.zeros((len(det), 7), np.float32)
    if not len(det):
        return out
    out[:, :6] = np.array(det, np.float32)
    out[:, :4] = np.round(scale_boxes(shape1, out[:, :4], shape0))
    if offset != (0, 0):
        out[:, [0, 2]] += np.float32(offset[0])
        out[:, [1, 3]] += np.float32(offset[1])
    out[:, 6] = source
    return out


@dataclass(frozen=True)
class ImageBoxes:
    """One image's final boxes as the label file and the predictions line say them."""

    text: str  # the YOLO label file ('' = no boxes)
    classes: list[int]
    record: dict  # the predictions line (COMMON contract)


def image_boxes(name: str, det: np.ndarray, shape0: tuple[int, int], names: tuple[str, ...]) -> ImageBoxes:
    """Label text written as `yolov5 detect --save-txt` does (ascending confidence, '%g'), and the same boxes
    with their confidence, class name and source for predictions.jsonl; `det` is sorted by confidence, high first."""
    h0, w0 = shape0
    record: dict = {"image": name, "width": int(w0), "height": int(h0), "boxes": []}
    if not len(det):
        return ImageBoxes("", [], record)
    det = det[::-1]  # the CLI writes `reversed(det)`
    gn = np.array((w0, h0, w0, h0), np.float32)
    xywh = (xyxy2xywh(np.array(det[:, :4], np.float32)) / gn).tolist()
    classes = [int(c) for c in det[:, 5].tolist()]
    lines, boxes = [], []
    for c, box, conf, src in zip(classes, xywh, det[:, 4].tolist(), det[:, 6].tolist(), strict=True):
        fields = [f"{v:g}" for v in box]  # '%g', as the CLI writes them
        lines.append(" ".join([f"{c:g}", *fields]) + "\n")
        boxes.append({"class_id": c, "class": names[c], "confidence": round(float(conf), 5),
                      "box": [float(f) for f in fields], "source": SOURCES[int(src)]})
    record["boxes"] = boxes
    return ImageBoxes("".join(lines), classes, record)


def predictions_jsonl(records: list[dict]) -> bytes:
    """One JSON object per line, sorted by image name (the predictions file of the COMMON contract)."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                   for r in sorted(records, key=lambda r: r["image"])).encode()


def label_text(det: np.ndarray, shape1: tuple[int, int], shape0: tuple[int, int]) -> tuple[str, list[int]]:
    """YOLO label lines for one image's `nms` rows (letterboxed pixels) exactly as `yolov5 detect --save-txt`
    writes them, through the stage's own path (to_original, image_boxes). Returns (text, class ids); text is
    '' when there are no detections."""
    names = tuple(str(i) for i in range(int(np.max(det[:, 5])) + 1)) if len(det) else ()
    boxes = image_boxes("", to_original(det, shape1, shape0), shape0, names)
    return boxes.text, boxes.classes


def detections(rows: np.ndarray, shape1: tuple[int, int], shape0: tuple[int, int], rc: RoadClasses,
               settings: DetectSettings, tile_boxes: Sequence[tuple[int, int, int, int]] = (),
               tile_shape1: tuple[int, int] | None = None, tile_cands: Sequence[np.ndarray] = ()) -> np.ndarray:
    """One image's boxes in its pixels (xyxy, conf, road class, source), sorted by confidence: the full
    frame's candidates through the road's NMS, merged with its tiles' when the road slices (detector.slicing)."""
    s = settings
    det = to_original(road_nms(rows, rc, s.iou_thres, s.max_det), shape1, shape0)
    if not len(tile_boxes):
        return det
    from answersheet.detector.slicing import merge_views

    assert tile_shape1 is not None  # tiles come with their letterboxed shape
    views = [det] + [
        to_original(road_nms(t, rc, s.iou_thres, s.max_det), tile_shape1, (y1 - y0, x1 - x0), (x0, y0), 1)
        for (x0, y0, x1, y1), t in zip(tile_boxes, tile_cands, strict=True)]
    return merge_views(np.concatenate(views), s.slices, s.max_det)
