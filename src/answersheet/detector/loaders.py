"""Getting a model ready: one `open_backend` for every backend, which are registered by name in LOADERS.

`open_backend` resolves the backend and device (`auto`: torch on a usable CUDA GPU, else OpenVINO bf16
on a CPU that has it natively, else ONNX Runtime), fetches the weights and verifies them against
detect.sha256 — always, also for the ONNX backends (yolov5n: 3.9 MB, ≈ 0.1 s) — then hands a
`ModelFiles` to the backend's loader. A loader that runs an ONNX graph asks `files.onnx()` for it:
detect.onnx verified against detect.onnx_sha256 or, without detect.onnx, the bucket's ONNX cache entry
for detect.sha256 (exported once on a miss; onnx_export.cached_export). Either ONNX file must carry
`source_sha256` = detect.sha256 in its metadata, checked once the backend has read it: so the lineage the
manifest records (weights sha256 -> ONNX sha256) is always true. Nothing here imports torch unless the
torch backend is opened or a CUDA device is probed for it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from answersheet.config import DetectSettings
from answersheet.detector.backend import CPUS, Backend
from answersheet.detector.onnx_export import cached_export, check_onnx_source
from answersheet.detector.weights import fetch_verified
from answersheet.errors import AnswersheetError
from answersheet.storage import Store


@dataclass
class ModelFiles:
    """What a loader is given: the verified weights, the ONNX graph on request, the lineage so far."""

    settings: DetectSettings
    device: str  # resolved: "cpu" or "cuda:<n>"
    scratch: Path
    store: Store | None  # the road's bucket (the ONNX cache); None: detect.onnx is required
    weights: Path  # verified against detect.sha256
    lineage: dict[str, Any]  # the manifest's `model`
    onnx_source: str | None = None  # the ONNX file's URI once onnx() fetched it (its source_sha256 is checked)

    def onnx(self) -> Path:
        """The verified ONNX graph of the weights: detect.onnx, or the bucket's cache entry (exported on a miss)."""
        s = self.settings
        if s.onnx:
            path = fetch_verified(s.onnx, s.onnx_sha256, self.scratch, "detect.onnx_sha256")
            self.lineage.update(onnx=s.onnx, onnx_sha256=s.onnx_sha256)
            self.onnx_source = s.onnx
            return path
        if self.store is None:
            raise AnswersheetError("detect: no detect.onnx and no bucket for the ONNX cache")
        cached = cached_export(self.store, self.weights, s.sha256, s.imgsz, self.scratch)
        self.lineage.update(onnx=cached.uri, onnx_sha256=cached.sha256, onnx_cache=cached.cache)
        self.onnx_source = cached.uri
        return cached.path


def _no_cuda(index: int) -> bool:
    return False


@dataclass(frozen=True)
class Loader:
    """How to open one backend from verified model files, and whether it can use CUDA device `index` here."""

    load: Callable[[ModelFiles], Backend]
    cuda: Callable[[int], bool] = _no_cuda


def _torch_cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


def load_torch(files: ModelFiles) -> Backend:
    from answersheet.detector.checkpoint import load_checkpoint
    from answersheet.detector.torch_backend import TorchBackend

    return TorchBackend(load_checkpoint(files.weights), files.device)


def load_onnx(files: ModelFiles) -> Backend:
    """On CPU, one single-threaded ORT session per core beats one run over all cores (no intra-op sync,
    no spinning): measured 47 vs 32 img/s for yolov5n on 2 cores (bench/detector.py)."""
    from answersheet.detector.onnx_backend import OnnxBackend

    cpu = not files.device.startswith("cuda")
    streams = min(CPUS, 8) if cpu else 1
    return OnnxBackend(files.onnx(), files.device, threads=1 if cpu else None, sessions=streams)


def load_openvino(files: ModelFiles) -> Backend:
    """The same verified ONNX graph on OpenVINO's CPU plugin, one single-threaded stream per core (as ONNX
    Runtime above); bf16 where the CPU has it natively (openvino_backend)."""
    from answersheet.detector.openvino_backend import OpenVinoBackend

    return OpenVinoBackend(files.onnx(), files.device, streams=min(CPUS, 8))


# Every backend by name: registering another is one line (import its module inside its load function,
# so that opening one backend never imports another's runtime).
LOADERS: dict[str, Loader] = {
    "torch": Loader(load_torch, cuda=lambda index: index < _torch_cuda_count()),
    "onnx": Loader(load_onnx, cuda=lambda index: _ort_has_cuda()),
    "openvino": Loader(load_openvino),  # CPU only
}
GPU_DEFAULT = "torch"  # what backend `auto` is on a usable GPU; on the CPU: cpu_default()


def cpu_default() -> str:
    """What backend `auto` is on the CPU: openvino where OpenVINO is installed and the CPU runs bf16 natively
    (1.6x ONNX Runtime fp32 model-only at 736x1280 on 2 cores), else onnx (OpenVINO f32 is no faster)."""
    from answersheet.detector.openvino_backend import fast_cpu_default

    return "openvino" if fast_cpu_default() else "onnx"


def gpu_visible() -> bool:
    """An NVIDIA GPU is exposed to this container (checked without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def resolve_backend(backend: str, device: str) -> tuple[str, str]:
    """(backend, device) from the requested ones.

    device auto -> cuda:0 when a GPU is visible (and usable by the backend), else cpu; an explicit cuda
    device must exist. backend auto -> torch on CUDA, else cpu_default(): openvino (bf16) or onnx (ONNX
    Runtime); no torch import at all on the CPU.
    """
    if backend != "auto" and backend not in LOADERS:
        raise AnswersheetError(f"--backend {backend!r}: must be one of auto, {', '.join(LOADERS)}")
    loader = LOADERS[GPU_DEFAULT if backend == "auto" else backend]
    gpu = gpu_visible()
    if device == "auto":
        device = "cuda:0" if gpu and loader.cuda(0) else "cpu"
    elif device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if not gpu or not loader.cuda(index):
            raise AnswersheetError(f"--device {device}: no usable CUDA device here for the {backend} backend; "
                                   "use --device cpu or auto")
        device = f"cuda:{index}"
    if backend == "auto":
        backend = GPU_DEFAULT if device.startswith("cuda") else cpu_default()
    return backend, device


def open_backend(settings: DetectSettings, backend: str, device: str, scratch: str | os.PathLike,
                 store: Store | None = None) -> tuple[Backend, dict[str, Any]]:
    """(the loaded backend, its lineage: the manifest's `model`): fetch, verify, export/cache, load.

    Writes only into `scratch` (and, on an ONNX cache miss, the cache entry); no stage output.
    """
    backend, device = resolve_backend(backend, device)
    lineage: dict[str, Any] = {
        "weights": settings.weights, "sha256": settings.sha256, "backend": backend, "imgsz": settings.imgsz,
        "conf_thres": settings.conf_thres, "iou_thres": settings.iou_thres, "max_det": settings.max_det}
    weights_dir = Path(scratch) / "weights"  # apart from the ONNX file, which may have the same base name
    weights_dir.mkdir(exist_ok=True)
    weights = fetch_verified(settings.weights, settings.sha256, weights_dir, "detect.sha256")
    files = ModelFiles(settings, device, Path(scratch), store, weights, lineage)
    loaded = LOADERS[backend].load(files)
    if files.onnx_source is not None:
        check_onnx_source(files.onnx_source, loaded.metadata.get("source_sha256"), settings.sha256)
    lineage.update(device=device, precision=loaded.precision, providers=list(loaded.providers),
                   streams=loaded.streams)
    return loaded, lineage
