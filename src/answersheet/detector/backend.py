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

from answersheet.errors import AnswersheetError

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


def refuse_simulated_oom(limit: int | None, batch: int) -> None:
    """BatchTooLarge when the test hook's limit (oom_above) is below this batch."""
    if limit is not None and batch > limit:
        raise BatchTooLarge(f"out of memory ({OOM_ABOVE_ENV}={limit}, batch of {batch})")


def graph_identity(path: object, metadata: dict[str, str], last_dim: int | None) -> tuple[int, dict[int, str]]:
    """(stride, class names) of an exported YOLOv5 graph, from the metadata yolov5's export writes; without
    `names`, the output's last dimension (5 + nc) gives numbered classes. One line naming the file otherwise."""
    names = _parse_names(metadata.get("names"))
    if names is None and last_dim is not None:
        names = {i: str(i) for i in range(last_dim - 5)}
    if names is None:
        raise AnswersheetError(f"{path}: cannot tell the number of classes (no 'names' metadata)")
    return int(metadata.get("stride", 32)), names


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
