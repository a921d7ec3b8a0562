"""Issue 8 item 8: a day whose archive holds one set of 6 real images and 199,994 junk members.

200,000 entries in all: ingest's default max_members, which refuses a whole archive with more entries.

Measures what the rejections cost downstream of ingest: the size of the preprocess manifest, the
answer sheet's datasheet.csv and report.html, and the peak RSS of the preprocess and datasheet stages
(each run as its own `answersheet` process; peak RSS from GNU time's %M, so the bench process's own
memory is not inherited through fork). Runs against a local SeaweedFS (answersheet.dev.s3server); the
stages are the real CLI, so the same script measures any checkout:

    PYTHONPATH=src ANSWERSHEET_WEIGHTS=../shared/models/yolov5n.pt \
        .venv/bin/python bench/junk_members.py [--junk 199994]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROAD = "daewang_pangyo"
DAY = dt.date(2026, 11, 2)
CAMERAS = ("front", "rear", "left", "right", "side1", "side2")


def junk_archive(junk: int, photos: list[Path]) -> bytes:
    """One zip: a set of 6 real images first (so max_members never cuts them), then `junk` 1-byte members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, cam in enumerate(CAMERAS):
            zf.writestr(f"{ROAD}_{DAY:%Y%m%d}_090000_{cam}.jpg", photos[i % len(photos)].read_bytes())
        for i in range(junk):
            zf.writestr(f"junk/{i:07d}.txt", b"x")
    return buf.getvalue()


def stage(name: str, roads: Path, env: dict) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS MiB) of one `answersheet <stage>` process."""
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile("r") as rss:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, "-m", "answersheet.cli",
                               "--log-level", "WARNING", name, "--road", ROAD, "--date", DAY.isoformat(),
                               "--config", str(roads)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kib = int(rss.read().split()[-1])
    if proc.returncode:
        print(proc.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
    return proc.returncode, time.monotonic() - t0, kib / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--junk", type=int, default=200_000 - len(CAMERAS))
    args = parser.parse_args()
    from answersheet.dev.s3server import S3Server
    from answersheet.dev.sample_day import sample_photos
    from answersheet.storage import Store

    weights = Path(os.environ.get("ANSWERSHEET_WEIGHTS", REPO.parent / "shared/models/yolov5n.pt"))
    with tempfile.TemporaryDirectory() as tmp, S3Server(Path(tmp) / "s3") as server:
        env = {**os.environ, **server.env()}
        os.environ.update(env)
        store = Store("bench-junk")
        store.client.create_bucket(Bucket=store.bucket)
        doc = yaml.safe_load((REPO / "dags/roads.yaml").read_text(encoding="utf-8"))
        doc["roads"][0].update(bucket=store.bucket)
        doc["roads"][0]["detect"] = {**doc["roads"][0].get("detect", {}), "weights": str(weights),
                                     "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                     "backend": "torch", "device": "cpu"}
        roads = Path(tmp) / "roads.yaml"
        roads.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        store.put(f"raw/{ROAD}/{DAY:%Y%m%d}/junk.zip", junk_archive(args.junk, sample_photos()), "application/zip")
        result: dict = {"junk_members": args.junk}
        for name in ("ingest", "detect", "preprocess", "datasheet"):
            code, seconds, rss = stage(name, roads, env)
            result[name] = {"exit": code, "seconds": round(seconds, 1), "peak_rss_mib": round(rss)}
            if code:
                break
        sizes = {o.key.rsplit("/", 1)[-1]: o.size for o in store.list(f"answersheet/{ROAD}/{DAY:%Y%m%d}/")
                 if "/report/" not in o.key and "/images/" not in o.key and "/labels/" not in o.key}
        work = {o.key.split("/", 3)[-1]: o.size for o in store.list(f"work/{ROAD}/{DAY:%Y%m%d}/")
                if o.key.endswith(".json")}
        result["bytes"] = {**{f"answersheet/{k}": v for k, v in sizes.items()},
                           **{f"work/{k}": v for k, v in work.items()}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
