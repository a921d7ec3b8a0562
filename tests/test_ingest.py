"""ingest stage on a real S3 server (SeaweedFS, see conftest) with archives built from real JPEG photos."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
from conftest import DAY, ROAD, write_roads_file

from answersheet.cli import main
from answersheet.config import load_road
from answersheet.day import RoadDay
from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.errors import AnswersheetError, printable
from answersheet.ingest import ingest_day
from answersheet.jpeg import BadJpeg, check_jpeg
from answersheet.layout import DayLayout

LAYOUT = DayLayout(ROAD, DAY)
YMD = LAYOUT.ymd


def image_name(hhmmss: str = "090000", cam: str = "front", road: str = ROAD, ymd: str = YMD) -> str:
    return f"{road}_{ymd}_{hhmmss}_{cam}.jpg"


def make_zip(members: list, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of (name or ZipInfo, bytes) members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def jpegs(photos) -> list[bytes]:
    """Distinct real JPEGs, smallest first (keeps archives and uploads small)."""
    distinct = {sha(p.read_bytes()): p.read_bytes() for p in photos}
    return sorted(distinct.values(), key=len)


def road_day(store, tmp_path, force: bool = False, **overrides) -> RoadDay:
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket, **overrides)
    return RoadDay(road=load_road(roads, ROAD), day=DAY, store=store, force=force)


def put_raw(store, name: str, data: bytes) -> str:
    key = LAYOUT.raw_prefix + name
    store.put(key, data, "application/zip")
    return key


def ingest_manifest(store) -> dict | None:
    return store.get_json(LAYOUT.ingest_manifest)


def image_keys(store) -> list[str]:
    return [o.key for o in store.list(LAYOUT.ingest_images)]


def rejections_for(manifest: dict, member: str | None) -> list[dict]:
    return [r for r in manifest["rejections"] if r["member"] == member]


def ingest_one_archive(store, tmp_path, members: list, good: bytes, **overrides) -> dict:
    """Ingest one archive of `members` plus one good image (which must come through); return the manifest."""
    key = put_raw(store, "cam.zip", make_zip([*members, (f"cam/{image_name('120000')}", good)]))
    result = ingest_day(road_day(store, tmp_path, **overrides))
    m = ingest_manifest(store)
    assert result["counts"] == m["counts"]
    assert [i["name"] for i in m["images"]] == [image_name("120000")]
    assert image_keys(store) == [LAYOUT.ingest_images + image_name("120000")]
    assert store.get(LAYOUT.ingest_images + image_name("120000")) == good
    assert all(r["object"] == key for r in m["rejections"])
    return m


# --- happy path ---------------------------------------------------------------------------------


def test_happy_path_uploads_every_image_with_manifest(store, tmp_path, photos):
    rd = road_day(store, tmp_path)
    archives = build_day_archives(ROAD, DAY, rd.road.cameras, 3, photos)
    upload_day(store, ROAD, DAY, archives)
    sources = {}
    for data in archives.values():
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            sources.update({info.filename.rsplit("/", 1)[1]: zf.read(info) for info in zf.infolist()})

    result = ingest_day(rd)

    counts = {"archives": 6, "members": 18, "images": 18, "selected": 6, "rejected": 0}
    assert result == {"manifest": store.uri(LAYOUT.ingest_manifest), "counts": counts, "skipped": False}
    m = ingest_manifest(store)
    assert m["stage"] == "ingest" and m["counts"] == counts and m["rejections"] == []
    assert [a["key"] for a in m["archives"]] == sorted(LAYOUT.raw_prefix + n for n in archives)
    assert [i["name"] for i in m["images"]] == sorted(sources)
    assert image_keys(store) == sorted(LAYOUT.ingest_images + n for n in sources)
    for entry in m["images"]:
        body = store.get(entry["key"])
        assert sha(body) == entry["sha256"] == sha(sources[entry["name"]]) == m["outputs"][entry["key"]]
        assert entry["size"] == len(body)
        assert entry["selected"] is (entry["camera"] in ("side1", "side2"))
        assert entry["archive"] == LAYOUT.raw_prefix + f"{entry['camera']}.zip"
        assert entry["set_id"] == entry["name"].rsplit("_", 1)[0]
        assert entry["capture_time"].startswith("2026-11-02T09:00:")
    head = store.client.head_object(Bucket=store.bucket, Key=m["images"][0]["key"])
    assert head["ContentType"] == "image/jpeg"


# --- unsafe members -----------------------------------------------------------------------------


def test_zip_slip_members_are_rejected(store, tmp_path, jpegs):
    bad = {
        f"../{image_name('090000')}": "'..' component",
        f"cam/../../{image_name('090001')}": "'..' component",
        f"/{image_name('090002')}": "absolute",
        f"C:/{image_name('090003')}": "drive letter",
        f"cam\\{image_name('090004')}": "backslash",
    }
    m = ingest_one_archive(store, tmp_path, [(n, jpegs[0]) for n in bad], jpegs[1])
    assert m["counts"]["rejected"] == len(bad)
    for member, problem in bad.items():
        [rej] = rejections_for(m, member)
        assert "unsafe path" in rej["reason"] and problem in rej["reason"]
        assert rej["kind"] == "unsafe_path"  # item 9: preprocess tells "rejected for its path" apart by kind
    assert m["rejection_counts"] == {"unsafe_path": len(bad)}


def test_symlink_member_is_rejected(store, tmp_path, jpegs):
    link = zipfile.ZipInfo(f"cam/{image_name('090000')}")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    m = ingest_one_archive(store, tmp_path, [(link, b"/etc/passwd")], jpegs[0])
    [rej] = rejections_for(m, link.filename)
    assert "symlink" in rej["reason"]


def test_directory_entries(store, tmp_path, jpegs):
    posing = zipfile.ZipInfo(f"cam/{image_name('090001')}")
    posing.external_attr = (stat.S_IFDIR | 0o755) << 16
    members = [("cam/", b""), ("data-dir/", b"payload"), (posing, jpegs[0])]
    m = ingest_one_archive(store, tmp_path, members, jpegs[1])
    assert rejections_for(m, "cam/") == []  # a plain empty directory entry is not an error
    assert "directory entry carrying data" in rejections_for(m, "data-dir/")[0]["reason"]
    assert "directory posing as a file" in rejections_for(m, posing.filename)[0]["reason"]
    assert m["counts"]["members"] == 3


# --- zip bombs and limits -----------------------------------------------------------------------


def test_zip_bomb_ratio_is_rejected(store, tmp_path, jpegs):
    bomb = b"\xff\xd8\xff" + bytes(4 * 1024 * 1024)
    key = put_raw(store, "bomb.zip", make_zip([(image_name("090000"), bomb), (image_name("090001"), jpegs[0])],
                                                zipfile.ZIP_DEFLATED))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]
    assert rej["object"] == key and rej["member"] == image_name("090000")
    assert "zip bomb" in rej["reason"] and "max_ratio 100" in rej["reason"]
    assert [i["name"] for i in m["images"]] == [image_name("090001")]


def test_member_over_max_member_bytes_is_rejected(store, tmp_path, jpegs):
    small, big = jpegs[0], jpegs[-1]
    limit = (len(small) + len(big)) // 2
    m = ingest_one_archive(store, tmp_path, [(image_name("090000"), big)], small,
                           ingest={"max_member_bytes": limit})
    [rej] = rejections_for(m, image_name("090000"))
    assert f"declared {len(big)} bytes > max_member_bytes {limit}" in rej["reason"]


def test_archive_over_max_total_bytes_rejects_the_rest(store, tmp_path, jpegs):
    first, second = jpegs[0], jpegs[1]
    members = [(image_name("120000"), first), (image_name("120001"), second)]
    key = put_raw(store, "cam.zip", make_zip(members))
    ingest_day(road_day(store, tmp_path, ingest={"max_total_bytes": len(first) + len(second) - 1}))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("120000")]
    [rej] = m["rejections"]
    assert rej["object"] == key and rej["member"] == image_name("120001")
    assert "max_total_bytes" in rej["reason"]


def test_archive_over_max_members_is_rejected_whole(store, tmp_path, jpegs):
    over = put_raw(store, "a.zip", make_zip([(image_name(f"09000{i}"), jpegs[i]) for i in range(3)]))
    put_raw(store, "b.zip", make_zip([(image_name("120000"), jpegs[3])]))
    ingest_day(road_day(store, tmp_path, ingest={"max_members": 2}))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("120000")]
    assert m["rejections"] == [{"object": over, "member": None, "kind": "too_many_members",
                                "reason": "archive has 3 entries (directories included) > max_members 2;"
                                          " archive not read"}]


def _patch_declared_size(zip_data: bytes, member: str, size: int) -> bytes:
    """Lie about a member's uncompressed size in both its local and central directory headers."""
    out = bytearray(zip_data)
    name = member.encode()
    for sig, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = out.find(sig)
        name_at = {b"PK\x03\x04": 30, b"PK\x01\x02": 46}[sig]
        while out[pos + name_at : pos + name_at + len(name)] != name:
            pos = out.find(sig, pos + 1)
        out[pos + field : pos + field + 4] = struct.pack("<I", size)
    return bytes(out)


