"""Detector speed: `yolov5 detect` (the seed's way) vs `answersheet detect` per backend, same images/weights.

One command:

    .venv/bin/python bench/detector.py --images 200            # + --rss-sizes 100 2000 (default)

What it does, all in one run:
1. N road-size 1920x1080 JPEGs composed from real photos ($ANSWERSHEET_SAMPLE_DIR, else the photos that
   ship inside the installed yolov5 package), packed into a day of camera archives (side1/side2) in the
   bucket `answersheet` of a local S3 server (SeaweedFS, 127.0.0.1, its own process) and ingested with
   the real ingest stage (not timed). The weights go where the shipped roads file expects them
   (s3://answersheet/models/yolov5n.pt).
2. (a) `yolov5 detect --weights W --source DIR --save-txt --conf-thres 0.25 --iou-thres 0.45 --imgsz 640`
   on the same JPEGs as local files (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, absolute weights path); also
   with `--nosave` (no annotated images), the fairer baseline.
   (b) `answersheet detect --force --backend B` end to end through S3 for B in torch, onnx and openvino
   (the last two run the same ONNX file, exported beforehand with `answersheet export-onnx` into S3 and
   configured; openvino runs bf16 where the CPU has it natively, so its labels are close to, not identical
   with, the CLI's).
   (c) `shipped default`: `answersheet detect --force --config dags/roads.yaml` — the roads file exactly as
   shipped (backend auto — OpenVINO bf16 on a CPU with native bf16, else ONNX Runtime — no detect.onnx):
   first with the bucket's ONNX cache empty (cold: the run exports the weights once into
   models/.onnx-cache/, counted in its time), then again (warm: the run reads and verifies the cached
   export). That is what a new user's CPU road gets without any step.
   When the shipped road runs another input size than 640 (the example road: 1280, chosen by
   bench/accuracy.py), these two rows are compared with `yolov5 detect --imgsz <that size>` (a'), the
   CLI at the same input size; their label agreement is against it too (the road's class map and
   per-class thresholds then make the labels differ on purpose).
   Every run is a separate process: wall time (start-up, model load, S3 GETs/PUTs included), peak RSS
   (GNU time: the largest process of the run's tree, i.e. the export child on the cold run), CPU seconds of
   the S3 server process, and label agreement with (a): the share of boxes matched one-to-one (same class,
   IoU > 0.9) and the share of byte-identical label files.
3. Model-only throughput on synthetic tensors (1x3x384x640 and 4x3x384x640): torch, ONNX Runtime and
   OpenVINO (its default precision here, as detect runs it).
4. Peak RSS of `--backend onnx` at --rss-sizes images (memory must stay flat in the image count).

Results: a table on stdout and bench/out/detector.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
BIN = Path(sys.executable).parent
ROAD = "daewang_pangyo"
DAY = dt.date(2026, 11, 2)
SIZE = (1920, 1080)
CONF, IOU, IMGSZ = 0.25, 0.45, 640


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


GNU_TIME = Path("/usr/bin/time")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (the S3 server), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], env: dict, logfile: Path, s3_pid: int, cwd: Path | None = None) -> dict:
    """Run a command in its own process: wall seconds, CPU seconds and peak RSS (MiB), and the CPU seconds
    the S3 server process spent meanwhile.

    Peak RSS comes from GNU time when installed (it forks from a tiny process); os.wait4's ru_maxrss
    would also count this (large) benchmark process's pages copied at fork.
    """
    timing = logfile.with_suffix(".time")
    full = [str(GNU_TIME), "-o", str(timing), "-f", "%e %U %S %M", *cmd] if GNU_TIME.exists() else cmd
    s3_cpu0 = process_cpu_seconds(s3_pid)
    with open(logfile, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({proc.returncode}); see {logfile}:\n"
                         + logfile.read_text(errors="replace")[-3000:])
    if GNU_TIME.exists():
        _, user, system, max_kb = timing.read_text().split()[-4:]
        cpu, rss_kb = float(user) + float(system), int(max_kb)
    else:
        cpu, rss_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    s3_cpu = process_cpu_seconds(s3_pid) - s3_cpu0
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mib": round(rss_kb / 1024, 1),
            "s3_server_cpu_seconds": round(s3_cpu, 2)}


def roads_file(path: Path, bucket: str, detect: dict) -> Path:
    from answersheet.config import deep_merge

    doc = yaml.safe_load((REPO / "dags" / "roads.yaml").read_text(encoding="utf-8"))
    # identity mode (80 COCO classes, no class map/thresholds/slices) so the labels must equal the CLI's
    identity = {"class_map": "identity", "class_conf_thres": None, "slices": None, "agnostic_nms": None}
    doc["roads"][0] = deep_merge(doc["roads"][0], {"bucket": bucket, "cameras": ["side1", "side2"],
                                                   "classes": doc["defaults"]["classes"],
                                                   "detect": {**identity, **detect}})
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def make_day(store, n_images: int, photos: list[Path], image_dir: Path | None) -> None:
    """n road-size JPEGs as a day of side1/side2 archives in S3, ingested; optionally also as local files."""
    from answersheet.dev.sample_day import build_day_archives, upload_day

    archives = build_day_archives(ROAD, DAY, ("side1", "side2"), (n_images + 1) // 2, photos, size=SIZE)
    upload_day(store, ROAD, DAY, archives)
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
        for data in archives.values():
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    (image_dir / Path(info.filename).name).write_bytes(zf.read(info))


def ingest(store, roads: Path) -> None:
    from answersheet.config import load_road
    from answersheet.day import RoadDay
    from answersheet.ingest import ingest_day

    ingest_day(RoadDay(road=load_road(roads, ROAD), day=DAY, store=store))


def s3_labels(store) -> dict[str, str]:
    from answersheet.layout import DayLayout

    prefix = DayLayout(ROAD, DAY).detect_labels
    return {o.key[len(prefix) : -4]: store.get(o.key).decode() for o in store.list(prefix)}


def model_only(weights: Path, onnx_path: Path, seconds: float = 8.0) -> dict:
    """Images/s of the model alone on synthetic letterboxed tensors (no decode, no NMS, no S3)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from answersheet.detector.checkpoint import load_checkpoint
    from answersheet.detector.onnx_backend import OnnxBackend
    from answersheet.detector.openvino_backend import OpenVinoBackend, default_precision
    from answersheet.detector.torch_backend import TorchBackend

    cpus = len(os.sched_getaffinity(0))
    setups = {  # name: (backend, concurrent streams)
        "torch": (TorchBackend(load_checkpoint(weights), "cpu"), 1),
        "onnx": (OnnxBackend(onnx_path, "cpu"), 1),
        f"onnx 1 thread x {cpus} streams (what detect uses)": (
            OnnxBackend(onnx_path, "cpu", threads=1, sessions=cpus), cpus),
        f"openvino {default_precision()} {cpus} streams x 1 thread (what detect uses)": (
            OpenVinoBackend(onnx_path, "cpu", streams=cpus), cpus),
    }
    rng = np.random.default_rng(0)
    result = {}
    for name, (backend, streams) in setups.items():
        for bs in (1, 4):
            batch = rng.integers(0, 255, (bs, 3, 384, 640), dtype=np.uint8)
            for _ in range(3):  # warm-up (oneDNN builds its kernels on the first calls)
                backend.infer(batch)
            done, t0 = 0, time.perf_counter()

            def work(_backend=backend, _batch=batch, _t0=t0) -> int:
                n = 0
                while time.perf_counter() - _t0 < seconds:
                    _backend.infer(_batch)
                    n += len(_batch)
                return n

            with ThreadPoolExecutor(streams) as pool:
                done = sum(pool.map(lambda _: work(), range(streams)))
            result[f"{name}, batch {bs}"] = round(done / (time.perf_counter() - t0), 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


SHIPPED_BUCKET = "answersheet"  # the shipped roads file's bucket; its weights are s3://answersheet/models/yolov5n.pt


def shipped_roads(tmp: Path, sha: str) -> tuple[Path, str]:
    """The roads file as shipped, or — for other weights — a copy differing only in detect.sha256."""
    shipped = REPO / "dags" / "roads.yaml"
    doc = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    if doc["defaults"]["detect"]["sha256"] == sha:
        return shipped, "dags/roads.yaml as shipped"
    doc["defaults"]["detect"]["sha256"] = sha
    path = tmp / "roads-shipped-other-weights.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path, "dags/roads.yaml with detect.sha256 of the benchmarked weights"


def end_to_end(args, tmp: Path, env: dict, s3_pid: int, weights: Path, sha: str, photos: list[Path]):
    """Every timed run on one day of args.images images: ({run name: measurements + labels}, export, store)."""
    from answersheet.layout import ONNX_CACHE_PREFIX
    from answersheet.storage import Store

    store = Store(SHIPPED_BUCKET)
    store.client.create_bucket(Bucket=store.bucket)
    store.put("models/yolov5n.pt", weights.read_bytes())
    weights_uri = f"s3://{store.bucket}/models/yolov5n.pt"
    detect = {"weights": weights_uri, "sha256": sha, "conf_thres": CONF, "iou_thres": IOU, "imgsz": IMGSZ}
    roads = roads_file(tmp / "roads.yaml", store.bucket, detect)
    log(f"composing {args.images} {SIZE[0]}x{SIZE[1]} JPEGs from {len(photos)} photo(s) and ingesting them")
    make_day(store, args.images, photos, tmp / "images")
    ingest(store, roads)

    runs: dict[str, dict] = {}
    cli_env = {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    for name, extra in (("yolov5 detect", []), ("yolov5 detect --nosave", ["--nosave"])):
        if extra and args.no_nosave:
            continue
        log(f"(a) {name}")
        project = tmp / f"runs-{len(runs)}"
        cmd = [str(BIN / "yolov5"), "detect", "--weights", str(weights), "--source", str(tmp / "images"),
               "--save-txt", "--conf-thres", str(CONF), "--iou-thres", str(IOU), "--imgsz", str(IMGSZ),
               "--project", str(project), "--name", "exp", *extra]
        runs[name] = run_measured(cmd, cli_env, tmp / f"cli-{len(runs)}.log", s3_pid, cwd=tmp)
        runs[name]["labels"] = {p.stem: p.read_text() for p in (project / "exp" / "labels").glob("*.txt")}

    def ours(name: str, cfg: Path, *extra: str) -> None:
        cmd = [str(BIN / "answersheet"), "detect", "--road", ROAD, "--date", DAY.isoformat(),
               "--config", str(cfg), "--force", *extra]
        runs[name] = run_measured(cmd, env, tmp / f"ours-{len(runs)}.log", s3_pid)
        runs[name]["labels"] = s3_labels(store)
        manifest = store.get_json(f"work/{ROAD}/{DAY:%Y%m%d}/detect/manifest-000-of-001.json")
        runs[name]["engine"] = {k: manifest["model"].get(k) for k in ("backend", "precision", "device", "providers",
                                                                       "batch_size", "onnx", "onnx_cache")}

    log("export-onnx (one-time, not timed in the detect runs)")
    out = subprocess.run([str(BIN / "answersheet"), "export-onnx", "--weights", weights_uri, "--sha256", sha],
                         env=env, check=True, capture_output=True, text=True)
    exported = json.loads(out.stdout)
    onnx_roads = roads_file(tmp / "roads-onnx.yaml", store.bucket,
                            {**detect, "onnx": exported["onnx"], "onnx_sha256": exported["onnx_sha256"]})
    for backend in args.backends:
        log(f"(b) answersheet detect --backend {backend}")
        ours(f"answersheet detect --backend {backend}", onnx_roads if backend != "torch" else roads,
             "--backend", backend)

    shipped, how = shipped_roads(tmp, sha)
    from answersheet.config import load_road

    shipped_imgsz = load_road(shipped, ROAD).detect.imgsz
    baseline = "yolov5 detect"
    if shipped_imgsz != IMGSZ:  # the fair baseline: the CLI at the input size the shipped road runs
        baseline = f"yolov5 detect --imgsz {shipped_imgsz}"
        log(f"(a') {baseline} (the shipped road's input size)")
        project = tmp / "runs-shipped-imgsz"
        cmd = [str(BIN / "yolov5"), "detect", "--weights", str(weights), "--source", str(tmp / "images"),
               "--save-txt", "--conf-thres", str(CONF), "--iou-thres", str(IOU), "--imgsz", str(shipped_imgsz),
               "--project", str(project), "--name", "exp"]
        runs[baseline] = run_measured(cmd, cli_env, tmp / "cli-shipped-imgsz.log", s3_pid, cwd=tmp)
        runs[baseline]["labels"] = {p.stem: p.read_text() for p in (project / "exp" / "labels").glob("*.txt")}
    log(f"(c) shipped default: {how}, backend auto, no detect.onnx, imgsz {shipped_imgsz}")
    store.delete(o.key for o in store.list(ONNX_CACHE_PREFIX))  # nothing pre-exported
    ours("shipped default, cold cache (exports once into the bucket)", shipped)
    ours("shipped default, warm cache", shipped)
    runs["shipped default, warm cache"]["config"] = how
    for name in ("shipped default, cold cache (exports once into the bucket)", "shipped default, warm cache"):
        runs[name]["baseline"] = baseline
    return runs, exported, store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--weights", default=os.environ.get("ANSWERSHEET_WEIGHTS")
                    or str(REPO.parent / "shared" / "models" / "yolov5n.pt"))
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx", "openvino"])
    ap.add_argument("--rss-sizes", type=int, nargs="*", default=[100, 2000])
    ap.add_argument("--rss-backend", default="onnx")
    ap.add_argument("--no-nosave", action="store_true", help="skip the `yolov5 detect --nosave` baseline")
    args = ap.parse_args()

    from answersheet.dev.label_agreement import agreement
    from answersheet.dev.s3server import S3Server
    from answersheet.dev.sample_day import sample_photos
    from answersheet.layout import ONNX_CACHE_PREFIX
    from answersheet.storage import Store

    weights = Path(args.weights).resolve()
    if not weights.is_file():
        raise SystemExit(f"{weights}: no weights (pass --weights or set ANSWERSHEET_WEIGHTS)")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    photos = sample_photos()
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "images": args.images, "image_size": list(SIZE), "photos": [p.name for p in photos],
        "weights": str(weights), "weights_sha256": sha, "conf_thres": CONF, "iou_thres": IOU, "imgsz": IMGSZ,
        "s3": "SeaweedFS (answersheet.dev.s3server) on 127.0.0.1",
    }
    with tempfile.TemporaryDirectory(prefix="bench-detector-") as tmp_name:
        tmp = Path(tmp_name)
        server = S3Server(tmp / "s3").start()
        try:
            env = {**os.environ, **server.env(), "PYTHONWARNINGS": "ignore"}
            os.environ.update(server.env())
            report["end_to_end"], exported, store = end_to_end(args, tmp, env, server.pid, weights, sha, photos)
            runs = report["end_to_end"]
            for r in runs.values():
                # vs the CLI at the same input size (the shipped road may run another imgsz than 640)
                base = runs[r.get("baseline", "yolov5 detect")]
                agree = agreement(base["labels"], r["labels"])
                r["images_per_s"] = round(args.images / r["seconds"], 2)
                r["speedup_vs_cli"] = round(base["seconds"] / r["seconds"], 2)
                r["boxes"] = agree.other_boxes
                r["boxes_matched_share"] = round(agree.matched_share, 4)
                r["identical_label_files_share"] = round(agree.identical_files / max(agree.files, 1), 4)
            for r in report["end_to_end"].values():
                del r["labels"]
            cached = [o.key for o in store.list(ONNX_CACHE_PREFIX)]
            report["onnx_cache_objects"] = cached

            rss = {}
            detect = {"sha256": sha, "conf_thres": CONF, "iou_thres": IOU, "imgsz": IMGSZ,
                      "onnx": exported["onnx"], "onnx_sha256": exported["onnx_sha256"]}
            for n in args.rss_sizes:
                log(f"peak RSS at {n} images (--backend {args.rss_backend})")
                day_store = Store(f"bench-rss-{n}")
                day_store.client.create_bucket(Bucket=day_store.bucket)
                day_store.put("models/yolov5n.pt", weights.read_bytes())
                cfg = roads_file(tmp / f"roads-rss-{n}.yaml", day_store.bucket,
                                 {**detect, "weights": f"s3://{day_store.bucket}/models/yolov5n.pt"})
                make_day(day_store, n, photos, None)
                ingest(day_store, cfg)
                cmd = [str(BIN / "answersheet"), "detect", "--road", ROAD, "--date", DAY.isoformat(),
                       "--config", str(cfg), "--backend", args.rss_backend, "--force"]
                rss[n] = run_measured(cmd, env, tmp / f"rss-{n}.log", server.pid)
                rss[n]["images_per_s"] = round(n / rss[n]["seconds"], 2)
            if len(rss) >= 2:
                lo, hi = min(rss), max(rss)
                rss["rss_growth"] = round(rss[hi]["peak_rss_mib"] / rss[lo]["peak_rss_mib"] - 1, 4)
            report["rss_by_images"] = rss

            log("model-only throughput (synthetic tensors)")
            local_onnx = tmp / "model.onnx"
            local_onnx.write_bytes(store.get(exported["onnx"].split("/", 3)[3]))
            report["model_only_images_per_s"] = model_only(weights, local_onnx)
        finally:
            server.stop()
    report["machine"]["load_average_at_end"] = os.getloadavg()

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "detector.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.images} images {SIZE[0]}x{SIZE[1]}, {weights.name}, CPU x{os.cpu_count()}, "
          f"load average {report['machine']['load_average_at_start'][0]:.2f} at start\n")
    print("| run | engine | wall s | CPU s | S3 server CPU s | img/s | vs CLI | peak RSS MiB | boxes matched "
          "| identical files |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in report["end_to_end"].items():
        label = f"`{name}`" + (f" (vs `{r['baseline']}`)" if r.get("baseline") else "")
        engine = " ".join(str(r["engine"][k]) for k in ("backend", "precision")) if "engine" in r else "yolov5"
        print(f"| {label} | {engine} "
              f"| {r['seconds']} | {r['cpu_seconds']} | {r['s3_server_cpu_seconds']} | {r['images_per_s']} "
              f"| {r['speedup_vs_cli']}x "
              f"| {r['peak_rss_mib']} "
              f"| {r['boxes_matched_share']:.2%} | {r['identical_label_files_share']:.2%} |")
    print("\nmodel only (img/s):", json.dumps(report["model_only_images_per_s"]))
    print("peak RSS by image count:", json.dumps(report["rss_by_images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
