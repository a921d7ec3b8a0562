"""Every stage pod of every DAG rendered offline, as the KubernetesPodOperator would send it, and validated
strictly against the Kubernetes API schema; GPU scheduling, security and credentials checked on the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pendulum
import pytest
from test_dags import MappedOperator, parse, road_dags, write_roads  # test_dags first: it sets AIRFLOW_HOME

K8S_VERSION = "1.31"  # oldest Kubernetes the chart supports; the schema kubernetes-validate checks against
LOGICAL_DATE = pendulum.datetime(2026, 11, 2, 0, tz="UTC")  # 09:00 KST
A100 = ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"]
SECRET_VALUES = ("AKIAPARSEANDRENDER01", "s3cr3t-parse-and-render-value")
DIGEST = "sha256:" + "ab" * 32


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


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Path:
    """The shipped road plus MIG + runtimeClass, sharded + digest-pinned + pull secret + deferrable roads."""
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "daewang_pangyo", "name": "대왕판교"},
        {"id": "mig_road", "kubernetes": {"gpu": {"resource": "nvidia.com/mig-1g.10gb", "count": 2,
                                                  "runtime_class": "nvidia"}}},
        {"id": "big_road", "detect": {"shards": 2}, "kubernetes": {
            "images": {"detector": {"digest": DIGEST, "pull_policy": "Always"}},
            "image_pull_secrets": ["ghcr-pull"], "deferrable": True, "push_summary": False,
            "namespace": "pipelines", "gpu": {"products": []}}},
    ])


@pytest.fixture(scope="module")
def pods(variants) -> dict[str, list[tuple[str, int, dict]]]:
    """dag_id -> rendered pods, parsed and rendered with AWS credentials in the environment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUES[0])
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUES[1])
    try:
        bag = parse(variants)
        assert bag.import_errors == {}
        return {dag_id: rendered_pods(dag) for dag_id, dag in road_dags(bag).items()}
    finally:
        mp.undo()


def all_pods(pods):
    return [(dag_id, *p) for dag_id, items in pods.items() for p in items]


def test_every_pod_of_every_dag_is_valid_kubernetes(pods):
    rendered = all_pods(pods)
    assert len(rendered) == 3 * 4 + 1  # big_road's detect is two pods
    for dag_id, task_id, map_index, pod in rendered:
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{dag_id}.{task_id}[{map_index}]: {exc}")


def test_strict_validation_catches_an_unknown_field(pods):
    pod = json.loads(json.dumps(pods["answersheet_daewang_pangyo"][0][2]))
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_detector_pod_gets_a_gpu_on_an_a100_node(pods):
    by_task = {t: p for t, _, p in pods["answersheet_daewang_pangyo"]}
    detect = by_task["detect"]
    spec = detect["spec"]
    assert base(detect)["image"] == "ghcr.io/answersheet/answersheet-detector:0.1.0"
    assert base(detect)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert base(detect)["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": A100}]}]
    assert "runtimeClassName" not in spec
    for stage in ("ingest", "preprocess", "datasheet"):
        pod = by_task[stage]
        assert base(pod)["image"] == "ghcr.io/answersheet/answersheet-preprocess:0.1.0"
        assert not any("gpu" in k for k in base(pod)["resources"]["limits"])
        assert not pod["spec"].get("affinity") and not pod["spec"].get("tolerations")


def test_mig_and_runtime_class_variant(pods):
    detect = next(p for t, _, p in pods["answersheet_mig_road"] if t == "detect")
    limits = base(detect)["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "2" and "nvidia.com/gpu" not in limits
    assert detect["spec"]["runtimeClassName"] == "nvidia"


def test_sharded_digest_pinned_variant(pods):
    detects = [(i, p) for t, i, p in pods["answersheet_big_road"] if t == "detect"]
    assert [i for i, _ in detects] == [0, 1]
    for i, pod in detects:
        args = base(pod)["args"]
        assert args[args.index("--shard-index") + 1] == str(i) and args[args.index("--shard-count") + 1] == "2"
        assert "--summary-json" not in args  # push_summary: false -> no XCom sidecar either
        assert [c["name"] for c in pod["spec"]["containers"]] == ["base"]
        assert pod["metadata"]["labels"]["answersheet.io/shard"] == str(i)
        assert pod["metadata"]["labels"]["map_index"] == str(i)
        assert base(pod)["image"] == f"ghcr.io/answersheet/answersheet-detector@{DIGEST}"
        assert base(pod)["imagePullPolicy"] == "Always"
        assert pod["spec"]["imagePullSecrets"] == [{"name": "ghcr-pull"}]
        assert pod["metadata"]["namespace"] == "pipelines"
        assert not pod["spec"].get("affinity")  # products: [] -> any GPU node


def test_every_pod_is_locked_down_and_labelled(pods):
    for dag_id, task_id, _, pod in all_pods(pods):
        road = dag_id.removeprefix("answersheet_")
        where = f"{dag_id}.{task_id}"
        spec, meta = pod["spec"], pod["metadata"]
        assert spec["securityContext"] == {"fsGroup": 10001, "runAsGroup": 10001, "runAsNonRoot": True,
                                           "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}}, where
        for c in spec["containers"]:  # the stage container and the XCom sidecar
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True, "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
            }, where
        container = base(pod)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TMPDIR"] == "/scratch" and env["HOME"] == "/scratch", where
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/scratch"]["name"]]["emptyDir"] == {"sizeLimit": "50Gi"}, where
        roads = mounts["/etc/answersheet"]
        assert roads["readOnly"] is True
        assert volumes[roads["name"]]["configMap"] == {"name": "answersheet-roads",
                                                       "items": [{"key": "roads.yaml", "path": "roads.yaml"}]}
        assert container["envFrom"] == [{"secretRef": {"name": "answersheet-s3"}}], where
        assert spec["serviceAccountName"] == "answersheet-pipeline"
        assert spec["automountServiceAccountToken"] is False
        assert spec["restartPolicy"] == "Never"
        assert meta["labels"]["answersheet.io/road"] == road
        assert meta["labels"]["answersheet.io/date"] == "2026-11-02"
        assert meta["labels"]["answersheet.io/stage"] == task_id
        assert meta["name"].startswith(f"answersheet-{task_id}-")


def test_no_pod_carries_a_credential(pods):
    text = json.dumps(pods)
    for value in SECRET_VALUES:
        assert value not in text
    for _, _, _, pod in all_pods(pods):
        for c in pod["spec"]["containers"]:
            names = {e["name"] for e in c.get("env") or []}
            assert not {n for n in names if n.startswith("AWS_") or "SECRET" in n or "PASSWORD" in n}
            assert all("secretRef" in e and "prefix" not in e for e in c.get("envFrom") or [])


def test_pod_operator_settings(variants):
    bag = parse(variants)
    for dag_id, dag in road_dags(bag).items():
        for task in dag.tasks:
            kw = task.partial_kwargs if isinstance(task, MappedOperator) else vars(task)
            finish = kw["on_finish_action"]  # an OnFinishAction enum once the operator is built
            assert getattr(finish, "value", finish) == "delete_succeeded_pod"
            assert kw["startup_timeout_seconds"] == 1200 and kw["schedule_timeout_seconds"] == 1800
            assert kw["get_logs"] is True
            assert kw["deferrable"] is (dag_id == "answersheet_big_road")
            assert kw["do_xcom_push"] is (dag_id != "answersheet_big_road")
