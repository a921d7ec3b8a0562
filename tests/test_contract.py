"""The DAG side and the stage CLI agree: one roads-file schema read from the same bytes, the same error line
for the same bad road, image tags = package version, and every pod's and every local task's command line
parses with the CLI's own parser (no drift between DAG and images)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from airflow.sdk.definitions.mappedoperator import MappedOperator
from answersheet_dagkit import commands
from answersheet_dagkit.roads import load_roads as dag_load_roads
from conftest import REPO, ROADS_FILE
from dagtest import base, parse, rendered_pods, road_dags, write_roads

import answersheet
from answersheet import roadsfile
from answersheet.cli import build_parser
from answersheet.config import ConfigError, load_road

# the package's file -> the DAG folder's (src/answersheet/<name> is a symlink to dags/<dag name>)
DAG_FILES = {"roadsfile.py": "answersheet_roadsfile.py", "roads.schema.json": "roads.schema.json"}


def test_both_sides_read_the_same_schema_and_reader_bytes():
    """answersheet.roadsfile is the DAG side's file (a symlink), not a copy: same bytes, same schema."""
    import answersheet_roadsfile as dag_roadsfile

    assert roadsfile.SCHEMA_PATH.resolve() == dag_roadsfile.SCHEMA_PATH.resolve()
    assert roadsfile.SCHEMA_PATH.read_bytes() == dag_roadsfile.SCHEMA_PATH.read_bytes()
    for name, dag_name in DAG_FILES.items():
        assert (REPO / "src/answersheet" / name).read_bytes() == (REPO / "dags" / dag_name).read_bytes()
    assert roadsfile.SCHEMA == dag_roadsfile.SCHEMA
    assert roadsfile.SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_is_valid_draft_2020_12():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(roadsfile.SCHEMA)


def test_the_wheel_ships_the_schema_and_reader_as_files(tmp_path):
    """The images build the wheel from what .dockerignore and their COPY lines give them (src/ with its two
    symlinks, and their targets in dags/): the wheel must hold the targets' bytes."""
    context = tmp_path / "context"
    shutil.copytree(REPO / "src", context / "src", symlinks=True, ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md", *(f"dags/{n}" for n in DAG_FILES.values())):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, context / name)
    assert (context / "src/answersheet/roadsfile.py").is_symlink()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("answersheet-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for name, dag_name in DAG_FILES.items():
            assert zf.read(f"answersheet/{name}") == (REPO / "dags" / dag_name).read_bytes()


BAD_ROADS = [
    ({"colour": "red"}, "colour", "unknown key (allowed: id, name, bucket"),
    ({"bucket": "Answer_Sheet"}, "bucket", "not a valid S3 bucket name, got 'Answer_Sheet'"),
    ({"detect": {"conf_thres": float("nan")}}, "detect.conf_thres", "must be a finite number in [0, 1], got nan"),
    ({"detect": {"imgsz": 650}}, "detect.imgsz", "must be a multiple of 32, got 650"),
    ({"detect": {"backend": "tensorrt"}}, "detect.backend", "must be one of ('auto', 'torch', 'onnx', 'openvino')"),
    ({"ingest": {"max_ratio": float("inf")}}, "ingest.max_ratio", "must be a finite number in [1, 1e+06], got inf"),
    ({"cameras": ["front", "side_1"]}, "cameras", "item 1: camera names are lowercase letters and digits"),
    ({"schedule": {"timezone": "Asia/Seol"}}, "schedule.timezone", "not an IANA time zone"),
    ({"schedule": {"start_date": "2026-02-30"}}, "schedule.start_date", "must be a date YYYY-MM-DD"),
    ({"schedule": {"retry_delay_minutes": float("nan")}}, "schedule.retry_delay_minutes",
     "must be a finite number > 0"),
]


@pytest.mark.parametrize(("override", "key", "problem"), BAD_ROADS, ids=[b[1] for b in BAD_ROADS])
def test_both_sides_give_the_same_error_line_for_the_same_bad_road(tmp_path, override, key, problem):
    roads = write_roads(tmp_path / "roads.yaml", [{"id": "bad", **override}])
    with pytest.raises(ConfigError) as err:
        load_road(roads, "bad")
    specs, errors = dag_load_roads(roads)
    assert specs == [] and len(errors) == 1
    assert errors[0].startswith(f"road 'bad': key '{key}': {problem}"), errors[0]
    assert str(err.value) == f"{roads}: {errors[0]}"
    assert "\n" not in errors[0]


def test_a_bad_bucket_is_a_dag_import_error_not_a_pod_failure(tmp_path):
    """Before the shared schema the DAG side only checked that the bucket was non-empty: the DAG loaded and
    every stage pod then failed on it."""
    roads = write_roads(tmp_path / "roads.yaml", [{"id": "good"}, {"id": "bad", "bucket": "s3://answersheet"}])
    bag = parse(roads)
    assert sorted(road_dags(bag)) == ["answersheet_good"]
    (error,) = bag.import_errors.values()
    assert "road 'bad': key 'bucket': not a valid S3 bucket name, got 's3://answersheet'" in error


def test_default_image_tags_are_the_package_version(pod_templates):  # noqa: F811
    """The chart's stage images default to its appVersion, which is the package's version."""
    chart = yaml.safe_load((REPO / "helm/answersheet/Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == answersheet.__version__
    images = {base(yaml.safe_load(p.read_text()))["image"] for p in pod_templates.glob("*.yaml")}
    assert {i.rsplit(":", 1)[1] for i in images} == {answersheet.__version__}


def test_the_shipped_roads_file_names_only_profiles_the_chart_has(pod_templates):  # noqa: F811
    shipped = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))["defaults"]["kubernetes"]
    default = roadsfile.ROAD_SCHEMA["properties"]["kubernetes"]["properties"]["pod_profile"]["default"]
    assert shipped["pod_profile"] == default
    for kind, profile in default.items():
        assert (pod_templates / f"{kind}-{profile}.yaml").is_file()


@pytest.fixture(scope="module")
def roads(tmp_path_factory):
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "daewang_pangyo"}, {"id": "sharded", "detect": {"shards": 3}},
        {"id": "quiet", "kubernetes": {"push_summary": False}}])


