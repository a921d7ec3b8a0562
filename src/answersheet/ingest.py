"""Ingest: unzip a road-day's camera archives from raw/ into work/<road>/<ymd>/ingest/images/.

Each archive is streamed to a scratch temp file (never held whole in memory) and every member is
checked before anything is uploaded: safe path, regular file, image name of this road/day/camera,
size and compression-ratio limits (zip bombs), CRC, and a real JPEG decode. Bad members become
rejections in the manifest; the good ones in the same archive are still ingested. Nothing is ever
written to local disk under a member's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from answersheet import manifest
from answersheet.config import IngestLimits
from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError
from answersheet.jpeg import BadJpeg, check_jpeg
from answersheet.naming import BadImageName, ImageName, parse_image_name
from answersheet.progress import Progress
from answersheet.storage import ObjectInfo, Store, run_bounded

log = logging.getLogger(__name__)

STAGE = "ingest"
READ_CHUNK = 1024 * 1024
MAX_WARNINGS = 50  # rejections logged one by one; the rest only counted (all are in the manifest)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class MemberRejected(ValueError):
    """One archive member is not ingested (the message is the manifest's `reason`)."""


@dataclass
class _Image:
    name: ImageName
    sha256: str
    size: int
    archive: str
    member: str


@dataclass
class _DayRun:
    """What one ingest run has seen so far (touched by the main thread, and by workers via on_done)."""

    store: Store
    images_prefix: str
    selected_cameras: tuple[str, ...]
    members: int = 0
    rejections: list[dict] = dataclasses.field(default_factory=list)
    images: dict[str, dict] = dataclasses.field(default_factory=dict)  # filename -> manifest entry
    claimed: dict[str, _Image] = dataclasses.field(default_factory=dict)  # filename -> first occurrence

    def reject(self, obj: str, member: str | None, reason: str) -> None:
        self.rejections.append({"object": obj, "member": member, "reason": reason})
        if len(self.rejections) <= MAX_WARNINGS:
            where = self.store.uri(obj) + (f" member {member!r}" if member is not None else "")
            log.warning("rejected %s: %s", where, reason)
        elif len(self.rejections) == MAX_WARNINGS + 1:
            log.warning("more rejections: not logged one by one (all are listed in the manifest)")


def _check_path(name: str) -> None:
    """Reject names that could escape a directory if anyone ever extracted them (zip-slip)."""
    if "\x00" in name:
        raise MemberRejected("unsafe path: NUL byte in member name")
    if "\\" in name:
        raise MemberRejected("unsafe path: backslash in member name")
    if name.startswith("/"):
        raise MemberRejected("unsafe path: absolute member path")
    if _DRIVE_RE.match(name):
        raise MemberRejected("unsafe path: drive letter in member path")
    if ".." in name.split("/"):
        raise MemberRejected("unsafe path: '..' component (path traversal)")


def _unix_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _is_empty_dir(info: zipfile.ZipInfo) -> bool:
    """A pure directory entry: nothing to ingest and nothing wrong (ignored silently)."""
    empty = info.file_size == 0 and info.compress_size <= 2  # an empty deflate stream is 2 bytes
    return info.is_dir() and empty and not stat.S_ISLNK(_unix_mode(info))


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Reject anything but a regular file member."""
    mode = _unix_mode(info)
    if stat.S_ISLNK(mode):
        raise MemberRejected("symlink member (not a regular file)")
    if info.is_dir():
        raise MemberRejected(f"directory entry carrying data ({info.file_size} bytes)")
    if stat.S_ISDIR(mode) or info.external_attr & 0x10:  # unix or MS-DOS directory attribute
        raise MemberRejected("directory posing as a file (directory mode bits on a file entry)")
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise MemberRejected(f"not a regular file (mode {stat.filemode(mode)})")
    if info.flag_bits & 0x1:
        raise MemberRejected("encrypted member")


def _check_limits(info: zipfile.ZipInfo, limits: IngestLimits, total_so_far: int) -> None:
    """Declared sizes against the bomb guards (before a single byte is inflated)."""
    if info.file_size > limits.max_member_bytes:
        raise MemberRejected(
            f"member too large: declared {info.file_size} bytes > max_member_bytes {limits.max_member_bytes}"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        raise MemberRejected(
            f"zip bomb guard: compression ratio {ratio:.0f} ({info.file_size} of {info.compress_size} bytes)"
            f" > max_ratio {limits.max_ratio:g}"
        )
    if total_so_far + info.file_size > limits.max_total_bytes:
        raise MemberRejected(
            f"archive too large: uncompressed total would reach {total_so_far + info.file_size} bytes"
            f" > max_total_bytes {limits.max_total_bytes}"
        )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, read with a hard cap of its declared size + 1 (headers are not trusted)."""
    cap = info.file_size + 1
    chunks: list[bytes] = []
    got = 0
    try:
        with zf.open(info) as fh:
            while got < cap:
                chunk = fh.read(min(READ_CHUNK, cap - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    except zipfile.BadZipFile as exc:  # CRC mismatch, bad local header, ...
        raise MemberRejected(f"corrupt member: {exc}") from None
    except (EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:  # zlib.error is OSError-like
        raise MemberRejected(f"unreadable member: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — zlib.error, lzma.LZMAError: the data stream is corrupt
        raise MemberRejected(f"corrupt compressed data: {type(exc).__name__}: {exc}") from None
    if got > info.file_size:
        raise MemberRejected(f"decompressed data exceeds the declared size of {info.file_size} bytes")
    if got != info.file_size:
        raise MemberRejected(f"truncated member: {got} of {info.file_size} declared bytes")
    return b"".join(chunks)


def _upload_task(run: _DayRun, image: _Image, data: bytes) -> Callable[[], tuple]:
    def task() -> tuple:
        try:
            check_jpeg(data)
        except BadJpeg as exc:
            return image, str(exc)
        run.store.put(run.images_prefix + image.name.filename, data, "image/jpeg")
        return image, None

    return task


def _on_uploaded(run: _DayRun) -> Callable[[tuple], None]:
    def done(result: tuple) -> None:
        image, problem = result
        if problem:
            run.reject(image.archive, image.member, problem)
            return
        name = image.name
        run.images[name.filename] = {
            "name": name.filename, "key": run.images_prefix + name.filename, "sha256": image.sha256,
            "size": image.size, "set_id": name.set_id, "camera": name.camera, "capture_time": name.capture_time,
            "selected": name.camera in run.selected_cameras, "archive": image.archive,
        }

    return done


def _archive_members(rd: RoadDay, run: _DayRun, archive: ObjectInfo) -> Iterator[Callable[[], tuple]]:
    """Download one archive to scratch, check its members; yield an upload task per good member."""
    limits, road = rd.road.ingest, rd.road
    with tempfile.TemporaryFile(prefix="answersheet-ingest-") as scratch:
        rd.store.download(archive.key, scratch)
        scratch.seek(0)
        try:
            zf = zipfile.ZipFile(scratch)
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
            run.reject(archive.key, None, f"corrupt or truncated zip archive: {type(exc).__name__}: {exc}")
            return
        progress = Progress(f"ingest {posixpath.basename(archive.key)}", len(infos), unit="members")
        files = 0
        total = 0
        with zf:
            for info in infos:
                progress.advance()
                member = info.filename
                if _is_empty_dir(info):
                    continue
                run.members += 1
                files += 1
                try:
                    if files > limits.max_members:
                        raise MemberRejected(f"archive has more than max_members {limits.max_members} members")
                    _check_path(member)
                    _check_entry(info)
                    try:
                        name = parse_image_name(posixpath.basename(member), road.id, rd.day, road.cameras)
                    except BadImageName as exc:
                        raise MemberRejected(f"bad image name: {exc}") from None
                    _check_limits(info, limits, total)
                    total += info.file_size
                    data = _read_member(zf, info)
                except MemberRejected as exc:
                    run.reject(archive.key, member, str(exc))
                    continue
                sha = hashlib.sha256(data).hexdigest()
                first = run.claimed.get(name.filename)
                if first is not None:
                    if first.sha256 != sha:
                        run.reject(archive.key, member, (
                            f"duplicate image name {name.filename!r} with different content: already taken from"
                            f" {first.archive} (member {first.member!r}); this copy from {archive.key} is rejected"
                        ))
                    continue  # identical bytes: the same image, counted once
                image = _Image(name, sha, len(data), archive.key, member)
                run.claimed[name.filename] = image
                yield _upload_task(run, image, data)
        progress.finish()


def _summary(run: _DayRun, limit: int = 3) -> str:
    shown = "; ".join(
        f"{r['object']}{':' + r['member'] if r['member'] is not None else ''}: {r['reason']}"
        for r in run.rejections[:limit]
    )
    more = f"; … and {len(run.rejections) - limit} more" if len(run.rejections) > limit else ""
    return f"{len(run.rejections)} rejection(s): {shown}{more}" if run.rejections else "no members at all"


def _result(rd: RoadDay, counts: dict, skipped: bool) -> dict:
    return {"manifest": rd.store.uri(rd.layout.ingest_manifest), "counts": counts, "skipped": skipped}


def ingest_day(rd: RoadDay) -> dict:
    """Unzip the day's archives into work/…/ingest/images/ and commit the ingest manifest."""
    layout, store = rd.layout, rd.store
    objects = store.list(layout.raw_prefix)
    if not objects:
        raise AnswersheetError(f"missing day: no archives under {store.uri(layout.raw_prefix)}")
    archives = [o for o in objects if o.key.lower().endswith(".zip")]
    limits = {k: v for k, v in dataclasses.asdict(rd.road.ingest).items() if k != "workers"}
    digest = manifest.inputs_digest(
        STAGE, [[o.key, o.etag, o.size] for o in objects], rd.road.digest(), limits
    )
    existing = manifest.current(store, layout.ingest_manifest, digest, rd.force)
    if existing is not None:
        return _result(rd, existing.get("counts", {}), skipped=True)

    started = manifest.begin(store, layout.ingest_manifest)
    run = _DayRun(store=store, images_prefix=layout.ingest_images, selected_cameras=rd.road.detect.cameras)
    archive_keys = {a.key for a in archives}
    for obj in objects:
        if obj.key not in archive_keys:
            run.reject(obj.key, None, "not a .zip archive")

    def tasks() -> Iterator[Callable[[], tuple]]:
        for archive in archives:  # Store.list is sorted by key
            yield from _archive_members(rd, run, archive)

    run_bounded(tasks(), rd.road.ingest.workers, _on_uploaded(run))

    if not run.images:
        stale = store.delete_stale(layout.ingest_images, set())
        raise AnswersheetError(
            f"{store.uri(layout.raw_prefix)}: no valid image in {len(archives)} archive(s)"
            f" ({len(objects)} object(s)); {_summary(run)}"
            + (f"; removed {stale} stale image(s) of an earlier run" if stale else "")
        )

    images = [run.images[n] for n in sorted(run.images)]
    store.delete_stale(layout.ingest_images, {e["key"] for e in images})
    rejections = sorted(run.rejections, key=lambda r: (r["object"], r["member"] or ""))
    counts = {
        "archives": len(archives),
        "members": run.members,
        "images": len(images),
        "selected": sum(e["selected"] for e in images),
        "rejected": len(rejections),
    }
    manifest.commit(
        store, layout.ingest_manifest, STAGE, digest, {e["key"]: e["sha256"] for e in images}, counts, started,
        images=images, rejections=rejections,
        archives=[{"key": a.key, "etag": a.etag, "size": a.size} for a in archives],
    )
    return _result(rd, counts, skipped=False)
