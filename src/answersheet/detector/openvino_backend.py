"""OpenVINO on the CPU: the fast default for CPU roads, running the same verified ONNX export as ONNX Runtime.

Why: on a CPU with native bf16 (AVX512_BF16 or AMX), OpenVINO's CPU plugin runs in bf16 by default
(`INFERENCE_PRECISION_HINT`). Measured on the 2-core AVX512_BF16 dev machine, yolov5n at 1x3x736x1280
(the example road's imgsz 1280), model only: ONNX Runtime fp32 2 sessions x 1 thread 15.6 img/s, OpenVINO
f32 15.2 img/s, OpenVINO bf16 24.9 img/s (1.6x). fp32 cannot make `detect` 3x the `yolov5 detect` CLI end to
end on those cores; bf16 can. The price is precision: against ONNX Runtime fp32 on 20 road photos the
objectness moved by <= 0.05 and box corners by <= 7 px at 1280 input, so labels are close to, not
byte-identical with, the CLI's (tests/test_openvino_backend.py states the tolerance; `--backend onnx` or
`torch` stays byte-identical). Without native bf16 OpenVINO f32 is no faster than ONNX Runtime, so `auto`
picks OpenVINO only where the CPU runs bf16 natively (`fast_cpu_default`).

The model is read from the same cached, sha256-verified ONNX file as the `onnx` backend (its metadata:
stride, names, source_sha256; `ModelFiles.onnx()`), so the ONNX cache and the manifest's lineage stay as they
are. The uint8 ->
float /255 conversion is compiled into the model (PrePostProcessor), so no float copy of the batch is made
in numpy. Each letterbox shape (H, W) gets its own compiled model with a static 1x3xHxW input — images
of one size share one shape, so a road day compiles once (~0.2-0.45 s) — with `streams` CPU streams of one
thread each and one infer request per stream, like the ONNX Runtime path's one single-threaded session per
core. A static input beat the fully dynamic model by ~14 % (1x3x736x1280, bf16, 2 streams, interleaved
bursts on the shared 2-core machine at load average ~9: medians 4.9 vs 4.3 img/s); a static batch of 4
was no faster than 4 single-image runs. No torch import on this path.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from answersheet.detector.backend import BatchTooLarge, graph_identity, oom_above, refuse_simulated_oom
from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)

# Compiled models kept per letterbox shape: a day's images share one or two sizes; an odd image's shape
# must not pin another compiled model (weights + activation buffers) for the rest of the day.
MAX_SHAPES = 4


def installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def default_precision() -> str | None:
    """The precision OpenVINO's CPU plugin runs by default here ('bf16' on AVX512_BF16/AMX CPUs, else 'f32');
    None when OpenVINO is not installed or has no CPU plugin."""
    if not installed():
        return None
    try:
        return _core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    except Exception:  # noqa: BLE001 - no CPU plugin / unsupported CPU: not a choice for auto
        return None


def fast_cpu_default() -> bool:
    """Whether `backend: auto` on CPU should pick OpenVINO: installed and running bf16 natively (1.6x ONNX
    Runtime fp32 model-only); with f32 only it is no faster than ONNX Runtime, which then stays the default."""
    return default_precision() == "bf16"


class OpenVinoBackend:
    """OpenVINO CPU inference on an exported YOLOv5 ONNX file: uint8 NCHW in, float32 (n, anchors, 5 + nc) out.

    `streams` concurrent `infer` calls run at once (one CPU stream of one thread each); `precision`
    None keeps the CPU plugin's default (bf16 where native), 'f32' forces full precision.
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", streams: int = 1,
                 precision: str | None = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise AnswersheetError("the openvino backend needs OpenVINO, which is not installed here (pip install "
                                   "openvino, part of the `detect` extra); or use --backend onnx") from None
        if device != "cpu":
            raise AnswersheetError(f"--device {device}: the openvino backend runs on the CPU only; use --device cpu "
                                   "(or auto), or --backend torch/onnx on a GPU")
        self.path, self.device = Path(path), device
        core = _core()
        try:
            self.model = core.read_model(str(self.path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise AnswersheetError(f"{self.path}: not a loadable ONNX model ({_first_line(exc)})") from None
        inputs = self.model.inputs
        if len(inputs) != 1 or inputs[0].get_partial_shape().rank.get_length() != 4:
            raise AnswersheetError(f"{self.path}: expected one NCHW image input, got "
                                   f"{[str(i.get_partial_shape()) for i in inputs]}")
        self.metadata = _metadata(self.model)
        last = self.model.outputs[0].get_partial_shape()[-1]
        last_dim = last.get_length() if last.is_static else None
        self.stride, self.names = graph_identity(self.path, self.metadata, last_dim)
        self.streams = max(1, streams)
        self.precision = precision or default_precision() or "f32"
        self.config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": str(self.streams),
            "INFERENCE_NUM_THREADS": str(self.streams),  # one thread per stream, as ORT's 1-thread sessions
            "INFERENCE_PRECISION_HINT": self.precision,
            # No pinning: the reader threads (decode) share these cores, and a pod's CPU quota is not a cpuset.
            "ENABLE_CPU_PINNING": False,
        }
        self.providers = [f"OpenVINO {ov.get_version().split('-')[0]} CPU {self.precision}"]
        self.oom_above = oom_above()
        self._compiled: OrderedDict[tuple[int, int], tuple[Any, queue.SimpleQueue]] = OrderedDict()
        self._lock = threading.Lock()
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny inference on the opening thread, before detect's inference threads start.

        OpenVINO's Python binding initialises its numpy glue lazily, in a function-local static whose
        initialiser drops and re-takes the GIL: two threads making their first `infer` at once deadlocked
        (seen twice: a detect run and a test stuck for minutes, every thread waiting on a futex, one in
        `__cxa_guard_acquire` holding the GIL, one in pybind11's call_once waiting for it). Doing the first
        numpy -> tensor -> numpy round trip here initialises it once. It also compiles the graph now, so
        a graph OpenVINO cannot compile fails at open time with one line."""
        side = self.stride
        try:
            self.infer(np.zeros((1, 3, side, side), np.uint8))
        except RuntimeError as exc:
            raise AnswersheetError(f"{self.path}: OpenVINO cannot compile it ({_first_line(exc)})") from None
        with self._lock:
            self._compiled.pop((side, side), None)  # not a road image's shape: free its slot

    @property
    def nc(self) -> int:
        return len(self.names)

    def _requests(self, hw: tuple[int, int]) -> queue.SimpleQueue:
        """The infer requests of the model compiled for 1x3xHxW (compiled on first use, LRU of MAX_SHAPES)."""
        with self._lock:
            if hw in self._compiled:
                self._compiled.move_to_end(hw)
                return self._compiled[hw][1]
            compiled = _core().compile_model(self._static_model(hw), "CPU", self.config)
            requests: queue.SimpleQueue = queue.SimpleQueue()
            for _ in range(self.streams):
                requests.put(compiled.create_infer_request())
            self._compiled[hw] = (compiled, requests)
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)  # requests in use keep their compiled model alive
            log.debug("openvino: compiled %s for 1x3x%dx%d (%s)", self.path.name, *hw, self.precision)
            return requests

    def _static_model(self, hw: tuple[int, int]) -> Any:
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        model = self.model.clone()
        model.reshape({model.inputs[0]: ov.PartialShape([1, 3, *hw])})
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8)
        ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0)  # = batch.astype(f32) / 255
        return ppp.build()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) -> float32 predictions (n, anchors, 5 + nc), one image per request."""
        refuse_simulated_oom(self.oom_above, len(batch))
        batch = np.ascontiguousarray(batch, np.uint8)
        requests = self._requests((int(batch.shape[2]), int(batch.shape[3])))
        request = requests.get()
        try:
            out = None
            for i in range(len(batch)):
                request.infer({0: batch[i : i + 1]}, share_inputs=True)
                pred = request.get_output_tensor(0).data
                if out is None:
                    out = np.empty((len(batch), *pred.shape[1:]), np.float32)
                out[i] = pred[0]  # a copy: the request's output buffer is reused by its next run
        except RuntimeError as exc:
            text = str(exc).lower()
            if "allocate" in text or "out of memory" in text or "bad_alloc" in text:
                raise BatchTooLarge(_first_line(exc)) from None
            raise
        finally:
            requests.put(request)
        return out if out is not None else np.zeros((0, 0, 5 + self.nc), np.float32)


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX file's metadata_props (stride, names, source_sha256, ...): OpenVINO's ONNX frontend keeps
    them in the model's rt_info under 'framework'."""
    if not model.has_rt_info(["framework"]):
        return {}
    return {str(k): str(v.astype(str)) for k, v in model.get_rt_info(["framework"]).astype(dict).items()}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
