"""ingest's zip guards on ZipInfo and raw archive bytes, without S3 (the fast subset: `make test-fast`).
The same guards end to end, archive by archive on a real S3 server: tests/test_ingest.py."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from answersheet import ingest
from answersheet.config import IngestLimits

pytestmark = pytest.mark.fast

LIMITS = IngestLimits(max_member_bytes=1000, max_total_bytes=5000, max_ratio=10.0, max_members=3)


def info(name: str = "a.jpg", mode: int | None = stat.S_IFREG | 0o644, size: int = 100, compressed: int = 50,
         flags: int = 0, dos: int = 0) -> zipfile.ZipInfo:
    """A ZipInfo as zipfile reads it from a central directory entry."""
    zi = zipfile.ZipInfo(name)
    zi.external_attr = ((mode or 0) << 16) | dos
    zi.file_size, zi.compress_size, zi.flag_bits = size, compressed, flags
    return zi


def rejected(check, *args) -> tuple[str, str]:
    with pytest.raises(ingest.Rejected) as caught:
        check(*args)
    assert "\n" not in str(caught.value)
    return caught.value.kind, str(caught.value)


@pytest.mark.parametrize("name, problem", [
    ("a\x00.jpg", "NUL byte"),
    ("a\x1b[2J.jpg", "U+001B"),
    ("a\u202e.jpg", "U+202E"),  # right-to-left override: renders a different name
    ("dir\\a.jpg", "backslash"),
    ("/etc/a.jpg", "absolute"),
    ("C:a.jpg", "drive letter"),
    ("x/../../a.jpg", "'..' component"),
])
def test_unsafe_member_paths_are_rejected_naming_the_problem(name, problem):
    kind, reason = rejected(ingest._check_path, name)
    assert kind == ingest.UNSAFE_PATH and problem in reason


@pytest.mark.parametrize("name", ["a.jpg", "day/cam/a..b.jpg", "대왕판교/a.jpg", "a b.jpg"])
def test_ordinary_member_paths_pass(name):
    ingest._check_path(name)


@pytest.mark.parametrize("zi, problem", [
    (info(mode=stat.S_IFLNK | 0o777), "symlink"),
    (info("d/", mode=stat.S_IFDIR | 0o755, size=10), "directory entry carrying data"),
    (info(mode=None, dos=0x10), "directory posing as a file"),
    (info(mode=stat.S_IFIFO | 0o644), "not a regular file (mode p"),
    (info(flags=0x1), "encrypted"),
])
def test_members_that_are_not_plain_files_are_rejected(zi, problem):
    kind, reason = rejected(ingest._check_entry, zi)
    assert kind == ingest.NOT_REGULAR_FILE and problem in reason


def test_plain_files_pass_and_empty_directories_are_ignored_silently():
    ingest._check_entry(info())
    ingest._check_entry(info(mode=None))  # archivers that write no unix mode (MS-DOS attributes only)
    assert ingest._is_empty_dir(info("d/", mode=stat.S_IFDIR | 0o755, size=0, compressed=0))
    assert not ingest._is_empty_dir(info("d/", mode=stat.S_IFLNK | 0o777, size=0, compressed=0))
    assert not ingest._is_empty_dir(info())


@pytest.mark.parametrize("zi, total, kind, problem", [
    (info(size=1001, compressed=1000), 0, ingest.SIZE_LIMIT, "declared 1001 bytes > max_member_bytes 1000"),
    (info(size=1000, compressed=99), 0, ingest.ZIP_BOMB, "compression ratio 10 (1000 of 99 bytes) > max_ratio 10"),
    (info(size=900, compressed=900), 4101, ingest.SIZE_LIMIT, "would reach 5001 bytes > max_total_bytes 5000"),
])
def test_declared_sizes_over_the_limits_are_refused_before_inflating(zi, total, kind, problem):
    got, reason = rejected(ingest._check_limits, zi, LIMITS, total)
    assert got == kind and problem in reason


def test_sizes_at_the_limits_pass():
    ingest._check_limits(info(size=1000, compressed=100), LIMITS, 4000)  # ratio 10, total exactly 5000
    ingest._check_limits(info(size=0, compressed=0), LIMITS, 5000)  # an empty member


def archive(n: int) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"m{i}.jpg", b"x")
    buf.seek(0)
    return buf


def test_member_count_is_checked_on_the_central_directory_before_zipfile_reads_it():
    ingest._check_central_directory(archive(3), LIMITS)
    kind, reason = rejected(ingest._check_central_directory, archive(4), LIMITS)
    assert kind == ingest.TOO_MANY_MEMBERS and "4 entries" in reason and "max_members 3" in reason
    # an end record that understates the count: the walk of the directory itself stops at max_members + 1
    data = bytearray(archive(4).getvalue())
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = (2).to_bytes(2, "little") * 2  # entries on this disk, entries total
    kind, reason = rejected(ingest._check_central_directory, io.BytesIO(bytes(data)), LIMITS)
    assert kind == ingest.TOO_MANY_MEMBERS and "more than max_members 3" in reason and "declares 2" in reason


def test_bytes_without_a_zip_directory_are_not_a_zip():
    with pytest.raises(zipfile.BadZipFile):
        ingest._check_central_directory(io.BytesIO(b"\xff\xd8\xff\xe0 a JPEG, not a zip" * 10), LIMITS)
