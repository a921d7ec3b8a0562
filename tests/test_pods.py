"""Every stage pod of every DAG built offline, as the KubernetesPodOperator would send it, from the pod templates
the Helm chart renders (helm/answersheet `stagePods`, ConfigMap answersheet-pod-templates), and validated
strictly against the Kubernetes API schema; GPU scheduling, security and credentials checked on the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
from airflow.sdk.definitions.mappedoperator import MappedOperator
from conftest import CI_VALUES, POD_TEMPLATES_ENV, render_pod_templates
from dagtest import base, parse, rendered_pods, road_dags, write_roads

K8S_VERSION = "1.31"  # oldest Kubernetes the chart supports; the schema kubernetes-validate checks against
A100 = ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"]
SECRET_VALUES = ("AKIAPARSEANDRENDER01", "s3cr3t-parse-and-render-value")
DIGEST = "sha256:" + "2" * 64  # the detector digest of helm/ci/gpu-mig-values.yaml


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Path:
    """The shipped road (detector profile a100), a road on MIG slices, a sharded, deferrable road without XCom."""
    return write_roads(tmp_path_factory.mktemp("roads") / "roads.yaml", [
        {"id": "daewang_pangyo", "name": "대왕판교"},
        {"id": "mig_road", "kubernetes": {"pod_profile": {"detector": "mig-1g"}}},
        {"id": "big_road", "detect": {"shards": 2}, "kubernetes": {"deferrable": True, "push_summary": False}},
    ])


def build_all(roads: Path, templates: Path) -> dict[str, list[tuple[str, int, dict]]]:
    """dag_id -> rendered pods, parsed and built with these pod templates and AWS credentials in the env."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUES[0])
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUES[1])
    mp.setenv(POD_TEMPLATES_ENV, str(templates))
    try:
        bag = parse(roads)
        assert bag.import_errors == {}
        return {dag_id: rendered_pods(dag) for dag_id, dag in road_dags(bag).items()}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def pods(variants, pod_templates) -> dict[str, list[tuple[str, int, dict]]]:
    return build_all(variants, pod_templates)


@pytest.fixture(scope="module")
def mig_chart_pods(variants, helm, tmp_path_factory) -> dict[str, list[tuple[str, int, dict]]]:  # noqa: F811
    """The same roads with the chart's gpu-mig variant: digests, a pull secret, runtimeClass, an extra toleration."""
    templates = render_pod_templates(helm, tmp_path_factory.mktemp("mig-templates"),
                                     CI_VALUES / "gpu-mig-values.yaml")
    return build_all(variants, templates)


def all_pods(*pod_sets):
    return [(dag_id, *p) for pods in pod_sets for dag_id, items in pods.items() for p in items]


def test_every_pod_of_every_dag_is_valid_kubernetes(pods, mig_chart_pods):
    rendered = all_pods(pods, mig_chart_pods)
    assert len(rendered) == 2 * (3 * 4 + 1)  # big_road's detect is two pods
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
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": A100}]}]
    assert "runtimeClassName" not in spec
    assert detect["metadata"]["labels"]["answersheet.io/pod-profile"] == "detector-a100"
    for stage in ("ingest", "preprocess", "datasheet"):
        pod = by_task[stage]
        assert base(pod)["image"] == "ghcr.io/answersheet/answersheet-preprocess:0.1.0"
        assert not any("gpu" in k for k in base(pod)["resources"]["limits"])
        assert not pod["spec"].get("affinity") and not pod["spec"].get("tolerations")
        assert pod["metadata"]["labels"]["answersheet.io/pod-profile"] == "preprocess-default"


def test_mig_profile(pods, mig_chart_pods):
    detect = next(p for t, _, p in pods["answersheet_mig_road"] if t == "detect")
    limits = base(detect)["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
    terms = detect["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == A100[1::2]  # the 80 GB A100s
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in detect["spec"]["tolerations"]
    # the gpu-mig chart variant: its values reach the pod
    detect = next(p for t, _, p in mig_chart_pods["answersheet_mig_road"] if t == "detect")
    assert detect["spec"]["runtimeClassName"] == "nvidia"
    assert {t["key"] for t in detect["spec"]["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    assert base(detect)["image"] == f"registry.example.com/answersheet/answersheet-detector@{DIGEST}"
    assert base(detect)["imagePullPolicy"] == "Always"
    assert detect["spec"]["imagePullSecrets"] == [{"name": "ghcr-pull"}]


def test_sharded_variant(pods):
    detects = [(i, p) for t, i, p in pods["answersheet_big_road"] if t == "detect"]
    assert [i for i, _ in detects] == [0, 1]
    for i, pod in detects:
        args = base(pod)["args"]
        assert args[args.index("--shard-index") + 1] == str(i) and args[args.index("--shard-count") + 1] == "2"
        assert "--summary-json" not in args  # push_summary: false -> no XCom sidecar either
        assert [c["name"] for c in pod["spec"]["containers"]] == ["base"]
        assert pod["metadata"]["labels"]["answersheet.io/shard"] == str(i)
        assert pod["metadata"]["labels"]["map_index"] == str(i)
        assert pod["metadata"]["namespace"] == "airflow"  # the chart's release namespace, from the template


def test_every_pod_is_locked_down_and_labelled(pods, mig_chart_pods):
    for dag_id, task_id, _, pod in all_pods(pods, mig_chart_pods):
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
        assert container["env"] == [{"name": "ANSWERSHEET_LOG_TIMESTAMPS", "value": "0"}], where  # the rest: image
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/scratch"]["name"]]["emptyDir"] == {"sizeLimit": "50Gi"}, where
        assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {"sizeLimit": "1Gi"}, where
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


def test_no_pod_carries_a_credential(pods, mig_chart_pods):
    text = json.dumps([pods, mig_chart_pods])
    for value in SECRET_VALUES:
        assert value not in text
    for _, _, _, pod in all_pods(pods, mig_chart_pods):
        for c in pod["spec"]["containers"]:
            names = {e["name"] for e in c.get("env") or []}
            assert not {n for n in names if n.startswith("AWS_") or "SECRET" in n or "PASSWORD" in n}
            assert all("secretRef" in e and "prefix" not in e for e in c.get("envFrom") or [])


def test_pod_operator_settings(variants, with_templates):
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
            profile = ("detector-mig-1g" if dag_id == "answersheet_mig_road" else "detector-a100") \
                if task.task_id == "detect" else "preprocess-default"
            assert kw["pod_template_file"] == str(with_templates / f"{profile}.yaml")


def test_a_pod_profile_the_chart_lacks_is_an_import_error_naming_it(tmp_path, with_templates):
    roads = write_roads(tmp_path / "roads.yaml", [
        {"id": "good"}, {"id": "typo", "kubernetes": {"pod_profile": {"detector": "a10"}}}])
    bag = parse(roads)
    assert sorted(road_dags(bag)) == ["answersheet_good"]
    (error,) = bag.import_errors.values()
    assert (f"road 'typo': key 'kubernetes.pod_profile.detector': no pod template detector-a10.yaml in "
            f"{with_templates} (the chart's detector profiles: ['a100', 'mig-1g'])") in error
