"""End to end: the real DAG in local mode (`airflow dags test`, as `make demo` runs it) turns a sample day on
the local S3 server into the answer sheet; a second run of the same date changes nothing; the README's
`airflow dags test` block works on a fresh AIRFLOW_HOME and the run records the answer sheet's asset event
in Airflow's database; without a cluster, kubernetes mode fails at once with one line; backfills of the DAG
can be created."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DAY, REPO, ROAD, write_roads_file

from answersheet.dev.local_airflow import prepare_airflow_home, run_airflow, run_dag_test
from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout

CAMERAS = ("front", "rear", "left", "right", "side1", "side2")
N_SETS = 3
LAYOUT = DayLayout(ROAD, DAY)


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    """One Airflow home (SQLite, migrated once) for this module's runs."""
    return tmp_path_factory.mktemp("airflow-home")


def bucket_state(store) -> dict[str, tuple[str, str]]:
    """key -> (etag, last modified) of every object in the bucket."""
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"].isoformat()) for p in pages for o in p.get("Contents", [])}


def test_local_mode_dag_produces_the_answer_sheet_and_a_rerun_changes_nothing(store, tmp_path, photos,
                                                                              tiny_weights, airflow_home):
    weights, sha = tiny_weights
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket, detect={
        "weights": str(weights), "sha256": sha, "backend": "torch", "conf_thres": 1e-6, "max_det": 3,
        "imgsz": 320, "shards": 2})  # two detect tasks (mapped), as in a two-GPU cluster
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, N_SETS, photos, short_sets={1: ["rear"]}))

    run_dag_test(ROAD, DAY.isoformat(), roads, airflow_home, dict(os.environ), echo=False)

    keys = {o.key for o in store.list(LAYOUT.out_prefix)}
    for name in ("manifest.json", "datasheet.csv", "classes.txt"):
        assert LAYOUT.out_prefix + name in keys
    sheet = json.loads(store.get(LAYOUT.out_prefix + "manifest.json"))
    images = sorted(k for k in keys if k.startswith(LAYOUT.out_images))
    assert len(images) == sheet["counts"]["images"] == N_SETS * 6 - 1
    for image in images:  # every image the detector looked at has its YOLO label file, and no other has one
        has_label = image.replace("/images/", "/labels/").removesuffix(".jpg") + ".txt" in keys
        assert has_label == image.endswith(("_side1.jpg", "_side2.jpg")), image
    assert store.list(LAYOUT.detect_manifest(0, 2)) and store.list(LAYOUT.detect_manifest(1, 2))

    # The task log: stage lines timestamped once (by Airflow), under the stage's own logger and level.
    log = (airflow_home / f"dags-test-{ROAD}-{DAY.isoformat()}.log").read_text(encoding="utf-8")
    assert not re.search(r"^\S+Z \[\w+\s*\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", log, re.M)  # no second timestamp
    assert re.search(r"\] detect shard .*: done \d+ img in .* \[answersheet\.progress\]", log)
    assert re.search(r"\] ingest: road=daewang_pangyo date=2026-11-02 bucket=\S+ \[answersheet\]", log)
    assert "Found credentials" not in log  # botocore's per-client INFO lines stay out of the task log

    before = bucket_state(store)
    run_dag_test(ROAD, DAY.isoformat(), roads, airflow_home, dict(os.environ), echo=False)
    assert bucket_state(store) == before


README_MARK = "<!-- tests/test_dag_e2e.py runs this block as written -->"


