"""Image names `<road>_<YYYYMMDD>_<HHMMSS>_<cam>.jpg`: parse (from the right: road ids may hold `_`)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

_NAME_RE = re.compile(r"^(?P<road>.+)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<cam>[a-z0-9]+)\.jpg$")


class BadImageName(ValueError):
    """The member's file name does not follow the naming scheme (the message says how and names the file;
    `problem` says how without the name, so that many misnamed members share one reason text)."""

    def __init__(self, problem: str, filename: str) -> None:
        super().__init__(f"{problem}: {filename!r}")
        self.problem = problem


@dataclass(frozen=True, order=True)
class ImageName:
    """The parts of one camera image's file name."""

    road: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS
    camera: str

    @property
    def set_id(self) -> str:
        """`<road>_<YYYYMMDD>_<HHMMSS>`: the images of one capture instant across cameras."""
        return f"{self.road}_{self.date}_{self.time}"

    @property
    def filename(self) -> str:
        return f"{self.stem}.jpg"

    @property
    def stem(self) -> str:
        """The file name without `.jpg`: label files and report images are named `<stem>.txt`/`.jpg`."""
        return f"{self.set_id}_{self.camera}"

    @classmethod
    def parse(cls, filename: str) -> ImageName:
        """The parts of a file name that follows the scheme (no road/day/camera check: for names an
        earlier stage accepted); BadImageName otherwise."""
        m = _NAME_RE.fullmatch(filename)  # not match(): `$` also matches before a trailing newline
        if not m:
            raise BadImageName("name does not match <road>_<YYYYMMDD>_<HHMMSS>_<cam>.jpg", filename)
        return cls(m["road"], m["date"], m["time"], m["cam"])

    @classmethod
    def in_set(cls, set_id: str, camera: str) -> ImageName:
        """Camera `camera`'s image of set `set_id` (a short set's missing camera has a name, not an image).
        Split from the right, like every name: road ids may hold `_`."""
        road, date, time = set_id.rsplit("_", 2)
        return cls(road, date, time, camera)

    @property
    def capture_time(self) -> str:
        """ISO local capture time, e.g. 2026-11-02T09:13:05."""
        d, t = self.date, self.time
        return f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}"


def parse_image_name(filename: str, road: str, day: dt.date, cameras: tuple[str, ...]) -> ImageName:
    """Parse a base file name and check it belongs to this road, day and camera list."""
    name = ImageName.parse(filename)
    if name.road != road:
        raise BadImageName(f"image of another road ({name.road!r}, expected {road!r})", filename)
    if name.date != day.strftime("%Y%m%d"):
        raise BadImageName(f"image of another date ({name.date}, expected {day:%Y%m%d})", filename)
    try:
        dt.time(int(name.time[:2]), int(name.time[2:4]), int(name.time[4:]))
    except ValueError:
        raise BadImageName(f"invalid capture time {name.time!r}", filename) from None
    if name.camera not in cameras:
        raise BadImageName(f"unknown camera {name.camera!r} (expected one of {list(cameras)})", filename)
    return name
