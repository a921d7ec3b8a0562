"""The roads as the DAG factory takes them: checked by the shared reader (answersheet_roadsfile, the stage CLI's
too), `schedule` and `kubernetes` over the schema's defaults. Here only what the DAG side alone can check:
the execution mode and the chart's pod templates (the cron: factory.timetable_for)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import answersheet_roadsfile as roadsfile

MODE_ENV = "ANSWERSHEET_EXECUTION_MODE"
MODES = tuple(roadsfile.ROAD_SCHEMA["properties"]["kubernetes"]["properties"]["mode"]["enum"])
ROADS_FILE_ENV = "ANSWERSHEET_ROADS_FILE"
# The chart's pod templates (ConfigMap answersheet-pod-templates), mounted here by helm/values-airflow.yaml.
POD_TEMPLATES_ENV = "ANSWERSHEET_POD_TEMPLATES"
POD_TEMPLATES_DIR = "/opt/airflow/answersheet-pod-templates"


def roads_file_path(dags_dir: Path) -> Path:
    """$ANSWERSHEET_ROADS_FILE, else roads.yaml next to the DAG file."""
    return Path(os.environ.get(ROADS_FILE_ENV) or Path(dags_dir) / "roads.yaml")


def pod_template_path(kind: str, profile: str) -> Path:
    """The chart's pod template of a stage kind (preprocess | detector) and profile: <dir>/<kind>-<profile>.yaml."""
    return Path(os.environ.get(POD_TEMPLATES_ENV) or POD_TEMPLATES_DIR) / f"{kind}-{profile}.yaml"


def dag_road(raw: dict, mode_env: str | None = None) -> dict[str, Any]:
    """One merged road, checked; RoadsFileError names the road and the key. Where the pod templates are mounted
    (the Airflow overlay mounts them in the DAG processor), a profile without one fails the parse, not a pod."""
    roadsfile.check_road(raw)
    road = {**raw, "name": raw.get("name", raw["id"]), "bucket": raw.get("bucket", roadsfile.schema_default("bucket")),
            "shards": raw["detect"].get("shards", roadsfile.schema_default("detect", "shards")),
            "schedule": {**roadsfile.schema_defaults("schedule"), **raw["schedule"]},
            "kubernetes": roadsfile.deep_merge(roadsfile.schema_defaults("kubernetes"), raw.get("kubernetes") or {})}
    k = road["kubernetes"]
    k["mode"] = mode_env or k["mode"]
    if k["mode"] not in MODES:
        raise roadsfile.fail(raw["id"], f"${MODE_ENV}", f"must be one of {MODES}, got {k['mode']!r}")
    for kind, profile in k["pod_profile"].items():
        path = pod_template_path(kind, profile)
        if k["mode"] == "kubernetes" and path.parent.is_dir() and not path.is_file():
            there = sorted(p.stem.removeprefix(f"{kind}-") for p in path.parent.glob(f"{kind}-*.yaml"))
            raise roadsfile.fail(raw["id"], f"kubernetes.pod_profile.{kind}",
                       f"no pod template {path.name} in {path.parent} (the chart's {kind} profiles: {there})")
    return road


def load_roads(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every valid road of the file, and one error line per invalid road (the others still load)."""
    raws = roadsfile.read_roads(path)
    ids = [raw.get("id") for raw in raws]
    roads, errors = [], []
    for raw in raws:
        try:
            if ids.count(raw.get("id")) > 1:
                raise roadsfile.fail(raw.get("id"), "id", f"defined {ids.count(raw.get('id'))} times")
            roads.append(dag_road(raw, os.environ.get(MODE_ENV) or None))
        except roadsfile.RoadsFileError as exc:
            errors.append(str(exc))
    return roads, list(dict.fromkeys(errors))
