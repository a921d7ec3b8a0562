"""The numpy/OpenCV ports of yolov5's pre- and postprocessing (answersheet.detector) against yolov5's own
functions: letterbox, check_img_size, non_max_suppression, scale_boxes and the CLI's label formatting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROAD_SAMPLES, SHARED
from jpegs import ODD_REFUSED, odd_jpegs
from yolov5.utils.augmentations import letterbox as yolo_letterbox
from yolov5.utils.general import check_img_size, non_max_suppression, scale_boxes, xyxy2xywh

from answersheet.detector import postprocess, preprocess
from answersheet.detector.checkpoint import load_checkpoint
from answersheet.detector.onnx_backend import onnx_providers
from answersheet.detector.torch_backend import TorchBackend
from answersheet.dev.sample_day import sample_photos


def cli_label_text(det: torch.Tensor, im_shape: tuple[int, int], im0_shape: tuple[int, int, int]) -> str:
    """The label lines exactly as yolov5 7.0's detect.py computes and writes them (--save-txt)."""
    out = ""
    gn = torch.tensor(im0_shape)[[1, 0, 1, 0]]
    if len(det):
        det[:, :4] = scale_boxes(im_shape, det[:, :4], im0_shape).round()
        for *xyxy, _conf, cls in reversed(det):
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
            line = (cls, *xywh)
            out += ("%g " * len(line)).rstrip() % line + "\n"
    return out


@pytest.fixture(scope="module")
def photos() -> list:
    found = sample_photos(ROAD_SAMPLES if ROAD_SAMPLES.is_dir() else None)
    bus = SHARED / "samples" / "bus.jpg"
    return found + ([bus] if bus.is_file() else [])


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return TorchBackend(load_checkpoint(tiny_weights[0]), "cpu")


@pytest.mark.fast
@pytest.mark.parametrize("imgsz,stride", [(640, 32), (320, 32), (1280, 64)])
def test_letterbox_equals_yolov5(photos, imgsz, stride):
    shapes = set()
    for photo in photos:
        bgr = preprocess.decode_bgr(photo.read_bytes())
        ours = preprocess.letterbox_chw(bgr, imgsz, stride)
        ref = yolo_letterbox(bgr, (imgsz, imgsz), stride=stride, auto=True)[0].transpose((2, 0, 1))[::-1]
        assert ours.flags.c_contiguous and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref)
        shapes.add(ours.shape)
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (17, 33), (2000, 300), (300, 2000), (640, 640), (641, 639)):
        bgr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ref = yolo_letterbox(bgr, (imgsz, imgsz), stride=stride, auto=True)[0].transpose((2, 0, 1))[::-1]
        np.testing.assert_array_equal(preprocess.letterbox_chw(bgr, imgsz, stride), ref)


@pytest.mark.fast
@pytest.mark.parametrize("imgsz", [32, 320, 333, 640, 650, 1280])
def test_check_imgsz_equals_yolov5(imgsz):
    for stride in (32, 64):
        assert preprocess.check_imgsz(imgsz, stride) == check_img_size(imgsz, s=stride)


def assert_post_equal(pred: torch.Tensor, shape1, shape0, conf=0.25, iou=0.45, max_det=1000):
    ref = non_max_suppression(pred.clone(), conf, iou, max_det=max_det)
    for i, cands in enumerate(postprocess.candidates(pred, conf)):
        det = postprocess.nms(cands, conf, iou, max_det)
        np.testing.assert_array_equal(det, ref[i].numpy())
        text, classes = postprocess.label_text(det, shape1, shape0)
        assert text == cli_label_text(ref[i].clone(), shape1, (*shape0, 3))
        assert classes == [int(c) for c in ref[i][:, 5].flip(0).tolist()]


def test_postprocessing_equals_yolov5_on_model_outputs(photos, tiny_model):
    checked = 0
    for photo in photos:
        p = preprocess.prepare(photo.name, photo.read_bytes(), 320, 32)
        pred = tiny_model.infer(p.chw[None])
        for conf, max_det in ((0.25, 300), (0.5, 5)):
            assert_post_equal(pred, p.shape1, p.shape0, conf=conf, max_det=max_det)
        checked += int((pred[0, :, 4] > 0.25).sum())
    assert checked > 1000, "the tiny model must give NMS real work"


@pytest.mark.fast
def test_postprocessing_equals_yolov5_on_random_crowded_predictions():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n, nc = int(rng.integers(1, 3000)), int(rng.choice([1, 3, 80]))
        xywh = np.concatenate([rng.uniform(0, 640, (n, 2)), rng.uniform(1, 200, (n, 2))], 1)
        if trial % 2:  # crowded: many boxes around a few centres
            xywh[:, :2] = rng.uniform(100, 110, (n, 2))
        scores = rng.uniform(0, 1, (n, 1 + nc))
        pred = torch.from_numpy(np.concatenate([xywh, scores], 1).astype(np.float32))[None]
        assert_post_equal(pred, (384, 640), (1080, 1920), max_det=int(rng.choice([3, 300, 1000])))


