"""detect: YOLOv5 over one shard of the day's selected images, one YOLO label file per image with boxes.

Inputs: the ingest manifest (images with `selected: true`, sorted by name; image i belongs to shard
i % shard_count) and a YOLOv5 checkpoint (local path or s3:// URI) verified against `detect.sha256`
— and, for the `onnx` and `openvino` backends, `detect.onnx` verified against `detect.onnx_sha256`, or without one the
bucket's ONNX cache entry for those weights (exported once, then reused by every run and shard). An
ONNX file must say (metadata `source_sha256`) that it was exported from `detect.sha256`'s weights.

The shard streams through a bounded pipeline, so memory stays flat in the number of images:
reader threads GET + sha256-check + decode + letterbox (cv2 releases the GIL), the main thread
stacks same-shape images into batches, inference threads run them (one stream on CUDA; on CPU one
single-threaded ONNX Runtime run per core), writer threads run NMS, format the labels and PUT
them. A CUDA out-of-memory halves the batch and retries. One image never ends the day: a GET cut
short or failing a checksum is retried; an image that still cannot be read, is not a whole JPEG, no
longer matches the ingest manifest, or fails to decode, letterbox, infer or post-process goes to the
manifest's `failed` list with a one-line reason, and the other images of its batch are kept. Labels
are byte-identical to `yolov5 detect --save-txt`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from answersheet import manifest, stage
from answersheet.config import BACKENDS, DetectSettings
from answersheet.day import RoadDay
from answersheet.detector import CPUS, Backend, BatchTooLarge, open_backend, resolve_backend
from answersheet.detector.onnx_export import export_settings_hash
from answersheet.detector.postprocess import (
    RoadClasses,
    candidates,
    detections,
    image_boxes,
    predictions_jsonl,
    resolve_classes,
)
from answersheet.detector.preprocess import BadImage, Prepared, check_imgsz, prepare
from answersheet.errors import AnswersheetError, printable
from answersheet.layout import LABEL_SUFFIX, DayLayout
from answersheet.naming import ImageName
from answersheet.progress import Progress
from answersheet.storage import Store, sha256_bytes

log = logging.getLogger(__name__)

STAGE = "detect"
# On CPU, batches beyond ~4 images only add cache misses (torch); for ONNX Runtime's one-stream-per-core
# setup, batch 4 beat 2 and 1 end to end (7.1 s vs 7.6 s vs 8.1 s for 200 road images on 2 cores).
CPU_MAX_BATCH = 4


TRIM_EVERY = 32  # images between malloc_trim calls
M_ARENA_MAX = -8  # glibc mallopt parameter


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): allocator tuning is skipped
        return None


_LIBC = _glibc()


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Few glibc malloc arenas for the pipeline's threads: decoded road images are ~6 MB each, and every
    extra per-thread arena keeps its own freed pages resident (peak RSS stepped up by ~65 MB mid-day)."""
    if _LIBC:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim), so RSS stays flat over a long day."""
    if _LIBC:
        _LIBC.malloc_trim(0)
READERS = int(os.environ.get("ANSWERSHEET_DETECT_READERS", "0")) or None
WRITERS = 8


@dataclass
class Failure:
    """An image the detector could not read (reported in the manifest's `failed` list)."""

    name: str
    key: str
    reason: str
    retryable: bool = False  # a read that kept failing in transit: a later run (without --force) redoes the shard

    def entry(self) -> dict:
        out = {"name": self.name, "key": self.key, "reason": printable(self.reason)}
        return {**out, "retryable": True} if self.retryable else out


# An image GET whose body arrives truncated, cut off, or not matching the ingest manifest's sha256 is
# retried this many times in all, sleeping GET_BACKOFF_S, 2x, 4x ... between tries (botocore's own
# retries cover errors before the body: connection refused, 5xx, throttling).
GET_ATTEMPTS = 4
GET_BACKOFF_S = 0.25
_BODY_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ConnectionClosedError,
                FlexibleChecksumError)
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "502",
                              "503", "504"})
_MISSING_CODES = frozenset({"NoSuchKey", "404"})


class _Transient(Exception):
    """One GET of an image failed in a way a retry may fix."""


class _ImageFailure(Exception):
    """This image cannot be read; the others go on (`retryable`: it kept failing in transit)."""

    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


