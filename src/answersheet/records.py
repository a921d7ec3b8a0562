"""Typed manifest records: what one stage writes about one image and the next stage reads.

Each serialises (`json()`) to exactly the dict the manifests have always held (manifests are written with
sorted keys, so field order is free), and reads (`from_json`) what the manifests hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from answersheet.naming import ImageName


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One accepted image in the ingest manifest's `images`."""

    name: str  # <road>_<YYYYMMDD>_<HHMMSS>_<cam>.jpg
    key: str
    sha256: str
    size: int
    set_id: str
    camera: str
    capture_time: str  # ISO local time, no offset
    selected: bool  # its camera is sent to the detector (detect.cameras)
    archive: str  # the raw/ object it came from

    @classmethod
    def of(cls, name: ImageName, key: str, sha256: str, size: int, selected: bool, archive: str) -> ImageRecord:
        return cls(name=name.filename, key=key, sha256=sha256, size=size, set_id=name.set_id, camera=name.camera,
                   capture_time=name.capture_time, selected=selected, archive=archive)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageRecord:
        return cls(name=d["name"], key=d["key"], sha256=d["sha256"], size=d.get("size", 0), set_id=d["set_id"],
                   camera=d["camera"], capture_time=d["capture_time"], selected=bool(d["selected"]),
                   archive=d.get("archive", ""))

    @property
    def image_name(self) -> ImageName:
        return ImageName.in_set(self.set_id, self.camera)

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DetectionRecord:
    """One image a detect shard looked at (its manifest's `images[name]`): label key when it found boxes."""

    label: str | None
    boxes: int
    per_class: dict[str, int] = field(default_factory=dict)  # road class id (a string, JSON) -> boxes

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DetectionRecord:
        return cls(label=d.get("label"), boxes=int(d.get("boxes", 0)), per_class=dict(d.get("per_class") or {}))

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SheetRow:
    """One row of the preprocess manifest (`rows`), which the datasheet publishes: an image, a missing
    camera of a short set, or a member rejected at ingest."""

    name: str
    set_id: str
    camera: str
    capture_time: str
    status: str  # detected | empty | not_detected | missing | rejected | failed
    selected: bool
    image_key: str | None = None
    image_sha256: str | None = None
    label_key: str | None = None
    label_sha256: str | None = None
    boxes: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def json(self) -> dict[str, Any]:
        return asdict(self)
