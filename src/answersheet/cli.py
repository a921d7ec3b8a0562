"""`answersheet <stage> --road ID --date YYYY-MM-DD`: the entrypoint of both stage images.

Exit 0 on success; otherwise one line `answersheet: error: <object>: <problem>` and exit 1
(exit 2 for bad arguments). S3 endpoint and credentials come only from the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from answersheet import __version__
from answersheet.errors import AnswersheetError, printable

log = logging.getLogger("answersheet")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--road", required=True, help="road id from the roads file")
    p.add_argument("--date", required=True, help="logical date YYYY-MM-DD (the day whose archives to process)")
    p.add_argument("--bucket", default=None, help="bucket (default: the road's `bucket` key)")
    p.add_argument("--config", default=os.environ.get("ANSWERSHEET_CONFIG"),
                   help="roads file (default: $ANSWERSHEET_CONFIG)")
    p.add_argument("--force", action="store_true", help="redo even if the stage's manifest is current")
    p.add_argument("--summary-json", default=None,
                   help="also write the stage's small summary (counts, manifest URI) to this file (XCom)")


def _add_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-index", type=int, default=0, help="this pod's shard, 0-based")
    p.add_argument("--shard-count", type=int, default=None, help="number of shards (default: detect.shards)")
    from answersheet.config import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="inference backend (default: detect.backend)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: detect.device)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: detect.batch_size)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (the DAG's pod arguments are tested against it)."""
    parser = argparse.ArgumentParser(prog="answersheet", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"answersheet {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("ANSWERSHEET_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    helps = {
        "ingest": "unzip the day's archives from raw/ into work/, rejecting unsafe or misnamed members",
        "detect": "run YOLOv5 on the images selected for detection; write YOLO label files",
        "preprocess": "pair images with labels, add empty labels, check sets against the short-set policy",
        "datasheet": "write the answer sheet: images/, labels/, classes.txt, datasheet.csv, manifest.json",
        "run": "all four stages in order for one road-day (debugging without Airflow)",
    }
    for name, help_text in helps.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name in ("detect", "run"):
            _add_detect(p)
    _add_export_onnx(sub)
    _add_pull(sub)
    return parser


def _add_pull(sub) -> None:
    help_text = "download a published answer sheet to a directory, every object checked against its manifest"
    p = sub.add_parser("pull", help=help_text, description=help_text)
    p.add_argument("--road", required=True, help="road id")
    p.add_argument("--date", required=True, help="day YYYY-MM-DD")
    p.add_argument("--out", required=True, help="directory to write the sheet into (created)")
    p.add_argument("--bucket", default=None, help="bucket (default: the road's `bucket` key from --config)")
    p.add_argument("--config", default=os.environ.get("ANSWERSHEET_CONFIG"), help="roads file (for the bucket)")


def _pull(args: argparse.Namespace) -> dict:
    from answersheet.config import load_road
    from answersheet.layout import parse_day
    from answersheet.pull import pull
    from answersheet.storage import Store

    if not args.bucket and not args.config:
        raise AnswersheetError("pull: pass --bucket, or --config (or ANSWERSHEET_CONFIG) to use the road's bucket")
    bucket = args.bucket or load_road(args.config, args.road).bucket
    try:
        day = parse_day(args.date)
    except ValueError as exc:
        raise AnswersheetError(str(exc)) from None
    return pull(Store(bucket), args.road, day, Path(args.out))


def _add_export_onnx(sub) -> None:
    help_text = "export YOLOv5 weights to ONNX (dynamic batch/height/width) beside them, with <file>.sha256"
    p = sub.add_parser("export-onnx", help=help_text, description=help_text)
    p.add_argument("--weights", required=True, help="YOLOv5 .pt: local path or s3://bucket/key")
    p.add_argument("--out", default=None, help="ONNX path or s3:// URI (default: the weights' name with .onnx)")
    p.add_argument("--sha256", default=None, help="verify the weights against this sha256 first")
    p.add_argument("--imgsz", type=int, default=640, help="square size the graph is traced at (H, W stay dynamic)")


def _export_onnx(args: argparse.Namespace) -> dict:
    from answersheet.detector.onnx_export import export_onnx

    return export_onnx(args.weights, out=args.out, imgsz=args.imgsz, sha256=args.sha256)


def _stage_functions() -> dict[str, Callable]:
    # Imported lazily: the slim image has no torch, and `detect` is the only stage that needs it.
    def ingest(rd, args):
        from answersheet.ingest import ingest_day
        return ingest_day(rd)

    def detect(rd, args):
        from answersheet.detect import detect_day
        return detect_day(rd, shard_index=args.shard_index, shard_count=args.shard_count,
                          backend=args.backend, device=args.device, batch_size=args.batch_size)

    def preprocess(rd, args):
        from answersheet.preprocess import preprocess_day
        return preprocess_day(rd)

    def datasheet(rd, args):
        from answersheet.datasheet import datasheet_day
        return datasheet_day(rd)

    return {"ingest": ingest, "detect": detect, "preprocess": preprocess, "datasheet": datasheet}


def _road_day(args: argparse.Namespace):
    from answersheet.config import load_road
    from answersheet.day import RoadDay
    from answersheet.layout import parse_day
    from answersheet.storage import Store

    if not args.config:
        raise AnswersheetError("no roads file: pass --config PATH or set ANSWERSHEET_CONFIG")
    road = load_road(args.config, args.road)
    try:
        day = parse_day(args.date)
    except ValueError as exc:
        raise AnswersheetError(str(exc)) from None
    return RoadDay(road=road, day=day, store=Store(args.bucket or road.bucket), force=args.force)


class _RedactingFormatter(logging.Formatter):
    """Strip URL userinfo (credentials in AWS_ENDPOINT_URL) from every formatted log line, tracebacks
    included: botocore's DEBUG lines and the exceptions it logs repeat the request URL."""

    def format(self, record: logging.LogRecord) -> str:
        from answersheet.storage import redact

        return redact(super().format(record))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under Airflow (the local operator and the stage pods set ANSWERSHEET_LOG_TIMESTAMPS=0) the task log
    # timestamps every line already: a second timestamp per line only made the log harder to read.
    timestamps = os.environ.get("ANSWERSHEET_LOG_TIMESTAMPS", "1") != "0"
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr)
    if level > logging.DEBUG:  # botocore's INFO lines per client ("Found credentials in ...") buried the progress
        logging.getLogger("botocore").setLevel(logging.WARNING)
    log_format = LOG_FORMAT if timestamps else LOG_FORMAT.removeprefix("%(asctime)s ")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter(log_format))
    try:
        if args.command in ("export-onnx", "pull"):
            print(json.dumps((_export_onnx if args.command == "export-onnx" else _pull)(args)))
            return 0
        from answersheet.manifest import STAGES

        rd = _road_day(args)
        stages = STAGES if args.command == "run" else (args.command,)
        funcs = _stage_functions()
        summary: dict = {}
        for stage in stages:
            t0 = time.monotonic()
            log.info("%s: road=%s date=%s bucket=%s", stage, rd.road.id, rd.day, rd.store.bucket)
            summary[stage] = funcs[stage](rd, args)
            log.info("%s: finished in %.1fs: %s", stage, time.monotonic() - t0, json.dumps(summary[stage]))
        result = summary[stages[0]] if len(stages) == 1 else summary
        if args.summary_json:
            Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.summary_json).write_text(json.dumps(result, ensure_ascii=False))
        print(json.dumps(result, ensure_ascii=False))
        return 0
    except AnswersheetError as exc:
        from answersheet.storage import redact

        print(f"answersheet: error: {printable(redact(str(exc)))}", file=sys.stderr)  # one line, no terminal control
        return 1
    except KeyboardInterrupt:
        print("answersheet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
