"""The one interface every inference backend implements, and what they share (torch-free).

A backend turns a batch of letterboxed images into yolov5's raw predictions; everything before
(decode, letterbox: `detector.preprocess`) and after (NMS, scaling, road classes: `detector.postprocess`)
is the same numpy code for all of them, so a backend is only "how to run the graph". Backends are
opened by `detector.open_backend`, which picks the loader by name from `detector.loaders.LOADERS`.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Test hook for the CUDA-OOM fallback: a backend refuses batches larger than this with the same
# exception a real out-of-memory raises (the real handler then halves the batch and retries).
OOM_ABOVE_ENV = "ANSWERSHEET_DETECT_OOM_ABOVE"


class BatchTooLarge(RuntimeError):
    """The backend ran out of (GPU) memory for this batch; retry with a smaller one."""


@runtime_checkable
class Backend(Protocol):
    """A loaded model that runs batches: what the detect stage and the benchmarks need of any backend."""

    name: str  # "torch", "onnx", ...: the manifest's model.backend
    device: str  # "cpu", "cuda:0"
    stride: int  # the model's largest stride: letterbox pads to a multiple of it
    names: dict[int, str]  # model class id -> name
    providers: list[str]  # what actually runs it (ONNX Runtime providers, the torch device)
    metadata: dict[str, str]  # what the model file says about itself (ONNX: stride, names, source_sha256)
    streams: int  # how many `infer` calls may run at once
    precision: str  # what the model computes in: f32, f16 (torch on CUDA) or bf16 (OpenVINO where native)

    @property
    def nc(self) -> int: ...

    def infer(self, batch: np.ndarray) -> Any:
        """uint8 (n, 3, H, W) RGB -> predictions (n, anchors, 5 + nc): an array or a device tensor that
        `postprocess.candidates` filters; BatchTooLarge when the batch does not fit in memory."""
        ...


def oom_above() -> int | None:
    """The batch size above which a backend simulates an out-of-memory ($ANSWERSHEET_DETECT_OOM_ABOVE)."""
    value = os.environ.get(OOM_ABOVE_ENV)
    return int(value) if value else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


CPUS = available_cpus()
