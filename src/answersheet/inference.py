"""YOLOv5 inference shared by every backend: one preprocessing, one postprocessing, two engines.

Pre- and postprocessing are what `yolov5 detect` does per image, ported line by line from yolov5
7.0 to numpy + OpenCV so that the ONNX path needs no torch (importing this CUDA build of torch alone
costs ~0.9 GB RSS and seconds of start-up): decode with cv2.imdecode (BGR), `letterbox(auto=True,
stride=model stride)`, HWC->CHW, BGR->RGB, uint8 -> float32 / 255; then `non_max_suppression`
(conf = obj * cls, best class only, boxes offset by class * 7680, greedy IoU NMS as
torchvision.ops.nms, max_det), `scale_boxes(...).round()` and `xyxy2xywh / gain` written in
reverse confidence order with '%g' — so a label file is byte-for-byte what `yolov5 detect
--save-txt` writes. Every operation keeps yolov5's float32 arithmetic; tests/test_detect_inference.py
checks the ports against yolov5's own functions.

Images of one original size share one letterbox shape, so they can be stacked into one batch
without changing any image's input. Backends: `TorchBackend` (CUDA fp16 with pinned memory and
non-blocking copies; or CPU fp32) and `OnnxBackend` (ONNX Runtime; CUDA/TensorRT providers
when installed, else CPU). Both return raw (n, anchors, 5 + nc) predictions; only the candidates
above the confidence threshold leave the GPU.
"""

from __future__ import annotations

import logging
import math
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from answersheet.errors import AnswersheetError
from answersheet.jpeg import EOI, EOI_WINDOW, JPEG_MAGIC, sniff

log = logging.getLogger(__name__)

# Test hook for the CUDA-OOM fallback: a backend refuses batches larger than this with the same
# exception a real out-of-memory raises (the real handler then halves the batch and retries).
OOM_ABOVE_ENV = "ANSWERSHEET_DETECT_OOM_ABOVE"


class BadImage(ValueError):
    """The bytes are not a whole, decodable JPEG (the message says what is wrong)."""


class BatchTooLarge(RuntimeError):
    """The backend ran out of (GPU) memory for this batch; retry with a smaller one."""


@dataclass
class Prepared:
    """One image ready for the model: its letterboxed CHW RGB uint8 array and its original size."""

    name: str
    shape0: tuple[int, int]  # original (height, width)
    chw: np.ndarray  # uint8 (3, H, W), contiguous

    @property
    def shape1(self) -> tuple[int, int]:
        return self.chw.shape[1], self.chw.shape[2]


