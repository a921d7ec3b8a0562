"""The official Airflow chart 1.22.0 (../shared/airflow-chart/chart, with its dependencies) rendered with
helm/values-airflow.yaml by `make helm-template`, next to our chart: what the overlay intends is what the
chart renders. Every manifest (the worker pod template inside the config ConfigMap too) is strictly valid;
KubernetesExecutor, git-sync, the roads file and pipeline env in every component that parses or runs DAGs,
the XCom backend, remote logs in S3, the S3 connection from our Secret, our Airflow image everywhere, no
triggerer volume, no default admin user, static API keys from our Secret, no chart warnings, and no
permission granted twice by the two charts' Roles.
"""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import make, make_var

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ANSWERSHEET_SHARED", REPO.parent / "shared"))
AIRFLOW_CHART = SHARED / "airflow-chart" / "chart"
OVERLAY = yaml.safe_load((REPO / "helm" / "values-airflow.yaml").read_text(encoding="utf-8"))
CHART_VALUES = yaml.safe_load((REPO / "helm" / "answersheet" / "values.yaml").read_text(encoding="utf-8"))
NAMESPACE = "airflow"
ROADS_MOUNT = "/opt/airflow/answersheet"
# Deployment name -> the container that parses or runs DAG code.
DAG_COMPONENTS = {"airflow-scheduler": "scheduler", "airflow-dag-processor": "dag-processor",
                  "airflow-triggerer": "triggerer"}
# What the KubernetesPodOperator does with the Kubernetes API (create, follow, read logs, exec into the
# XCom sidecar, clean up, read events on failure), for the worker pods and the triggerer (deferrable).
KPO_NEEDS = {("pods", v) for v in ("create", "get", "list", "watch", "delete", "patch")} | {
    ("pods/log", "get"), ("pods/exec", "create"), ("pods/exec", "get"), ("events", "list")}


@pytest.fixture(scope="module")
def render(helm, tmp_path_factory) -> dict:
    """`make helm-template` with the official chart: {"airflow": docs, "ours": docs (default variant),
    "pod_template": the worker Pod, "notes": the chart's NOTES, "stderr": helm's stderr}."""
    if not (AIRFLOW_CHART / "Chart.yaml").is_file():
        pytest.skip(f"the official Airflow chart is not unpacked at {AIRFLOW_CHART} (CI pulls it there)")
    out = tmp_path_factory.mktemp("helm-template")
    proc = make("helm-template", f"HELM_TEMPLATE_DIR={out}", f"HELM={helm}", f"NAMESPACE={NAMESPACE}",
                f"AIRFLOW_CHART_DIR={AIRFLOW_CHART}")
    assert proc.returncode == 0, f"make helm-template failed:\n{proc.stdout}\n{proc.stderr}"

    def docs(name: str) -> list[dict]:
        return [d for d in yaml.safe_load_all((out / name).read_text(encoding="utf-8")) if d]

    (pod_template,) = docs("airflow-pod-template.yaml")
    return {"airflow": docs("airflow.yaml"), "ours": docs("default.yaml"), "pod_template": pod_template,
            "notes": (out / "airflow-notes.txt").read_text(encoding="utf-8"),
            "stderr": (out / "airflow-stderr.txt").read_text(encoding="utf-8")}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def airflow_cfg(render) -> configparser.ConfigParser:
    (cm,) = find(render["airflow"], "ConfigMap", "airflow-config")
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read_string(cm["data"]["airflow.cfg"])
    return cfg


