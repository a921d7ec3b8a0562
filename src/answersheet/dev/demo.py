"""`make demo`: one road-day end to end on a local S3 endpoint, result pulled to ./demo-output/.

Starts a real S3 server (SeaweedFS) on 127.0.0.1 (stopped afterwards), writes a sample day composed from real
photos (one short set), runs the real DAG in local mode (`airflow dags test`, or `--runner cli` for
`answersheet run`), pulls `answersheet/<road>/<YYYYMMDD>/` (sha256-verified) and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import yaml

from answersheet.config import deep_merge, load_road
from answersheet.dev.sample_day import build_day_archives, sample_photos, upload_day
from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout
from answersheet.storage import Store

log = logging.getLogger("answersheet.dev.demo")

REPO = Path(__file__).resolve().parents[3]
DEFAULT_ROADS = REPO / "dags" / "roads.yaml"
WEIGHTS_KEY = "models/yolov5n.pt"
DOWNLOAD_TIMEOUT_S = 45


@contextmanager
def local_s3(data_dir: Path):
    """A real S3 server (SeaweedFS, `answersheet.dev.s3server`) on 127.0.0.1 with fresh credentials in the
    environment; killed by PID on exit."""
    from answersheet.dev.s3server import S3Server

    with S3Server(data_dir) as server, mock.patch.dict(os.environ, server.env()):  # the environment restored after
        log.info("local S3 (SeaweedFS) on %s, pid %d", server.endpoint, server.pid)
        yield server.endpoint


def demo_weights(workdir: Path) -> tuple[Path, bool]:
    """(weights file, real?): $ANSWERSHEET_WEIGHTS, else yolov5's download, else a random-init model."""
    env = os.environ.get("ANSWERSHEET_WEIGHTS")
    if env:
        path = Path(env).resolve()
        if not path.is_file():
            raise AnswersheetError(f"{path}: ANSWERSHEET_WEIGHTS points to no file")
        return path, True
    target = workdir / "yolov5n.pt"
    if download_official_weights(target):
        return target, True
    from answersheet.dev.random_init import save_random_checkpoint

    save_random_checkpoint(target, cfg="yolov5n.yaml", nc=80)
    banner = "!" * 78
    log.warning("\n%s\n!! NO REAL WEIGHTS: using a RANDOMLY INITIALISED YOLOv5n. Its labels are MEANINGLESS.\n"
                "!! Set ANSWERSHEET_WEIGHTS=/abs/path/yolov5n.pt for real detections.\n%s", banner, banner)
    return target, False