def test_every_pod_command_parses_with_the_cli(roads, with_templates):  # noqa: F811
    parser = build_parser()
    bag = parse(roads)
    seen = set()
    for dag_id, dag in road_dags(bag).items():
        road = load_road(roads, dag_id.removeprefix("answersheet_"))
        for task_id, map_index, pod in rendered_pods(dag):
            container = base(pod)
            assert container["command"] == ["answersheet"]
            args = parser.parse_args(container["args"])
            assert (args.command, args.road, args.date) == (task_id, road.id, "2026-11-02")
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert args.config == commands.POD_CONFIG_PATH  # the chart's roads ConfigMap mount
            assert commands.POD_CONFIG_PATH.rsplit("/", 1)[0] in mounts
            pushed = road.kubernetes.get("push_summary", True)
            assert args.summary_json == (commands.POD_SUMMARY_PATH if pushed else None)
            if task_id == "detect":
                assert (args.shard_index, args.shard_count) == (max(map_index, 0), road.detect.shards)
            seen.add((dag_id, task_id, map_index))
    assert len(seen) == 3 * 4 + 2


def test_every_local_command_parses_with_the_cli(roads):
    parser = build_parser()
    bag = parse(roads, mode="local")
    for dag in road_dags(bag).values():
        for task in dag.tasks:
            if isinstance(task, MappedOperator):
                lines = [kw["command"] for kw in task.expand_input.value]
            else:
                lines = [task.command]
            for cmd in lines:
                assert cmd[0] == "answersheet"
                args = parser.parse_args(cmd[1:] + ["--summary-json", "/tmp/summary.json"])
                assert args.command == task.task_id in commands.STAGES
                assert args.config == str(roads)


@pytest.mark.parametrize("process_date", ["previous_run", "run_day"])
def test_both_sides_accept_schedule_process_date(tmp_path, process_date):
    """The stage CLI reads the same roads file as the DAGs: a road's schedule.process_date must load on both."""
    roads = write_roads(tmp_path / "roads.yaml", [{"id": "r1", "schedule": {"process_date": process_date}}])
    assert load_road(roads, "r1").schedule["process_date"] == process_date
    specs, errors = dag_load_roads(roads)
    assert errors == [] and specs[0]["schedule"]["process_date"] == process_date