def test_member_inflating_past_its_declared_size_is_rejected(store, tmp_path, jpegs):
    # 1 MiB of deflated data declaring 2000 bytes: passes the header checks, must not be trusted.
    liar = image_name("090000")
    data = _patch_declared_size(
        make_zip([(liar, b"\xff\xd8\xff" + bytes(1024 * 1024)), (image_name("120000"), jpegs[0])],
                 zipfile.ZIP_DEFLATED),
        liar, 2000,
    )
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.getinfo(liar).file_size == 2000
    key = put_raw(store, "cam.zip", data)
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]
    assert rej["object"] == key and rej["member"] == liar and "CRC" in rej["reason"]
    assert [i["name"] for i in m["images"]] == [image_name("120000")]


def test_crc_error_is_rejected(store, tmp_path, jpegs):
    data = bytearray(make_zip([(image_name("090000"), jpegs[1]), (image_name("120000"), jpegs[0])]))
    at = data.find(jpegs[1]) + len(jpegs[1]) // 2
    data[at] ^= 0xFF
    key = put_raw(store, "cam.zip", bytes(data))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]
    assert rej["object"] == key and rej["member"] == image_name("090000")
    assert "Bad CRC-32" in rej["reason"]


def test_truncated_zip_is_rejected_and_other_archives_ingested(store, tmp_path, jpegs, caplog):
    good = put_raw(store, "a.zip", make_zip([(image_name("090000"), jpegs[0])]))
    whole = make_zip([(image_name("090001"), jpegs[1])])
    bad = put_raw(store, "b.zip", whole[: len(whole) // 2])
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]
    assert rej["object"] == bad and rej["member"] is None
    assert "corrupt or truncated zip archive" in rej["reason"]
    assert [i["archive"] for i in m["images"]] == [good]
    assert m["counts"] == {"archives": 2, "members": 1, "images": 1, "selected": 0, "rejected": 1}
    assert any(r.levelname == "WARNING" and bad in r.getMessage() for r in caplog.records)


def test_non_zip_object_is_reported(store, tmp_path, jpegs):
    put_raw(store, "a.zip", make_zip([(image_name("090000"), jpegs[0])]))
    notes = put_raw(store, "notes.txt", b"hello")
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    assert m["rejections"] == [{"object": notes, "member": None, "kind": "not_zip", "reason": "not a .zip archive"}]
    assert m["counts"]["images"] == 1 and m["counts"]["archives"] == 1


# --- bad content and names ----------------------------------------------------------------------


def test_non_jpeg_members_are_rejected(store, tmp_path, jpegs):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, "PNG")
    members = [(image_name("090000"), png.getvalue()), (image_name("090001"), b"just some text\n")]
    m = ingest_one_archive(store, tmp_path, members, jpegs[0])
    assert "not a JPEG (PNG data)" in rejections_for(m, image_name("090000"))[0]["reason"]
    assert "not a JPEG" in rejections_for(m, image_name("090001"))[0]["reason"]


