"""helm/values-airflow.yaml: valid for the official Airflow chart 1.22 (its values.schema.json from
../shared/airflow-chart), known top-level keys only, wired to the objects helm/answersheet creates, and
deploying the Airflow `make test` runs: our image's Airflow version and providers equal the venv's.
(tests/test_helm_airflow.py renders it with the chart itself.)"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "helm" / "values-airflow.yaml"
CHART_VALUES = REPO / "helm" / "answersheet" / "values.yaml"
SHARED = Path(os.environ.get("ANSWERSHEET_SHARED", REPO.parent / "shared"))
AIRFLOW_CHART = SHARED / "airflow-chart"
ROADS_MOUNT = "/opt/airflow/answersheet"
POD_TEMPLATES_MOUNT = "/opt/airflow/answersheet-pod-templates"
# The components that parse or run the DAGs, where the roads ConfigMap must be mounted.
DAG_COMPONENTS = (("scheduler",), ("dagProcessor",), ("triggerer",), ("workers", "kubernetes"))


def helm_merge(base: dict, over: dict) -> dict:
    """Deep merge of mappings as helm merges values files (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = helm_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="module")
def official() -> tuple[dict, dict]:
    """(values.schema.json, values.yaml) of apache-airflow/airflow 1.22.0."""
    schema, values = AIRFLOW_CHART / "values.schema.json", AIRFLOW_CHART / "values.yaml"
    if not (schema.is_file() and values.is_file()):
        pytest.skip(f"official Airflow chart schema not found in {AIRFLOW_CHART} (the shared data folder)")
    chart = yaml.safe_load((AIRFLOW_CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["version"] == "1.22.0"
    return json.loads(schema.read_text(encoding="utf-8")), yaml.safe_load(values.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def overlay() -> dict:
    return yaml.safe_load(OVERLAY.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chart() -> dict:
    return yaml.safe_load(CHART_VALUES.read_text(encoding="utf-8"))


def schema_errors(official, values: dict) -> list[str]:
    schema, defaults = official
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator.iter_errors(helm_merge(defaults, values))]


def unknown_keys(schema: dict, node: dict, value, path: tuple = ()) -> list[str]:
    """Key paths of `value` that `node` does not declare, where it declares its properties (the official
    schema lets some sections, e.g. workers.kubernetes, take any key, so a typo there would pass)."""
    while "$ref" in node:
        ref = node["$ref"].removeprefix("#/definitions/")
        node = {**schema["definitions"][ref], **{k: v for k, v in node.items() if k != "$ref"}}
    found = []
    if isinstance(value, dict):
        props, extra = node.get("properties"), node.get("additionalProperties")
        for key, item in value.items():
            if props and key in props:
                found += unknown_keys(schema, props[key], item, (*path, key))
            elif isinstance(extra, dict):
                found += unknown_keys(schema, extra, item, (*path, key))
            elif props:
                found.append("/".join((*path, key)))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_keys(schema, node["items"], item, (*path, str(i)))
    return found


def test_overlay_validates_against_the_official_schema(official, overlay):
    assert schema_errors(official, overlay) == []


def test_every_overlay_key_is_declared_by_the_schema(official, overlay):
    schema, _ = official
    assert unknown_keys(schema, schema, overlay) == []


def test_overlay_top_level_keys_are_known(official, overlay):
    schema, _ = official
    assert set(overlay) <= set(schema["properties"]), set(overlay) - set(schema["properties"])


@pytest.mark.parametrize(("path", "value"), [
    (("executor",), "KubernetesExecuter"),
    (("workers", "kubernetes", "extraVolumeMount"), []),
    (("dags", "gitSync", "subpath"), "dags"),
    (("scheduler", "resources", "limits", "cpu"), {"n": 1}),
])
def test_the_schema_check_catches_mistakes(official, overlay, path, value):
    """The validation above is not vacuous: typical slips in this overlay are rejected."""
    broken = copy.deepcopy(overlay)
    node = broken
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    schema, _ = official
    assert schema_errors(official, broken) or unknown_keys(schema, schema, broken)


def test_overlay_sets_the_roads_file_variable_the_dags_read(overlay):
    env = {e["name"]: e["value"] for e in overlay["env"]}
    sys.path.insert(0, str(REPO / "dags"))
    try:
        from answersheet_dagkit.roads import ROADS_FILE_ENV
    finally:
        sys.path.remove(str(REPO / "dags"))
    assert env[ROADS_FILE_ENV] == f"{ROADS_MOUNT}/roads.yaml"  # the variable the DAGs read, at the mount


@pytest.mark.parametrize(("config_map", "mount"), [
    (("roadsConfigMap", "name"), ROADS_MOUNT),
    (("stagePods", "podTemplatesConfigMap", "name"), POD_TEMPLATES_MOUNT),  # roads.POD_TEMPLATES_DIR
])
def test_config_maps_are_mounted_where_dags_are_parsed_or_run(overlay, chart, config_map, mount):
    """The roads file and the chart's stage pod templates, read-only, in every component that parses or runs
    the DAGs (the pod templates' path is the DAGs' fixed default: tests/test_helm_airflow.py checks)."""
    name = chart
    for key in config_map:
        name = name[key]
    for path in DAG_COMPONENTS:
        section = overlay
        for key in path:
            section = section[key]
        volumes = [v for v in section["extraVolumes"] if v.get("configMap", {}).get("name") == name]
        assert len(volumes) == 1, path
        mounts = [m for m in section["extraVolumeMounts"] if m["name"] == volumes[0]["name"]]
        assert mounts == [{"name": volumes[0]["name"], "mountPath": mount, "readOnly": True}], path


def test_s3_connection_and_credentials_come_from_our_secrets(overlay, chart):
    conn = chart["airflowConnection"]
    env_name = f"AIRFLOW_CONN_{conn['connId'].upper()}"
    assert overlay["secret"] == [{"envName": env_name, "secretName": conn["secretName"], "secretKey": env_name}]
    env_from = yaml.safe_load(overlay["extraEnvFrom"])
    assert env_from == [{"secretRef": {"name": chart["s3"]["secretName"]}}]
    assert f"s3://{conn['connId']}@" in next(e["value"] for e in overlay["env"]
                                             if e["name"] == "AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH")
    text = OVERLAY.read_text(encoding="utf-8")
    for literal in ("AKIA", "aws_secret_access_key", "password:", "MINIO_ROOT"):
        assert literal not in text


def test_api_keys_come_from_our_secret(overlay, chart):
    secret = chart["airflowApiSecret"]
    assert secret["enabled"] is True
    assert overlay["apiSecretKeySecretName"] == overlay["jwtSecretName"] == secret["secretName"]
    assert overlay["createUserJob"]["enabled"] is False  # no admin/admin
    assert overlay["triggerer"]["persistence"]["enabled"] is False  # logs are remote: no 100 Gi claim


def pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", path.read_text(encoding="utf-8"), re.M))


def test_overlay_deploys_the_airflow_make_test_runs(overlay):
    """One Airflow version: the overlay's airflowVersion, our image's base and providers are what this venv
    (`make install` from requirements/constraints.txt) has installed and the test suite runs."""
    installed = importlib.metadata.version("apache-airflow")
    constraints = pins(REPO / "requirements" / "constraints.txt")
    assert overlay["airflowVersion"] == overlay["defaultAirflowTag"] == installed == constraints["apache-airflow"]
    dockerfile = (REPO / "images" / "airflow" / "Dockerfile").read_text(encoding="utf-8")
    assert f"ARG AIRFLOW_VERSION={installed}\n" in dockerfile
    image_pins = pins(REPO / "images" / "airflow" / "requirements.txt")
    assert image_pins == {name: importlib.metadata.version(name) for name in image_pins}
    assert image_pins == {name: constraints[name] for name in image_pins}
    # ... and they are the providers the package's `airflow` extra asks for.
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = {re.match(r"[A-Za-z0-9._-]+", req).group(0) for req in project["optional-dependencies"]["airflow"]}
    assert set(image_pins) == wanted - {"apache-airflow"}


def test_overlay_uses_our_airflow_image(overlay):
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    for key in ("airflow", "pod_template"):
        image = overlay["images"][key]
        assert image["repository"].endswith("/answersheet-airflow") and image["tag"] == version, key
    assert overlay["images"]["airflow"] == overlay["images"]["pod_template"]


def test_resources_fit_a_small_cluster(overlay):
    components = [overlay[c] for c in ("scheduler", "dagProcessor", "triggerer", "apiServer")]
    components.append(overlay["workers"]["kubernetes"])
    for section in components:
        requests, limits = section["resources"]["requests"], section["resources"]["limits"]
        assert set(requests) == set(limits) == {"cpu", "memory"}
    assert overlay["redis"]["enabled"] is False  # no Celery