def get_image(store: Store, key: str, sha256: str | None) -> tuple[bytes, int]:
    """(bytes of one image, retries it took), its sha256 checked against the ingest manifest's.

    A truncated, reset or checksum-failing body (or a sha256 mismatch) is retried up to GET_ATTEMPTS
    times with exponential backoff; then _ImageFailure. A missing object is an _ImageFailure at once; S3
    unreachable or access denied stays an AnswersheetError (the whole stage fails: every image would).
    """
    reason = ""
    for attempt in range(GET_ATTEMPTS):
        if attempt:
            time.sleep(GET_BACKOFF_S * 2 ** (attempt - 1))
        try:
            data = _get_once(store, key)
        except _Transient as exc:
            reason = str(exc)
            continue
        actual = sha256_bytes(data)
        if not sha256 or actual == sha256:
            return data, attempt
        reason = f"content changed since ingest (sha256 {actual}, manifest {sha256})"
    raise _ImageFailure(f"{reason} (after {GET_ATTEMPTS} reads)", retryable=not reason.startswith("content"))


def _get_once(store: Store, key: str) -> bytes:
    try:
        return store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    except _BODY_ERRORS as exc:  # the type only: some botocore messages carry the endpoint URL
        detail = f": {exc}" if isinstance(exc, IncompleteReadError) else ""
        raise _Transient(f"read failed in transit ({type(exc).__name__}{detail})") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in _MISSING_CODES:
            raise _ImageFailure(f"missing from S3 ({code}): deleted since ingest?") from None
        if code in _TRANSIENT_CODES:
            raise _Transient(f"read failed: {code}") from None
        raise store._error(key, exc, "read") from None
    except BotoCoreError as exc:
        raise store._error(key, exc, "read") from None


