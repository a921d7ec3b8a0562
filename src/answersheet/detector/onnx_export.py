"""`answersheet export-onnx`: a YOLOv5 checkpoint as ONNX for the `onnx` detect backend, and the
bucket's ONNX cache that makes the CPU default fast without any user step.

The graph has dynamic batch, height and width (opset 17, yolov5's Detect in export mode with
`dynamic=True`), so the ONNX backend is fed exactly the letterboxed shapes `yolov5 detect` uses —
no fixed 640x640 padding, and labels stay equal to the CLI's. `--imgsz` only sets the size the
graph is traced at. The file is written beside the weights (or to --out), with `<file>.sha256`
(sha256sum format) next to it; put that digest in the roads file as `detect.onnx_sha256`.

Every export carries the sha256 of the weights it was made from (ONNX metadata `source_sha256`);
detect refuses an ONNX file whose `source_sha256` is not the road's `detect.sha256`, so the model
lineage in a manifest (weights sha256 -> ONNX sha256) is always true.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from answersheet.detector.weights import fetch_verified, file_sha256
from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)

OPSET = 17
# Everything besides the weights and the opset that decides the exported bytes. Bump `format` when
# export_model changes what it writes: the cache key changes with it and old entries are left unused.
EXPORT_SETTINGS = {"format": 1, "fuse": True, "constant_folding": True, "dynamic": ["batch", "height", "width"],
                   "input": "images", "output": "output0"}


def export_settings_hash(imgsz: int) -> str:
    """A short digest of the export settings (with the trace size), part of the cache key."""
    body = json.dumps({**EXPORT_SETTINGS, "opset": OPSET, "imgsz": imgsz}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def export_model(weights: str | os.PathLike, out: str | os.PathLike, imgsz: int = 640,
                 source_sha256: str | None = None) -> str:
    """Export a local YOLOv5 checkpoint to ONNX at `out`; returns the ONNX file's sha256.

    `source_sha256` (the weights' sha256, computed when not given) goes into the ONNX metadata.
    Deterministic: the same weights, settings and torch version give byte-identical files (checked:
    three exports of yolov5n.pt in separate processes, one sha256).
    """
    import onnx
    import torch

    from answersheet.detector.checkpoint import load_checkpoint

    source_sha256 = source_sha256 or file_sha256(weights)
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
            model, im, str(out), verbose=False, opset_version=OPSET, do_constant_folding=True,  # type: ignore[arg-type]
            input_names=["images"], output_names=["output0"], dynamo=False,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                          "output0": {0: "batch", 1: "anchors"}},
        )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {"stride": str(loaded.stride), "names": str(loaded.names), "source_sha256": source_sha256,
            "producer": "answersheet export-onnx", "export_settings": export_settings_hash(imgsz)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return file_sha256(out)


def _export_child(weights: str, out: str, imgsz: int, source_sha256: str) -> str:
    warnings.simplefilter("ignore")  # yolov5's pkg_resources note, tracer warnings
    logging.getLogger("yolov5").setLevel(logging.WARNING)
    return export_model(weights, out, imgsz=imgsz, source_sha256=source_sha256)


def export_in_subprocess(weights: str | os.PathLike, out: str | os.PathLike, imgsz: int, source_sha256: str) -> str:
    """export_model in a child process, so the caller never imports torch: detect's ONNX path stays at
    ≈0.45 GiB instead of keeping torch's ≈1 GiB for the rest of the run after an in-process export."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_export_child, str(weights), str(out), imgsz, source_sha256).result()
    except AnswersheetError:
        raise
    except BrokenProcessPool:
        raise AnswersheetError(f"{weights}: the ONNX export process died (out of memory?)") from None
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types; one line for the user
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise AnswersheetError(f"{weights}: ONNX export failed: {type(exc).__name__}: {first}") from None


def default_out(weights: str) -> str:
    """`<weights without .pt>.onnx`, beside the weights (same directory or same S3 prefix)."""
    base = weights[: -len(".pt")] if weights.endswith(".pt") else weights
    return base + ".onnx"


def export_onnx(weights: str, out: str | None = None, imgsz: int = 640, sha256: str | None = None) -> dict:
    """Export weights (local path or s3:// URI) to ONNX beside them (or at `out`), with `<out>.sha256`."""
    out = out or default_out(weights)
    with tempfile.TemporaryDirectory(prefix="answersheet-export-") as scratch:
        local = fetch_verified(weights, sha256 or None, scratch, what="--sha256")
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


# -- the bucket's ONNX cache (detect without detect.onnx) ---------------------------------------------

@dataclass
class CachedOnnx:
    """A verified ONNX file for the weights, and where it came from (recorded in the manifest)."""

    path: Path
    sha256: str
    uri: str  # the cache object it was read from, or "exported in this run" when the cache is unusable
    cache: str  # "hit" | "miss: exported and cached" | "miss: exported, cached by another run first" | ...


def cached_export(store, weights: Path, weights_sha256: str, imgsz: int, scratch: str | os.PathLike) -> CachedOnnx:
    """The ONNX export of the verified local `weights` (sha256 `weights_sha256`) from the bucket's cache,
    exported on a miss.

    The cache key (layout.onnx_cache_key) is content-addressed: weights sha256, opset, export settings.
    The object carries its own sha256 and the weights' as S3 user metadata, written in the same PUT as
    the bytes, so no reader ever sees bytes and digest out of step; every read checks both (and detect
    checks the ONNX's embedded `source_sha256` too). A miss exports once in a child process (≈ 6-16 s and
    ≈ 1.3 GiB with torch on 2 cores) and writes with `If-None-Match: *`: of two shards racing, one writes,
    the other gets 412 and both then use what the bucket holds (re-read and verified). The export is
    deterministic anyway, so even a server that ignores the condition ends with identical bytes. A bad
    entry (digest mismatch) is replaced; a bucket that refuses the write costs only a warning.
    A `<key>.sha256` sidecar (sha256sum format) is written beside the entry for people and tools.
    """
    from answersheet.layout import onnx_cache_key

    key = onnx_cache_key(weights_sha256, OPSET, export_settings_hash(imgsz))
    path = Path(scratch) / "cached.onnx"
    digest, why = _read_cache(store, key, weights_sha256, path)
    if digest:
        log.info("ONNX cache hit: %s (sha256 %s)", store.uri(key), digest)
        return CachedOnnx(path, digest, store.uri(key), "hit")
    if why == "missing":
        log.info("ONNX cache miss: exporting the weights (sha256 %s) once into %s", weights_sha256, store.uri(key))
    else:
        log.warning("ONNX cache entry %s is bad (%s): exporting again to replace it", store.uri(key), why)
    exported = Path(scratch) / "exported.onnx"
    exported_sha = export_in_subprocess(weights, exported, imgsz, weights_sha256)
    return _publish(store, key, exported, exported_sha, weights_sha256, path, replace=why != "missing")


def _read_cache(store, key: str, weights_sha256: str, path: Path) -> tuple[str | None, str]:
    """(sha256 of the verified cache entry, now written to `path`, or None; why not)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from answersheet.storage import sha256_bytes

    try:
        resp = store.client.get_object(Bucket=store.bucket, Key=key)
        body = resp["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("NoSuchKey", "404"):
            return None, "missing"
        raise store._error(key, exc, "read") from None
    except BotoCoreError as exc:
        return None, f"unreadable ({type(exc).__name__})"
    meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
    digest = sha256_bytes(body)
    if meta.get("sha256") != digest:
        return None, f"corrupt: its bytes have sha256 {digest}, its metadata says {meta.get('sha256')}"
    if meta.get("source-sha256") != weights_sha256:
        return None, f"exported from other weights ({meta.get('source-sha256')})"
    path.write_bytes(body)
    return digest, "ok"


def _publish(store, key: str, exported: Path, digest: str, weights_sha256: str, path: Path,
             replace: bool) -> CachedOnnx:
    """Write this run's export into the cache (unless another run got there first), then use what the bucket
    holds, verified; this run's own file when the cache cannot be written or read back."""
    from botocore.exceptions import BotoCoreError, ClientError

    data = exported.read_bytes()
    args = {"Bucket": store.bucket, "Key": key, "Body": data, "ContentType": "application/octet-stream",
            "Metadata": {"sha256": digest, "source-sha256": weights_sha256}}
    cache = "miss: exported and cached"
    try:
        try:
            store.client.put_object(**args, **({} if replace else {"IfNoneMatch": "*"}))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                cache = "miss: exported, cached by another run first"
            elif code in ("NotImplemented", "501"):  # no conditional writes here: last writer wins (same bytes)
                store.client.put_object(**args)
            else:
                raise
    except (BotoCoreError, ClientError) as exc:
        log.warning("%s", store._error(key, exc, "write"))
        log.warning("ONNX cache not written: using this run's export (sha256 %s)", digest)
        shutil.move(exported, path)
        return CachedOnnx(path, digest, "exported in this run", "miss: exported, cache not writable")
    held, why = _read_cache(store, key, weights_sha256, path)
    if held is None:
        log.warning("ONNX cache %s unusable right after writing it (%s): using this run's export",
                    store.uri(key), why)
        shutil.move(exported, path)
        return CachedOnnx(path, digest, "exported in this run", f"miss: exported, cache unreadable ({why})")
    try:
        store.put(key + ".sha256", f"{held}  {key.rsplit('/', 1)[-1]}\n".encode(), "text/plain")
    except AnswersheetError as exc:
        log.warning("ONNX cache sidecar not written: %s", exc)
    log.info("ONNX cache: %s (sha256 %s; %s)", store.uri(key), held, cache)
    return CachedOnnx(path, held, store.uri(key), cache)


def check_onnx_source(onnx: str, source_sha256: str | None, sha256: str) -> None:
    """Refuse an ONNX file not exported from the weights the road names (detect.sha256)."""
    if not source_sha256:
        raise AnswersheetError(
            f"{onnx}: no source_sha256 in its metadata, so it cannot be checked against detect.sha256 {sha256}; "
            "re-export it with `answersheet export-onnx --weights <weights> --sha256 <detect.sha256>`")
    if source_sha256 != sha256:
        raise AnswersheetError(
            f"{onnx}: exported from weights with sha256 {source_sha256}, but detect.sha256 is {sha256} "
            "(a stale detect.sha256, or an ONNX file of other weights)")
