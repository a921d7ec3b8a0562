"""ingest stage on a real S3 server (moto over HTTP) with archives built from real JPEG photos."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import struct
import zipfile

import pytest
from conftest import DAY, ROAD, write_roads_file

from answersheet.cli import main
from answersheet.config import load_road
from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError
from answersheet.ingest import ingest_day
from answersheet.layout import DayLayout
from answersheet.sample_day import build_day_archives, upload_day

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


def test_members_beyond_max_members_are_rejected(store, tmp_path, jpegs):
    members = [(image_name(f"09000{i}"), jpegs[i]) for i in range(3)]
    put_raw(store, "cam.zip", make_zip(members))
    ingest_day(road_day(store, tmp_path, ingest={"max_members": 2}))
    m = ingest_manifest(store)
    assert [i["name"] for i in m["images"]] == [image_name("090000"), image_name("090001")]
    [rej] = m["rejections"]
    assert rej["member"] == image_name("090002") and "more than max_members 2" in rej["reason"]


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
    assert m["rejections"] == [{"object": notes, "member": None, "reason": "not a .zip archive"}]
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
    [rej] = rejections_for(m, f"cam/{name}")
    assert "bad image name" in rej["reason"] and problem in rej["reason"] and name in rej["reason"]


def test_duplicate_names_across_archives(store, tmp_path, jpegs):
    same, other = image_name("090000"), image_name("090001")
    a = put_raw(store, "a.zip", make_zip([(same, jpegs[0]), (other, jpegs[1])]))
    b = put_raw(store, "b.zip", make_zip([(same, jpegs[2]), (f"dup/{other}", jpegs[1])]))
    ingest_day(road_day(store, tmp_path))
    m = ingest_manifest(store)
    [rej] = m["rejections"]  # the identical copy of `other` is counted once, silently
    assert rej["object"] == b and rej["member"] == same
    assert "duplicate image name" in rej["reason"] and a in rej["reason"] and b in rej["reason"]
    assert {i["name"]: (i["archive"], i["sha256"]) for i in m["images"]} == {
        same: (a, sha(jpegs[0])), other: (a, sha(jpegs[1]))}
    assert store.get(LAYOUT.ingest_images + same) == jpegs[0]
    assert m["counts"] == {"archives": 2, "members": 4, "images": 2, "selected": 0, "rejected": 1}


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