def test_truncated_and_corrupt_jpegs_are_rejected(store, tmp_path, jpegs):
    whole = jpegs[1]
    garbled = whole[:600] + bytes(len(whole) - 602) + b"\xff\xd9"
    members = [(image_name("090000"), whole[: len(whole) // 2]), (image_name("090001"), garbled)]
    m = ingest_one_archive(store, tmp_path, members, jpegs[0])
    assert "truncated JPEG" in rejections_for(m, image_name("090000"))[0]["reason"]
    assert "corrupt JPEG" in rejections_for(m, image_name("090001"))[0]["reason"]


@pytest.mark.parametrize("name, problem", [
    ("IMG_0001.jpg", "does not match"),
    (image_name().replace(".jpg", ".png"), "does not match"),
    (image_name("250000"), "invalid capture time"),
    (image_name(cam="roof"), "unknown camera 'roof'"),
    (image_name(road="other_road"), "image of another road ('other_road'"),
    (image_name(ymd="20261103"), "image of another date (20261103"),
])
def test_misnamed_members_are_rejected(store, tmp_path, jpegs, name, problem):
    m = ingest_one_archive(store, tmp_path, [(f"cam/{name}", jpegs[1])], jpegs[0])
    [rej] = rejections_for(m, f"cam/{name}")  # the member names the file; the reason says what is wrong
    assert rej["kind"] == "bad_name" and rej["reason"].startswith("bad image name: ") and problem in rej["reason"]


def test_duplicate_names_across_archives(store, tmp_path, jpegs):
    same, other = image_name("090000"), image_name("090001")
    a = put_raw(store, "a.zip", make_zip([(same, jpegs[0]), (other, jpegs[1])]))
    b = put_raw(store, "b.zip", make_zip([(same, jpegs[2]), (f"dup/{other}", jpegs[1])]))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]  # the identical copy of `other` is counted once, silently
    assert rej["object"] == b and rej["member"] == same and rej["kind"] == "duplicate_conflict"
    assert "duplicate image name" in rej["reason"] and a in rej["reason"] and b in rej["reason"]
    assert rej["sha256"] == sha(jpegs[2]) and rej["kept"] == {"object": a, "member": same, "sha256": sha(jpegs[0])}
    assert {i["name"]: (i["archive"], i["sha256"]) for i in m["images"]} == {
        same: (a, sha(jpegs[0])), other: (a, sha(jpegs[1]))}
    assert store.get(LAYOUT.ingest_images + same) == jpegs[0]
    assert m["counts"] == {"archives": 2, "members": 4, "images": 2, "selected": 0, "rejected": 1}
    assert m["identical_duplicates"] == 1 and m["rejection_counts"] == {"duplicate_conflict": 1}


# --- whole-day failures -------------------------------------------------------------------------


def test_missing_day_is_an_error(store, tmp_path):
    with pytest.raises(AnswersheetError) as exc:
        ingest_day(road_day(store, tmp_path))
    assert str(exc.value) == f"missing day: no archives under s3://{store.bucket}/raw/{ROAD}/{YMD}/"
    assert store.list("work/") == []


def test_s3_failure_names_the_object(store, tmp_path):
    from answersheet.storage import Store

    rd = road_day(store, tmp_path)
    missing = Store(f"{store.bucket}-gone")
    with pytest.raises(AnswersheetError) as exc:
        ingest_day(RoadDay(road=rd.road, day=DAY, store=missing))
    assert str(exc.value).startswith(f"s3://{missing.bucket}/{LAYOUT.raw_prefix}: list failed: NoSuchBucket")


def test_empty_day_is_an_error_without_manifest(store, tmp_path, jpegs):
    put_raw(store, "a.zip", make_zip([("IMG_0001.jpg", jpegs[0]), (image_name("090000"), b"text")]))
    with pytest.raises(AnswersheetError) as exc:
        ingest_day(road_day(store, tmp_path))
    msg = str(exc.value)
    assert msg.startswith(f"s3://{store.bucket}/{LAYOUT.raw_prefix}: no valid image in 1 archive(s)")
    assert "2 rejection(s)" in msg and "IMG_0001.jpg" in msg and "not a JPEG" in msg
    assert store.list("work/") == []


def test_empty_day_after_a_good_run_leaves_nothing_that_looks_complete(store, tmp_path, jpegs):
    key = put_raw(store, "a.zip", make_zip([(image_name("090000"), jpegs[0])]))
    ingest_day(road_day(store, tmp_path))
    assert ingest_manifest(store) is not None
    put_raw(store, "a.zip", make_zip([(image_name("090000"), jpegs[0][:100])]))
    with pytest.raises(AnswersheetError, match="no valid image") as exc:
        ingest_day(road_day(store, tmp_path))
    assert key in str(exc.value) and "truncated JPEG" in str(exc.value)
    assert store.list("work/") == []


# --- re-runs ------------------------------------------------------------------------------------


def _listing(store) -> dict:
    resp = store.client.list_objects_v2(Bucket=store.bucket, Prefix="work/")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in resp["Contents"]}


def test_rerun_skips_force_redoes_and_removed_archive_leaves_no_stale_images(store, tmp_path, photos):
    rd = road_day(store, tmp_path)
    archives = build_day_archives(ROAD, DAY, ("front", "side1"), 2, photos)
    upload_day(store, ROAD, DAY, archives)
    first = ingest_day(rd)
    before, manifest_bytes = _listing(store), store.get(LAYOUT.ingest_manifest)

    again = ingest_day(rd)
    assert again == {**first, "skipped": True}
    assert _listing(store) == before and store.get(LAYOUT.ingest_manifest) == manifest_bytes

    images = {k: store.get(k) for k in image_keys(store)}
    forced = ingest_day(road_day(store, tmp_path, force=True))
    assert forced == first
    assert {k: store.get(k) for k in image_keys(store)} == images
    assert ingest_manifest(store)["images"] == json.loads(manifest_bytes)["images"]

    store.delete([LAYOUT.raw_prefix + "side1.zip"])
    third = ingest_day(rd)
    assert third["counts"] == {"archives": 1, "members": 2, "images": 2, "selected": 0, "rejected": 0}
    assert image_keys(store) == sorted(k for k in images if k.endswith("_front.jpg"))
    assert {i["camera"] for i in ingest_manifest(store)["images"]} == {"front"}


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_missing_day_then_success(store, tmp_path, jpegs, capsys):
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket)
    argv = ["ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads)]

    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"answersheet: error: missing day: no archives under s3://{store.bucket}/raw/{ROAD}/{YMD}/"

    put_raw(store, "side1.zip", make_zip([(image_name(cam="side1"), jpegs[0])]))
    summary = tmp_path / "summary.json"
    assert main([*argv, "--summary-json", str(summary)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"archives": 1, "members": 1, "images": 1, "selected": 1, "rejected": 0}
    assert json.loads(summary.read_text()) == out
    assert out["manifest"] == store.uri(LAYOUT.ingest_manifest)


# --- issue 8, item 3: a bad copy must not shadow a good one ---------------------------------------


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    return buf.getvalue()


def spliced(jpeg: bytes, keep: float = 0.4) -> bytes:
    """The first `keep` of a JPEG plus an end-of-image marker: well formed on the outside, data missing."""
    return jpeg[: int(len(jpeg) * keep)] + b"\xff\xd9"


@pytest.mark.parametrize("bad", ["truncated", "png", "spliced"])
def test_item3_a_bad_first_copy_does_not_shadow_a_good_one(store, tmp_path, jpegs, bad):
    same, good = image_name("090000"), jpegs[-1]
    first = {"truncated": good[: len(good) // 2], "png": png_bytes(), "spliced": spliced(good)}[bad]
    a = put_raw(store, "a.zip", make_zip([(same, first)]))
    b = put_raw(store, "b.zip", make_zip([(same, good)]))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    assert [(i["name"], i["archive"], i["sha256"]) for i in m["images"]] == [(same, b, sha(good))]
    assert store.get(LAYOUT.ingest_images + same) == good
    [rej] = m["rejections"]
    assert (rej["object"], rej["member"], rej["kind"]) == (a, same, "bad_jpeg")
    assert "duplicate" not in rej["reason"]
    assert m["rejection_counts"] == {"bad_jpeg": 1}


def test_item3_first_valid_copy_wins_within_one_archive_and_later_copies_are_judged(store, tmp_path, jpegs):
    same = image_name("090000")
    members = [(f"try1/{same}", jpegs[1][:200]), (f"try2/{same}", jpegs[1]), (f"try3/{same}", jpegs[1]),
               (f"try4/{same}", spliced(jpegs[2])), (f"try5/{same}", jpegs[2])]
    key = put_raw(store, "cam.zip", make_zip(members))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    assert [(i["name"], i["sha256"]) for i in m["images"]] == [(same, sha(jpegs[1]))]
    assert store.get(LAYOUT.ingest_images + same) == jpegs[1]
    kinds = {r["member"]: r["kind"] for r in m["rejections"]}
    assert kinds == {f"try1/{same}": "bad_jpeg", f"try4/{same}": "bad_jpeg", f"try5/{same}": "duplicate_conflict"}
    [conflict] = rejections_for(m, f"try5/{same}")
    assert conflict["kept"] == {"object": key, "member": f"try2/{same}", "sha256": sha(jpegs[1])}
    assert f"try2/{same}" in conflict["reason"] and sha(jpegs[2])[:12] in conflict["reason"]
    assert m["identical_duplicates"] == 1  # try3: the same bytes as the winner, ingested once


def test_item3_identical_copies_across_archives_are_ingested_once(store, tmp_path, jpegs):
    same = image_name("090000", "side1")
    for name in ("a.zip", "b.zip", "c.zip"):
        put_raw(store, name, make_zip([(f"{name[0]}/{same}", jpegs[0])]))
    result = ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    assert result["counts"] == {"archives": 3, "members": 3, "images": 1, "selected": 1, "rejected": 0}
    assert [i["archive"] for i in m["images"]] == [LAYOUT.raw_prefix + "a.zip"]
    assert m["rejections"] == [] and m["rejection_counts"] == {} and m["identical_duplicates"] == 2


def test_item3_first_valid_copy_wins_whatever_order_the_uploads_finish(store, tmp_path, jpegs):
    """30 names in three archives, uploaded by 8 threads: the winner is decided by archive and member order."""
    names = [image_name(f"09{i:04d}") for i in range(30)]
    good_a, good_b, good_c = jpegs[0], jpegs[1], jpegs[2]
    a = put_raw(store, "a.zip", make_zip([(n, good_a if i % 3 == 0 else good_a[:300]) for i, n in enumerate(names)]))
    b = put_raw(store, "b.zip", make_zip([(n, good_b if i % 3 != 2 else spliced(good_b)) for i, n in enumerate(names)]))
    c = put_raw(store, "c.zip", make_zip([(n, good_c) for n in names]))
    ingest_day(road_day(store, tmp_path, ingest={"workers": 8}))
    m = ingest_manifest(store)
    expected = {n: [a, b, c][i % 3] for i, n in enumerate(names)}
    assert {i["name"]: i["archive"] for i in m["images"]} == expected
    assert {i["name"]: i["sha256"] for i in m["images"]} == {
        n: sha({a: good_a, b: good_b, c: good_c}[k]) for n, k in expected.items()}
    conflicts = {(r["object"], r["member"]): r["kept"]["object"] for r in m["rejections"]
                 if r["kind"] == "duplicate_conflict"}
    assert conflicts == {**{(b, n): a for n, k in expected.items() if k == a},
                         **{(c, n): k for n, k in expected.items() if k != c}}
    assert m["rejection_counts"] == {"bad_jpeg": 30, "duplicate_conflict": 30}


# --- issue 8, item 8: junk members and memory -----------------------------------------------------


def zip_with_directories(n_dirs: int, members: list[tuple[str, bytes]]) -> bytes:
    """A stored zip of `n_dirs` empty directory entries, then `members`, written by hand (zipfile's writer
    keeps a ZipInfo per entry, ~0.5 KB each), with zip64 end records as zipfile writes them past 65535."""
    local, central = bytearray(), bytearray()

    def add(name: str, data: bytes, attr: int) -> None:
        raw, crc, offset = name.encode(), zlib.crc32(data), len(local)
        local.extend(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(data), len(data),
                                 len(raw), 0) + raw + data)
        central.extend(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x314, 20, 0, 0, 0, 0x21, crc, len(data),
                                   len(data), len(raw), 0, 0, 0, 0, attr, offset) + raw)

    for i in range(n_dirs):
        add(f"d{i:07d}/", b"", (stat.S_IFDIR | 0o755) << 16 | 0x10)
    for name, data in members:
        add(name, data, (stat.S_IFREG | 0o644) << 16)
    count, cd_at, cd_size = n_dirs + len(members), len(local), len(central)
    tail = bytearray()
    if count > 0xFFFF:
        tail += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_at)
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, cd_at + cd_size, 1)
    small = min(count, 0xFFFF)
    tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, small, small, cd_size, cd_at, 0)
    return bytes(local + central + tail)