def workloads(render) -> list[tuple[str, dict]]:
    """(name, pod spec) of every workload the Airflow chart runs, the worker pod template included."""
    out = [("pod-template", render["pod_template"]["spec"])]
    for doc in render["airflow"]:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            out.append((doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def dag_containers(render) -> list[tuple[str, dict, dict]]:
    """(component, pod spec, container) for the containers that parse or run DAGs: scheduler, dag processor,
    triggerer and the KubernetesExecutor worker pods (container `base` of the pod template)."""
    out = []
    for name, container in DAG_COMPONENTS.items():
        (deploy,) = find(render["airflow"], "Deployment", name)
        spec = deploy["spec"]["template"]["spec"]
        out.append((name, spec, next(c for c in spec["containers"] if c["name"] == container)))
    spec = render["pod_template"]["spec"]
    out.append(("worker pod template", spec, next(c for c in spec["containers"] if c["name"] == "base")))
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- rendering ------------------------------------------------------------------------------------------


def test_every_manifest_and_the_worker_pod_template_are_valid_kubernetes_strict(render):
    version = make_var("K8S_VERSION")
    assert render["pod_template"]["kind"] == "Pod"
    for doc in [*render["airflow"], render["pod_template"]]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_broken_pod_template(render):
    broken = {**render["pod_template"], "spec": {**render["pod_template"]["spec"], "restartPolicyy": "Never"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, make_var("K8S_VERSION"), strict=True)


def test_no_chart_warnings(render):
    assert "WARNING" not in render["notes"].upper()
    assert render["stderr"].strip() == ""
    assert f"Thank you for installing Apache Airflow {OVERLAY['airflowVersion']}!" in render["notes"]


def test_helm_template_fails_on_chart_warnings(helm, tmp_path):  # noqa: F811
    """The notes check can fail: the overlay as it was before (no static API key, deprecated git-sync
    probes, implicit enableServiceLinks) stops `make helm-template` with the chart's warnings."""
    if not (AIRFLOW_CHART / "Chart.yaml").is_file():
        pytest.skip(f"the official Airflow chart is not unpacked at {AIRFLOW_CHART}")
    old = {k: v for k, v in OVERLAY.items() if k not in ("apiSecretKeySecretName", "enableServiceLinks")}
    old["dags"] = {**OVERLAY["dags"], "gitSync": {k: v for k, v in OVERLAY["dags"]["gitSync"].items()
                                                  if k != "recommendedProbeSetting"}}
    overlay = tmp_path / "values-airflow.yaml"
    overlay.write_text(yaml.safe_dump(old), encoding="utf-8")
    proc = make("helm-template", f"HELM_TEMPLATE_DIR={tmp_path / 'out'}", f"HELM={helm}",
                f"AIRFLOW_CHART_DIR={AIRFLOW_CHART}", f"AIRFLOW_OVERLAY={overlay}")
    assert proc.returncode != 0
    assert f"helm-template: the Airflow chart warns about {overlay}" in proc.stderr
    for warning in ("recommendedProbeSetting", "enableServiceLinks", "static API secret key"):
        assert warning in proc.stdout, warning


def test_without_the_chart_only_the_schema_is_checked(helm, tmp_path):  # noqa: F811
    proc = make("helm-template", f"HELM_TEMPLATE_DIR={tmp_path}", f"HELM={helm}",
                f"AIRFLOW_CHART_DIR={tmp_path / 'absent'}")
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'absent'}/Chart.yaml not found: the official Airflow chart is NOT rendered" in proc.stdout
    assert not list(tmp_path.glob("airflow*"))


# --- what the overlay intends -------------------------------------------------------------------------------


def test_kubernetes_executor_without_celery(render):
    cfg = airflow_cfg(render)
    assert cfg["core"]["executor"] == "KubernetesExecutor"
    names = {f"{d['kind']}/{d['metadata']['name']}" for d in render["airflow"]}
    assert not [n for n in names if "redis" in n or "flower" in n]
    assert not {"StatefulSet/airflow-worker", "Deployment/airflow-worker"} & names  # no Celery workers


def test_dags_by_git_sync_where_they_are_parsed_or_run(render):
    git = OVERLAY["dags"]["gitSync"]
    cfg = airflow_cfg(render)
    assert cfg["core"]["dags_folder"] == f"/opt/airflow/dags/repo/{git['subPath']}"
    assert (REPO / git["subPath"] / "answersheet_dags.py").is_file()  # the synced folder holds the DAG file
    specs = dict(workloads(render))
    for name in ("airflow-dag-processor", "airflow-triggerer", "pod-template"):
        spec = specs[name]
        syncers = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"].startswith("git-sync")]
        assert syncers, name
        for c in syncers:
            env = {k: v.get("value") for k, v in env_of(c).items()}
            assert env["GITSYNC_REPO"] == git["repo"] and env["GITSYNC_REF"] == git["ref"], name


def test_roads_file_and_pipeline_env_in_every_dag_component(render):
    roads = CHART_VALUES["roadsConfigMap"]["name"]
    for name, spec, container in dag_containers(render):
        volumes = [v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == roads]
        assert len(volumes) == 1, name
        mounts = [m for m in container["volumeMounts"] if m["name"] == volumes[0]]
        assert mounts == [{"name": volumes[0], "mountPath": ROADS_MOUNT, "readOnly": True}], name
        env = env_of(container)
        assert env["ANSWERSHEET_ROADS_FILE"]["value"] == f"{ROADS_MOUNT}/roads.yaml", name
        assert env["AIRFLOW__CORE__XCOM_BACKEND"]["value"] == \
            "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend", name
        assert env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH"]["value"] == "s3://aws_default@answersheet/xcom"
        assert env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD"]["value"] == "65536"


def test_stage_pod_templates_at_the_fixed_path_in_every_dag_component(render):
    """The chart's pod templates where the DAGs look for them (roads.POD_TEMPLATES_DIR): the dag processor
    checks each road's profiles at parse time, the worker pods and the triggerer build the stage pods."""
    import sys

    sys.path.insert(0, str(REPO / "dags"))
    try:
        from answersheet_dagkit.roads import POD_TEMPLATES_DIR
    finally:
        sys.path.remove(str(REPO / "dags"))
    name = CHART_VALUES["stagePods"]["podTemplatesConfigMap"]["name"]
    for component, spec, container in dag_containers(render):
        volumes = [v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == name]
        assert len(volumes) == 1, component
        mounts = [m for m in container["volumeMounts"] if m["name"] == volumes[0]]
        assert mounts == [{"name": volumes[0], "mountPath": POD_TEMPLATES_DIR, "readOnly": True}], component
    ours = {f"{d['kind']}/{d['metadata']['name']}" for d in render["ours"]}
    assert f"ConfigMap/{name}" in ours


def test_s3_connection_and_credentials_from_our_secrets(render):
    conn = CHART_VALUES["airflowConnection"]
    for name, _, container in dag_containers(render):
        env = env_of(container)
        ref = env[f"AIRFLOW_CONN_{conn['connId'].upper()}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": conn["secretName"], "key": "AIRFLOW_CONN_AWS_DEFAULT"}, name
        assert {"secretRef": {"name": CHART_VALUES["s3"]["secretName"]}} in container["envFrom"], name
    ours = {f"{d['kind']}/{d['metadata']['name']}" for d in render["ours"]}
    assert {f"Secret/{conn['secretName']}", f"Secret/{CHART_VALUES['s3']['secretName']}"} <= ours


def test_task_logs_go_to_s3(render):
    logging = airflow_cfg(render)["logging"]
    assert logging["remote_logging"] == "True"
    assert logging["remote_base_log_folder"] == "s3://answersheet/airflow-logs"
    assert logging["remote_log_conn_id"] == "aws_default"


def test_our_airflow_image_everywhere(render):
    image = f"{OVERLAY['images']['airflow']['repository']}:{OVERLAY['images']['airflow']['tag']}"
    assert image.endswith("/answersheet-airflow:0.1.0")
    others = {"git-sync", "git-sync-init", "postgresql"}
    for name, spec in workloads(render):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["name"] not in others:
                assert c["image"] == image, f"{name}/{c['name']}: {c['image']}"
    executor = airflow_cfg(render)["kubernetes_executor"]
    assert f"{executor['worker_container_repository']}:{executor['worker_container_tag']}" == image


def test_no_triggerer_volume_and_no_other_claims(render):
    (triggerer,) = find(render["airflow"], "Deployment", "airflow-triggerer")
    assert not find(render["airflow"], "StatefulSet", "airflow-triggerer")
    assert not [v for v in triggerer["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert not find(render["airflow"], "PersistentVolumeClaim")
    claims = [d["metadata"]["name"] for d in find(render["airflow"], "StatefulSet")
              if d["spec"].get("volumeClaimTemplates")]
    assert claims == ["airflow-postgresql"]  # the bundled metadata database only (README prerequisites)


def test_no_default_admin_user(render):
    jobs = [d["metadata"]["name"] for d in find(render["airflow"], "Job")]
    assert jobs == ["airflow-run-airflow-migrations"]
    assert not find(render["airflow"], "ServiceAccount", "airflow-create-user-job")
    assert "admin" not in render["notes"].lower()


def test_static_api_keys_from_our_secret(render):
    secret = CHART_VALUES["airflowApiSecret"]["secretName"]
    assert OVERLAY["apiSecretKeySecretName"] == OVERLAY["jwtSecretName"] == secret
    refs = {}
    for name, _, container in dag_containers(render):
        env = env_of(container)
        refs[name] = env["AIRFLOW__API__SECRET_KEY"]["valueFrom"]["secretKeyRef"]
    (api,) = find(render["airflow"], "Deployment", "airflow-api-server")
    api_env = env_of(next(c for c in api["spec"]["template"]["spec"]["containers"] if c["name"] == "api-server"))
    refs["api-server"] = api_env["AIRFLOW__API__SECRET_KEY"]["valueFrom"]["secretKeyRef"]
    assert set(map(str, refs.values())) == {str({"name": secret, "key": "api-secret-key"})}
    jwt = api_env["AIRFLOW__API_AUTH__JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert jwt == {"name": secret, "key": "jwt-secret"}
    # The chart generates no key of its own (it would change on every upgrade); ours holds both.
    generated = [d["metadata"]["name"] for d in find(render["airflow"], "Secret")]
    assert not [n for n in generated if n.endswith(("api-secret-key", "jwt-secret"))], generated
    (ours,) = find(render["ours"], "Secret", secret)
    assert set(ours["stringData"]) == {"api-secret-key", "jwt-secret"}


def grants(docs: list[dict]) -> dict[tuple[str, str], dict[tuple[str, str], list[str]]]:
    """{(subject kind, name): {(resource, verb): [roles granting it]}} over the Roles and RoleBindings."""
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    out: dict = {}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        role = roles[binding["roleRef"]["name"]]
        for subject in binding["subjects"]:
            per = out.setdefault((subject["kind"], subject["name"]), {})
            for rule in role["rules"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        per.setdefault((resource, verb), []).append(role["metadata"]["name"])
    return out


def test_pod_launching_granted_once_and_enough(render):
    """Both charts together: no permission is granted to a ServiceAccount by two Roles, and the worker pods
    and the triggerer may do what the KubernetesPodOperator does."""
    docs = [*render["airflow"], *render["ours"]]
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    given = grants(docs)
    twice = {f"{who[1]}: {what}": roles for who, per in given.items() for what, roles in per.items() if len(roles) > 1}
    assert twice == {}
    workers = render["pod_template"]["spec"]["serviceAccountName"]
    assert workers == "airflow-worker-kubernetes"
    (triggerer,) = find(render["airflow"], "Deployment", "airflow-triggerer")
    for sa in (workers, triggerer["spec"]["template"]["spec"]["serviceAccountName"]):
        assert find(render["airflow"], "ServiceAccount", sa), sa
        assert KPO_NEEDS <= set(given[("ServiceAccount", sa)]), sa
    for rule in (r for role in find(docs, "Role") for r in role["rules"]):
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "secrets" not in rule["resources"]


def test_grants_sees_a_duplicate():
    """The check above can fail: a second Role bound to the same account with the same verb is found."""
    role = {"kind": "Role", "metadata": {"name": "a"}, "rules": [{"resources": ["pods"], "verbs": ["get"]}]}
    docs = [role, {**role, "metadata": {"name": "b"}}]
    for name in ("a", "b"):
        docs.append({"kind": "RoleBinding", "roleRef": {"name": name},
                     "subjects": [{"kind": "ServiceAccount", "name": "w"}]})
    assert grants(docs)[("ServiceAccount", "w")][("pods", "get")] == ["a", "b"]


def test_helm_lint_strict_of_the_official_chart_with_the_overlay(helm):  # noqa: F811
    if not (AIRFLOW_CHART / "Chart.yaml").is_file():
        pytest.skip(f"the official Airflow chart is not unpacked at {AIRFLOW_CHART}")
    proc = subprocess.run([str(helm), "lint", "--strict", str(AIRFLOW_CHART), "-f",
                           str(REPO / "helm" / "values-airflow.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