def readme_block(mark: str = README_MARK) -> str:
    """The first ```bash block after `mark` in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text[text.index(mark):].split("```bash\n", 1)[1].split("```", 1)[0]


def checkout_env(roads: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no AIRFLOW_* from this test session, the venv's bin on PATH, the test's roads file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               ANSWERSHEET_ROADS_FILE=str(roads), **extra)
    return env


def test_readme_dags_test_block_works_on_a_fresh_home_and_records_the_asset_event(store, tmp_path, photos,
                                                                                  tiny_weights):
    weights, sha = tiny_weights
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket, detect={
        "weights": str(weights), "sha256": sha, "backend": "torch", "conf_thres": 1e-6, "max_det": 3,
        "imgsz": 320})
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, 2, photos))
    checkout = tmp_path / "checkout"  # the README runs in a checkout: $PWD/dags, $PWD/.airflow (fresh)
    checkout.mkdir()
    (checkout / "dags").symlink_to(REPO / "dags")

    out = subprocess.run(["bash", "-ec", readme_block()], cwd=checkout, env=checkout_env(roads),
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    sheet = json.loads(store.get(LAYOUT.out_prefix + "manifest.json"))
    assert sheet["date"] == DAY.isoformat()

    with sqlite3.connect(checkout / ".airflow" / "airflow.db") as db:
        events = db.execute(
            "SELECT a.name, a.uri, e.extra, e.source_dag_id, e.source_task_id FROM asset_event e "
            "JOIN asset a ON a.id = e.asset_id").fetchall()
        paused = dict(db.execute("SELECT dag_id, is_paused FROM dag").fetchall())
        queued = db.execute("SELECT count(*) FROM asset_dag_run_queue").fetchone()[0]
    ((name, uri, extra, dag_id, task_id),) = events
    assert (name, uri) == (f"answersheet_{ROAD}", f"s3://{store.bucket}/answersheet/{ROAD}")
    assert (dag_id, task_id) == (f"answersheet_{ROAD}", "datasheet")
    assert json.loads(extra) == {
        "road": ROAD, "date": DAY.isoformat(), "unchanged": False,
        "manifest": f"s3://{store.bucket}/{LAYOUT.out_manifest}",
        "counts": {k: v for k, v in sheet["counts"].items()},
    }
    assert paused["answersheet_training_example"] == 1 and queued == 0  # disabled until someone unpauses it


def test_kubernetes_mode_without_a_cluster_fails_at_once_with_one_line(store, tmp_path):
    """No in-cluster config, no kubeconfig, no connection: the first task fails without retries (the plain
    operator retried twice, 5 and 10 minutes apart, while `airflow dags test` printed "No tasks to run")."""
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket)
    airflow_home = tmp_path / "home"  # its own: the failed run must not hide a day from the backfill test
    env = prepare_airflow_home(airflow_home, roads, {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
    env["ANSWERSHEET_EXECUTION_MODE"] = "kubernetes"
    env.pop("KUBERNETES_SERVICE_HOST", None)
    t0 = time.monotonic()
    code, tail = run_airflow(["dags", "test", f"answersheet_{ROAD}", "2026-11-03"], env, airflow_home / "k8s.log",
                             timeout=300)
    assert code == 1 and time.monotonic() - t0 < 300
    assert tail[0] == ("answersheet: error: no Kubernetes cluster configured for the stage pods (Invalid kube-config "
                       "file. No configuration found); to run the stages as local subprocesses instead, set "
                       "ANSWERSHEET_EXECUTION_MODE=local")
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        tries = dict(db.execute("SELECT task_id, state || ' ' || try_number || '/' || (max_tries + 1) "
                                "FROM task_instance WHERE dag_id = ? AND run_id IN (SELECT run_id FROM dag_run "
                                "WHERE dag_id = ? AND logical_date LIKE '2026-11-03%')", (f"answersheet_{ROAD}",) * 2))
    assert tries["ingest"] == "failed 1/3"  # one try of the three it would have had; no retry delay sat out
    assert {tries[t] for t in ("detect", "preprocess", "datasheet")} == {"upstream_failed 0/3"}


def test_backfill_can_be_created_for_weekdays(airflow_home, tmp_path):
    """`airflow backfill create --dry-run` lists one run per weekday, 09:00 KST = 00:00 UTC."""
    env = prepare_airflow_home(airflow_home, write_roads_file(tmp_path / "roads.yaml", "answersheet"),
                               dict(os.environ))
    log = airflow_home / "backfill.log"
    code, tail = run_airflow(["dags", "reserialize"], env, log)
    assert code == 0, "\n".join(tail)
    code, _ = run_airflow(["backfill", "create", "--dag-id", f"answersheet_{ROAD}", "--from-date", "2026-11-02",
                           "--to-date", "2026-11-08", "--dry-run"], env, log)
    out = log.read_text().rsplit("$ airflow backfill", 1)[1]
    assert code == 0, out[-3000:]
    runs = re.findall(r"\|\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00)\s*\|", out)
    assert runs == [f"2026-11-0{d} 00:00:00+00:00" for d in range(2, 7)]  # Mon 2 .. Fri 6; not Sat 7, Sun 8


def test_failed_stage_fails_fast_with_its_error_line(s3_endpoint, tmp_path, airflow_home):
    """No bucket: ingest exits 1 with its error line, which the run's AnswersheetError leads with (no retries)."""
    roads = write_roads_file(tmp_path / "roads.yaml", "no-such-bucket-here")
    with pytest.raises(AnswersheetError) as err:
        run_dag_test(ROAD, DAY.isoformat(), roads, airflow_home, dict(os.environ), echo=False)
    first, second = str(err.value).splitlines()[:2]
    assert first.startswith(f"DAG answersheet_{ROAD} failed for {DAY.isoformat()} (exit 1, log ")
    assert second.startswith("answersheet: error: s3://no-such-bucket-here/raw/daewang_pangyo/20261102/")


def test_bad_arguments_are_named(tmp_path):
    roads = write_roads_file(tmp_path / "roads.yaml", "answersheet")
    with pytest.raises(AnswersheetError, match="logical date '2026-13-01': expected YYYY-MM-DD"):
        run_dag_test(ROAD, "2026-13-01", roads, tmp_path / "home", {})
    with pytest.raises(AnswersheetError, match="no answersheet_dags.py"):
        run_dag_test(ROAD, "2026-11-02", roads, tmp_path / "home", {}, dags_folder=tmp_path)
