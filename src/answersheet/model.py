"""YOLOv5 checkpoints: fetch (local path or s3:// URI), verify sha256, load without running pickled code.

Official YOLOv5 `.pt` files pickle the whole model (`models.yolo.Model`, `models.common.Conv`, ...).
They are loaded with `torch.load(weights_only=True)` and an allow-list of exactly the yolov5 and
torch.nn classes such a checkpoint holds — never `weights_only=False`. `save_random_checkpoint`
writes a random-init model in the same format (for tests, benchmarks and the offline demo).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# (module inside the yolov5 package, class name, extra pickled names) of every class an official checkpoint holds.
_YOLO_CLASSES = (
    ("models.yolo", "DetectionModel", ("models.yolo.Model", "models.yolo.DetectionModel")),
    ("models.yolo", "Detect", ("models.yolo.Detect",)),
    ("models.common", "Conv", ("models.common.Conv",)),
    ("models.common", "C3", ("models.common.C3",)),
    ("models.common", "Bottleneck", ("models.common.Bottleneck",)),
    ("models.common", "SPPF", ("models.common.SPPF",)),
    ("models.common", "Concat", ("models.common.Concat",)),
)
_NN_CLASSES = ("Conv2d", "BatchNorm2d", "SiLU", "MaxPool2d", "Upsample", "Sequential", "ModuleList")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_verified(uri: str, sha256: str, scratch: str | os.PathLike, what: str = "detect.sha256") -> Path:
    """A local, sha256-verified copy of a model file given as a local path or an s3:// URI.

    s3:// objects are downloaded through Store (any bucket) into `scratch`; local files are used in place.
    A missing file or a digest other than `sha256` raises AnswersheetError naming the file and both digests.
    """
    if uri.startswith("s3://"):
        from answersheet.storage import Store, split_s3_uri

        bucket, key = split_s3_uri(uri)
        path = Path(scratch) / (key.rsplit("/", 1)[-1] or "model")
        with open(path, "wb") as f:
            Store(bucket).download(key, f)
    else:
        path = Path(uri).expanduser().resolve()
        if not path.is_file():
            raise AnswersheetError(f"{uri}: model file not found")
    actual = file_sha256(path)
    if actual != sha256:
        raise AnswersheetError(
            f"{uri}: sha256 mismatch: the file has {actual} but {what} is {sha256} "
            "(wrong or corrupted model file, or a stale digest in the roads file)"
        )
    return path


def _yolo_modules() -> dict[str, Any]:
    import yolov5.models.common as common  # noqa: F401 - also puts yolov5's dir on sys.path (`models.*`)
    import yolov5.models.yolo as yolo

    return {"models.yolo": yolo, "models.common": common}


def safe_globals() -> list:
    """The allow-list for torch.load(weights_only=True): only the classes a YOLOv5 detection checkpoint holds."""
    import torch.nn as nn

    mods = _yolo_modules()
    allowed: list = []
    for mod, name, pickled_names in _YOLO_CLASSES:
        cls = getattr(mods[mod], name)
        allowed.append(cls)  # as pickled by this yolov5 package (yolov5.models.*)
        allowed.extend((cls, n) for n in pickled_names)  # as pickled by the official release files
    allowed.extend(getattr(nn, n) for n in _NN_CLASSES)
    return allowed


@dataclass
class LoadedModel:
    """A YOLOv5 detection model in eval mode (fp32, CPU) and what the pipeline needs to know about it."""

    module: Any  # yolov5.models.yolo.DetectionModel
    stride: int
    names: dict[int, str]

    @property
    def nc(self) -> int:
        return len(self.names)


def load_checkpoint(path: str | os.PathLike, fuse: bool = True) -> LoadedModel:
    """Load a YOLOv5 `.pt` with weights_only=True and yolov5's compatibility updates (as attempt_load does)."""
    import torch
    import torch.nn as nn

    path = Path(path)
    mods = _yolo_modules()
    detection_model, detect_cls = mods["models.yolo"].DetectionModel, mods["models.yolo"].Detect
    try:
        with torch.serialization.safe_globals(safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickle_reason(exc)
        raise AnswersheetError(f"{path}: not a loadable YOLOv5 detection checkpoint ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnswersheetError(f"{path}: corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {first})") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, detection_model):
        raise AnswersheetError(
            f"{path}: not a YOLOv5 detection checkpoint (expected a dict with a 'model' DetectionModel, "
            f"got {type(model if isinstance(ckpt, dict) else ckpt).__name__})"
        )
    model = model.float()
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    names = model.names if hasattr(model, "names") else [str(i) for i in range(model.nc)]
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    model.names = names
    if fuse:
        model = _fuse(model)
    model.eval()
    for m in model.modules():  # yolov5's module compatibility updates (models/experimental.py attempt_load)
        t = type(m)
        if t in (nn.SiLU, detect_cls, detection_model):
            m.inplace = True
            if t is detect_cls and not isinstance(m.anchor_grid, list):
                delattr(m, "anchor_grid")
                m.anchor_grid = [torch.zeros(1)] * m.nl
        elif t is nn.Upsample and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return LoadedModel(module=model, stride=max(int(model.stride.max()), 32), names=dict(names))


def _unpickle_reason(exc: Exception) -> str:
    """The useful part of torch's weights-only refusal (without its advice to unpickle arbitrary code)."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if m:
        return f"it holds {m.group(1)}, which is not one of the YOLOv5 classes allowed to load"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return f"unpickling failed: {m.group(1).strip()}" if m else f"unpickling failed: {text.splitlines()[0][:200]}"


def _fuse(model):
    """Fold BatchNorm into the preceding conv (yolov5's fuse_conv_and_bn) without its logging."""
    from yolov5.models.common import Conv
    from yolov5.utils.torch_utils import fuse_conv_and_bn

    for m in model.model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


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

    mods = _yolo_modules()
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

    from answersheet.inference import prepare

    photos = sorted((Path(_yolo_modules()["models.yolo"].__file__).parents[1] / "data" / "images").glob("*.jpg"))
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

    coco = Path(_yolo_modules()["models.yolo"].__file__).parents[1] / "data" / "coco128.yaml"
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