def download_official_weights(target: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bool:
    """yolov5's own weight download, in a child process killed after timeout_s (offline it retries for minutes)."""
    code = ("import sys\nfrom yolov5.utils.downloads import attempt_download\n"
            "attempt_download(sys.argv[1])")
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.info("yolov5 weight download: no answer in %.0fs (offline?)", timeout_s)
        return False
    return target.is_file() and target.stat().st_size > 1_000_000


def effective_roads_file(src: Path, road_id: str, bucket: str, weights_sha: str, dst: Path) -> Path:
    """The roads file with the demo's bucket and the weights' real sha256 (the demo's one override)."""
    doc = yaml.safe_load(src.read_text(encoding="utf-8"))
    for i, road in enumerate(doc["roads"]):
        if road.get("id") == road_id:
            doc["roads"][i] = deep_merge(road, {
                "bucket": bucket,
                "detect": {"weights": f"s3://{bucket}/{WEIGHTS_KEY}", "sha256": weights_sha},
            })
    dst.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return dst


EXPORTS = ("datasheet.csv", "report.html", "data.yaml", "train.txt", "val.txt", "coco/instances.json",
           "coco/results.json", "cvat/coco-1.0.zip", "label-studio/tasks.json", "label-studio/config.xml",
           "predictions.jsonl", "classes.txt", "manifest.json")


def summary_lines(sheet: dict, classes: tuple[str, ...], out_dir: Path, real_weights: bool) -> list[str]:
    """The human summary printed at the end of the demo."""
    c = sheet["counts"]
    lines = [
        f"answer sheet: {sheet['road']['name']} ({sheet['road']['id']}) {sheet['date']} -> {out_dir}",
        f"  images {c['images']} in {c['sets']} sets | detected {c['detected']} | empty {c['empty']} | "
        f"not_detected {c.get('not_detected', 0)} (no label file) | missing {c['missing']} | "
        f"rejected {c['rejected']} | failed {c.get('failed', 0)} | short sets {c['short_sets']}",
        f"  boxes {c['boxes']}: " + (", ".join(f"{k} {v}" for k, v in sorted(c['per_class'].items(),
                                                                              key=lambda kv: -kv[1])) or "none"),
    ]
    for set_id, missing in sheet.get("short_sets", {}).items():
        lines.append(f"  short set {set_id}: missing {', '.join(missing)} (policy {sheet['short_set_policy']})")
    for flag in sheet.get("drift", {}).get("flags", []):
        lines.append(f"  drift: camera {flag['camera']} {flag['metric']} {flag['today']} (usual {flag['baseline']})")
    lines.append(f"  open {out_dir / 'report.html'} and {out_dir / 'datasheet.csv'}")
    lines.append("  exports: " + ", ".join(e for e in EXPORTS if (out_dir / e).is_file()))
    if not real_weights:
        lines.append("  WARNING: random-init weights were used: the labels are meaningless")
    return lines


def run_demo(out: Path, road_id: str, day: dt.date, runner: str, roads_src: Path, n_sets: int) -> list[str]:
    """Everything `make demo` does; returns the summary lines."""
    with tempfile.TemporaryDirectory(prefix="answersheet-demo-") as tmp, local_s3(Path(tmp) / "s3"):
        work = Path(tmp)
        store = Store("answersheet")
        store.client.create_bucket(Bucket=store.bucket)
        weights, real = demo_weights(work)
        data = weights.read_bytes()
        store.put(WEIGHTS_KEY, data)
        roads = effective_roads_file(roads_src, road_id, store.bucket, hashlib.sha256(data).hexdigest(),
                                     work / "roads.yaml")
        road = load_road(roads, road_id)
        photos = sample_photos()
        archives = build_day_archives(road.id, day, road.cameras, n_sets, photos,
                                      short_sets={n_sets // 2: ["rear"]})
        keys = upload_day(store, road.id, day, archives)
        log.info("sample day: %d archives, %d sets from %d photos (%s)", len(keys), n_sets, len(photos),
                 photos[0].parent)
        if runner == "airflow":
            from answersheet.dev.local_airflow import run_dag_test

            run_dag_test(road.id, day.isoformat(), roads, work / "airflow", dict(os.environ))
        else:
            from answersheet.cli import main

            if main(["run", "--road", road.id, "--date", day.isoformat(), "--config", str(roads)]) != 0:
                raise AnswersheetError("answersheet run failed (see the log above)")
        layout = DayLayout(road.id, day)
        dest = out / road.id / layout.ymd
        if dest.exists():
            shutil.rmtree(dest)
        from answersheet.pull import pull

        pull(store, road.id, day, dest)  # as a user gets it: every object checked against the manifest
        sheet = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
        return summary_lines(sheet, road.classes, dest, real)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="answersheet-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo-output", help="where the answer sheet is copied")
    parser.add_argument("--road", default="daewang_pangyo")
    parser.add_argument("--date", default="2026-11-02", help="logical date of the sample day")
    parser.add_argument("--runner", choices=("airflow", "cli"), default="airflow",
                        help="airflow: the real DAG in local mode (default); cli: `answersheet run`")
    parser.add_argument("--roads", default=str(DEFAULT_ROADS), help="roads file to start from")
    parser.add_argument("--sets", type=int, default=8, help="sets (6 images each) in the sample day")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lines = run_demo(Path(args.out).resolve(), args.road, dt.date.fromisoformat(args.date), args.runner,
                         Path(args.roads), args.sets)
    except AnswersheetError as exc:
        print(f"answersheet-demo: error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
