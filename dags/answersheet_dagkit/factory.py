"""One DAG per road: ingest -> detect (one task per shard) -> preprocess -> datasheet, as pods or local subprocesses."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path
from typing import Any, cast

import pendulum
from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, CronTriggerTimetable, chain
from answersheet_roadsfile import RoadsFileError, fail

from answersheet_dagkit.commands import (
    DATE_TEMPLATE,
    DAY_MACRO,
    POD_CONFIG_PATH,
    POD_SUMMARY_PATH,
    STAGES,
    process_day,
    stage_commands,
)
from answersheet_dagkit.lineage import answer_sheet_asset, example_consumer_dag
from answersheet_dagkit.roads import load_roads, roads_file_path

CONFIG_ERRORS_DAG_ID = "answersheet_config_errors"
STAGE_DOCS = {
    "ingest": "unzip the day's archives from `raw/` into `work/`, rejecting unsafe or misnamed members",
    "detect": "YOLOv5 on the selected (side camera) images; YOLO label files",
    "preprocess": "pair images with labels, empty labels, set completeness (short-set policy)",
    "datasheet": "the answer sheet: images/, labels/, classes.txt, datasheet.csv, report, manifest.json",
}
PROCESS_DATE_DOCS = {
    "previous_run": "the day before the run: each run processes its data interval's start, the previous "
                    "scheduled time (with `0 9 * * 1-5`: Tuesday 09:00 processes Monday, Monday 09:00 Friday)",
    "run_day": "the day of the run (09:00 processes the same day)",
}


def timetable_for(road: dict) -> CronDataIntervalTimetable | CronTriggerTimetable | None:
    """`previous_run`: CronDataIntervalTimetable (Airflow 2's `schedule_interval`), so a run's logical date is the
    day it processes — in the Grid, in pod labels, and as `airflow backfill create`'s --from/--to-date;
    `run_day`: CronTriggerTimetable (logical date = run time). The reasons: dags/README.md "The DAG"."""
    s = road["schedule"]
    if not s["cron"]:
        return None
    cron = s["cron"].strip()
    cls = CronDataIntervalTimetable if s["process_date"] == "previous_run" else CronTriggerTimetable
    timetable = cls(cron, timezone=pendulum.timezone(s["timezone"]))
    try:
        timetable.validate()
    except Exception as exc:  # AirflowTimetableInvalid, with croniter's reason
        raise fail(road["id"], "schedule.cron", f"invalid cron {cron!r}: {exc}") from None
    return timetable


def _doc_md(road: dict, roads_file: Path, asset: Asset) -> str:
    s, rid, dag_id, ymd = road["schedule"], road["id"], f"answersheet_{road['id']}", "&lt;YYYYMMDD&gt;"
    rows = "\n".join(f"| `{st}` | {STAGE_DOCS[st]} |" for st in STAGES)
    local = functools.partial(_local, timezone=s["timezone"])
    shards = f" across {road['shards']} pods (one GPU each)" if road["shards"] > 1 else ""
    return f"""# {road['name']} (`{rid}`): road-camera day → answer sheet

Runs `{s['cron'] or 'manually / by backfill'}` ({s['timezone']}). **Day processed**
(`schedule.process_date: {s['process_date']}`): {PROCESS_DATE_DOCS[s['process_date']]}; it is the run's
logical date in {s['timezone']}, shown in the Grid, passed as `--date` and set as pod label
`answersheet.io/date`. Reads `s3://{road['bucket']}/raw/{rid}/{ymd}/*.zip`, writes
`s3://{road['bucket']}/answersheet/{rid}/{ymd}/` (Asset `{asset.name}`, one event per day with road,
date, counts and manifest URI). Mode: **{road['kubernetes']['mode']}**; detection{shards}.

| task | what it does |
| --- | --- |
{rows}

Every stage is idempotent (manifest deleted first, written last): clearing a task or re-running a
day is safe and rewrites only what changed. Data moves through S3, never XCom (XCom holds each
stage's small JSON summary). Backfill the processed days Mon 2 .. Fri 6 November 2026 with
`airflow backfill create --dag-id {dag_id} --from-date {local("2026-11-02T00:00:00")}
--to-date {local("2026-11-06T23:59:59")}` (`make backfill ROAD={rid} FROM=2026-11-02
TO=2026-11-06` writes those bounds for you).

Configured in `{roads_file.name}` (road `{rid}`).
"""


def _local(naive: str, timezone: str) -> str:
    """A wall-clock time in the road's zone with its UTC offset (2026-11-02T00:00:00+09:00), for the doc."""
    return cast(pendulum.DateTime, pendulum.parse(naive, tz=timezone)).isoformat()


def _stage_task(road: dict, stage: str, roads_file: Path, asset: Asset):
    """The task for one stage: a pod (kubernetes mode) or a subprocess (local mode); mapped over shards."""
    kube, rid = road["kubernetes"], road["id"]
    local = kube["mode"] == "local"
    summary = None if local or not kube["push_summary"] else POD_SUMMARY_PATH
    commands = stage_commands(stage, rid, DATE_TEMPLATE, str(roads_file) if local else POD_CONFIG_PATH,
                              road["shards"], summary_json=summary)
    common: dict[str, Any] = {"task_id": stage, "doc_md": f"`answersheet {stage}`: {STAGE_DOCS[stage]}"}
    outlets = [asset] if stage == "datasheet" else []
    if local:
        from answersheet_dagkit.local import AnswersheetCliOperator as Cli

        if len(commands) == 1:
            return Cli(command=commands[0], outlets=outlets, **common)
        return Cli.partial(**common).expand_kwargs([{"command": c} for c in commands])

    from answersheet_dagkit.pods import AnswersheetPodOperator as Pod
    from answersheet_dagkit.pods import pod_labels, pod_operator_kwargs

    common.update(cmds=commands[0][:1], **pod_operator_kwargs(kube, stage))
    if len(commands) == 1:
        return Pod(arguments=commands[0][1:], labels=pod_labels(rid, stage, DATE_TEMPLATE), outlets=outlets, **common)
    return Pod.partial(**common).expand_kwargs([{"arguments": c[1:], "labels": pod_labels(rid, stage, DATE_TEMPLATE, i)}
                                                for i, c in enumerate(commands)])


def build_road_dag(road: dict, roads_file: Path) -> DAG:
    """The DAG `answersheet_<road>`; RoadsFileError (road + key) for what only Airflow can check (the cron)."""
    s, asset = road["schedule"], answer_sheet_asset(road["id"], road["bucket"])
    start = dt.date.fromisoformat(s["start_date"])
    with DAG(
        dag_id=f"answersheet_{road['id']}",
        description=f"{road['name']}: road-camera day -> YOLO answer sheet (ingest, detect, preprocess, datasheet)",
        doc_md=_doc_md(road, roads_file, asset),
        tags=["yolov5", road["id"]],
        start_date=pendulum.datetime(start.year, start.month, start.day, tz=pendulum.timezone(s["timezone"])),
        schedule=timetable_for(road),
        user_defined_macros={DAY_MACRO: functools.partial(process_day, timezone=s["timezone"])},
        catchup=s["catchup"],
        max_active_runs=s["max_active_runs"],
        default_args={
            "owner": "answersheet",
            # local mode (demo, CI) fails fast: `airflow dags test` would sit out each retry delay
            "retries": 0 if road["kubernetes"]["mode"] == "local" else s["retries"],
            "retry_delay": dt.timedelta(minutes=s["retry_delay_minutes"]),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": dt.timedelta(minutes=s["max_retry_delay_minutes"]),
        },
    ) as dag:
        chain(*[_stage_task(road, stage, roads_file, asset) for stage in STAGES])
    return dag


class RoadsConfigErrorDag(DAG):
    """Placeholder holding the roads-file errors: DagBag calls validate() before bagging each DAG, so raising
    there records an import error for the DAG file while the good roads' DAGs still load."""

    def validate(self) -> None:
        raise RoadsFileError(self.description)


def build_dags(dags_dir: Path) -> dict[str, Any]:
    """dag_id -> DAG for every valid road, plus a RoadsConfigErrorDag naming each invalid road and key."""
    roads_file = roads_file_path(dags_dir)
    roads, errors = load_roads(roads_file)
    dags: dict[str, Any] = {}
    for road in roads:
        try:
            dags[f"answersheet_{road['id']}"] = build_road_dag(road, roads_file)
        except RoadsFileError as exc:
            errors.append(str(exc))
    assets = [answer_sheet_asset(r["id"], r["bucket"]) for r in roads if f"answersheet_{r['id']}" in dags]
    if assets:
        consumer = example_consumer_dag(assets)
        dags[consumer.dag_id] = consumer
    if errors:
        message = f"{roads_file}: {len(errors)} road(s) not loaded:\n" + "\n".join(f"  {e}" for e in errors)
        dags[CONFIG_ERRORS_DAG_ID] = RoadsConfigErrorDag(dag_id=CONFIG_ERRORS_DAG_ID, description=message,
                                                         schedule=None)
    return dags
