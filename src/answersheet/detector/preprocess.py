"""Preprocessing shared by every backend: what `yolov5 detect` does to an image before the model.

Ported line by line from yolov5 7.0 to numpy + OpenCV so that the ONNX path needs no torch
(importing this CUDA build of torch alone costs ~0.9 GB RSS and seconds of start-up): decode with
cv2.imdecode (BGR, EXIF orientation applied as cv2.imread does), `letterbox(auto=True, stride=model
stride)`, HWC->CHW, BGR->RGB; the backend then divides uint8 by 255 in its own precision.
tests/test_detect_inference.py checks the ports against yolov5's own functions.

Images of one original size share one letterbox shape, so they can be stacked into one batch
without changing any image's input.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from answersheet.jpeg import EOI, EOI_WINDOW, JPEG_MAGIC, sniff

log = logging.getLogger(__name__)


class BadImage(ValueError):
    """The bytes are not a whole, decodable JPEG (the message says what is wrong)."""


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

