"""From the model's candidate rows to a road's boxes: class map, per-class thresholds, label and prediction lines.

`class_map: identity` goes through `inference.nms` unchanged, so the labels stay byte-identical to
`yolov5 detect --save-txt`. A mapped road applies its class map *before* NMS: every candidate keeps the
model's best class (as the CLI), takes that class's road class, and candidates of dropped classes are
gone. Merged classes then share one class-aware NMS: a lorry the model calls `train` in one anchor and
`truck` in the next is one `truck` box, not the two that NMS over the model's classes keeps and a
mapping after NMS would label `truck` twice (measured on road-dev: BENCHMARKS.md "Accuracy").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from answersheet.config import DetectSettings
from answersheet.errors import AnswersheetError, ConfigError
from answersheet.inference import MAX_NMS, MAX_WH, best_class, nms, nms_boxes, scale_boxes, xyxy2xywh

SOURCES = ("full", "slice", "flip")  # column 6 of a box row: which view found it


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
