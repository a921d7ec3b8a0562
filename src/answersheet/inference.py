"""YOLOv5 inference shared by every backend: one preprocessing, one postprocessing, two engines.

Preprocessing is what `yolov5 detect` does per image (LoadImages): decode with cv2.imdecode (BGR),
yolov5's `letterbox(auto=True, stride=model stride)`, HWC->CHW, BGR->RGB, uint8 -> float / 255.
Postprocessing is yolov5's `non_max_suppression` (one image at a time, as the CLI calls it),
`scale_boxes(...).round()` and `xyxy2xywh / gain`, written in reverse confidence order with '%g'
— so a label file is byte-for-byte what `yolov5 detect --save-txt` writes for the same image.

Images of one original size share one letterbox shape, so they can be stacked into one batch
without changing any image's input. Backends: `TorchBackend` (CUDA fp16 with pinned memory and
non-blocking copies; or CPU fp32) and `OnnxBackend` (ONNX Runtime; CUDA/TensorRT providers
when installed, else CPU). Both return the raw (n, anchors, 5 + nc) float32 predictions.
"""

from __future__ import annotations

import logging
import os
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


def decode_bgr(data: bytes) -> np.ndarray:
    """Decode a JPEG as `yolov5 detect` reads files (cv2.imdecode, BGR); BadImage if not a whole JPEG."""
    import cv2

    if not data.startswith(JPEG_MAGIC):
        raise BadImage(f"not a JPEG ({sniff(data)})")
    # libjpeg fills a truncated image with grey and only warns, so check the end-of-image marker first.
    if data.rfind(EOI, max(0, len(data) - EOI_WINDOW)) < 2:
        raise BadImage("truncated JPEG: no end-of-image marker (FFD9)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadImage("corrupt JPEG: OpenCV could not decode it")
    return bgr


def letterbox_chw(bgr: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    """yolov5's letterbox (auto=True: minimal stride-multiple padding) as a contiguous CHW RGB array."""
    from yolov5.utils.augmentations import letterbox

    im = letterbox(bgr, (imgsz, imgsz), stride=stride, auto=True)[0]
    return np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])


def prepare(name: str, data: bytes, imgsz: int, stride: int) -> Prepared:
    """Decode and letterbox one image."""
    bgr = decode_bgr(data)
    return Prepared(name=name, shape0=(bgr.shape[0], bgr.shape[1]), chw=letterbox_chw(bgr, imgsz, stride))


def check_imgsz(imgsz: int, stride: int) -> int:
    """The inference size the CLI would use (a multiple of the model stride)."""
    from yolov5.utils.general import check_img_size

    return int(check_img_size(imgsz, s=stride))


def nms(pred: Any, conf_thres: float, iou_thres: float, max_det: int) -> list:
    """yolov5's non_max_suppression, one image at a time (the CLI's time limit and rules): [(n, 6) xyxy conf cls]."""
    from yolov5.utils.general import non_max_suppression

    return [non_max_suppression(pred[i : i + 1], conf_thres, iou_thres, max_det=max_det)[0]
            for i in range(pred.shape[0])]


def label_text(det: Any, shape1: tuple[int, int], shape0: tuple[int, int]) -> tuple[str, list[int]]:
    """YOLO label lines for one image's detections exactly as `yolov5 detect --save-txt` writes them.

    Returns (text, class ids); text is '' when there are no detections.
    """
    import torch
    from yolov5.utils.general import scale_boxes, xyxy2xywh

    if not len(det):
        return "", []
    det = det.detach().float().cpu().clone()
    h0, w0 = shape0
    gn = torch.tensor((h0, w0, 3))[[1, 0, 1, 0]]  # as the CLI: torch.tensor(im0.shape)[[1, 0, 1, 0]]
    det[:, :4] = scale_boxes(shape1, det[:, :4], (h0, w0, 3)).round()
    det = det.flip(0)  # the CLI writes `reversed(det)`
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

    def __init__(self, model: Any, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.half = self.cuda
        self.module = model.module.to(self.device)
        if self.half:
            self.module.half()
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.oom_above = _oom_above()
        self.providers = [str(self.device)]

    def infer(self, batch: np.ndarray) -> Any:
        """uint8 (n, 3, H, W) -> float32 predictions (n, anchors, 5 + nc) on the model's device."""
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
                return self.module(im)[0].float()
        except torch.cuda.OutOfMemoryError as exc:
            if self.cuda:
                torch.cuda.empty_cache()
            raise BatchTooLarge(str(exc).splitlines()[0]) from None


class OnnxBackend:
    """ONNX Runtime on an exported YOLOv5 (dynamic batch, height and width): same inputs as the CLI."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, device: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        wanted = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = device.split(":")[1] if ":" in device else "0"
            wanted = [("TensorrtExecutionProvider", {"device_id": index}),
                      ("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]
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
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise AnswersheetError(f"{self.path}: expected one NCHW image input, got {[i.shape for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
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

    def infer(self, batch: np.ndarray) -> Any:
        """uint8 (n, 3, H, W) -> float32 predictions (n, anchors, 5 + nc) as a CPU torch tensor."""
        import torch

        if self.oom_above is not None and len(batch) > self.oom_above:
            raise BatchTooLarge(f"out of memory ({OOM_ABOVE_ENV}={self.oom_above}, batch of {len(batch)})")
        im = batch.astype(np.float32)
        im /= 255
        try:
            out = self.session.run([self.output_name], {self.input_name: im})[0]
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "allocate" in text.lower() or "out of memory" in text.lower():
                raise BatchTooLarge(text.splitlines()[0]) from None
            raise
        return torch.from_numpy(out)


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
