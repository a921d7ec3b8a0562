"""Where a road-day's objects live in the bucket (the storage contract documented in the README)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from answersheet.naming import ImageName

# Inside the answer sheet (paths relative to its root: the datasheet, exports and report refer to each other
# by these, so a pulled sheet resolves them next to the CSV).
SHEET_IMAGES = "images/"
SHEET_LABELS = "labels/"
LABEL_SUFFIX = ".txt"


def label_file(name: ImageName) -> str:
    """A label file's name: the image's stem + `.txt` (YOLO pairs them by stem)."""
    return f"{name.stem}{LABEL_SUFFIX}"


def sheet_image(name: ImageName) -> str:
    """An image's path in the answer sheet."""
    return f"{SHEET_IMAGES}{name.filename}"


def sheet_label(name: ImageName) -> str:
    """An image's label file's path in the answer sheet."""
    return f"{SHEET_LABELS}{label_file(name)}"


def report_image(kind: str, name: ImageName) -> str:
    """A drawn copy of an image for the report (`thumbs` or `full`)."""
    return f"report/{kind}/{name.stem}.jpg"


@dataclass(frozen=True)
class DayLayout:
    """Object keys for one road and one logical date."""

    road: str
    day: dt.date

    @property
    def ymd(self) -> str:
        return self.day.strftime("%Y%m%d")

    # input
    @property
    def raw_prefix(self) -> str:
        return f"raw/{self.road}/{self.ymd}/"

    # intermediate (work) objects, one prefix per stage
    @property
    def work_prefix(self) -> str:
        return f"work/{self.road}/{self.ymd}/"

    @property
    def ingest_images(self) -> str:
        return f"{self.work_prefix}ingest/images/"

    def ingest_image(self, name: ImageName) -> str:
        return f"{self.ingest_images}{name.filename}"

    @property
    def ingest_manifest(self) -> str:
        return f"{self.work_prefix}ingest/manifest.json"

    @property
    def detect_labels(self) -> str:
        return f"{self.work_prefix}detect/labels/"

    def detect_label(self, name: ImageName) -> str:
        return f"{self.detect_labels}{label_file(name)}"

    def detect_manifest(self, shard: int, shards: int) -> str:
        return f"{self.work_prefix}detect/manifest-{shard:03d}-of-{shards:03d}.json"

    def detect_predictions(self, shard: int, shards: int) -> str:
        """One JSON line per image the shard looked at: boxes with confidence, class and source view."""
        return f"{self.work_prefix}detect/predictions-{shard:03d}-of-{shards:03d}.jsonl"

    @property
    def preprocess_labels(self) -> str:
        return f"{self.work_prefix}preprocess/labels/"

    def preprocess_label(self, name: ImageName) -> str:
        """An empty label (the detector looked and found nothing) or a short set's placeholder."""
        return f"{self.preprocess_labels}{label_file(name)}"

    @property
    def preprocess_manifest(self) -> str:
        return f"{self.work_prefix}preprocess/manifest.json"

    # output: the answer sheet
    @property
    def out_prefix(self) -> str:
        return f"answersheet/{self.road}/{self.ymd}/"

    @property
    def out_images(self) -> str:
        return f"{self.out_prefix}{SHEET_IMAGES}"

    @property
    def out_labels(self) -> str:
        return f"{self.out_prefix}{SHEET_LABELS}"

    @property
    def out_manifest(self) -> str:
        return f"{self.out_prefix}manifest.json"

    def out(self, relpath: str) -> str:
        """An answer-sheet object by its path relative to the sheet (`data.yaml`, `report/x.jpg`): the
        datasheet, the exports and the report refer to each other by these relative paths."""
        return f"{self.out_prefix}{relpath}"


def published_manifest(road: str, day: dt.date) -> str:
    """The answer-sheet manifest of another day of the road (drift reads the last published days)."""
    return DayLayout(road, day).out_manifest


# Bucket-wide (not per road-day): ONNX exports of YOLOv5 weights, content-addressed, shared by every road
# and day whose weights have that sha256 (see detector.onnx_export.cached_export).
ONNX_CACHE_PREFIX = "models/.onnx-cache/"


def onnx_cache_key(weights_sha256: str, opset: int, settings_hash: str) -> str:
    """The ONNX export of the weights with this sha256, at this opset and these export settings."""
    return f"{ONNX_CACHE_PREFIX}{weights_sha256}-opset{opset}-{settings_hash}.onnx"


def parse_day(value: str) -> dt.date:
    """The logical date as given on the command line (YYYY-MM-DD, or an ISO timestamp)."""
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        raise ValueError(f"--date must be YYYY-MM-DD, got {value!r}") from None
