"""Roads file: each road's settings as typed objects, validated against roads.schema.json (answersheet.roadsfile,
the one reader the DAGs share) plus the checks a schema cannot express: the detect cameras and class names
must be the road's own. Errors are one line naming the file, the road and the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from answersheet.errors import ConfigError

# ROAD_KEYS and deep_merge are re-exported: bench/, demo and the tests merge roads as the reader does
from answersheet.roadsfile import (  # noqa: F401
    ROAD_KEYS,
    ROAD_SCHEMA,
    RoadsFileError,
    check_road,
    deep_merge,
    read_roads,
    schema_default,
)


def _default(*path: str) -> Any:
    """The schema's `default` of a road key, lists as tuples: roads.schema.json owns every default, the
    dataclasses below only repeat its values by reference."""
    value = schema_default(*path)
    return tuple(value) if isinstance(value, list) else value


DEFAULT_CAMERAS: tuple[str, ...] = _default("cameras")
# the detector backends: the schema's enum for detect.backend is their one definition
BACKENDS: tuple[str, ...] = tuple(ROAD_SCHEMA["properties"]["detect"]["properties"]["backend"]["enum"])


@dataclass(frozen=True)
class SliceSettings:
    """Sliced inference (SAHI's idea): tiles of `size` px (width, height) overlapping by `overlap` of the
    tile, each letterboxed to `imgsz`, plus the whole frame at detect.imgsz (the near, large vehicles that
    no tile holds whole); the views' boxes are merged per class by `merge` (`greedy_nmm`: the union of
    boxes whose `match_metric` >= `match_threshold`, SAHI's default; or `nms`)."""

    size: tuple[int, int] = (_default("detect", "slices", "size"),) * 2
    overlap: float = float(_default("detect", "slices", "overlap"))
    imgsz: int = _default("detect", "slices", "imgsz")
    merge: str = _default("detect", "slices", "merge")
    match_metric: str = _default("detect", "slices", "match_metric")
    match_threshold: float = float(_default("detect", "slices", "match_threshold"))


@dataclass(frozen=True)
class IngestLimits:
    """Zip-safety limits and upload concurrency for ingest."""

    max_member_bytes: int = _default("ingest", "max_member_bytes")  # 50 MiB
    max_total_bytes: int = _default("ingest", "max_total_bytes")  # 20 GiB
    max_ratio: float = float(_default("ingest", "max_ratio"))
    max_members: int = _default("ingest", "max_members")
    workers: int = _default("ingest", "workers")


@dataclass(frozen=True)
class DetectSettings:
    """Which cameras go through the detector, and how."""

    cameras: tuple[str, ...]
    weights: str
    sha256: str
    onnx: str | None = None
    onnx_sha256: str | None = None
    backend: str = _default("detect", "backend")
    device: str = _default("detect", "device")
    conf_thres: float = float(_default("detect", "conf_thres"))
    iou_thres: float = float(_default("detect", "iou_thres"))
    imgsz: int = _default("detect", "imgsz")
    max_det: int = _default("detect", "max_det")
    batch_size: int = _default("detect", "batch_size")
    shards: int = _default("detect", "shards")
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


@dataclass(frozen=True)
class SheetSettings:
    """How the answer sheet is published: image URLs of the Label Studio tasks, drift history, report size."""

    image_urls: str = _default("sheet", "image_urls")  # s3:// URIs (resolved by a Label Studio S3 storage) | presigned
    presign_expiry_s: int = _default("sheet", "presign_expiry_s")  # URL lifetime (SigV4's maximum: 7 days)
    drift_days: int = _default("sheet", "drift_days")  # compare each camera with the road's last N published days
    report_samples: int = _default("sheet", "report_samples")  # images per report sample section


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
    # none: no label file for images not sent to the detector | empty
    unlabelled_labels: str = _default("unlabelled_labels")
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


def read_roads_file(path: str | Path) -> list[dict]:
    """Parse the roads file and return each road's raw mapping with `defaults` merged in."""
    try:
        return read_roads(path)
    except RoadsFileError as exc:
        raise ConfigError(str(exc)) from None


def _in_classes(road: str, key: str, names: Any, classes: tuple[str, ...]) -> None:
    """Road class names used by a detect key must be classes of the road (JSON Schema cannot say so)."""
    for name in names:
        if name not in classes:
            raise ConfigError(f"road {road!r}: key {key!r}: {name!r} is not one of the road's classes {list(classes)}")


def validate_road(raw: dict) -> RoadConfig:
    """Validate one merged road mapping against roads.schema.json, then what the schema cannot express (the
    detect cameras and class names must be the road's own); raise ConfigError naming the road and key."""
    try:
        check_road(raw)
    except RoadsFileError as exc:
        raise ConfigError(str(exc)) from None
    road = raw["id"]
    cameras = tuple(raw.get("cameras", DEFAULT_CAMERAS))
    classes = tuple(raw["classes"])
    det = raw["detect"]
    dcams = det.get("cameras", _default("detect", "cameras"))
    dcams = cameras if dcams == "all" else tuple(dcams)
    for cam in dcams:
        if cam not in cameras:
            raise ConfigError(f"road {road!r}: key 'detect.cameras': {cam!r} is not one of the road's cameras "
                              f"{list(cameras)}")
    class_map = det.get("class_map", "identity")
    class_map = None if class_map in ("identity", None) else class_map
    _in_classes(road, "detect.class_map", [v for v in (class_map or {}).values() if v is not None], classes)
    class_conf = det.get("class_conf_thres") or {}
    _in_classes(road, "detect.class_conf_thres", class_conf, classes)
    agnostic = tuple(det.get("agnostic_nms") or ())
    _in_classes(road, "detect.agnostic_nms", agnostic, classes)
    detect_keys = ("weights", "sha256", "onnx", "onnx_sha256", "backend", "device", "conf_thres", "iou_thres",
                   "imgsz", "max_det", "batch_size", "shards")
    detect = DetectSettings(
        cameras=dcams, **{k: det[k] for k in detect_keys if det.get(k) is not None},
        # mappings sorted: key order (e.g. after Helm's YAML round trip) must not change digests
        class_map=None if class_map is None else tuple(sorted(class_map.items())),
        class_conf_thres=tuple(sorted((k, float(v)) for k, v in class_conf.items())),
        slices=_slices(det.get("slices")), agnostic_nms=agnostic,
    )
    detect = replace(detect, conf_thres=float(detect.conf_thres), iou_thres=float(detect.iou_thres))
    ing = raw.get("ingest") or {}
    limits = IngestLimits(**{k: v for k, v in ing.items() if v is not None})
    limits = replace(limits, max_ratio=float(limits.max_ratio))
    return RoadConfig(
        id=road, name=raw.get("name", road), bucket=raw.get("bucket", _default("bucket")), cameras=cameras,
        classes=classes, short_set_policy=raw.get("short_set_policy", _default("short_set_policy")), ingest=limits,
        detect=detect, schedule=dict(raw.get("schedule") or {}), kubernetes=dict(raw.get("kubernetes") or {}),
        unlabelled_labels=raw.get("unlabelled_labels", _default("unlabelled_labels")),
        sheet=SheetSettings(**(raw.get("sheet") or {})),
    )


def _slices(value: Any) -> SliceSettings | None:
    """`detect.slices` (schema-checked): null/false = off; `size` as one number or [width, height]."""
    if value is None or value is False:
        return None
    base = SliceSettings(**{k: v for k, v in value.items() if k != "size"})
    size = value.get("size", base.size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return replace(base, size=size, overlap=float(base.overlap), match_threshold=float(base.match_threshold))


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