def test_item8_directory_entries_count_against_max_members(store, tmp_path, jpegs):
    over = put_raw(store, "a.zip", make_zip([*((f"d{i}/", b"") for i in range(3)), (image_name("090000"), jpegs[0])]))
    put_raw(store, "b.zip", make_zip([(image_name("090001"), jpegs[1])]))
    ingest_day(road_day(store, tmp_path, ingest={"max_members": 3}))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("090001")]
    assert m["rejections"] == [{"object": over, "member": None, "kind": "too_many_members",
                                "reason": "archive has 4 entries (directories included) > max_members 3;"
                                          " archive not read"}]
    assert m["rejection_counts"] == {"too_many_members": 1}


def test_item8_entries_are_counted_in_the_directory_not_taken_from_the_end_record(store, tmp_path, jpegs):
    data = bytearray(make_zip([*((f"d{i}/", b"") for i in range(3)), (image_name("090000"), jpegs[0])]))
    eocd = data.rfind(b"PK\x05\x06")
    data[eocd + 8 : eocd + 12] = struct.pack("<2H", 1, 1)  # the end record claims one entry; zipfile reads four
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert len(zf.infolist()) == 4
    over = put_raw(store, "a.zip", bytes(data))
    put_raw(store, "b.zip", make_zip([(image_name("090001"), jpegs[1])]))
    ingest_day(road_day(store, tmp_path, ingest={"max_members": 3}))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("090001")]
    [rej] = m["rejections"]
    assert rej["object"] == over and rej["kind"] == "too_many_members"
    assert "more than max_members 3 entries" in rej["reason"] and "declares 1" in rej["reason"]


