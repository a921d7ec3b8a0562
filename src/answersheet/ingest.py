"""Ingest: unzip a road-day's camera archives from raw/ into work/<road>/<ymd>/ingest/images/.

Each archive is streamed to a scratch temp file (never held whole in memory) and every member is
checked before anything is uploaded: safe path, regular file, image name of this road/day/camera,
size and compression-ratio limits (zip bombs), CRC, and a strict JPEG decode. Bad members become
rejections in the manifest; the good ones in the same archive are still ingested. Nothing is ever
written to local disk under a member's name.

Memory is bounded by the limits: the central directory is counted (every entry, directories too) and
sized straight from the file before zipfile builds one ZipInfo per entry, so an archive over
`max_members` costs a scan, not a directory in memory (1M directory entries: 643 MiB peak RSS before,
134 MiB now, most of it the download's buffers; see `_check_central_directory`).

Names from archives are outside input: every rejection's member, reason and log line goes through
`printable`, so no control character reaches a terminal or a report raw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import re
import stat
import struct
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from answersheet import manifest, stage
from answersheet.config import IngestLimits
from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError, printable
from answersheet.jpeg import BadJpeg, check_jpeg
from answersheet.layout import DayLayout
from answersheet.naming import BadImageName, ImageName, parse_image_name
from answersheet.progress import Progress
from answersheet.records import ImageRecord
from answersheet.storage import ObjectInfo, Store, run_bounded

log = logging.getLogger(__name__)

STAGE = "ingest"
READ_CHUNK = 1024 * 1024
MAX_WARNINGS = 50  # rejections logged one by one; the rest only counted (all are in the manifest)
# The central directory may average this many bytes per allowed member (real entries: ~100 B, a name of
# ~60 B plus a 46 B header and a timestamp extra): bounds what zipfile reads and keeps for its ZipInfos.
CD_BYTES_PER_MEMBER = 1024
_DRIVE_RE = re.compile(r"^[A-Za-z]:")

# Rejection kinds: the manifest's `kind` of each rejection and the keys of `rejection_counts`.
NOT_ZIP = "not_zip"
CORRUPT_ARCHIVE = "corrupt_archive"
TOO_MANY_MEMBERS = "too_many_members"
UNSAFE_PATH = "unsafe_path"  # zip-slip, control characters: rejected for the path alone
NOT_REGULAR_FILE = "not_regular_file"
BAD_NAME = "bad_name"
SIZE_LIMIT = "size_limit"
ZIP_BOMB = "zip_bomb"
CORRUPT_MEMBER = "corrupt_member"
BAD_JPEG = "bad_jpeg"
DUPLICATE_CONFLICT = "duplicate_conflict"


class Rejected(ValueError):
    """An archive or one of its members is not ingested (`kind`, and the message is the manifest's `reason`)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(slots=True)
class _Image:
    name: ImageName
    sha256: str
    size: int
    archive: str
    member: str


@dataclass(slots=True)
class _Claim:
    """One image name across the day's archives: the copy that won (the first valid one, in archive-key and
    member order), and whether the copy now in flight has been judged (under _DayRun.settled). At most one
    copy of a name is in flight at a time, so "first valid" does not depend on which upload finishes first.
    Kept small (no Event per name: 1.2 KB each, 240 MB for 200k images)."""

    judged: bool = False
    winner: _Image | None = None


@dataclass
class _DayRun:
    """What one ingest run has seen so far (main thread only; workers report through on_done, except that an
    upload task settles its _Claim under `settled`)."""

    store: Store
    layout: DayLayout
    selected_cameras: tuple[str, ...]
    members: int = 0
    identical_duplicates: int = 0
    rejections: list[dict] = dataclasses.field(default_factory=list)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # one string object per distinct reason
    images: dict[str, ImageRecord] = dataclasses.field(default_factory=dict)  # filename -> manifest entry
    claims: dict[str, _Claim] = dataclasses.field(default_factory=dict)  # filename -> its copies' claim
    settled: threading.Condition = dataclasses.field(default_factory=threading.Condition)  # a claim was judged

    def reject(self, obj: str, member: str | None, kind: str, reason: str, **detail: object) -> None:
        """Record a rejection; member and reason are made printable here, at the source."""
        member = None if member is None else printable(member)
        reason = self.reasons.setdefault(reason, printable(reason))  # 200k junk members: one reason, not 200k
        record = {"object": printable(obj), "member": member, "kind": kind, "reason": reason, **detail}
        self.rejections.append(record)
        if len(self.rejections) <= MAX_WARNINGS:
            where = self.store.uri(record["object"]) + (f" member {member!r}" if member is not None else "")
            log.warning("rejected %s: %s", where, record["reason"])
        elif len(self.rejections) == MAX_WARNINGS + 1:
            log.warning("more rejections: not logged one by one (all are listed in the manifest)")


def _check_path(name: str) -> None:
    """Reject names that could escape a directory if anyone ever extracted them (zip-slip), or that would
    break a log line, a CSV row or a terminal (control and other non-printable characters)."""
    if "\x00" in name:  # zipfile cuts `filename` at a NUL; this is the raw `orig_filename`
        raise Rejected(UNSAFE_PATH, "unsafe path: NUL byte in member name")
    if not name.isprintable():
        bad = next(ch for ch in name if not ch.isprintable())
        raise Rejected(UNSAFE_PATH, f"unsafe path: control or non-printable character U+{ord(bad):04X} in member name")
    if "\\" in name:
        raise Rejected(UNSAFE_PATH, "unsafe path: backslash in member name")
    if name.startswith("/"):
        raise Rejected(UNSAFE_PATH, "unsafe path: absolute member path")
    if _DRIVE_RE.match(name):
        raise Rejected(UNSAFE_PATH, "unsafe path: drive letter in member path")
    if ".." in name.split("/"):
        raise Rejected(UNSAFE_PATH, "unsafe path: '..' component (path traversal)")


def _unix_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _is_empty_dir(info: zipfile.ZipInfo) -> bool:
    """A pure directory entry: nothing to ingest and nothing wrong (ignored silently; counted against
    max_members all the same, by _check_central_directory)."""
    empty = info.file_size == 0 and info.compress_size <= 2  # an empty deflate stream is 2 bytes
    return info.is_dir() and empty and not stat.S_ISLNK(_unix_mode(info))


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Reject anything but a regular file member."""
    mode = _unix_mode(info)
    if stat.S_ISLNK(mode):
        raise Rejected(NOT_REGULAR_FILE, "symlink member (not a regular file)")
    if info.is_dir():
        raise Rejected(NOT_REGULAR_FILE, f"directory entry carrying data ({info.file_size} bytes)")
    if stat.S_ISDIR(mode) or info.external_attr & 0x10:  # unix or MS-DOS directory attribute
        raise Rejected(NOT_REGULAR_FILE, "directory posing as a file (directory mode bits on a file entry)")
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise Rejected(NOT_REGULAR_FILE, f"not a regular file (mode {stat.filemode(mode)})")
    if info.flag_bits & 0x1:
        raise Rejected(NOT_REGULAR_FILE, "encrypted member")


def _check_limits(info: zipfile.ZipInfo, limits: IngestLimits, total_so_far: int) -> None:
    """Declared sizes against the bomb guards (before a single byte is inflated)."""
    if info.file_size > limits.max_member_bytes:
        raise Rejected(SIZE_LIMIT, (
            f"member too large: declared {info.file_size} bytes > max_member_bytes {limits.max_member_bytes}"
        ))
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        raise Rejected(ZIP_BOMB, (
            f"zip bomb guard: compression ratio {ratio:.0f} ({info.file_size} of {info.compress_size} bytes)"
            f" > max_ratio {limits.max_ratio:g}"
        ))
    if total_so_far + info.file_size > limits.max_total_bytes:
        raise Rejected(SIZE_LIMIT, (
            f"archive too large: uncompressed total would reach {total_so_far + info.file_size} bytes"
            f" > max_total_bytes {limits.max_total_bytes}"
        ))


_CD_HEADER = 46  # fixed part of a central-directory file header
_CD_SIGNATURE = b"PK\x01\x02"
_CD_LENGTHS = struct.Struct("<3H")  # file name, extra field, comment lengths, at offset 28 of the header


def _check_central_directory(fp: IO[bytes], limits: IngestLimits) -> None:
    """Raise Rejected(TOO_MANY_MEMBERS) when the archive has more than `max_members` central-directory
    entries (directory entries included) or a central directory over `max_members * CD_BYTES_PER_MEMBER`
    bytes; raise zipfile.BadZipFile when it has no readable directory.

    zipfile.ZipFile() reads the whole directory and builds a ZipInfo per entry before anyone can look at
    the count (measured: 1M directory entries, 95 MB archive -> 639 MiB peak). This finds the directory
    exactly as ZipFile does (zipfile's own end-record reader, zip64 included) and walks it entry by entry
    from the file, keeping nothing: it stops at max_members + 1, so its cost is bounded by the limit.
    """
    # zipfile's private end-record reader and offsets are not in typeshed: `type: ignore[attr-defined]` below
    endrec = zipfile._EndRecData(fp)  # type: ignore[attr-defined]  # the reader ZipFile itself uses
    if not endrec:
        raise zipfile.BadZipFile("File is not a zip file")
    declared, size_cd = endrec[zipfile._ECD_ENTRIES_TOTAL], endrec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if declared > limits.max_members:
        raise Rejected(TOO_MANY_MEMBERS, (
            f"archive has {declared} entries (directories included) > max_members {limits.max_members};"
            " archive not read"
        ))
    if size_cd > limits.max_members * CD_BYTES_PER_MEMBER:
        raise Rejected(TOO_MANY_MEMBERS, (
            f"central directory of {size_cd} bytes > {CD_BYTES_PER_MEMBER} bytes per allowed member"
            f" (max_members {limits.max_members}); archive not read"
        ))
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    start = endrec[zipfile._ECD_OFFSET] + concat  # type: ignore[attr-defined]
    if start < 0:
        raise zipfile.BadZipFile("Bad offset for central directory")
    fp.seek(start)
    walked = entries = 0
    while walked < size_cd:  # the loop of ZipFile._RealGetContents, without building anything
        header = fp.read(_CD_HEADER)
        if len(header) != _CD_HEADER:
            raise zipfile.BadZipFile("Truncated central directory")
        if header[:4] != _CD_SIGNATURE:
            raise zipfile.BadZipFile("Bad magic number for central directory")
        skip = sum(_CD_LENGTHS.unpack_from(header, 28))
        fp.seek(skip, 1)
        walked += _CD_HEADER + skip
        entries += 1
        if entries > limits.max_members:
            raise Rejected(TOO_MANY_MEMBERS, (
                f"archive has more than max_members {limits.max_members} entries (directories included;"
                f" its end record declares {declared}); archive not read"
            ))


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
        raise Rejected(CORRUPT_MEMBER, f"corrupt member: {exc}") from None
    except (EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:  # zlib.error is OSError-like
        raise Rejected(CORRUPT_MEMBER, f"unreadable member: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — zlib.error, lzma.LZMAError: the data stream is corrupt
        raise Rejected(CORRUPT_MEMBER, f"corrupt compressed data: {type(exc).__name__}: {exc}") from None
    if got > info.file_size:
        raise Rejected(CORRUPT_MEMBER, f"decompressed data exceeds the declared size of {info.file_size} bytes")
    if got != info.file_size:
        raise Rejected(CORRUPT_MEMBER, f"truncated member: {got} of {info.file_size} declared bytes")
    return b"".join(chunks)


def _jpeg_problem(data: bytes) -> str | None:
    try:
        check_jpeg(data)
    except BadJpeg as exc:
        return str(exc)
    return None


def _upload_task(run: _DayRun, image: _Image, data: bytes, claim: _Claim) -> Callable[[], tuple]:
    """Check the copy strictly; if valid it wins its name (the main thread made it the only copy in flight)
    and is uploaded. The claim is judged whatever happens, so a later copy waiting on it never hangs."""

    def task() -> tuple:
        won = False
        try:
            problem = _jpeg_problem(data)
            if problem is None:
                run.store.put(run.layout.ingest_image(image.name), data, "image/jpeg")
                won = True
            return image, problem
        finally:
            with run.settled:
                claim.winner = image if won else None
                claim.judged = True
                run.settled.notify_all()

    return task


def _on_uploaded(run: _DayRun) -> Callable[[tuple], None]:
    def done(result: tuple) -> None:
        image, problem = result
        if problem:
            run.reject(image.archive, image.member, BAD_JPEG, problem)
            return
        name = image.name
        run.images[name.filename] = ImageRecord.of(name, run.layout.ingest_image(name), image.sha256, image.size,
                                                   name.camera in run.selected_cameras, image.archive)

    return done


def _claim_task(run: _DayRun, image: _Image, data: bytes) -> Callable[[], tuple] | None:
    """The upload task for this copy of an image name, or None when an earlier copy settled it.

    First valid copy wins: a later copy waits until the earlier copy in flight is judged (it was submitted
    first, so it runs; duplicates are rare, so the wait costs nothing in practice). If that copy was invalid,
    this one gets its chance; identical bytes are the same image, ingested once; different valid bytes are
    a conflict, rejected naming the copy that was kept."""
    filename = image.name.filename
    claim = run.claims.get(filename)
    if claim is None:
        claim = run.claims[filename] = _Claim()
        return _upload_task(run, image, data, claim)
    with run.settled:
        run.settled.wait_for(lambda: claim.judged)
        winner = claim.winner
        if winner is None:  # every earlier copy was invalid: this one is the next in flight
            claim.judged = False
            return _upload_task(run, image, data, claim)
    if winner.sha256 == image.sha256:
        run.identical_duplicates += 1
        return None
    problem = _jpeg_problem(data)
    if problem:
        run.reject(image.archive, image.member, BAD_JPEG, problem)
        return None
    run.reject(
        image.archive, image.member, DUPLICATE_CONFLICT,
        f"duplicate image name {filename!r} with different content: the first valid copy, from {winner.archive}"
        f" (member {winner.member!r}, sha256 {winner.sha256[:12]}…), is kept; this copy from {image.archive}"
        f" (sha256 {image.sha256[:12]}…) is rejected",
        sha256=image.sha256,
        kept={"object": printable(winner.archive), "member": printable(winner.member), "sha256": winner.sha256},
    )
    return None


def _archive_members(rd: RoadDay, run: _DayRun, archive: ObjectInfo) -> Iterator[Callable[[], tuple]]:
    """Download one archive to scratch, check its members; yield an upload task per good member."""
    limits, road = rd.road.ingest, rd.road
    with tempfile.TemporaryFile(prefix="answersheet-ingest-") as scratch:
        rd.store.download(archive.key, scratch)
        try:
            _check_central_directory(scratch, limits)
            scratch.seek(0)
            zf = zipfile.ZipFile(scratch)
            infos = zf.infolist()
        except Rejected as exc:
            run.reject(archive.key, None, exc.kind, str(exc))
            return
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
            run.reject(archive.key, None, CORRUPT_ARCHIVE,
                       f"corrupt or truncated zip archive: {type(exc).__name__}: {exc}")
            return
        if len(infos) > limits.max_members:  # cannot happen while zipfile reads as above; cheap to be sure
            run.reject(archive.key, None, TOO_MANY_MEMBERS,
                       f"archive has {len(infos)} entries > max_members {limits.max_members}")
            return
        progress = Progress(f"ingest {printable(posixpath.basename(archive.key))}", len(infos), unit="members")
        total = 0
        with zf:
            for info in infos:
                progress.advance()
                if _is_empty_dir(info):
                    continue
                run.members += 1
                member = info.orig_filename  # the raw name: `filename` is cut at a NUL byte
                try:
                    _check_path(member)
                    _check_entry(info)
                    try:
                        name = parse_image_name(posixpath.basename(member), road.id, rd.day, road.cameras)
                    except BadImageName as exc:
                        raise Rejected(BAD_NAME, f"bad image name: {exc.problem}") from None
                    _check_limits(info, limits, total)
                    total += info.file_size
                    data = _read_member(zf, info)
                except Rejected as exc:
                    run.reject(archive.key, member, exc.kind, str(exc))
                    continue
                image = _Image(name, hashlib.sha256(data).hexdigest(), len(data), archive.key, member)
                task = _claim_task(run, image, data)
                if task is not None:
                    yield task
        progress.finish()


def _summary(run: _DayRun, limit: int = 3) -> str:
    shown = "; ".join(
        f"{r['object']}{':' + r['member'] if r['member'] is not None else ''}: {r['reason']}"
        for r in run.rejections[:limit]
    )
    more = f"; … and {len(run.rejections) - limit} more" if len(run.rejections) > limit else ""
    return f"{len(run.rejections)} rejection(s): {shown}{more}" if run.rejections else "no members at all"


def ingest_day(rd: RoadDay) -> dict:
    """Unzip the day's archives into work/…/ingest/images/ and commit the ingest manifest."""
    layout, store = rd.layout, rd.store
    objects = store.list(layout.raw_prefix)
    if not objects:
        raise AnswersheetError(f"missing day: no archives under {store.uri(layout.raw_prefix)}")
    limits = {k: v for k, v in dataclasses.asdict(rd.road.ingest).items() if k != "workers"}
    digest = manifest.inputs_digest(
        STAGE, [[o.key, o.etag, o.size] for o in objects], rd.road.digest(STAGE), limits
    )
    this = stage.Stage(STAGE, layout.ingest_manifest, digest, owns=layout.ingest_images)
    return stage.run(rd, this, lambda: _ingest(rd, this, objects))


def _ingest(rd: RoadDay, this: stage.Stage, objects: list[ObjectInfo]) -> stage.StageResult:
    """Every archive's good members into images/; rejections (and their kinds) for the rest."""
    layout, store = rd.layout, rd.store
    archives = [o for o in objects if o.key.lower().endswith(".zip")]
    run = _DayRun(store=store, layout=layout, selected_cameras=rd.road.detect.cameras)
    archive_keys = {a.key for a in archives}
    for obj in objects:
        if obj.key not in archive_keys:
            run.reject(obj.key, None, NOT_ZIP, "not a .zip archive")

    def tasks() -> Iterator[Callable[[], tuple]]:
        for archive in archives:  # Store.list is sorted by key
            yield from _archive_members(rd, run, archive)

    run_bounded(tasks(), rd.road.ingest.workers, _on_uploaded(run))

    if not run.images:
        stale = stage.remove_stale(store, this, {})
        raise AnswersheetError(
            f"{store.uri(layout.raw_prefix)}: no valid image in {len(archives)} archive(s)"
            f" ({len(objects)} object(s)); {_summary(run)}"
            + (f"; removed {stale} stale image(s) of an earlier run" if stale else "")
        )

    images = [run.images[n] for n in sorted(run.images)]
    run.rejections.sort(key=lambda r: (r["object"], r["member"] or ""))
    counts = {
        "archives": len(archives),
        "members": run.members,
        "images": len(images),
        "selected": sum(e.selected for e in images),
        "rejected": len(run.rejections),
    }
    return stage.StageResult(
        outputs={e.key: e.sha256 for e in images}, counts=counts,
        records={"images": [e.json() for e in images], "rejections": run.rejections,
                 "rejection_counts": dict(sorted(Counter(r["kind"] for r in run.rejections).items())),
                 "identical_duplicates": run.identical_duplicates,
                 "archives": [{"key": a.key, "etag": a.etag, "size": a.size} for a in archives]},
    )
