"""One DAG per road: ingest -> detect (one task per shard) -> preprocess -> datasheet, as pods or local subprocesses."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path
from typing import Any, cast

import pendulum
from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, CronTriggerTimetable, chain

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
from answersheet_dagkit.settings import RoadConfigError, RoadSpec, Schedule, load_roads, roads_file_path

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


def timetable_for(road: str, s: Schedule) -> CronDataIntervalTimetable | CronTriggerTimetable | None:
    """The road's timetable; with it, a run's logical date *is* the day the run processes (process_day).

    `previous_run` (default) -> CronDataIntervalTimetable, the timetable behind Airflow 2's
    `schedule_interval='0 9 * * 1-5'`: the run at Tue 09:00 gets the data interval [Mon 09:00, Tue 09:00)
    and logical date Mon 09:00, so it processes Monday; Monday's run gets [Fri 09:00, Mon 09:00) and
    processes Friday. Chosen over CronTriggerTimetable plus "previous cron fire time" computed in the
    DAG because: Airflow's own timetable computes the previous fire (weekday gaps, DST) with no second
    cron implementation in the DAG folder; the Grid (logical date) and the pod labels then show the
    processed day (run ids do not: Airflow 3 names a run after its run time, `backfill__<Tue>` for
    Monday); `airflow backfill create --from-date/--to-date` select runs by logical date, so FROM and TO
    are the first and last processed day; and `airflow dags test <day>` processes <day> (the Airflow
    docs: for manual runs use the logical date, the data interval is the timetable's guess).
    Its cost: a day's run (and its backfill) exists only once the interval has ended, Friday's at the
    next Monday 09:00 — which is when the seed's run for it happened too.

    `run_day` -> CronTriggerTimetable: logical date = run time, so the 09:00 run processes the same day.
    """
    if s.cron is None:
        return None
    tz = pendulum.timezone(s.timezone)
    cls = CronDataIntervalTimetable if s.process_date == "previous_run" else CronTriggerTimetable
    timetable = cls(s.cron, timezone=tz)
    try:
        timetable.validate()
    except Exception as exc:  # AirflowTimetableInvalid, with croniter's reason
        raise RoadConfigError(f"road {road!r}: key 'schedule.cron': invalid cron {s.cron!r}: {exc}") from None
    return timetable


def _doc_md(road: RoadSpec, roads_file: Path, asset: Asset) -> str:
    k, s = road.kubernetes, road.schedule
    ymd = "&lt;YYYYMMDD&gt;"
    rows = "\n".join(f"| `{st}` | {STAGE_DOCS[st]} |" for st in STAGES)
    shards = f" across {road.shards} pods (one GPU each)" if road.shards > 1 else ""
    return f"""# {road.name} (`{road.id}`): road-camera day → answer sheet

Runs `{s.cron or 'manually / by backfill'}` ({s.timezone}). **Day processed**
(`schedule.process_date: {s.process_date}`): {PROCESS_DATE_DOCS[s.process_date]}; it is the run's
logical date in {s.timezone}, shown in the Grid, passed as `--date` and set as pod label
`answersheet.io/date`. Reads `s3://{road.bucket}/raw/{road.id}/{ymd}/*.zip`, writes
`s3://{road.bucket}/answersheet/{road.id}/{ymd}/` (Asset `{asset.name}`, one event per day with road,
date, counts and manifest URI). Mode: **{k['mode']}**; detection{shards}.

| task | what it does |
| --- | --- |
{rows}

Every stage is idempotent (manifest deleted first, written last): clearing a task or re-running a
day is safe and rewrites only what changed. Data moves through S3, never XCom (XCom holds each
stage's small JSON summary). Backfill the processed days Mon 2 .. Fri 6 November 2026 with
`airflow backfill create --dag-id {road.dag_id} --from-date {_local("2026-11-02T00:00:00", s.timezone)}
--to-date {_local("2026-11-06T23:59:59", s.timezone)}` (`make backfill ROAD={road.id} FROM=2026-11-02
TO=2026-11-06` writes those bounds for you).

Configured in `{roads_file.name}` (road `{road.id}`).
"""


def _local(naive: str, timezone: str) -> str:
    """A wall-clock time in the road's zone with its UTC offset (2026-11-02T00:00:00+09:00), for the doc."""
    return cast(pendulum.DateTime, pendulum.parse(naive, tz=timezone)).isoformat()  # a date-time string


def _stage_task(road: RoadSpec, stage: str, roads_file: Path, date: str, asset: Asset):
    """The task for one stage: a pod (kubernetes mode) or a subprocess (local mode); mapped over shards."""
    kube = road.kubernetes
    local = kube["mode"] == "local"
    config = str(roads_file) if local else POD_CONFIG_PATH
    summary = None if local or not kube["push_summary"] else POD_SUMMARY_PATH
    commands = stage_commands(stage, road.id, date, config, road.shards, summary_json=summary)
    doc = f"`answersheet {stage}`: {STAGE_DOCS[stage]}"
    outlets = [asset] if stage == "datasheet" else []
    if local:
        from answersheet_dagkit.local import AnswersheetCliOperator

        if len(commands) == 1:
            return AnswersheetCliOperator(task_id=stage, command=commands[0], doc_md=doc, outlets=outlets)
        return AnswersheetCliOperator.partial(task_id=stage, doc_md=doc).expand_kwargs(
            [{"command": c} for c in commands])

    from answersheet_dagkit.pods import AnswersheetPodOperator, pod_labels, pod_operator_kwargs

    kwargs = pod_operator_kwargs(kube, stage)
    if len(commands) == 1:
        return AnswersheetPodOperator(task_id=stage, doc_md=doc, cmds=commands[0][:1], arguments=commands[0][1:],
                                      labels=pod_labels(road.id, stage, date), outlets=outlets, **kwargs)
    return AnswersheetPodOperator.partial(task_id=stage, doc_md=doc, cmds=commands[0][:1], **kwargs).expand_kwargs(
        [{"arguments": c[1:], "labels": pod_labels(road.id, stage, date, shard=i)} for i, c in enumerate(commands)])


def build_road_dag(road: RoadSpec, roads_file: Path) -> DAG:
    """The DAG `answersheet_<road>`; RoadConfigError (road + key) for what only Airflow can check."""
    s = road.schedule
    tz = pendulum.timezone(s.timezone)
    asset = answer_sheet_asset(road.id, road.bucket)
    dag = DAG(
        dag_id=road.dag_id,
        description=f"{road.name}: road-camera day -> YOLO answer sheet (ingest, detect, preprocess, datasheet)",
        doc_md=_doc_md(road, roads_file, asset),
        tags=["yolov5", road.id],
        start_date=pendulum.datetime(s.start_date.year, s.start_date.month, s.start_date.day, tz=tz),
        schedule=timetable_for(road.id, s),
        user_defined_macros={DAY_MACRO: functools.partial(process_day, timezone=s.timezone)},
        catchup=s.catchup,
        max_active_runs=s.max_active_runs,
        default_args={
            "owner": "answersheet",
            # local mode (demo, CI) fails fast: `airflow dags test` would sit out each retry delay
            "retries": 0 if road.kubernetes["mode"] == "local" else s.retries,
            "retry_delay": dt.timedelta(minutes=s.retry_delay_minutes),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": dt.timedelta(minutes=s.max_retry_delay_minutes),
        },
    )
    with dag:
        chain(*[_stage_task(road, stage, roads_file, DATE_TEMPLATE, asset) for stage in STAGES])
    return dag


class RoadsConfigErrorDag(DAG):
    """Placeholder holding the roads-file errors: DagBag calls validate() before bagging each DAG, so raising
    there records an import error for the DAG file while the good roads' DAGs still load."""

    def validate(self) -> None:
        raise RoadConfigError(self.description)


def build_dags(dags_dir: Path) -> dict[str, Any]:
    """dag_id -> DAG for every valid road, plus a RoadsConfigErrorDag naming each invalid road and key."""
    roads_file = roads_file_path(dags_dir)
    roads, errors = load_roads(roads_file)
    dags: dict[str, Any] = {}
    for road in roads:
        try:
            dags[road.dag_id] = build_road_dag(road, roads_file)
        except RoadConfigError as exc:
            errors.append(str(exc))
    assets = [answer_sheet_asset(r.id, r.bucket) for r in roads if r.dag_id in dags]
    if assets:
        consumer = example_consumer_dag(assets)
        dags[consumer.dag_id] = consumer
    if errors:
        message = f"{roads_file}: {len(errors)} road(s) not loaded:\n" + "\n".join(f"  {e}" for e in errors)
        dags[CONFIG_ERRORS_DAG_ID] = RoadsConfigErrorDag(dag_id=CONFIG_ERRORS_DAG_ID, description=message,
                                                         schedule=None)
    return dags
