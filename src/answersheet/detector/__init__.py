"""The detector: one `Backend` interface, many model formats (like yolov5's DetectMultiBackend).

- `backend`: the `Backend` protocol every backend implements, `BatchTooLarge`, the usable CPU count.
- `loaders`: `open_backend()` — resolve backend/device, fetch + verify the weights, export/cache the
  ONNX graph, load — and `LOADERS`, the backends by name (`torch_backend`, `onnx_backend`).
- `preprocess` / `postprocess` / `slicing`: yolov5's decode + letterbox and NMS + scaling ported to
  numpy (byte-identical labels to `yolov5 detect --save-txt`), the road class head, sliced inference.
- `weights`, `checkpoint`, `onnx_export`: model files, safe `.pt` loading, the ONNX export and its
  bucket cache (random-init checkpoints for tests and the offline demo: answersheet.dev.random_init).

Importing this package imports neither torch nor onnxruntime; each backend's runtime is imported
when that backend is opened. The detect stage (answersheet.detect) only streams images through it.
"""

from answersheet.detector.backend import CPUS, Backend, BatchTooLarge
from answersheet.detector.loaders import LOADERS, Loader, ModelFiles, gpu_visible, open_backend, resolve_backend

__all__ = ["CPUS", "LOADERS", "Backend", "BatchTooLarge", "Loader", "ModelFiles", "gpu_visible", "open_backend",
           "resolve_backend"]
