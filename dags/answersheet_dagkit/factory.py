"""One DAG per road: ingest -> detect (one task per shard) -> preprocess -> datasheet, as pods or local subprocesses."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, chain

from answersheet_dagkit.commands import POD_CONFIG_PATH, POD_SUMMARY_PATH, STAGES, date_template, stage_commands
from answersheet_dagkit.settings import RoadConfigError, RoadSpec, load_roads, roads_file_path

CONFIG_ERRORS_DAG_ID = "answersheet_config_errors"
STAGE_DOCS = {
    "ingest": "unzip the day's archives from `raw/` into `work/`, rejecting unsafe or misnamed members",
    "detect": "YOLOv5 on the selected (side camera) images; YOLO label files",
    "preprocess": "pair images with labels, empty labels, set completeness (short-set policy)",
    "datasheet": "the answer sheet: images/, labels/, classes.txt, datasheet.csv, report, manifest.json",
}


def _doc_md(road: RoadSpec, roads_file: Path) -> str:
    k, s = road.kubernetes, road.schedule
    ymd = "&lt;YYYYMMDD&gt;"
    rows = "\n".join(f"| `{st}` | {STAGE_DOCS[st]} |" for st in STAGES)
    shards = f" across {road.shards} pods (one GPU each)" if road.shards > 1 else ""
    return f"""# {road.name} (`{road.id}`): road-camera day → answer sheet

Runs `{s.cron or 'manually / by backfill'}` ({s.timezone}); the stage date is the run's logical date in
{s.timezone}. Reads `s3://{road.bucket}/raw/{road.id}/{ymd}/*.zip`, writes
`s3://{road.bucket}/answersheet/{road.id}/{ymd}/`. Mode: **{k['mode']}**; detection{shards}.

| task | what it does |
| --- | --- |
{rows}

Every stage is idempotent (manifest deleted first, written last): clearing a task or re-running a
day is safe and rewrites only what changed. Data moves through S3, never XCom (XCom holds each
stage's small JSON summary). Backfill past days with
`airflow backfill create --dag-id {road.dag_id} --from-date 2026-11-02 --to-date 2026-11-06`.

Configured in `{roads_file.name}` (road `{road.id}`).
"""


def _stage_task(road: RoadSpec, stage: str, roads_file: Path, date: str):
    """The task for one stage: a pod (kubernetes mode) or a subprocess (local mode); mapped over shards."""
    kube = road.kubernetes
    local = kube["mode"] == "local"
    config = str(roads_file) if local else POD_CONFIG_PATH
    summary = None if local or not kube["push_summary"] else POD_SUMMARY_PATH
    commands = stage_commands(stage, road.id, date, config, road.shards, summary_json=summary)
    doc = f"`answersheet {stage}`: {STAGE_DOCS[stage]}"
    if local:
        from answersheet_dagkit.local import AnswersheetCliOperator

        if len(commands) == 1:
            return AnswersheetCliOperator(task_id=stage, command=commands[0], doc_md=doc)
        return AnswersheetCliOperator.partial(task_id=stage, doc_md=doc).expand_kwargs(
            [{"command": c} for c in commands])

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from answersheet_dagkit.pods import pod_labels, pod_operator_kwargs

    kwargs = pod_operator_kwargs(kube, stage)
    if len(commands) == 1:
        return KubernetesPodOperator(task_id=stage, doc_md=doc, cmds=commands[0][:1], arguments=commands[0][1:],
                                     labels=pod_labels(road.id, stage, date), **kwargs)
    return KubernetesPodOperator.partial(task_id=stage, doc_md=doc, cmds=commands[0][:1], **kwargs).expand_kwargs(
        [{"arguments": c[1:], "labels": pod_labels(road.id, stage, date, shard=i)} for i, c in enumerate(commands)])


def build_road_dag(road: RoadSpec, roads_file: Path) -> DAG:
    """The DAG `answersheet_<road>`; RoadConfigError (road + key) for what only Airflow can check."""
    s = road.schedule
    tz = pendulum.timezone(s.timezone)
    timetable = None
    if s.cron is not None:
        timetable = CronTriggerTimetable(s.cron, timezone=tz)
        try:
            timetable.validate()
        except Exception as exc:  # AirflowTimetableInvalid, with croniter's reason
            raise RoadConfigError(f"road {road.id!r}: key 'schedule.cron': invalid cron {s.cron!r}: {exc}") from None
    dag = DAG(
        dag_id=road.dag_id,
        description=f"{road.name}: road-camera day -> YOLO answer sheet (ingest, detect, preprocess, datasheet)",
        doc_md=_doc_md(road, roads_file),
        tags=["yolov5", road.id],
        start_date=pendulum.datetime(s.start_date.year, s.start_date.month, s.start_date.day, tz=tz),
        schedule=timetable,
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
    date = date_template(s.timezone)
    with dag:
        chain(*[_stage_task(road, stage, roads_file, date) for stage in STAGES])
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
    if errors:
        message = f"{roads_file}: {len(errors)} road(s) not loaded:\n" + "\n".join(f"  {e}" for e in errors)
        dags[CONFIG_ERRORS_DAG_ID] = RoadsConfigErrorDag(dag_id=CONFIG_ERRORS_DAG_ID, description=message,
                                                         schedule=None)
    return dags