def _one_line(exc: BaseException) -> str:
    """`Type: message` on one line, short: OpenCV's assertion texts span lines and name source files."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def shard_images(ingest: dict, shard_index: int, shard_count: int) -> tuple[list[dict], list[dict]]:
    """(all selected images sorted by name, this shard's images): image i goes to shard i % shard_count."""
    selected = sorted((img for img in ingest.get("images", []) if img.get("selected")), key=lambda i: i["name"])
    return selected, selected[shard_index::shard_count]


@dataclass
class ShardRun:
    """One shard's pass through the pipeline: results, outputs and the (adaptive) batch size."""

    store: Store
    backend: Backend
    settings: DetectSettings
    layout: DayLayout  # label keys: layout.detect_label(ImageName), like every other stage's keys
    batch_size: int
    imgsz: int
    progress: Progress
    outputs: dict[str, str] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)  # image name -> extra GETs it took
    keys: dict[str, str] = field(default_factory=dict)  # image name -> object key
    classes: RoadClasses | None = None
    records: list[dict] = field(default_factory=list)  # predictions lines
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- readers ----------------------------------------------------------------------------------
    def read(self, image: dict) -> Prepared | Failure:
        """GET (retried, sha256-checked against the ingest manifest), decode and letterbox one image.

        Whatever goes wrong with this one image becomes a Failure; only S3 errors that every image
        would hit (unreachable, denied) end the stage.
        """
        name, key = image["name"], image["key"]
        try:
            data, retries = get_image(self.store, key, image.get("sha256"))
        except _ImageFailure as exc:
            if exc.retryable:
                self._count_retries(name, GET_ATTEMPTS - 1)
            return Failure(name, key, str(exc), retryable=exc.retryable)
        if retries:
            self._count_retries(name, retries)
            log.info("detect: %s read correctly after %d retr%s", self.store.uri(key), retries,
                     "y" if retries == 1 else "ies")
        try:
            if self.settings.slices:
                from answersheet.detector.slicing import prepare_sliced

                return prepare_sliced(name, data, self.imgsz, self.backend.stride, self.settings.slices)
            return prepare(name, data, self.imgsz, self.backend.stride)
        except BadImage as exc:
            return Failure(name, key, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd image must not end the day (OpenCV, numpy, memory)
            return Failure(name, key, f"decode/letterbox failed: {_one_line(exc)}")

    def _count_retries(self, name: str, n: int) -> None:
        with self.lock:
            self.retries[name] = self.retries.get(name, 0) + n

    # -- inference --------------------------------------------------------------------------------
    def infer(self, batch: list[Prepared]) -> list[tuple[list, list[np.ndarray]]]:
        """Run same-shape images in chunks of the current batch size; halve it on out-of-memory.

        Returns per chunk (image metadata, candidate rows): no pixels or raw predictions are kept.
        """
        assert self.classes is not None  # set with the model, before the first batch
        out, i = [], 0
        while i < len(batch):
            chunk = batch[i : i + self.batch_size]
            try:
                pred = self.backend.infer(np.stack([p.chw for p in chunk]))
                cands = candidates(pred, self.classes.min_conf)
                tiles = [candidates(self.backend.infer(p.tiles), self.classes.min_conf)
                         if getattr(p, "tiles", None) is not None else [] for p in chunk]  # one batch per image
            except BatchTooLarge as exc:
                if len(chunk) == 1:
                    raise AnswersheetError(f"detect: out of memory even for a single image ({exc})") from None
                with self.lock:
                    self.batch_size = min(self.batch_size, max(1, len(chunk) // 2))
                log.warning("detect: %s — retrying with batches of %d", exc, self.batch_size)
                continue
            except Exception as exc:  # noqa: BLE001 - find the image that fails; the rest of the batch goes on
                out.extend(self._infer_one_by_one(chunk, exc))
                i += len(chunk)
                continue
            del pred
            out.append(([(p.name, p.shape0, p.shape1, getattr(p, "tile_boxes", []),
                          p.tiles.shape[2:] if len(t) else None, t) for p, t in zip(chunk, tiles, strict=True)],
                        cands))
            i += len(chunk)
        return out

    def _infer_one_by_one(self, chunk: list[Prepared], exc: Exception) -> list[tuple[list, list[np.ndarray]]]:
        """After a batch failed: each of its images alone; an image that fails alone goes to `failed`."""
        if len(chunk) == 1:
            p = chunk[0]
            self.fail(Failure(p.name, self.keys.get(p.name, ""), f"inference failed: {_one_line(exc)}"))
            return []
        log.warning("detect: a batch of %d failed (%s): running its images one by one", len(chunk), _one_line(exc))
        return [done for p in chunk for done in self.infer([p])]

    # -- writers ----------------------------------------------------------------------------------
    def finish(self, images: list[tuple], cands: list[np.ndarray]) -> None:
        """NMS, label text and PUT for one inferred chunk (runs on a writer thread).

        `images` holds (name, original shape, letterboxed shape, tile boxes, letterboxed tile shape, tile
        candidates); `cands` the full frames' rows above the lowest threshold.
        """
        assert self.classes is not None  # set with the model, before the first batch
        for (name, shape0, shape1, *tiles), rows in zip(images, cands, strict=True):
            try:
                det = detections(rows, shape1, shape0, self.classes, self.settings, *tiles)
                boxes = image_boxes(name, det, shape0, self.classes.names)
            except Exception as exc:  # noqa: BLE001 - one image's post-processing must not end the day
                self.fail(Failure(name, self.keys.get(name, ""), f"NMS/labels failed: {_one_line(exc)}"))
                continue
            text, classes = boxes.text, boxes.classes
            key = None
            if text:
                key = self.layout.detect_label(ImageName.parse(name))
                digest = self.store.put(key, text.encode(), "text/plain")
            per_class = {str(c): n for c, n in sorted(Counter(classes).items())}
            with self.lock:
                if key:
                    self.outputs[key] = digest
                self.images[name] = {"label": key, "boxes": len(classes), "per_class": per_class}
                self.records.append(boxes.record)
            self.progress.advance()

    def fail(self, failure: Failure) -> None:
        log.warning("detect: skipping %s: %s", self.store.uri(failure.key), printable(failure.reason))
        with self.lock:
            self.failed.append(failure.entry())
        self.progress.advance()

    # -- the pipeline -----------------------------------------------------------------------------
    def run(self, images: list[dict], readers: int, streams: int) -> None:
        """Stream `images` through read -> batch -> infer -> write with bounded queues.

        readers: threads that GET + decode + letterbox; streams: concurrent inference calls.
        """
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the reader threads; OpenCV's own pool would compete
        read_ahead = max(2 * readers, 2 * self.batch_size)
        max_buffered = 2 * self.batch_size  # decoded images waiting for a full same-shape batch
        reads: deque[Future] = deque()
        inferring: deque[Future] = deque()
        writes: deque[Future] = deque()
        source = iter(images)
        self.keys.update((image["name"], image["key"]) for image in images)

        with ThreadPoolExecutor(readers, thread_name_prefix="detect-read") as read_pool, \
                ThreadPoolExecutor(streams, thread_name_prefix="detect-infer") as infer_pool, \
                ThreadPoolExecutor(WRITERS, thread_name_prefix="detect-write") as write_pool:

            def refill() -> None:
                while len(reads) < read_ahead:
                    image = next(source, None)
                    if image is None:
                        return
                    reads.append(read_pool.submit(self.read, image))

            def drain(max_inferring: int) -> None:
                while len(inferring) > max_inferring or (inferring and inferring[0].done()):
                    for meta, cands in inferring.popleft().result():
                        writes.append(write_pool.submit(self.finish, meta, cands))
                while len(writes) > 4 * WRITERS or (writes and writes[0].done()):
                    writes.popleft().result()

            def submit(batch: list[Prepared]) -> None:
                inferring.append(infer_pool.submit(self.infer, batch))
                drain(streams)

            try:
                buckets: dict[tuple[int, int], list[Prepared]] = {}
                trimmed = 0
                refill()
                while reads:
                    item = reads.popleft().result()
                    refill()
                    if isinstance(item, Failure):
                        self.fail(item)
                        continue
                    trimmed += 1
                    if trimmed % TRIM_EVERY == 0:
                        release_free_memory()
                    bucket = buckets.setdefault(item.shape1, [])
                    bucket.append(item)
                    if len(bucket) >= self.batch_size:
                        submit(buckets.pop(item.shape1))
                    elif sum(len(b) for b in buckets.values()) > max_buffered:
                        submit(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
                    drain(streams)
                for shape in list(buckets):
                    submit(buckets.pop(shape))
                drain(0)
                while writes:
                    writes.popleft().result()
            except BaseException:
                for fut in (*reads, *inferring, *writes):
                    fut.cancel()
                raise


def detect_day(
    rd: RoadDay, shard_index: int = 0, shard_count: int | None = None, backend: str | None = None,
    device: str | None = None, batch_size: int | None = None,
) -> dict:
    """Detect objects in this shard's selected images; write labels and the shard's manifest."""
    limit_malloc_arenas()  # before ONNX Runtime and the pipeline start their threads
    settings, store, layout = rd.road.detect, rd.store, rd.layout
    shard_count = shard_count or settings.shards
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise AnswersheetError(f"--shard-index {shard_index} / --shard-count {shard_count}: "
                               "need 0 <= shard index < shard count")
    backend = backend or settings.backend
    if backend not in BACKENDS:
        raise AnswersheetError(f"--backend {backend!r}: must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    batch_size = batch_size or settings.batch_size
    if batch_size < 1:
        raise AnswersheetError(f"--batch-size {batch_size}: must be >= 1")
    key = layout.detect_manifest(shard_index, shard_count)
    ingest = stage.read_upstream(rd, layout.ingest_manifest, "ingest")
    selected, mine = shard_images(ingest, shard_index, shard_count)

    backend, device = resolve_backend(backend, device or settings.device)
    if not device.startswith("cuda"):
        batch_size = min(batch_size, CPU_MAX_BATCH)
    model_digest = [settings.sha256, (settings.onnx_sha256 or export_settings_hash(settings.imgsz))
                    if backend != "torch" else None]
    engine_id = backend
    if backend == "openvino":  # its precision depends on the CPU (bf16 where native): part of the output
        from answersheet.detector.openvino_backend import default_precision

        engine_id = f"openvino-{default_precision()}"
    digest = manifest.inputs_digest(STAGE, ingest["outputs_digest"], rd.road.digest(STAGE), model_digest,
                                    shard_index, shard_count, engine_id, device.split(":")[0])

    def retry_failed_reads(existing: dict) -> bool:
        if any(f.get("retryable") for f in existing.get("failed", [])):
            log.info("detect: %s lists images whose reads kept failing in transit: redoing the shard", store.uri(key))
            return True
        return False

    @contextmanager
    def engine_ready() -> Iterator[tuple[Backend, dict[str, Any], Any, int]]:
        """The model loaded and checked against the road's classes: before the manifest is deleted."""
        with tempfile.TemporaryDirectory(prefix="answersheet-detect-") as scratch:
            engine, lineage = open_backend(settings, backend, device, scratch, store)
            classes = resolve_classes(rd.road.id, rd.road.classes, settings, engine.names,
                                      settings.onnx if backend != "torch" and settings.onnx else settings.weights)
            imgsz = check_imgsz(settings.imgsz, engine.stride)
            log.info("detect: shard %d/%d: %d of %d selected image(s); backend %s on %s (%s), batch %d, imgsz %d",
                     shard_index, shard_count, len(mine), len(selected), backend, device,
                     ",".join(lineage["providers"]), batch_size, imgsz)
            yield engine, lineage, classes, imgsz

    def work(ready: tuple[Backend, dict[str, Any], Any, int]) -> stage.StageResult:
        engine, lineage, classes, imgsz = ready
        progress = Progress(f"detect shard {shard_index}/{shard_count}", len(mine))
        run = ShardRun(store=store, backend=engine, settings=settings, layout=layout,
                       batch_size=batch_size, imgsz=imgsz, progress=progress, classes=classes)
        cuda = device.startswith("cuda")
        readers = READERS or (min(16, 2 * CPUS) if cuda else 2)
        run.run(mine, readers, streams=engine.streams)
        progress.finish()

        predictions_key = layout.detect_predictions(shard_index, shard_count)
        run.outputs[predictions_key] = store.put(predictions_key, predictions_jsonl(run.records),
                                                 "application/x-ndjson")
        counts = {
            "images": len(mine),
            "labelled": sum(1 for r in run.images.values() if r["label"]),
            "empty": sum(1 for r in run.images.values() if not r["label"]),
            "boxes": sum(r["boxes"] for r in run.images.values()),
            "failed": len(run.failed),
            "retries": sum(run.retries.values()),  # extra GETs of images whose body was cut short or corrupt
        }
        model = {**lineage, **settings.settings(), "imgsz": imgsz, "batch_size": run.batch_size,
                 "classes": list(classes.names), "predictions": predictions_key}
        if run.failed:
            log.warning("detect: %d image(s) failed (listed in the manifest), e.g. %s: %s",
                        len(run.failed), run.failed[0]["name"], run.failed[0]["reason"])
        return stage.StageResult(run.outputs, counts, records=dict(
            shard=shard_index, shards=shard_count, model=model, images=dict(sorted(run.images.items())),
            failed=sorted(run.failed, key=lambda f: f["name"]), retries=dict(sorted(run.retries.items()))))

    def clean(outputs: dict[str, str]) -> int:
        return _delete_stale_labels(store, layout, outputs, mine, selected, owns_orphans=shard_index == 0)

    this = stage.Stage(STAGE, key, digest, upstream={layout.ingest_manifest: ingest}, clean=clean,
                       redo=retry_failed_reads, setup=engine_ready,
                       summary={"shard": shard_index, "shards": shard_count})
    return stage.run(rd, this, work)


def _delete_stale_labels(store: Store, layout: DayLayout, keep: dict[str, str], mine: list[dict],
                         selected: list[dict], owns_orphans: bool) -> int:
    """Remove label files of this shard's images that this run did not write (and, for shard 0,
    labels of images that are no longer selected at all)."""
    def label(image: dict) -> str:
        return layout.detect_label(ImageName.in_set(image["set_id"], image["camera"]))

    mine_labels, selected_labels = {label(i) for i in mine}, {label(i) for i in selected}
    stale = []
    for obj in store.list(layout.detect_labels):
        if obj.key in keep or not obj.key.endswith(LABEL_SUFFIX):
            continue
        if obj.key in mine_labels or (owns_orphans and obj.key not in selected_labels):
            stale.append(obj.key)
    if stale:
        log.info("detect: removing %d stale label(s) under %s", len(stale), store.uri(layout.detect_labels))
        store.delete(stale)
    return len(stale)
