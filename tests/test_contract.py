"""The DAG side and the stage CLI agree: the same road keys, image tags = package version, and every pod's
and every local task's command line parses with the CLI's own parser (no drift between DAG and images)."""

from __future__ import annotations

import pytest
import yaml
from test_dags import (  # first: AIRFLOW_HOME
    ROADS_FILE,
    MappedOperator,
    commands,
    parse,
    road_dags,
    settings,
    write_roads,
)
from test_pods import base, rendered_pods

import answersheet
from answersheet.cli import build_parser
from answersheet.config import ROAD_KEYS, ConfigError, load_road


def test_dag_side_accepts_exactly_the_road_keys_of_the_stage_code():
    assert settings.ROAD_KEYS == ROAD_KEYS


def test_default_image_tags_are_the_package_version():
    shipped = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))["defaults"]["kubernetes"]
    for images in (settings.KUBERNETES_DEFAULTS["images"], shipped["images"]):
        assert {img["tag"] for img in images.values()} == {answersheet.__version__}
    assert shipped == settings.KUBERNETES_DEFAULTS  # the file documents every default


def test_unknown_road_key_is_rejected_by_both_sides(tmp_path):
    roads = write_roads(tmp_path / "roads.yaml", [{"id": "r1", "colour": "red"}])
    with pytest.raises(ConfigError, match="road 'r1': key 'colour': unknown key"):
        load_road(roads, "r1")
    assert settings.load_roads(roads)[1] == [f"road 'r1': key 'colour': unknown key (allowed: {', '.join(ROAD_KEYS)})"]


@pytest.fixture(scope="module")
def roads(tmp_path_factory):
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "daewang_pangyo"}, {"id": "sharded", "detect": {"shards": 3}},
        {"id": "quiet", "kubernetes": {"push_summary": False}}])


def test_every_pod_command_parses_with_the_cli(roads):
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
            env = {e["name"]: e["value"] for e in container["env"]}
            assert args.config == env["ANSWERSHEET_CONFIG"] == commands.POD_CONFIG_PATH  # the ConfigMap mount
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
    specs, errors = settings.load_roads(roads)
    assert errors == [] and specs[0].schedule.process_date == process_date
