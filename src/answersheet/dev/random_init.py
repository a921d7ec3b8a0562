"""A randomly initialised YOLOv5 in the official checkpoint format, for tests, benchmarks and the offline demo."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from answersheet.detector.checkpoint import yolo_modules
from answersheet.detector.weights import file_sha256
from answersheet.errors import AnswersheetError


def save_random_checkpoint(
    path: str | os.PathLike, cfg: str = "yolov5n.yaml", nc: int = 80, width_multiple: float | None = None,
    depth_multiple: float | None = None, seed: int = 0, obj_bias: float = -2.0,
) -> str:
    """Write a randomly initialised YOLOv5 in the official checkpoint format (fp16 model); returns its sha256.

    `cfg` is one of yolov5's model yamls; width/depth multiples shrink it further for fast tests.
    Its BatchNorm statistics are calibrated on yolov5's sample photos so activations neither vanish
    nor explode, and its head gives unit-spread logits: boxes depend on image content (though they
    mean nothing) — with the default `obj_bias`, tens of boxes per road photo at conf 0.25, imgsz 320.
    """
    import torch
    import yaml

    mods = yolo_modules()
    cfg_path = Path(mods["models.yolo"].__file__).parent / cfg
    if not cfg_path.is_file():
        raise AnswersheetError(f"{cfg}: no such yolov5 model config in {cfg_path.parent}")
    spec = yaml.safe_load(cfg_path.read_text())
    spec["nc"] = nc
    if width_multiple is not None:
        spec["width_multiple"] = width_multiple
    if depth_multiple is not None:
        spec["depth_multiple"] = depth_multiple
    torch.manual_seed(seed)
    with _quiet_yolov5():
        model = mods["models.yolo"].DetectionModel(spec, ch=3, nc=nc)
    _calibrate(model, obj_bias)
    model.names = [f"class{i}" for i in range(nc)] if nc != 80 else _coco_names()
    ckpt = {
        "epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": None,
        "optimizer": None, "wandb_id": None, "date": dt.datetime(2026, 1, 1).isoformat(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return file_sha256(path)


def _calibrate(model, obj_bias: float) -> None:
    """BatchNorm running stats from yolov5's sample photos; head weights scaled to unit-spread logits."""
    import torch

    from answersheet.detector.preprocess import prepare

    photos = sorted((Path(yolo_modules()["models.yolo"].__file__).parents[1] / "data" / "images").glob("*.jpg"))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration images
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for photo in photos:
            im = prepare(photo.name, photo.read_bytes(), 320, 32).chw
            model(torch.from_numpy(im[None]).float() / 255)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.03
    # Head: logits with unit spread on the calibration images (no saturated sigmoids, so no float ties).
    detect, inputs = model.model[-1], []
    hook = detect.register_forward_pre_hook(lambda _m, args: inputs.append([x.detach() for x in args[0]]))
    model.eval()
    with torch.no_grad():
        for conv in detect.m:
            torch.nn.init.normal_(conv.weight)
            conv.bias.zero_()
        for photo in photos:
            model(torch.from_numpy(prepare(photo.name, photo.read_bytes(), 320, 32).chw[None]).float() / 255)
        hook.remove()
        for i, conv in enumerate(detect.m):
            out = torch.cat([conv(x[i]).transpose(0, 1).flatten(1) for x in inputs], 1)  # (channels, positions)
            conv.weight /= out.std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
            bias = conv.bias.view(detect.na, -1)
            bias[:, 4] = obj_bias
            bias[:, 5:] = -1.0
    model.eval()


def _coco_names() -> list[str]:
    import yaml

    coco = Path(yolo_modules()["models.yolo"].__file__).parents[1] / "data" / "coco128.yaml"
    names = yaml.safe_load(coco.read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


class _quiet_yolov5:
    """Silence yolov5's per-layer INFO table while building a model."""

    def __enter__(self):
        self.logger = logging.getLogger("yolov5")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