# Decoded pixels above this are refused before decoding: Pillow's decompression-bomb error threshold, the
# same limit ingest's JPEG check applies. A JPEG header may claim up to 65535x65535 px (12 GB as BGR) in a
# few MB of data, and detect decodes several images at once (one per reader thread).
MAX_PIXELS = 2 * 89_478_485
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame (not DHT, JPG, DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG's start-of-frame header, or None when no frame header is found."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:  # extraneous bytes before a marker: libjpeg skips them (with a warning), so do we
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_bgr(data: bytes) -> np.ndarray:
    """Decode a JPEG as `yolov5 detect` reads files (cv2.imread: BGR, EXIF orientation applied — imdecode
    applies it too); BadImage if not a whole JPEG or too large to decode safely."""
    import cv2

    if not data.startswith(JPEG_MAGIC):
        raise BadImage(f"not a JPEG ({sniff(data)})")
    # libjpeg fills a truncated image with grey and only warns, so check the end-of-image marker first.
    if data.rfind(EOI, max(0, len(data) - EOI_WINDOW)) < 2:
        raise BadImage("truncated JPEG: no end-of-image marker (FFD9)")
    size = jpeg_size(data)  # None: no frame header found; OpenCV then refuses it (or finds one we did not)
    if size and size[0] * size[1] > MAX_PIXELS:
        raise BadImage(f"JPEG of {size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.0f} MP) is above the decode "
                       f"limit of {MAX_PIXELS / 1e6:.0f} MP")
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise BadImage(f"corrupt JPEG: OpenCV could not decode it ({_first_line(exc)})") from None
    if bgr is None:
        raise BadImage("corrupt JPEG: OpenCV could not decode it")
    return bgr


def _first_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (OpenCV puts the useful part there), shortened."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


MAX_WH = 7680  # yolov5: class offset for batched NMS (maximum box width/height)
MAX_NMS = 30000  # yolov5: most boxes sorted into NMS


def letterbox(im: np.ndarray, new_shape: tuple[int, int], stride: int, color=(114, 114, 114)) -> np.ndarray:
    """yolov5.utils.augmentations.letterbox(auto=True, scaleup=True): resize, then pad to a stride multiple."""
    import cv2

    shape = im.shape[:2]  # current shape [height, width]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    if min(new_unpad) < 1:  # cv2.resize would fail an assertion; `yolov5 detect` dies on such an image
        raise BadImage(f"image of {shape[1]}x{shape[0]} px is too thin to letterbox: it scales to "
                       f"{new_unpad[0]}x{new_unpad[1]} px at imgsz {max(new_shape)}")
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]  # wh padding
    dw, dh = np.mod(dw, stride), np.mod(dh, stride)  # auto: minimum rectangle
    dw /= 2  # divide padding into 2 sides
    dh /= 2
    if shape[::-1] != new_unpad:  # resize
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)


def letterbox_chw(bgr: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    """The letterboxed image as the model's contiguous CHW RGB uint8 input (as LoadImages yields it)."""
    im = letterbox(bgr, (imgsz, imgsz), stride=stride)
    return np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])


def prepare(name: str, data: bytes, imgsz: int, stride: int) -> Prepared:
    """Decode and letterbox one image."""
    bgr = decode_bgr(data)
    return Prepared(name=name, shape0=(bgr.shape[0], bgr.shape[1]), chw=letterbox_chw(bgr, imgsz, stride))


def check_imgsz(imgsz: int, stride: int) -> int:
    """yolov5's check_img_size: the inference size rounded up to a multiple of the model stride."""
    size = math.ceil(imgsz / stride) * stride
    if size != imgsz:
        log.warning("imgsz %d is not a multiple of the model stride %d: using %d", imgsz, stride, size)
    return size


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


def label_text(det: np.ndarray, shape1: tuple[int, int], shape0: tuple[int, int]) -> tuple[str, list[int]]:
    """YOLO label lines for one image's detections exactly as `yolov5 detect --save-txt` writes them.

    Returns (text, class ids); text is '' when there are no detections.
    """
    if not len(det):
        return "", []
    det = np.array(det, np.float32)
    h0, w0 = shape0
    gn = np.array((w0, h0, w0, h0), np.float32)  # normalization gain whwh
    det[:, :4] = np.round(scale_boxes(shape1, det[:, :4], shape0))
    det = det[::-1]  # the CLI writes `reversed(det)`
    xywh = (xyxy2xywh(det[:, :4]) / gn).tolist()
    classes = det[:, 5].tolist()
    lines = [("%g " * 5).rstrip() % (c, *box) for c, box in zip(classes, xywh, strict=True)]
    return "".join(line + "\n" for line in lines), [int(c) for c in classes]


def _oom_above() -> int | None:
    value = os.environ.get(OOM_ABOVE_ENV)
    return int(value) if value else None


