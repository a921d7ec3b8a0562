"""The stage command line and the day it processes, built once for the pods and the local-subprocess tasks."""

from __future__ import annotations

import zoneinfo
from typing import Any

STAGES = ("ingest", "detect", "preprocess", "datasheet")
POD_CONFIG_PATH = "/etc/answersheet/roads.yaml"  # the roads ConfigMap, mounted in every stage pod
POD_SUMMARY_PATH = "/airflow/xcom/return.json"  # read by the KubernetesPodOperator's XCom sidecar
DAY_MACRO = "answersheet_day"  # a user-defined macro of every road DAG: process_day in the road's zone
DATE_TEMPLATE = "{{ " + DAY_MACRO + "(dag_run) }}"
# Set for the stage CLI by both the local operator and the pods: the task log already timestamps each line.
LOG_TIMESTAMPS_ENV = "ANSWERSHEET_LOG_TIMESTAMPS"


def process_day(dag_run: Any, timezone: str) -> str:
    """The day a run processes, YYYY-MM-DD: its logical date in the road's zone (which instant that is: the
    timetable, factory.timetable_for). Airflow 3 allows manual runs without a logical date: those name no day,
    so their first task fails, without retries, saying so."""
    logical = getattr(dag_run, "logical_date", None)
    if logical is None:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"answersheet: error: run {getattr(dag_run, 'run_id', '?')}: no logical date, so no day to process; "
            "trigger it with the logical date of the day (e.g. 2026-11-02T09:00:00+09:00)")
    return logical.astimezone(zoneinfo.ZoneInfo(timezone)).date().isoformat()


def stage_command(stage: str, road: str, date: str, config: str, *, shard: tuple[int, int] | None = None,
                  summary_json: str | None = None) -> list[str]:
    """`answersheet <stage> --road R --date D --config C [--shard-index i --shard-count n] [--summary-json P]`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    cmd = ["answersheet", stage, "--road", road, "--date", date, "--config", config]
    if shard is not None:
        cmd += ["--shard-index", str(shard[0]), "--shard-count", str(shard[1])]
    return cmd + (["--summary-json", summary_json] if summary_json else [])


def stage_commands(stage: str, road: str, date: str, config: str, shards: int,
                   summary_json: str | None = None) -> list[list[str]]:
    """One command per task instance: `shards` for detect (one pod/GPU each), one for every other stage."""
    if stage == "detect":
        return [stage_command(stage, road, date, config, shard=(i, shards), summary_json=summary_json)
                for i in range(shards)]
    return [stage_command(stage, road, date, config, summary_json=summary_json)]
