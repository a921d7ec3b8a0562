"""`answersheet export-onnx`: a YOLOv5 checkpoint as ONNX for the `onnx` detect backend.

The graph has dynamic batch, height and width (opset 17, yolov5's Detect in export mode with
`dynamic=True`), so the ONNX backend is fed exactly the letterboxed shapes `yolov5 detect` uses —
no fixed 640x640 padding, and labels stay equal to the CLI's. `--imgsz` only sets the size the
graph is traced at. The file is written beside the weights (or to --out), with `<file>.sha256`
(sha256sum format) next to it; put that digest in the roads file as `detect.onnx_sha256`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

from answersheet.errors import AnswersheetError
from answersheet.model import fetch_verified, file_sha256, load_checkpoint

log = logging.getLogger(__name__)

OPSET = 17


def export_model(weights: str | os.PathLike, out: str | os.PathLike, imgsz: int = 640, source_sha256: str = "") -> str:
    """Export a local YOLOv5 checkpoint to ONNX at `out`; returns the ONNX file's sha256."""
    import onnx
    import torch

    loaded = load_checkpoint(weights, fuse=True)
    model = loaded.module
    detect = model.model[-1]
    detect.inplace, detect.dynamic, detect.export = False, True, True
    im = torch.zeros(1, 3, imgsz, imgsz)
    with torch.inference_mode():
        model(im)  # dry run (builds the grids)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation / tracer notes
        torch.onnx.export(
            model, im, str(out), verbose=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["images"], output_names=["output0"], dynamo=False,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                          "output0": {0: "batch", 1: "anchors"}},
        )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {"stride": str(loaded.stride), "names": str(loaded.names), "source_sha256": source_sha256,
            "producer": "answersheet export-onnx"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return file_sha256(out)


def default_out(weights: str) -> str:
    """`<weights without .pt>.onnx`, beside the weights (same directory or same S3 prefix)."""
    base = weights[: -len(".pt")] if weights.endswith(".pt") else weights
    return base + ".onnx"


def export_onnx(weights: str, out: str | None = None, imgsz: int = 640, sha256: str | None = None) -> dict:
    """Export weights (local path or s3:// URI) to ONNX beside them (or at `out`), with `<out>.sha256`."""
    out = out or default_out(weights)
    with tempfile.TemporaryDirectory(prefix="answersheet-export-") as scratch:
        if sha256:
            local = fetch_verified(weights, sha256, scratch, what="--sha256")
        else:
            local = _fetch_unverified(weights, scratch)
        weights_sha = file_sha256(local)
        target = Path(scratch) / "model.onnx" if out.startswith("s3://") else Path(out).expanduser().resolve()
        digest = export_model(local, target, imgsz=imgsz, source_sha256=weights_sha)
        sidecar = f"{digest}  {Path(out).name}\n"
        if out.startswith("s3://"):
            from answersheet.storage import Store, split_s3_uri

            bucket, key = split_s3_uri(out)
            store = Store(bucket)
            with open(target, "rb") as f:
                store.put(key, f.read(), "application/octet-stream")
            store.put(key + ".sha256", sidecar.encode(), "text/plain")
        else:
            Path(str(target) + ".sha256").write_text(sidecar)
    log.info("export-onnx: %s -> %s (sha256 %s)", weights, out, digest)
    return {"onnx": out, "onnx_sha256": digest, "weights_sha256": weights_sha, "opset": OPSET,
            "dynamic": ["batch", "height", "width"]}


def _fetch_unverified(weights: str, scratch: str) -> Path:
    if weights.startswith("s3://"):
        from answersheet.storage import Store, split_s3_uri

        bucket, key = split_s3_uri(weights)
        path = Path(scratch) / (key.rsplit("/", 1)[-1] or "model.pt")
        with open(path, "wb") as f:
            Store(bucket).download(key, f)
        return path
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise AnswersheetError(f"{weights}: model file not found")
    return path
