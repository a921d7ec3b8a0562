"""Roads file: load, merge `defaults` into each road, validate with errors that name the road and key.

The stage code owns every section except `schedule` and `kubernetes`, which the DAG factory
(`dags/answersheet_factory.py`) validates; here they only have to be mappings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from answersheet.errors import ConfigError

DEFAULT_CAMERAS = ("front", "rear", "left", "right", "side1", "side2")
SHORT_SET_POLICIES = ("fill", "flag", "fail")
BACKENDS = ("auto", "torch", "onnx")
ROAD_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]*[a-z0-9]$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Every key a road may have. The DAG factory keeps the same list (tests/test_contract.py checks).
ROAD_KEYS = (
    "id", "name", "bucket", "cameras", "classes", "short_set_policy",
    "ingest", "detect", "schedule", "kubernetes", "unlabelled_labels", "sheet",
)
UNLABELLED_LABELS = ("none", "empty")
SHEET_KEYS = ("image_urls", "presign_expiry_s", "drift_days", "report_samples")
IMAGE_URLS = ("s3", "presigned")
INGEST_KEYS = ("max_member_bytes", "max_total_bytes", "max_ratio", "max_members", "workers")
DETECT_KEYS = (
    "cameras", "weights", "sha256", "onnx", "onnx_sha256", "backend", "device", "conf_thres",
    "iou_thres", "imgsz", "max_det", "batch_size", "shards", "class_map", "class_conf_thres", "slices",
    "agnostic_nms",
)
SLICE_KEYS = ("size", "overlap", "imgsz", "merge", "match_metric", "match_threshold")
SLICE_MERGES = ("greedy_nmm", "nms")
SLICE_METRICS = ("ios", "iou")


@dataclass(frozen=True)
class SliceSettings:
    """Sliced inference (SAHI's idea): tiles of `size` px (width, height) overlapping by `overlap` of the
    tile, each letterboxed to `imgsz`, plus the whole frame at detect.imgsz (the near, large vehicles that
    no tile holds whole); the views' boxes are merged per class by `merge` (`greedy_nmm`: the union of
    boxes whose `match_metric` >= `match_threshold`, SAHI's default; or `nms`)."""

    size: tuple[int, int] = (640, 640)
    overlap: float = 0.2
    imgsz: int = 640
    merge: str = "greedy_nmm"
    match_metric: str = "ios"
    match_threshold: float = 0.5


@dataclass(frozen=True)
class IngestLimits:
    """Zip-safety limits and upload concurrency for ingest."""

    max_member_bytes: int = 50 * 1024 * 1024
    max_total_bytes: int = 20 * 1024 * 1024 * 1024
    max_ratio: float = 100.0
    max_members: int = 200_000
    workers: int = 16


@dataclass(frozen=True)
class DetectSettings:
    """Which cameras go through the detector, and how."""

    cameras: tuple[str, ...]
    weights: str
    sha256: str
    onnx: str | None = None
    onnx_sha256: str | None = None
    backend: str = "auto"
    device: str = "auto"
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    imgsz: int = 640
    max_det: int = 1000
    batch_size: int = 16
    shards: int = 1
    # model class name -> road class name (None: dropped); None = identity (the model's classes as they are)
    class_map: tuple[tuple[str, str | None], ...] | None = None
    class_conf_thres: tuple[tuple[str, float], ...] = ()  # road class name -> its own confidence threshold
    slices: SliceSettings | None = None
    agnostic_nms: tuple[str, ...] = ()  # road classes that suppress one another in NMS (one vehicle, one box)

    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the boxes, as JSON (the model block of the manifests)."""
        return {
            "imgsz": self.imgsz, "conf_thres": self.conf_thres, "iou_thres": self.iou_thres, "max_det": self.max_det,
            "class_map": "identity" if self.class_map is None else dict(self.class_map),
            "class_conf_thres": dict(self.class_conf_thres), "agnostic_nms": list(self.agnostic_nms),
            "slices": None if self.slices is None else {**asdict(self.slices), "size": list(self.slices.size)},
            "tta": False,  # horizontal-flip TTA is not built (BENCHMARKS.md "Accuracy")
        }


DETECT_DEFAULTS = {f.name: f.default for f in fields(DetectSettings) if f.default is not MISSING}


@dataclass(frozen=True)
class SheetSettings:
    """How the answer sheet is published: image URLs of the Label Studio tasks, drift history, report size."""

    image_urls: str = "s3"  # s3:// URIs (Label Studio resolves them through a connected S3 storage) | presigned
    presign_expiry_s: int = 7 * 24 * 3600  # presigned URL lifetime (S3's SigV4 maximum is 7 days)
    drift_days: int = 5  # compare each camera with the road's last N published days
    report_samples: int = 6  # images per report sample section


@dataclass(frozen=True)
class RoadConfig:
    """One road, defaults merged in and validated."""

    id: str
    name: str
    bucket: str
    cameras: tuple[str, ...]
    classes: tuple[str, ...]
    short_set_policy: str
    ingest: IngestLimits
    detect: DetectSettings
    schedule: dict[str, Any] = field(default_factory=dict)
    kubernetes: dict[str, Any] = field(default_factory=dict)
    unlabelled_labels: str = "none"  # none: no label file for images not sent to the detector | empty
    sheet: SheetSettings = field(default_factory=SheetSettings)

    @property
    def timezone(self) -> str:
        """The road's IANA time zone (schedule.timezone): capture times in the datasheet carry its offset."""
        return str(self.schedule.get("timezone") or "UTC")

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings that change `stage`'s own output — and nothing else, so that changing
        `detect.conf_thres` redoes detect and what follows but never ingest.

        Left out on purpose: worker counts, batch size, device, shard count (performance only; the
        backend, device type and shard layout are part of detect's digest where it computes them),
        weight/ONNX *paths* (the sha256 is the model's identity), schedule and kubernetes.
        """
        d = self.detect
        scopes: dict[str, dict[str, Any]] = {
            # image names, which members are accepted, and the selected-for-detection flags
            "ingest": {"id": self.id, "cameras": self.cameras, "selected": d.cameras,
                       "limits": {k: v for k, v in self.ingest.__dict__.items() if k != "workers"}},
            "detect": {"cameras": d.cameras, "sha256": d.sha256, "onnx_sha256": d.onnx_sha256,
                       "conf_thres": d.conf_thres, "iou_thres": d.iou_thres, "imgsz": d.imgsz,
                       "max_det": d.max_det, "n_classes": len(self.classes),
                       # road classes: which boxes exist, their ids and thresholds, how views merge
                       "classes": self.classes, "class_map": d.class_map, "class_conf_thres": d.class_conf_thres,
                       "agnostic_nms": d.agnostic_nms, "slices": asdict(d.slices) if d.slices else None},
            # set completeness, placeholders, the selected flag and notes of missing cameras
            "preprocess": {"id": self.id, "cameras": self.cameras, "short_set_policy": self.short_set_policy,
                           "selected": d.cameras, "unlabelled_labels": self.unlabelled_labels},
            # classes.txt, the datasheet's columns and road columns, the report's title; capture-time offsets,
            # task image URLs, drift history, report samples; review priority (thresholds)
            "datasheet": {"id": self.id, "name": self.name, "classes": self.classes, "timezone": self.timezone,
                          "sheet": self.sheet.__dict__, "unlabelled_labels": self.unlabelled_labels,
                          "conf_thres": d.conf_thres, "class_conf_thres": d.class_conf_thres},
        }
        if stage not in scopes:
            raise ValueError(f"unknown stage {stage!r}")
        return scopes[stage]

    def digest(self, stage: str | None = None) -> str:
        """sha256 of the settings that change `stage`'s output (see stage_settings); without a stage,
        of everything that changes any stage's output (recorded as the answer sheet's config digest)."""
        if stage is None:
            body: dict[str, Any] = {
                "id": self.id, "name": self.name, "cameras": self.cameras, "classes": self.classes,
                "short_set_policy": self.short_set_policy, "detect": asdict(self.detect),
                "unlabelled_labels": self.unlabelled_labels, "sheet": self.sheet.__dict__,
                "timezone": self.timezone,
            }
        else:
            body = {"stage": stage, **self.stage_settings(stage)}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()


def deep_merge(base: dict, over: dict) -> dict:
    """Return base updated by over, recursing into mappings (as helm merges values)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_text(p: Path) -> str:
    """The roads file as text; every way it can be unreadable is one line naming the file."""
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: roads file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a roads file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the roads file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{p}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save the roads file as UTF-8") from None


def _yaml_error(p: Path, exc: yaml.YAMLError) -> ConfigError:
    """PyYAML's multi-line message as one line: file, line, column, problem."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(x for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
    return ConfigError(f"{p}: {where}not valid YAML: {_one_line(problem or exc)}")


def read_roads_file(path: str | Path) -> list[dict]:
    """Parse the roads file and return each road's raw mapping with `defaults` merged in."""
    p = Path(path)
    text = _read_text(p)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(p, exc) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("roads"), list):
        raise ConfigError(f"{p}: expected a mapping with a 'roads' list")
    unknown = set(doc) - {"defaults", "roads"}
    if unknown:
        raise ConfigError(f"{p}: unknown top-level key(s) {sorted(unknown)} (allowed: defaults, roads)")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{p}: 'defaults' must be a mapping")
    roads = []
    for i, road in enumerate(doc["roads"]):
        if not isinstance(road, dict):
            raise ConfigError(f"{p}: roads[{i}] must be a mapping")
        roads.append(deep_merge(defaults, road))
    return roads


def _fail(road: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"road {road!r}: key {key!r}: {problem}")


def _check_keys(road: str, where: str, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise _fail(road, f"{where}{key}", f"unknown key (allowed: {', '.join(allowed)})")


def _number(road: str, key: str, value: Any, kind: type, low: float, high: float):
    """A finite number in [low, high]: `.nan` compares false with every bound and `.inf` passes any
    lower bound, so without the isfinite check `conf_thres: .nan` would publish a sheet with no boxes
    and `max_ratio: .inf` would switch the zip-bomb guard off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _fail(road, key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise _fail(road, key, f"must be a finite number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise _fail(road, key, f"must be in [{low:g}, {high:g}], got {value!r}")
    return kind(value)


def _str_list(road: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(road, key, f"must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(road, key, "has duplicates")
    return tuple(value)


def validate_road(raw: dict) -> RoadConfig:
    """Validate one merged road mapping; raise ConfigError naming the road and key."""
    road = raw.get("id")
    if not isinstance(road, str) or not ROAD_ID_RE.match(road):
        raise ConfigError(f"road {road!r}: key 'id': must match {ROAD_ID_RE.pattern}")
    _check_keys(road, "", raw, ROAD_KEYS)
    name = raw.get("name", road)
    if not isinstance(name, str) or not name:
        raise _fail(road, "name", "must be a non-empty string")
    bucket = raw.get("bucket", "answersheet")
    if not isinstance(bucket, str) or not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        raise _fail(road, "bucket", f"not a valid S3 bucket name: {bucket!r}")
    cameras = _str_list(road, "cameras", raw.get("cameras", list(DEFAULT_CAMERAS)))
    for cam in cameras:
        if "_" in cam or not re.match(r"^[a-z0-9]+$", cam):
            raise _fail(road, "cameras", f"camera name {cam!r} must be lowercase letters/digits, no '_'")
    classes = _str_list(road, "classes", raw.get("classes"))
    policy = raw.get("short_set_policy", "fill")
    if policy not in SHORT_SET_POLICIES:
        raise _fail(road, "short_set_policy", f"must be one of {SHORT_SET_POLICIES}, got {policy!r}")

    ing = raw.get("ingest") or {}
    if not isinstance(ing, dict):
        raise _fail(road, "ingest", "must be a mapping")
    _check_keys(road, "ingest.", ing, INGEST_KEYS)
    base = IngestLimits()

    def limit(key: str, kind: type, low: float, high: float):
        return _number(road, f"ingest.{key}", ing.get(key, getattr(base, key)), kind, low, high)

    limits = IngestLimits(
        max_member_bytes=limit("max_member_bytes", int, 1, 2**40),
        max_total_bytes=limit("max_total_bytes", int, 1, 2**50),
        max_ratio=limit("max_ratio", float, 1, 1e6),
        max_members=limit("max_members", int, 1, 10**8),
        workers=limit("workers", int, 1, 256),
    )

    det = raw.get("detect")
    if not isinstance(det, dict):
        raise _fail(road, "detect", "must be a mapping")
    _check_keys(road, "detect.", det, DETECT_KEYS)
    dcams = det.get("cameras", ["side1", "side2"])
    dcams = cameras if dcams == "all" else _str_list(road, "detect.cameras", dcams)
    for cam in dcams:
        if cam not in cameras:
            raise _fail(road, "detect.cameras", f"{cam!r} is not one of the road's cameras {list(cameras)}")
    weights = det.get("weights")
    if not isinstance(weights, str) or not weights:
        raise _fail(road, "detect.weights", "must be a local path or s3:// URI")
    for key in ("sha256", "onnx_sha256"):
        val = det.get(key)
        if (key == "sha256" or val is not None) and not (isinstance(val, str) and SHA256_RE.match(val)):
            raise _fail(road, f"detect.{key}", "must be 64 lowercase hex digits")
    onnx = det.get("onnx")
    if onnx is not None and (not isinstance(onnx, str) or not det.get("onnx_sha256")):
        raise _fail(road, "detect.onnx", "must be a path/URI and needs detect.onnx_sha256")
    backend = det.get("backend", DETECT_DEFAULTS["backend"])
    if backend not in BACKENDS:
        raise _fail(road, "detect.backend", f"must be one of {BACKENDS}, got {backend!r}")
    device = det.get("device", DETECT_DEFAULTS["device"])
    if not isinstance(device, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device):
        raise _fail(road, "detect.device", f"must be auto, cpu or cuda[:N], got {device!r}")

    def number(key: str, kind: type, low: float, high: float):  # DetectSettings holds the defaults
        return _number(road, f"detect.{key}", det.get(key, DETECT_DEFAULTS[key]), kind, low, high)

    detect = DetectSettings(
        cameras=tuple(dcams), weights=weights, sha256=det["sha256"], onnx=onnx,
        onnx_sha256=det.get("onnx_sha256"), backend=backend, device=device,
        conf_thres=number("conf_thres", float, 0, 1),
        iou_thres=number("iou_thres", float, 0, 1),
        imgsz=number("imgsz", int, 32, 8192),
        max_det=number("max_det", int, 1, 100_000),
        batch_size=number("batch_size", int, 1, 1024),
        shards=number("shards", int, 1, 256),
    )
    if detect.imgsz % 32:
        raise _fail(road, "detect.imgsz", f"must be a multiple of 32, got {detect.imgsz}")
    detect = replace(detect, class_map=_class_map(road, det.get("class_map", "identity"), classes),
                     class_conf_thres=_class_conf(road, det.get("class_conf_thres"), classes),
                     slices=_slices(road, det.get("slices")),
                     agnostic_nms=_agnostic(road, det.get("agnostic_nms"), classes))
    for key in ("schedule", "kubernetes"):
        if not isinstance(raw.get(key, {}), dict):
            raise _fail(road, key, "must be a mapping")
    return RoadConfig(
        id=road, name=name, bucket=bucket, cameras=cameras, classes=classes,
        short_set_policy=policy, ingest=limits, detect=detect,
        schedule=dict(raw.get("schedule") or {}), kubernetes=dict(raw.get("kubernetes") or {}),
        unlabelled_labels=_unlabelled_labels(road, raw), sheet=_sheet_settings(road, raw),
    )


def _unlabelled_labels(road: str, raw: dict) -> str:
    value = raw.get("unlabelled_labels", "none")
    if value not in UNLABELLED_LABELS:
        raise _fail(road, "unlabelled_labels", f"must be one of {UNLABELLED_LABELS}, got {value!r}")
    return value


def _sheet_settings(road: str, raw: dict) -> SheetSettings:
    """The `sheet:` section (image URLs in the Label Studio tasks, drift history, report sample size)."""
    sheet = raw.get("sheet") or {}
    if not isinstance(sheet, dict):
        raise _fail(road, "sheet", "must be a mapping")
    _check_keys(road, "sheet.", sheet, SHEET_KEYS)
    base = SheetSettings()
    urls = sheet.get("image_urls", base.image_urls)
    if urls not in IMAGE_URLS:
        raise _fail(road, "sheet.image_urls", f"must be one of {IMAGE_URLS}, got {urls!r}")
    tz = raw.get("schedule", {}).get("timezone") if isinstance(raw.get("schedule"), dict) else None
    if tz is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise _fail(road, "schedule.timezone", f"unknown time zone {tz!r}") from None
    return SheetSettings(
        image_urls=urls,
        presign_expiry_s=_number(road, "sheet.presign_expiry_s", sheet.get("presign_expiry_s", base.presign_expiry_s),
                                 int, 60, 7 * 24 * 3600),
        drift_days=_number(road, "sheet.drift_days", sheet.get("drift_days", base.drift_days), int, 0, 60),
        report_samples=_number(road, "sheet.report_samples", sheet.get("report_samples", base.report_samples),
                               int, 1, 100),
    )


def _class_map(road: str, value: Any, classes: tuple[str, ...]) -> tuple[tuple[str, str | None], ...] | None:
    """`identity` (None) or {model class name: road class name or null}. The model's names are checked
    when detect loads the model (inference.resolve_class_map); the road's names here."""
    key = "detect.class_map"
    if value == "identity" or value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise _fail(road, key, f"must be `identity` or a mapping model class -> road class (or null), got {value!r}")
    for src, dst in value.items():
        if not isinstance(src, str) or not src:
            raise _fail(road, key, f"model class names must be strings, got {src!r}")
        if dst is not None and dst not in classes:
            raise _fail(road, key, f"{src!r} -> {dst!r}: {dst!r} is not one of the road's classes {list(classes)}")
    return tuple(sorted((str(k), v) for k, v in value.items()))  # a mapping: key order must not change digests


def _class_conf(road: str, value: Any, classes: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    key = "detect.class_conf_thres"
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _fail(road, key, f"must be a mapping road class -> confidence threshold, got {value!r}")
    out = []
    for name, thr in value.items():
        if name not in classes:
            raise _fail(road, key, f"{name!r} is not one of the road's classes {list(classes)}")
        out.append((name, _number(road, f"{key}.{name}", thr, float, 0, 1)))
    return tuple(sorted(out))  # a mapping: key order (e.g. after Helm's YAML round trip) must not change digests


def _agnostic(road: str, value: Any, classes: tuple[str, ...]) -> tuple[str, ...]:
    if value is None or value == []:
        return ()
    names = _str_list(road, "detect.agnostic_nms", value)
    for name in names:
        if name not in classes:
            raise _fail(road, "detect.agnostic_nms", f"{name!r} is not one of the road's classes {list(classes)}")
    return names


def _slices(road: str, value: Any) -> SliceSettings | None:
    key = "detect.slices"
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise _fail(road, key, f"must be a mapping ({', '.join(SLICE_KEYS)}) or null, got {value!r}")
    _check_keys(road, f"{key}.", value, SLICE_KEYS)
    base = SliceSettings()
    size = value.get("size", list(base.size))
    size = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(size, list) or len(size) != 2:
        raise _fail(road, f"{key}.size", f"must be a tile size in pixels or [width, height], got {size!r}")
    size = tuple(_number(road, f"{key}.size", v, int, 32, 8192) for v in size)
    imgsz = _number(road, f"{key}.imgsz", value.get("imgsz", base.imgsz), int, 32, 8192)
    if imgsz % 32:
        raise _fail(road, f"{key}.imgsz", f"must be a multiple of 32, got {imgsz}")
    merge, metric = value.get("merge", base.merge), value.get("match_metric", base.match_metric)
    if merge not in SLICE_MERGES:
        raise _fail(road, f"{key}.merge", f"must be one of {SLICE_MERGES}, got {merge!r}")
    if metric not in SLICE_METRICS:
        raise _fail(road, f"{key}.match_metric", f"must be one of {SLICE_METRICS}, got {metric!r}")
    return SliceSettings(
        size=size, overlap=_number(road, f"{key}.overlap", value.get("overlap", base.overlap), float, 0, 0.9),
        imgsz=imgsz, merge=merge, match_metric=metric,
        match_threshold=_number(road, f"{key}.match_threshold", value.get("match_threshold", base.match_threshold),
                                float, 0.01, 1),
    )


def load_road(path: str | Path, road_id: str) -> RoadConfig:
    """Load and validate one road from the roads file (other roads are not validated)."""
    roads = read_roads_file(path)
    matches = [r for r in roads if r.get("id") == road_id]
    if not matches:
        ids = [r.get("id") for r in roads]
        raise ConfigError(f"{path}: road {road_id!r} not found (roads: {ids})")
    if len(matches) > 1:
        raise ConfigError(f"{path}: road {road_id!r} defined {len(matches)} times")
    try:
        return validate_road(matches[0])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
