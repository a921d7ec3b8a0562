"""Compose a road-day of camera archives from real photos (for the demo, tests and benchmarks).

Photos come from `$ANSWERSHEET_SAMPLE_DIR` when set, else from the sample images that ship inside
the installed `yolov5` / `ultralytics` packages (bus.jpg, zidane.jpg).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout
from answersheet.storage import Store


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # no import: yolov5 would pull in torch
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def sample_photos(sample_dir: str | os.PathLike | None = None) -> list[Path]:
    """Real JPEG photos to build days from, sorted by name."""
    sample_dir = sample_dir or os.environ.get("ANSWERSHEET_SAMPLE_DIR")
    if sample_dir:
        photos = sorted(Path(sample_dir).glob("*.jpg"))
        if not photos:
            raise AnswersheetError(f"{sample_dir}: no *.jpg photos (ANSWERSHEET_SAMPLE_DIR)")
        return photos
    for pkg, sub in (("yolov5", "data/images"), ("ultralytics", "assets")):
        base = _package_dir(pkg)
        if base and sorted((base / sub).glob("*.jpg")):
            return sorted((base / sub).glob("*.jpg"))
    raise AnswersheetError("no sample photos: set ANSWERSHEET_SAMPLE_DIR or install yolov5/ultralytics")


def resized_jpeg(photo: Path, size: tuple[int, int] | None, quality: int = 90) -> bytes:
    """The photo's bytes, or re-encoded at `size` (e.g. road-camera 1920x1080)."""
    if size is None:
        return photo.read_bytes()
    from PIL import Image

    with Image.open(photo) as im:
        out = io.BytesIO()
        im.convert("RGB").resize(size).save(out, "JPEG", quality=quality)
        return out.getvalue()


def set_times(n_sets: int, start: str = "090000", step_s: int = 7) -> list[str]:
    """HHMMSS capture times, `step_s` apart."""
    t0 = dt.datetime.strptime(start, "%H%M%S")
    return [(t0 + dt.timedelta(seconds=i * step_s)).strftime("%H%M%S") for i in range(n_sets)]


def build_day_archives(
    road: str, day: dt.date, cameras: Sequence[str], n_sets: int, photos: Sequence[Path],
    short_sets: dict[int, Sequence[str]] | None = None, size: tuple[int, int] | None = None,
) -> dict[str, bytes]:
    """One zip per camera {archive file name: zip bytes}; `short_sets` drops cameras from sets."""
    short_sets = short_sets or {}
    ymd = day.strftime("%Y%m%d")
    cache: dict[Path, bytes] = {}
    archives: dict[str, bytes] = {}
    for c, cam in enumerate(cameras):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for i, hhmmss in enumerate(set_times(n_sets)):
                if cam in short_sets.get(i, ()):
                    continue
                photo = photos[(i * len(cameras) + c) % len(photos)]
                if photo not in cache:
                    cache[photo] = resized_jpeg(photo, size)
                # stamped with the capture time, not now: the same day packs to the same bytes, so the
                # stages' input digests (which start from the archives' ETags) repeat between runs
                stamp = (day.year, day.month, day.day, int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:]))
                member = zipfile.ZipInfo(f"{cam}/{road}_{ymd}_{hhmmss}_{cam}.jpg", date_time=stamp)
                member.external_attr = 0o600 << 16  # what writestr(name, ...) gives a member
                zf.writestr(member, cache[photo])
        archives[f"{cam}.zip"] = buf.getvalue()
    return archives


def upload_day(store: Store, road: str, day: dt.date, archives: dict[str, bytes]) -> list[str]:
    """Put the archives under raw/<road>/<YYYYMMDD>/; returns their keys."""
    prefix = DayLayout(road, day).raw_prefix
    keys = []
    for name, data in sorted(archives.items()):
        store.put(prefix + name, data, "application/zip")
        keys.append(prefix + name)
    return keys
