"""The stage command line, built once and used by both the pod and the local-subprocess task."""

from __future__ import annotations

STAGES = ("ingest", "detect", "preprocess", "datasheet")
CLI = "answersheet"
POD_CONFIG_PATH = "/etc/answersheet/roads.yaml"  # the roads ConfigMap, mounted in every stage pod
POD_SUMMARY_PATH = "/airflow/xcom/return.json"  # read by the KubernetesPodOperator's XCom sidecar


def date_template(timezone: str) -> str:
    """Jinja for the run's logical date as YYYY-MM-DD in the road's time zone (09:00 KST -> that day)."""
    return "{{ logical_date.in_timezone('" + timezone + "').strftime('%Y-%m-%d') }}"


def stage_command(stage: str, road: str, date: str, config: str, *, shard: tuple[int, int] | None = None,
                  summary_json: str | None = None) -> list[str]:
    """`answersheet <stage> --road R --date D --config C [--shard-index i --shard-count n] [--summary-json P]`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    cmd = [CLI, stage, "--road", road, "--date", date, "--config", config]
    if shard is not None:
        index, count = shard
        cmd += ["--shard-index", str(index), "--shard-count", str(count)]
    if summary_json:
        cmd += ["--summary-json", summary_json]
    return cmd


def stage_commands(stage: str, road: str, date: str, config: str, shards: int,
                   summary_json: str | None = None) -> list[list[str]]:
    """One command per task instance: `shards` for detect (one pod/GPU each), one for every other stage."""
    if stage == "detect":
        return [stage_command(stage, road, date, config, shard=(i, shards), summary_json=summary_json)
                for i in range(shards)]
    return [stage_command(stage, road, date, config, summary_json=summary_json)]
