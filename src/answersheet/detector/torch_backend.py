"""The PyTorch backend: the yolov5 module itself, fp16 on CUDA, fp32 on CPU (the GPU default)."""

from __future__ import annotations

from typing import Any

import numpy as np

from answersheet.detector.backend import OOM_ABOVE_ENV, BatchTooLarge, oom_above
from answersheet.detector.checkpoint import LoadedModel


class TorchBackend:
    """PyTorch: fp16 on CUDA (pinned host memory, non-blocking copies, cudnn.benchmark), fp32 on CPU."""

    name = "torch"
    streams = 1  # one CUDA stream; on CPU torch's own thread pool uses every core

    def __init__(self, model: LoadedModel, device: str, half: bool | None = None) -> None:
        import torch

        self.torch = torch
        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        self.cuda = self.torch_device.type == "cuda"
        self.half = self.cuda if half is None else half  # half=True on CPU: the CUDA path's precision, testable
        self.module = model.module.to(self.torch_device)
        self.precision = "f16" if self.half else "f32"
        if self.half:
            self.module.half()
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.stride, self.names = model.stride, model.names
        self.metadata: dict[str, str] = {}
        self.oom_above = oom_above()
        self.providers = [self.device]

    @property
    def nc(self) -> int:
        return len(self.names)

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
                    im = im.pin_memory().to(self.torch_device, non_blocking=True)
                im = im.half() if self.half else im.float()
                im /= 255
                return self.module(im)[0]
        except torch.cuda.OutOfMemoryError as exc:
            if self.cuda:
                torch.cuda.empty_cache()
            raise BatchTooLarge(str(exc).splitlines()[0]) from None