@pytest.mark.fast
def test_postprocessing_of_an_image_without_boxes():
    pred = torch.zeros((1, 100, 85))
    det = postprocess.nms(postprocess.candidates(pred, 0.25)[0], 0.25, 0.45, 1000)
    assert det.shape == (0, 6)
    assert postprocess.label_text(det, (384, 640), (1080, 1920)) == ("", [])


@pytest.mark.fast
def test_decode_reads_like_yolov5_and_rejects_broken_jpegs(photos):
    import cv2

    data = photos[0].read_bytes()
    np.testing.assert_array_equal(preprocess.decode_bgr(data), cv2.imread(str(photos[0])))
    with pytest.raises(preprocess.BadImage, match="truncated JPEG"):
        preprocess.decode_bgr(data[: len(data) // 2])
    with pytest.raises(preprocess.BadImage, match="not a JPEG \\(PNG data\\)"):
        preprocess.decode_bgr(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(preprocess.BadImage, match="corrupt JPEG"):
        preprocess.decode_bgr(data[:200] + b"\x00" * 200 + b"\xff\xd9")


def test_fp16_inference_as_on_cuda_agrees_with_fp32(photos):
    """The CUDA path runs the model in fp16; on CPU the same code path (half model, half input, candidates
    compared in float32) must find the same objects as fp32."""
    from conftest import REAL_WEIGHTS

    from answersheet.dev.label_agreement import agreement

    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"real YOLOv5 weights not found at {REAL_WEIGHTS} (set ANSWERSHEET_WEIGHTS)")
    fp32 = TorchBackend(load_checkpoint(REAL_WEIGHTS), "cpu")
    fp16 = TorchBackend(load_checkpoint(REAL_WEIGHTS), "cpu", half=True)
    texts: list[dict[str, str]] = [{}, {}]
    for photo in photos[::5]:  # fp16 convolutions are slow on CPU: a fifth of the photos
        p = preprocess.prepare(photo.name, photo.read_bytes(), 640, 32)
        for out, backend in zip(texts, (fp32, fp16), strict=True):
            pred = backend.infer(p.chw[None])
            assert pred.dtype == (torch.float16 if backend is fp16 else torch.float32)
            det = postprocess.nms(postprocess.candidates(pred, 0.25)[0], 0.25, 0.45, 1000)
            out[photo.stem] = postprocess.label_text(det, p.shape1, p.shape0)[0]
    agree = agreement(texts[0], texts[1])
    assert agree.reference_boxes > 20
    assert agree.matched_share >= 0.95, agree


# -- item 4: odd JPEGs --------------------------------------------------------------------------------

def test_item4_odd_jpegs_decode_like_yolov5_loadimages_or_fail_with_one_line(photos, tmp_path):
    """yolov5 detect reads files with LoadImages (cv2.imread: EXIF orientation applied, CMYK and grey to
    BGR); ours decodes the bytes with cv2.imdecode, which must give the same pixels and the same
    letterboxed input — and whatever yolov5 would crash on is a BadImage with a one-line reason."""
    from yolov5.utils.dataloaders import LoadImages

    for name, data in odd_jpegs(photos[0]).items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        if name in ODD_REFUSED:
            with pytest.raises(preprocess.BadImage) as caught:
                preprocess.prepare(name, data, 640, 32)
            reason = str(caught.value)
            assert ODD_REFUSED[name] in reason and "\n" not in reason, (name, reason)
            continue
        ours = preprocess.prepare(name, data, 640, 32)
        _, im, im0, _, _ = next(iter(LoadImages(str(path), img_size=640, stride=32, auto=True)))
        np.testing.assert_array_equal(preprocess.decode_bgr(data), im0, err_msg=name)
        np.testing.assert_array_equal(ours.chw, im, err_msg=name)
        assert ours.shape0 == im0.shape[:2]
    rotated = preprocess.decode_bgr(odd_jpegs(photos[0])["exif_rotated"])
    assert rotated.shape[:2] == (320, 180), "EXIF orientation 6 turns the 320x180 photo upright"


@pytest.mark.fast
def test_onnx_providers_ask_for_tensorrt_only_when_its_library_loads():
    """The GPU wheel lists TensorRT even where libnvinfer is absent (as in the detector image): asking for it
    first logged an error on every GPU session. CUDA then CPU otherwise; CPU devices never get GPU providers."""
    gpu_wheel = {"TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"}
    names = lambda ps: [p[0] if isinstance(p, tuple) else p for p in ps]  # noqa: E731
    assert names(onnx_providers("cuda:1", gpu_wheel, tensorrt=False)) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert names(onnx_providers("cuda", gpu_wheel, tensorrt=True)) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda:1", gpu_wheel, tensorrt=False)[0][1] == {"device_id": "1"}
    assert onnx_providers("cpu", gpu_wheel, tensorrt=True) == ["CPUExecutionProvider"]
    assert names(onnx_providers("cuda", {"CPUExecutionProvider"}, tensorrt=True)) == ["CPUExecutionProvider"]
