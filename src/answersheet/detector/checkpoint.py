"""YOLOv5 checkpoints loaded without running pickled code (the torch backend and the ONNX export).

Official YOLOv5 `.pt` files pickle the whole model (`models.yolo.Model`, `models.common.Conv`, ...).
They are loaded with `torch.load(weights_only=True)` and an allow-list of exactly the yolov5 and
torch.nn classes such a checkpoint holds — never `weights_only=False`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from answersheet.errors import AnswersheetError

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


def yolo_modules() -> dict[str, Any]:
    import yolov5.models.common as common  # noqa: F401 - also puts yolov5's dir on sys.path (`models.*`)
    import yolov5.models.yolo as yolo

    return {"models.yolo": yolo, "models.common": common}


def safe_globals() -> list:
    """The allow-list for torch.load(weights_only=True): only the classes a YOLOv5 detection checkpoint holds."""
    import torch.nn as nn

    mods = yolo_modules()
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
    mods = yolo_modules()
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

