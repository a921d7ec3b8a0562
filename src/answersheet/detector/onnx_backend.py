"""The ONNX Runtime backend: an exported YOLOv5 (detector.onnx_export) without torch (the CPU default).

ONNX Runtime with CUDA/TensorRT providers when installed and loadable, else the CPU. Importing this
module imports neither torch nor yolov5: the detect image's CPU path stays at ≈0.45 GiB.
"""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

import numpy as np

from answersheet.detector.backend import BatchTooLarge, graph_identity, oom_above, refuse_simulated_oom
from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)


def tensorrt_loadable() -> bool:
    """Whether TensorRT's runtime library loads. The onnxruntime-gpu wheel always *lists*
    TensorrtExecutionProvider, but without libnvinfer (not in the detector image) asking for it first made
    every GPU session log an error before falling back to CUDA."""
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


def onnx_providers(device: str, available: set[str], tensorrt: bool) -> list:
    """ONNX Runtime providers for a device, in preference order, only those that are installed and loadable."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    index = device.split(":")[1] if ":" in device else "0"
    wanted: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if tensorrt:
        wanted.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
    return [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]


class OnnxBackend:
    """ONNX Runtime on an exported YOLOv5 (dynamic batch, height and width): same inputs as the CLI.

    `sessions` > 1 opens that many sessions so as many `infer` calls run at once (one per CPU core,
    each single-threaded): every session's memory arena then only ever holds one run, so memory is
    fixed after the first batch instead of stepping up whenever concurrent runs happen to peak together.
    """

    name = "onnx"

    def __init__(self, path: str | os.PathLike, device: str, threads: int | None = None, sessions: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.device, self.streams, self.precision = device, sessions, "f32"
        available = set(ort.get_available_providers())
        providers = onnx_providers(device, available, tensorrt_loadable())
        if device.startswith("cuda") and len(providers) == 1:
            log.warning("onnxruntime has no CUDA/TensorRT provider here (%s): running ONNX on the CPU",
                        sorted(available))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads must not spin: the decode threads need those cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise AnswersheetError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.sessions: queue.SimpleQueue = queue.SimpleQueue()
        self.sessions.put(self.session)
        for _ in range(sessions - 1):
            self.sessions.put(ort.InferenceSession(str(self.path), opts, providers=providers))
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise AnswersheetError(f"{self.path}: expected one NCHW image input, got {[i.shape for i in inputs]}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        last = outputs[0].shape[-1]
        self.stride, self.names = graph_identity(self.path, self.metadata, last if isinstance(last, int) else None)
        self.oom_above = oom_above()

    @property
    def nc(self) -> int:
        return len(self.names)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) -> float32 predictions (n, anchors, 5 + nc)."""
        refuse_simulated_oom(self.oom_above, len(batch))
        im = batch.astype(np.float32)
        im /= 255
        session = self.sessions.get()
        try:
            out = session.run([self.output_name], {self.input_name: im})[0]
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "allocate" in text.lower() or "out of memory" in text.lower():
                raise BatchTooLarge(text.splitlines()[0]) from None
            raise
        finally:
            self.sessions.put(session)
        return out