class TorchBackend:
    """PyTorch: fp16 on CUDA (pinned host memory, non-blocking copies, cudnn.benchmark), fp32 on CPU."""

    name = "torch"

    def __init__(self, model: Any, device: str, half: bool | None = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.half = self.cuda if half is None else half  # half=True on CPU: the CUDA path's precision, testable
        self.module = model.module.to(self.device)
        if self.half:
            self.module.half()
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.oom_above = _oom_above()
        self.providers = [str(self.device)]

    def infer(self, batch: np.ndarray) -> Any:
        """uint8 (n, 3, H, W) -> predictions (n, anchors, 5 + nc) on the model's device (fp16 on CUDA)."""
        torch = self.torch
        try:
            if self.oom_above is not None and len(batch) > self.oom_above:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory ({OOM_ABOVE_ENV}={self.oom_above}, batch of {len(batch)})")
            with torch.inference_mode():
                im = torch.from_numpy(batch)
                if self.cuda:
                    im = im.pin_memory().to(self.device, non_blocking=True)
                im = im.half() if self.half else im.float()
                im /= 255
                return self.module(im)[0]
        except torch.cuda.OutOfMemoryError as exc:
            if self.cuda:
                torch.cuda.empty_cache()
            raise BatchTooLarge(str(exc).splitlines()[0]) from None


def tensorrt_loadable() -> bool:
    """Whether TensorRT's runtime library loads. The onnxruntime-gpu wheel always *lists*
    TensorrtExecutionProvider, but without libnvinfer (not in the detector image) asking for it first made
    every GPU session log an error before falling back to CUDA."""
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


def onnx_providers(device: str, available: set[str], tensorrt: bool) -> list:
    """ONNX Runtime providers for a device, in preference order, only those that are installed and loadable."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    index = device.split(":")[1] if ":" in device else "0"
    wanted: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if tensorrt:
        wanted.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
    return [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]


class OnnxBackend:
    """ONNX Runtime on an exported YOLOv5 (dynamic batch, height and width): same inputs as the CLI.

    `sessions` > 1 opens that many sessions so as many `infer` calls run at once (one per CPU core,
    each single-threaded): every session's memory arena then only ever holds one run, so memory is
    fixed after the first batch instead of stepping up whenever concurrent runs happen to peak together.
    """

    name = "onnx"

    def __init__(self, path: str | os.PathLike, device: str, threads: int | None = None, sessions: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = set(ort.get_available_providers())
        providers = onnx_providers(device, available, tensorrt_loadable())
        if device.startswith("cuda") and len(providers) == 1:
            log.warning("onnxruntime has no CUDA/TensorRT provider here (%s): running ONNX on the CPU",
                        sorted(available))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads must not spin: the decode threads need those cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise AnswersheetError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.sessions: queue.SimpleQueue = queue.SimpleQueue()
        self.sessions.put(self.session)
        for _ in range(sessions - 1):
            self.sessions.put(ort.InferenceSession(str(self.path), opts, providers=providers))
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise AnswersheetError(f"{self.path}: expected one NCHW image input, got {[i.shape for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.stride = int(meta.get("stride", 32))
        self.names = _parse_names(meta.get("names"))
        out_shape = outputs[0].shape
        if self.names is None and isinstance(out_shape[-1], int):
            self.names = {i: str(i) for i in range(out_shape[-1] - 5)}
        if self.names is None:
            raise AnswersheetError(f"{self.path}: cannot tell the number of classes (no 'names' metadata)")
        self.oom_above = _oom_above()

    @property
    def nc(self) -> int:
        return len(self.names)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) -> float32 predictions (n, anchors, 5 + nc)."""
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise BatchTooLarge(f"out of memory ({OOM_ABOVE_ENV}={self.oom_above}, batch of {len(batch)})")
        im = batch.astype(np.float32)
        im /= 255
        session = self.sessions.get()
        try:
            out = session.run([self.output_name], {self.input_name: im})[0]
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "allocate" in text.lower() or "out of memory" in text.lower():
                raise BatchTooLarge(text.splitlines()[0]) from None
            raise
        finally:
            self.sessions.put(session)
        return out


def _parse_names(value: str | None) -> dict[int, str] | None:
    import ast

    if not value:
        return None
    try:
        names = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None
