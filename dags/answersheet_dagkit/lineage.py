"""Lineage: each road's answer sheets are one Airflow Asset; the datasheet task emits an asset event per day.

A downstream DAG (e.g. training) scheduled on the Asset runs when a new day is published; the event's extra
says which day and where its manifest is, so the consumer never lists the bucket:

    {"road": "daewang_pangyo", "date": "2026-11-02", "counts": {...}, "manifest": "s3://…/manifest.json",
     "unchanged": false}

`counts`, `manifest` and `unchanged` come from the datasheet stage's summary (None with `push_summary:
false`); `unchanged: true` marks a re-run that found the day current and rewrote nothing.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, Asset, AssetAny, task

EXAMPLE_CONSUMER_DAG_ID = "answersheet_training_example"


def answer_sheet_asset(road: str, bucket: str) -> Asset:
    """`s3://<bucket>/answersheet/<road>` (no trailing slash: the amazon provider's URI handler drops it)."""
    return Asset(name=f"answersheet_{road}", uri=f"s3://{bucket}/answersheet/{road}", group="answersheet")


def record_answer_sheet(context: Any, outlets: list, command: list[str], summary: Any) -> None:
    """The day's extra on the event Airflow emits for each Asset outlet when the task succeeds: road and date
    from the command the task ran, counts and manifest URI from the stage's summary."""
    summary = summary if isinstance(summary, dict) else {}
    arg = {flag: command[command.index(flag) + 1] for flag in ("--road", "--date") if flag in command}
    extra = {"road": arg.get("--road"), "date": arg.get("--date"), "counts": summary.get("counts"),
             "manifest": summary.get("manifest"), "unchanged": summary.get("skipped")}
    for outlet in outlets:
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = extra


def example_consumer_dag(assets: list[Asset]) -> DAG:
    """`answersheet_training_example`, paused when created: runs when any road publishes a day and only logs
    what it would train on; copy it and replace the task to start training."""
    with DAG(dag_id=EXAMPLE_CONSUMER_DAG_ID, doc_md=__doc__, schedule=AssetAny(*assets), is_paused_upon_creation=True,
             description="Example consumer: runs on every new answer sheet (any road); logs road, date and manifest",
             tags=["answersheet", "example"]) as dag:

        @task
        def new_answer_sheets(triggering_asset_events=None) -> list[dict[str, Any]]:
            """One entry per new answer sheet: the extra of each triggering asset event."""
            days = [dict(event.extra) for events in (triggering_asset_events or {}).values() for event in events]
            for day in days:
                print(f"new answer sheet: road={day.get('road')} date={day.get('date')} "
                      f"manifest={day.get('manifest')} counts={day.get('counts')}")
            return days

        new_answer_sheets()
    return dag
