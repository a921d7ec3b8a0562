"""DAG helpers shared by the DAG, pod, contract and process-date tests: parse the DAG file through Airflow's
own DagBag with a given roads file, write roads files, render every stage pod offline.

A plain module: importing it imports Airflow, which reads AIRFLOW_HOME then; tests/conftest.py points it at
a private one before any test module is collected (pytest_configure), and pyproject.toml puts dags/ on the
path (`pythonpath`), so each test module runs alone or with the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pendulum
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.mappedoperator import MappedOperator
from answersheet_dagkit.lineage import EXAMPLE_CONSUMER_DAG_ID
from conftest import REPO, ROADS_FILE

DAGS_DIR = REPO / "dags"
DAG_FILE = DAGS_DIR / "answersheet_dags.py"
ENV_KEYS = ("ANSWERSHEET_ROADS_FILE", "ANSWERSHEET_EXECUTION_MODE")
LOGICAL_DATE = pendulum.datetime(2026, 11, 2, 0, tz="UTC")  # 09:00 KST


def road_dags(bag: DagBag) -> dict:
    """dag_id -> DAG of the roads (without the example asset consumer)."""
    return {dag_id: dag for dag_id, dag in bag.dags.items() if dag_id != EXAMPLE_CONSUMER_DAG_ID}


def dag_run(logical_date, run_id: str = "scheduled__test"):
    """What a task's context holds as `dag_run`, as far as the DAGs' templates read it."""
    return SimpleNamespace(logical_date=logical_date, run_id=run_id, conf={})


def write_roads(path: Path, roads: list[dict], **defaults) -> Path:
    """The shipped roads file with `roads` replaced and `defaults` deep-merged into its defaults."""
    from answersheet.config import deep_merge

    doc = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    doc["defaults"] = deep_merge(doc["defaults"], defaults)
    doc["roads"] = roads
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def parse(roads_file: Path | None = None, mode: str | None = None, dag_folder: Path = DAG_FILE) -> DagBag:
    """Airflow's DagBag over the DAG file with this roads file and execution mode (env restored after)."""
    with mock.patch.dict(os.environ):
        for key, value in zip(ENV_KEYS, (roads_file, mode), strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        return DagBag(dag_folder=str(dag_folder))


def rendered_pods(dag) -> list[tuple[str, int, dict]]:
    """(task_id, map_index, pod manifest) for every task instance of the DAG, rendered without a cluster
    the way the task runner renders it (a mapped task is expanded for each map index first)."""
    from kubernetes.client import ApiClient

    out = []
    for task in dag.tasks:
        mapped = isinstance(task, MappedOperator)
        for map_index in range(len(task.expand_input.value)) if mapped else [-1]:
            ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=map_index, try_number=1)
            ctx = {"logical_date": LOGICAL_DATE, "ti": ti, "run_id": "scheduled__2026-11-02T00:00:00+00:00",
                   "dag": dag, "task": task,
                   "dag_run": SimpleNamespace(conf={}, logical_date=LOGICAL_DATE, run_id="scheduled__x")}
            task.render_template_fields(ctx)  # a mapped task puts its unmapped, rendered operator in ctx["task"]
            pod = ctx["task"].build_pod_request_obj(ctx, dry_run=True)
            out.append((task.task_id, map_index, ApiClient().sanitize_for_serialization(pod)))
    return out


def base(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")