def test_item8_central_directory_bytes_are_bounded_by_max_members(store, tmp_path, jpegs):
    """Few entries with huge names/extras would still make zipfile read and keep the whole directory."""
    long_name = "x" * 3000 + "/" + image_name("090000")
    over = put_raw(store, "a.zip", make_zip([(long_name, jpegs[0])]))
    put_raw(store, "b.zip", make_zip([(image_name("090001"), jpegs[1])]))
    ingest_day(road_day(store, tmp_path, ingest={"max_members": 2}))
    m = ingest_manifest(store)
    [rej] = m["rejections"]
    assert rej["object"] == over and rej["kind"] == "too_many_members"
    assert rej["reason"] == (f"central directory of {46 + len(long_name)} bytes > 1024 bytes per allowed member"
                             " (max_members 2); archive not read")
    assert [i["name"] for i in m["images"]] == [image_name("090001")]


_PEAK_RSS_CHILD = """
import datetime as dt, gc, json, resource, sys, tempfile
from answersheet.config import load_road
from answersheet.day import RoadDay
from answersheet.ingest import ingest_day
from answersheet.storage import Store
rd = RoadDay(road=load_road(sys.argv[1], sys.argv[2]), day=dt.date.fromisoformat(sys.argv[3]), store=Store(sys.argv[4]))
for obj in rd.store.list(rd.layout.raw_prefix):  # what downloading costs is S3 client business: count it first
    with tempfile.TemporaryFile() as fh:
        rd.store.download(obj.key, fh)
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ingest_day(rd)
print(json.dumps({"growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_item8_an_archive_over_max_members_is_rejected_before_its_directory_is_built(store, tmp_path, jpegs):
    """300k directory entries (zip64, 28 MB) against the default max_members 200000, in a fresh process.
    Peak RSS over what downloading the archives alone peaked at, measured on SeaweedFS: +60 to +78 MiB before
    (zipfile built 300k ZipInfos, and directory entries were not even counted); +0 now: the directory is
    counted from the file and nothing is built."""
    n = 300_000
    over = put_raw(store, "a.zip", zip_with_directories(n, [(image_name("090000"), jpegs[0])]))
    put_raw(store, "b.zip", make_zip([(image_name("090001"), jpegs[1])]))
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket)
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, str(roads), ROAD, DAY.isoformat(), store.bucket],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth_mib"]
    m = ingest_manifest(store)
    assert m["rejections"] == [{"object": over, "member": None, "kind": "too_many_members",
                                "reason": f"archive has {n + 1} entries (directories included) > max_members 200000;"
                                          " archive not read"}]
    assert [i["name"] for i in m["images"]] == [image_name("090001")]
    assert growth < 16, f"peak RSS grew {growth:.0f} MiB over the download's while rejecting an archive unread"


def test_item8_every_junk_member_is_in_the_manifest_with_counts_per_kind(store, tmp_path, jpegs):
    junk = [(f"junk/{i:05d}.txt", b"x") for i in range(500)]
    others = [(f"../{image_name('090001')}", jpegs[1]), (image_name("090002"), b"text")]
    m = ingest_one_archive(store, tmp_path, [*junk, *others], jpegs[0])
    assert m["counts"]["rejected"] == len(m["rejections"]) == 502
    assert m["rejection_counts"] == {"bad_name": 500, "bad_jpeg": 1, "unsafe_path": 1}
    assert sorted(r["member"] for r in m["rejections"] if r["kind"] == "bad_name") == [n for n, _ in junk]
    # one reason text for all of them (the member names the file): the manifest does not repeat 500 names twice
    assert {r["reason"] for r in m["rejections"] if r["kind"] == "bad_name"} == {
        "bad image name: name does not match <road>_<YYYYMMDD>_<HHMMSS>_<cam>.jpg"}


# --- issue 8, item 10: strict names and strict JPEG decoding --------------------------------------


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b", "\x7f", "\t", "\x85", "\u202e", "\u2028", "\xa0"])
def test_item10_member_names_with_control_characters_are_rejected(store, tmp_path, jpegs, char):
    trailing, inside = f"cam/{image_name('090000')}{char}", f"cam{char}/{image_name('090001')}"
    m = ingest_one_archive(store, tmp_path, [(trailing, jpegs[1]), (inside, jpegs[2])], jpegs[0])
    assert len(m["rejections"]) == 2
    for raw in (trailing, inside):
        [rej] = rejections_for(m, printable(raw))
        assert rej["kind"] == "unsafe_path"
        assert rej["reason"] == f"unsafe path: control or non-printable character U+{ord(char):04X} in member name"
        assert rej["member"].isprintable() and char not in rej["member"]


def test_item10_nul_byte_cut_member_name_is_rejected(store, tmp_path, jpegs):
    """zipfile cuts `filename` at a NUL; the raw name is what must be judged."""
    named = image_name("090000") + "#.txt"
    data = make_zip([(named, jpegs[1]), (image_name("120000"), jpegs[0])])
    data = data.replace(named.encode(), named.replace("#", "\x00").encode())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.infolist()[0].filename == image_name("090000")
    key = put_raw(store, "cam.zip", data)
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("120000")]
    assert m["rejections"] == [{"object": key, "member": image_name("090000") + "\\x00.txt", "kind": "unsafe_path",
                                "reason": "unsafe path: NUL byte in member name"}]


def test_item10_a_jpeg_spliced_from_40_percent_plus_an_end_marker_is_rejected(store, tmp_path, jpegs):
    from PIL import Image

    with Image.open(io.BytesIO(jpegs[-1])) as im:
        progressive = io.BytesIO()
        im.save(progressive, "JPEG", quality=90, progressive=True)
    members = [(image_name("090000"), spliced(jpegs[-1])), (image_name("090001"), spliced(progressive.getvalue()))]
    m = ingest_one_archive(store, tmp_path, members, jpegs[0])
    for name, _ in members:
        [rej] = rejections_for(m, name)
        assert rej["kind"] == "bad_jpeg" and rej["reason"].startswith("corrupt JPEG: ")
        assert "premature end" in rej["reason"]


def _jpeg(im, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_item10_strict_decode_accepts_every_real_photo_and_unusual_valid_jpegs(photos):
    from PIL import Image

    for path in photos:
        data = path.read_bytes()
        with Image.open(path) as im:
            assert check_jpeg(data) == im.size, path
    with Image.open(photos[0]) as im:
        im.load()
        rgb = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    variants = {
        "cmyk": _jpeg(rgb.convert("CMYK")), "gray": _jpeg(rgb.convert("L")),
        "progressive": _jpeg(rgb, progressive=True), "exif-rotated": _jpeg(rgb, exif=exif),
        "1x1": _jpeg(Image.new("RGB", (1, 1))),
        "8x60000": _jpeg(Image.new("RGB", (8, 60000))), "60000x8": _jpeg(Image.new("RGB", (60000, 8))),
        "camera trailer": _jpeg(rgb) + b"\x00TRAILER" * 64,
    }
    for what, data in variants.items():
        assert check_jpeg(data)[0] >= 1, what
    with pytest.raises(BadJpeg, match="too large to decode safely"):
        check_jpeg(_jpeg(Image.new("L", (16384, 8192))))


# --- issue 8, output hygiene -----------------------------------------------------------------------


@pytest.mark.fast
def test_output_hygiene_printable_escapes_every_control_character_and_is_idempotent():
    raw = "a\nb\rc\x1b[31md\x7fe\x85f\u202eg\u2028h\ti"
    assert printable(raw) == r"a\nb\rc\x1b[31md\x7fe\x85f\u202eg\u2028h\ti"
    for text in ("plain name_20261102.jpg", "대왕판교 C:\\dir", "x\n\x1b"):
        once = printable(text)
        assert once.isprintable() and printable(once) == once
    assert printable("대왕판교 C:\\dir") == "대왕판교 C:\\dir"


def test_output_hygiene_control_characters_never_reach_logs_the_manifest_or_the_error_line(
        store, tmp_path, jpegs, caplog, capsys):
    evil = f"cam/\x1b[2J\x1b[31m{image_name('090000')}\r\nFAKE: all good"
    put_raw(store, "a.zip", make_zip([(evil, jpegs[0])]))
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket)
    argv = ["ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("answersheet: error:")]
    assert printable(evil) in line and "FAKE" in line and not any(c in err for c in "\x1b\r")
    assert all(r.getMessage().isprintable() for r in caplog.records if r.name.startswith("answersheet"))

    put_raw(store, "b.zip", make_zip([(image_name("120000"), jpegs[1])]))
    caplog.clear()
    assert main(argv) == 0
    [rej] = ingest_manifest(store)["rejections"]
    assert rej["member"] == printable(evil) and rej["member"].isprintable() and rej["reason"].isprintable()
    assert all(r.getMessage().isprintable() for r in caplog.records if r.name.startswith("answersheet"))
