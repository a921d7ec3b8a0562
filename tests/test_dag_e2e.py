"""End to end: the real DAG in local mode (`airflow dags test`, as `make demo` runs it) turns a sample day on
the local S3 server into the answer sheet; a second run of the same date changes nothing; backfills of
the DAG can be created."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import DAY, ROAD, write_roads_file
from test_dags import DAG_FILE  # noqa: F401  (first: points Airflow at a private AIRFLOW_HOME)

from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout
from answersheet.local_airflow import prepare_airflow_home, run_airflow, run_dag_test
from answersheet.sample_day import build_day_archives, upload_day

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

    before = bucket_state(store)
    run_dag_test(ROAD, DAY.isoformat(), roads, airflow_home, dict(os.environ), echo=False)
    assert bucket_state(store) == before


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
