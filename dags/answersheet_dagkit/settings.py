"""The DAG side of the roads file: each road checked against roads.schema.json (roadsfile, shared with the stage
CLI) and turned into what the DAG factory needs (`id`, `schedule`, `kubernetes`, `detect.shards`).

Stdlib + yaml + jsonschema only (no Airflow, no `answersheet`): a road's problem is a RoadConfigError naming
the road and the key, in the same words as the stage CLI (the same code builds them). Checks only the DAG side
needs (the execution mode, the pod templates, the cron expression in the factory) live here.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from answersheet_dagkit.roadsfile import (
    ROAD_SCHEMA,
    RoadsFileError,
    check_road,
    deep_merge,
    read_roads,
    schema_defaults,
)
from answersheet_dagkit.roadsfile import fail as _fail

MODES = tuple(ROAD_SCHEMA["properties"]["kubernetes"]["properties"]["mode"]["enum"])
MODE_ENV = "ANSWERSHEET_EXECUTION_MODE"
ROADS_FILE_ENV = "ANSWERSHEET_ROADS_FILE"
# The chart's pod templates (ConfigMap answersheet-pod-templates), mounted here by helm/values-airflow.yaml.
POD_TEMPLATES_ENV = "ANSWERSHEET_POD_TEMPLATES"
POD_TEMPLATES_DIR = "/opt/airflow/answersheet-pod-templates"
RoadConfigError = RoadsFileError


@dataclass(frozen=True)
class Schedule:
    """When a road's DAG runs."""

    timezone: str
    cron: str | None
    process_date: str  # previous_run | run_day (factory.timetable_for)
    start_date: dt.date
    catchup: bool
    max_active_runs: int
    retries: int
    retry_delay_minutes: float
    max_retry_delay_minutes: float


@dataclass(frozen=True)
class RoadSpec:
    """What the DAG factory needs to know about one road (validated)."""

    id: str
    name: str
    bucket: str
    shards: int
    schedule: Schedule
    kubernetes: dict[str, Any]  # the schema's defaults merged with the file; mode resolved

    @property
    def dag_id(self) -> str:
        return f"answersheet_{self.id}"


def roads_file_path(dags_dir: Path) -> Path:
    """$ANSWERSHEET_ROADS_FILE, else roads.yaml next to the DAG file."""
    return Path(os.environ.get(ROADS_FILE_ENV) or Path(dags_dir) / "roads.yaml")


def validate_schedule(raw: dict) -> Schedule:
    """The schema-checked `schedule` section with the schema's defaults (the cron expression itself is checked
    by Airflow's timetable in the factory)."""
    s = {**schema_defaults("schedule"), **raw}
    return Schedule(
        timezone=s["timezone"], cron=s["cron"].strip() if s["cron"] else None, process_date=s["process_date"],
        start_date=dt.date.fromisoformat(s["start_date"]), catchup=s["catchup"],
        max_active_runs=s["max_active_runs"], retries=s["retries"],
        retry_delay_minutes=float(s["retry_delay_minutes"]),
        max_retry_delay_minutes=float(s["max_retry_delay_minutes"]),
    )


def pod_template_path(kind: str, profile: str) -> Path:
    """The chart's pod template for a stage kind (preprocess | detector) and profile: <dir>/<kind>-<profile>.yaml."""
    return Path(os.environ.get(POD_TEMPLATES_ENV) or POD_TEMPLATES_DIR) / f"{kind}-{profile}.yaml"


def validate_kubernetes(road: str, raw: dict | None, mode_env: str | None = None) -> dict[str, Any]:
    """The schema-checked `kubernetes` section over the schema's defaults; `mode` resolved with
    $ANSWERSHEET_EXECUTION_MODE. In kubernetes mode, where the pod templates are mounted (the Airflow overlay
    mounts them in the DAG processor), a profile without a template is the road's error at parse time,
    not a task failing at run time."""
    k = deep_merge(schema_defaults("kubernetes"), raw or {})
    k["mode"] = mode_env or k["mode"]
    if k["mode"] not in MODES:
        raise _fail(road, f"${MODE_ENV}", f"must be one of {MODES}, got {k['mode']!r}")
    for kind, profile in k["pod_profile"].items():
        path = pod_template_path(kind, profile)
        if k["mode"] == "kubernetes" and path.parent.is_dir() and not path.is_file():
            there = sorted(p.stem.removeprefix(f"{kind}-") for p in path.parent.glob(f"{kind}-*.yaml"))
            raise _fail(road, f"kubernetes.pod_profile.{kind}",
                        f"no pod template {path.name} in {path.parent} (the chart's {kind} profiles: {there})")
    return k


def validate_road(raw: dict, mode_env: str | None = None) -> RoadSpec:
    """One merged road mapping -> RoadSpec, or RoadConfigError naming the road and the key."""
    check_road(raw)
    road = raw["id"]
    return RoadSpec(
        id=road, name=raw.get("name", road), bucket=raw.get("bucket", "answersheet"),
        shards=raw["detect"].get("shards", 1), schedule=validate_schedule(raw["schedule"]),
        kubernetes=validate_kubernetes(road, raw.get("kubernetes"), mode_env),
    )


def load_roads(path: Path) -> tuple[list[RoadSpec], list[str]]:
    """Every valid road of the file, and one error line per invalid road (the others still load)."""
    mode_env = os.environ.get(MODE_ENV) or None
    raws = read_roads(path)
    counts: dict[Any, int] = {}
    for raw in raws:
        counts[raw.get("id")] = counts.get(raw.get("id"), 0) + 1
    specs, errors = [], []
    for raw in raws:
        if counts[raw.get("id")] > 1:
            errors.append(f"road {raw.get('id')!r}: key 'id': defined {counts[raw.get('id')]} times")
            continue
        try:
            specs.append(validate_road(raw, mode_env))
        except RoadConfigError as exc:
            errors.append(str(exc))
    return specs, list(dict.fromkeys(errors))
