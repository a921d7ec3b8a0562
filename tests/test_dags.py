"""The DAG file through Airflow's own DagBag: one DAG per road, schedule and defaults as configured, the
same shape in local mode, and bad roads reported as import errors naming the road and key while the
other roads still load. Helpers (parse, write_roads, ...): tests/dagtest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pendulum
import pytest
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import CronDataIntervalTimetable
from airflow.sdk.definitions.mappedoperator import MappedOperator
from answersheet_dagkit.commands import STAGES
from answersheet_dagkit.lineage import EXAMPLE_CONSUMER_DAG_ID
from answersheet_dagkit.local import AnswersheetCliOperator
from conftest import ROADS_FILE
from dagtest import DAG_FILE, DAGS_DIR, dag_run, parse, road_dags, write_roads


def only_error(bag: DagBag) -> str:
    assert list(bag.import_errors) == [str(DAG_FILE)], bag.import_errors
    return bag.import_errors[str(DAG_FILE)]


@pytest.fixture(scope="module")
def three_roads(tmp_path_factory) -> Path:
    """Three roads: shipped defaults; a Los Angeles schedule with catch-up; detection in 3 shards."""
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "daewang_pangyo", "name": "대왕판교"},
        {"id": "la_101", "name": "US-101", "schedule": {
            "timezone": "America/Los_Angeles", "cron": "30 7 * * *", "start_date": "2026-10-01",
            "catchup": True, "max_active_runs": 3, "retries": 5}},
        {"id": "gyeongbu_3", "detect": {"shards": 3}},
    ])


def test_dag_folder_parses_one_dag_per_shipped_road_and_skips_the_dagkit():
    bag = parse(dag_folder=DAGS_DIR)
    roads = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))["roads"]
    assert bag.import_errors == {}
    assert sorted(road_dags(bag)) == sorted(f"answersheet_{r['id']}" for r in roads)
    assert EXAMPLE_CONSUMER_DAG_ID in bag.dag_ids
    assert [Path(s.file).name for s in bag.dagbag_stats] == ["answersheet_dags.py"]  # .airflowignore


def test_shipped_dag_schedule_defaults_and_tasks():
    dag = parse().dags["answersheet_daewang_pangyo"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)  # process_date: previous_run
    assert dag.timetable.expression == "0 9 * * 1-5"
    assert dag.timezone.name == "Asia/Seoul"
    assert dag.start_date == pendulum.datetime(2026, 11, 2, tz="Asia/Seoul")
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.tags) == {"yolov5", "daewang_pangyo"}
    assert "대왕판교" in dag.description and "daewang_pangyo" in dag.doc_md
    assert "airflow backfill create --dag-id answersheet_daewang_pangyo" in dag.doc_md
    for task in dag.tasks:
        assert task.retries == 2
        assert task.retry_exponential_backoff == 2.0
        assert task.retry_delay == pendulum.duration(minutes=5)
        assert task.max_retry_delay == pendulum.duration(minutes=60)
    assert [t.task_id for t in dag.topological_sort()] == list(STAGES)
    for up, down in zip(STAGES, STAGES[1:], strict=False):
        assert dag.get_task(up).downstream_task_ids == {down}


def test_per_road_schedule_and_shards(three_roads):
    bag = parse(three_roads)
    assert bag.import_errors == {}
    assert sorted(road_dags(bag)) == ["answersheet_daewang_pangyo", "answersheet_gyeongbu_3", "answersheet_la_101"]
    la = bag.dags["answersheet_la_101"]
    assert la.timetable.expression == "30 7 * * *" and la.timezone.name == "America/Los_Angeles"
    assert la.start_date == pendulum.datetime(2026, 10, 1, tz="America/Los_Angeles")
    assert la.catchup is True and la.max_active_runs == 3
    assert {t.retries for t in la.tasks} == {5}
    sharded = bag.dags["answersheet_gyeongbu_3"]
    detect = sharded.get_task("detect")
    assert isinstance(detect, MappedOperator)
    assert len(detect.expand_input.value) == 3
    assert sharded.get_task("preprocess").upstream_task_ids == {"detect"}  # waits for every shard
    assert not isinstance(bag.dags["answersheet_daewang_pangyo"].get_task("detect"), MappedOperator)


def test_stage_date_is_the_logical_date_in_the_road_timezone(three_roads):
    """The --date of every stage is the run's logical date in the road's zone (which instant that is per
    process_date: tests/test_process_date.py)."""
    bag = parse(three_roads)
    for dag_id, logical_date, day in [
        ("answersheet_daewang_pangyo", pendulum.datetime(2026, 11, 2, 0, tz="UTC"), "2026-11-02"),  # 09:00 KST
        ("answersheet_daewang_pangyo", pendulum.datetime(2026, 11, 1, 23, tz="UTC"), "2026-11-02"),  # 08:00 KST
        ("answersheet_la_101", pendulum.datetime(2026, 11, 3, 5, tz="UTC"), "2026-11-02"),  # 21:00 PST the day before
    ]:
        for task in bag.dags[dag_id].tasks:
            if isinstance(task, MappedOperator):
                continue
            task.render_template_fields({"dag_run": dag_run(logical_date)})
            assert task.arguments[task.arguments.index("--date") + 1] == day
            assert task.labels["answersheet.io/date"] == day


def test_a_run_without_logical_date_fails_at_once_naming_the_problem(three_roads):
    from airflow.sdk.exceptions import AirflowFailException

    task = parse(three_roads).dags["answersheet_daewang_pangyo"].get_task("ingest")
    with pytest.raises(AirflowFailException, match=r"^answersheet: error: run manual__x: no logical date"):
        task.render_template_fields({"dag_run": dag_run(None, "manual__x")})


@pytest.mark.parametrize("how", ["env", "config"])
def test_local_mode_has_the_same_shape(three_roads, tmp_path, how):
    if how == "env":
        roads, bag = three_roads, parse(three_roads, mode="local")
    else:
        roads = write_roads(tmp_path / "roads.yaml", yaml.safe_load(three_roads.read_text())["roads"],
                            kubernetes={"mode": "local"})
        bag = parse(roads)
    pods = parse(three_roads)
    assert bag.import_errors == {} and sorted(bag.dag_ids) == sorted(pods.dag_ids)
    for dag_id, dag in road_dags(bag).items():
        pod_dag = pods.dags[dag_id]
        assert dag.timetable == pod_dag.timetable
        for task in dag.tasks:
            pod_task = pod_dag.get_task(task.task_id)
            assert task.downstream_task_ids == pod_task.downstream_task_ids
            assert isinstance(task, MappedOperator) == isinstance(pod_task, MappedOperator)
            if isinstance(task, MappedOperator):
                assert task.operator_class is AnswersheetCliOperator
                commands = [kw["command"] for kw in task.expand_input.value]
                pod_commands = [task.partial_kwargs.get("cmds", ["answersheet"]) + kw["arguments"]
                                for kw in pod_task.expand_input.value]
            else:
                assert isinstance(task, AnswersheetCliOperator)
                commands, pod_commands = [task.command], [pod_task.cmds + pod_task.arguments]
            assert task.retries == 0  # local mode fails fast
            for cmd, pod_cmd in zip(commands, pod_commands, strict=True):
                # the same command line; only the roads file's path and the XCom summary file differ
                i = cmd.index("--config")
                assert cmd[i + 1] == str(roads)
                assert cmd[:i] + cmd[i + 2:] == pod_cmd[:i] + pod_cmd[i + 2:-2]
                assert pod_cmd[-2:] == ["--summary-json", "/airflow/xcom/return.json"]


BAD_ROADS = [
    ({"colour": "red"}, "colour", "unknown key"),
    ({"schedule": {"cron": "0 25 * * 1-5"}}, "schedule.cron", "invalid cron"),
    ({"schedule": {"cron": "every morning"}}, "schedule.cron", "invalid cron"),
    ({"kubernetes": {"startup_timeout_seconds": 0}}, "kubernetes.startup_timeout_seconds", "must be in [1, 86400]"),
    ({"kubernetes": {"gpus": 1}}, "kubernetes.gpus", "unknown key"),
    ({"schedule": {"timezone": "Asia/Seol"}}, "schedule.timezone", "not an IANA time zone"),
    ({"detect": {"shards": 0}}, "detect.shards", "must be in [1, 256], got 0"),
    # the stage keys too (one schema, roads.schema.json): a bad bucket fails at parse, not later in a pod
    ({"bucket": "Answer_Sheet"}, "bucket", "not a valid S3 bucket name"),
    ({"detect": {"conf_thres": float("nan")}}, "detect.conf_thres", "must be a finite number in [0, 1], got nan"),
    ({"kubernetes": {"pod_profile": {"detector": "A100"}}}, "kubernetes.pod_profile.detector", "must name a pod"),
    # the pods' cluster shape is the Helm chart's (stagePods), no longer a roads-file key
    ({"kubernetes": {"gpu": {"count": 2}}}, "kubernetes.gpu", "unknown key (allowed: mode, pod_profile"),
]


@pytest.mark.parametrize(("override", "key", "problem"), BAD_ROADS, ids=[b[1] for b in BAD_ROADS])
def test_bad_road_is_an_import_error_naming_road_and_key_and_the_others_load(tmp_path, override, key, problem):
    roads = write_roads(tmp_path / "roads.yaml", [{"id": "good_a"}, {"id": "bad_road", **override}, {"id": "good_b"}])
    bag = parse(roads)
    assert sorted(road_dags(bag)) == ["answersheet_good_a", "answersheet_good_b"]
    error = only_error(bag)
    assert f"road 'bad_road': key '{key}'" in error and problem in error and str(roads) in error
    assert "good_a" not in error and "good_b" not in error


def test_every_bad_road_is_reported(tmp_path):
    roads = write_roads(tmp_path / "roads.yaml", [
        {"id": "twice"}, {"id": "twice"}, {"id": "Bad-Id"}, {"id": "no_gpu", "kubernetes": {"deferrable": "yes"}},
        {"id": "fine"}])
    bag = parse(roads)
    assert list(road_dags(bag)) == ["answersheet_fine"]
    error = only_error(bag)
    assert "3 road(s) not loaded" in error
    assert "road 'twice': key 'id': defined 2 times" in error
    assert "road 'Bad-Id': key 'id'" in error
    assert "road 'no_gpu': key 'kubernetes.deferrable'" in error


def test_bad_execution_mode_env_is_named(three_roads):
    error = only_error(parse(three_roads, mode="cluster"))
    assert "key '$ANSWERSHEET_EXECUTION_MODE': must be one of ('kubernetes', 'local'), got 'cluster'" in error


@pytest.mark.parametrize(("content", "problem"), [
    (None, "roads file not found"),
    ("roads: [\n", "not valid YAML"),
    ("defaults: {}\nroad: []\n", "expected a mapping with a 'roads' list"),
])
def test_unreadable_roads_file_is_an_import_error(tmp_path, content, problem):
    roads = tmp_path / "roads.yaml"
    if content is not None:
        roads.write_text(content)
    bag = parse(roads)
    assert bag.dag_ids == []
    error = only_error(bag)
    assert str(roads) in error and problem in error


def test_dag_file_imports_neither_torch_nor_answersheet_and_boto3_only_through_the_amazon_provider():
    """The DAG folder works in the official Airflow image: no torch, yolov5 or `answersheet`. boto3 is loaded
    only by the amazon provider's s3:// asset URI handler, which the DAG file pre-imports itself."""
    code = (
        "import sys\n"
        "import airflow.providers.amazon.aws.assets.s3\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "before = set(sys.modules)\n"
        f"bag = DagBag(dag_folder={str(DAG_FILE)!r})\n"
        "assert not bag.import_errors and bag.dag_ids, bag.import_errors\n"
        "print(sorted(m for m in set(sys.modules) - before\n"
        "             if m.split('.')[0] in ('torch', 'yolov5', 'boto3', 'botocore', 'answersheet')))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("ANSWERSHEET_ROADS_FILE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_local_task_fails_without_retry_on_the_cli_error_line(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException
    from answersheet_dagkit.commands import stage_command

    missing = tmp_path / "nowhere.yaml"
    task = AnswersheetCliOperator(task_id="ingest",
                                  command=stage_command("ingest", "daewang_pangyo", "2026-11-02", str(missing)))
    with pytest.raises(AirflowFailException, match=r"^answersheet: error: .*nowhere\.yaml: roads file not found"):
        task.execute({})
    bad_args = AnswersheetCliOperator(task_id="ingest", command=stage_command(
        "ingest", "daewang_pangyo", "2026-11-02", str(ROADS_FILE), shard=(0, 2)))
    with pytest.raises(AirflowFailException, match=r"^answersheet: error: unrecognized arguments: --shard-index 0"):
        bad_args.execute({})


def test_local_cli_override_must_exist(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from answersheet_dagkit.local import resolve_cli

    monkeypatch.setenv("ANSWERSHEET_CLI", str(tmp_path / "answersheet"))
    with pytest.raises(AirflowFailException, match="ANSWERSHEET_CLI="):
        resolve_cli()
    monkeypatch.delenv("ANSWERSHEET_CLI")
    assert Path(resolve_cli()).name == "answersheet"
