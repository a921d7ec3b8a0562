"""Shared fixtures: a real S3 server (SeaweedFS on 127.0.0.1, auth on), a fault proxy, buckets, roads files."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROADS_FILE = REPO / "dags" / "roads.yaml"
SHARED = Path(os.environ.get("ANSWERSHEET_SHARED", REPO.parent / "shared"))
REAL_WEIGHTS = Path(os.environ.get("ANSWERSHEET_WEIGHTS") or SHARED / "models" / "yolov5n.pt")
ROAD_SAMPLES = Path(os.environ.get("ANSWERSHEET_ROAD_SAMPLES") or SHARED / "samples" / "road")
DAY = dt.date(2026, 11, 2)
ROAD = "daewang_pangyo"


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, auth on) on 127.0.0.1 for the whole session; its admin identity's
    environment is set as boto3 reads it (subprocesses inherit it). Identities: `admin`, `reader` (read/list)."""
    from answersheet.dev.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """The S3 endpoint URL (env set for the admin identity)."""
    return s3_server.endpoint


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting proxy (tests/faultproxy.py) in front of the real server. AWS_ENDPOINT_URL stays on the
    server: point the code under test at `fault_proxy.url` (env of a subprocess, or Store(client=...))."""
    from faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def store(s3_endpoint):
    """A fresh, empty bucket on the S3 server."""
    from answersheet.storage import Store

    s = Store(f"test-{uuid.uuid4().hex[:12]}")
    s.client.create_bucket(Bucket=s.bucket)
    return s


def write_roads_file(path: Path, bucket: str, **road_overrides) -> Path:
    """The shipped roads file with this test's bucket and overrides deep-merged into the road."""
    from answersheet.config import deep_merge

    doc = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    doc["roads"][0] = deep_merge(doc["roads"][0], {"bucket": bucket, **road_overrides})
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


MIN_PHOTOS = 8


def real_photos() -> list[Path]:
    """At least MIN_PHOTOS distinct real photos: the shared road samples when present; else the two shipped in
    yolov5, plus mirrored/cropped variants of them (written once to a temp dir) so tests get distinct images."""
    import tempfile

    from PIL import Image, ImageOps

    from answersheet.dev.sample_day import sample_photos

    photos = sample_photos(ROAD_SAMPLES if ROAD_SAMPLES.is_dir() else None)
    if len(photos) >= MIN_PHOTOS:
        return photos
    out = Path(tempfile.mkdtemp(prefix="answersheet-photos-"))
    variants = []
    for i in range(MIN_PHOTOS - len(photos)):
        src = photos[i % len(photos)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = i // len(photos)
            im = ImageOps.mirror(im) if k % 2 == 0 else im
            im = im.crop((k * w // 16, k * h // 16, w - k * w // 16, h - k * h // 16))
            path = out / f"variant{i}_{src.name}"
            im.save(path, "JPEG", quality=90)
            variants.append(path)
    return photos + variants


@pytest.fixture(scope="session")
def photos():
    """Real photos (see real_photos)."""
    return real_photos()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """(path, sha256) of a tiny random-init YOLOv5 (yolov5n.yaml at half width, 80 classes) saved in the
    official checkpoint format; its boxes are meaningless but deterministic (seed 0)."""
    from answersheet.model import save_random_checkpoint

    path = tmp_path_factory.mktemp("weights") / "tiny-yolov5.pt"
    sha = save_random_checkpoint(path, cfg="yolov5n.yaml", nc=80, width_multiple=0.125, seed=0)
    return path, sha
