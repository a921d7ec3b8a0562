"""helm/answersheet: rendered by the pinned helm (`make tools`) through `make helm-template` once per
values variant, then checked manifest by manifest: strict Kubernetes validation, hardened pods, no RBAC of
its own (the official chart's pod-launcher Role covers the Airflow side: tests/test_helm_airflow.py),
credentials only in Secrets, and a deployed roads file that both the stage code and the DAGs accept.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import make, make_var

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "answersheet"
CI_VALUES = REPO / "helm" / "ci"
ROADS_FILE = REPO / "dags" / "roads.yaml"
NAMESPACE = "airflow"
VARIANTS = ["bare"] + sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


@pytest.fixture(scope="session")
def rendered(helm, tmp_path_factory) -> dict[str, Path]:
    """`make helm-template` into a temp dir: every variant rendered once, kubernetes-validate --strict."""
    out = tmp_path_factory.mktemp("helm-template")
    proc = make("helm-template", f"HELM_TEMPLATE_DIR={out}", f"HELM={helm}", f"NAMESPACE={NAMESPACE}")
    assert proc.returncode == 0, f"make helm-template failed:\n{proc.stdout}\n{proc.stderr}"
    files = {p.stem: p for p in out.glob("*.yaml") if not p.stem.startswith("airflow") and "-stagepod-" not in p.stem}
    assert sorted(files) == VARIANTS
    return files


def test_helm_template_validates_each_stage_pod_template_as_a_pod(rendered):
    """The pod templates travel as ConfigMap text; `make helm-template` also writes each one out as a file of
    its own (`<variant>-stagepod-<profile>.yaml`), so kubernetes-validate --strict checks it as the Pod the
    KubernetesPodOperator builds from it (a typo in a template would otherwise pass as a valid string)."""
    for variant, path in rendered.items():
        if variant == "bare":
            continue
        (cm,) = [d for d in docs_of(rendered, variant) if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"].endswith("pod-templates")]
        written = {p.name.removeprefix(f"{variant}-stagepod-"): p for p in path.parent.glob(f"{variant}-stagepod-*")}
        assert sorted(written) == sorted(cm["data"])
        assert {"preprocess-default.yaml", "detector-a100.yaml"} <= set(written)
        for name, file in written.items():
            assert file.read_text(encoding="utf-8") == cm["data"][name]
            assert yaml.safe_load(cm["data"][name])["kind"] == "Pod"


def docs_of(rendered: dict[str, Path], variant: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered[variant].read_text(encoding="utf-8")) if d]


def values_of(variant: str) -> dict:
    chart = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    if variant == "bare":
        return chart
    given = yaml.safe_load((CI_VALUES / f"{variant}-values.yaml").read_text(encoding="utf-8")) or {}
    return _merge(chart, given)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    if doc["kind"] == "Pod":
        return spec
    if doc["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec.get("template", {}).get("spec") if doc["kind"] in POD_KINDS else None


def secret_values(doc: dict) -> dict[str, str]:
    values = dict(doc.get("stringData") or {})
    values.update({k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()})
    return values


def deployed_roads(docs: list[dict], tmp_path: Path) -> Path:
    """The roads.yaml of the rendered answersheet-roads ConfigMap, written to a file."""
    (cm,) = find(docs, "ConfigMap", "answersheet-roads")
    path = tmp_path / "roads.yaml"
    path.write_text(cm["data"]["roads.yaml"], encoding="utf-8")
    return path


# --- rendering and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_is_valid_kubernetes_strict(rendered, variant):
    docs = docs_of(rendered, variant)
    assert docs, f"{variant}: nothing rendered"
    version = make_var("K8S_VERSION")
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_manifest_has_duplicate_keys(rendered, variant):
    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"{variant}: duplicate keys {dupes} at {node.start_mark}"
        return loader.construct_mapping(node, deep=deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    assert list(yaml.load_all(rendered[variant].read_text(encoding="utf-8"), Loader=UniqueKeys))


def test_helm_lint_strict(helm):
    for values in [None, *sorted(CI_VALUES.glob("*-values.yaml"))]:
        args = [str(helm), "lint", "--strict", str(CHART)]
        if values:
            args += ["-f", str(values), "--set-file", f"roadsYaml={ROADS_FILE}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def test_resources_per_variant(rendered):
    """The objects each variant is meant to produce (listed in the README)."""
    kinds = {v: sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs_of(rendered, v)) for v in VARIANTS}
    core = {"ConfigMap/answersheet-roads", "ConfigMap/answersheet-pod-templates", "ServiceAccount/answersheet-pipeline",
            "Secret/answersheet-airflow-connections", "Secret/answersheet-airflow-api"}
    minio = {"Secret/answersheet-minio", "Service/answersheet-minio", "StatefulSet/answersheet-minio",
             "ConfigMap/answersheet-minio-bucket-init", "Job/answersheet-minio-bucket-init"}
    assert set(kinds["default"]) == core | minio | {"Secret/answersheet-s3"}
    assert set(kinds["bare"]) == set(kinds["default"])
    assert set(kinds["gpu-mig"]) == set(kinds["default"]) | {"NetworkPolicy/answersheet-minio",
                                                              "NetworkPolicy/answersheet-stage-pods"}
    assert set(kinds["external-s3"]) == core | {"Secret/answersheet-s3", "NetworkPolicy/answersheet-stage-pods"}
    assert set(kinds["existing-secret"]) == core


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "roadsYaml=roads: [oops"], "roadsYaml: not valid YAML"),
    (["--set", "roadsYaml=defaults: {}"], "roadsYaml: expected a mapping with a 'roads' list"),
    (["--set", "stagePods.profiles.detector.a100.gpu.count=0"], "/stagePods/profiles/detector/a100/gpu/count"),
    (["--set", "stagePods.unknownKey=1"], "unknownKey"),
    (["--set", "stagePods.profiles.detector.A100.resources.limits.cpu=1"], "/stagePods/profiles/detector"),
    (["--set", "minio.image.tag=latest"], "/minio/image/tag"),
    (["--set", "minio.enabled=false", "--set", "s3.accessKeyId=AKIAONLY"], "s3.secretAccessKey is empty"),
])
def test_bad_values_fail_with_a_clear_message(helm, args, message):
    proc = subprocess.run([str(helm), "template", "x", str(CHART), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


# --- pods -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_non_root_read_only_and_unprivileged(rendered, variant):
    pods = [d for d in docs_of(rendered, variant) if pod_spec(d) is not None]
    if variant in ("default", "gpu-mig", "bare"):
        assert {d["kind"] for d in pods} == {"StatefulSet", "Job"}
    for doc in pods:
        where = f"{variant}: {doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 0) > 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container.get("securityContext", {})
            what = f"{where} container {container['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("privileged") is not True, what
            assert sc.get("runAsNonRoot") is True, what
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), what
            assert not sc.get("capabilities", {}).get("add"), what
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{what}: /tmp must be an emptyDir (read-only root)"
            image = container["image"]
            assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image.split("/")[-1]), f"{what}: {image}"
            assert not image.endswith(":latest"), what
            assert container.get("resources", {}).get("limits"), f"{what}: no resource limits"


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """file name -> Pod of the rendered answersheet-pod-templates ConfigMap."""
    (cm,) = find(docs, "ConfigMap", "answersheet-pod-templates")
    return {name: yaml.safe_load(text) for name, text in cm["data"].items()}


def test_digests_win_over_tags(rendered):
    templates = pod_templates(docs_of(rendered, "gpu-mig"))
    image = templates["detector-mig-1g.yaml"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/answersheet/answersheet-detector@sha256:" + "2" * 64


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_templates_are_valid_locked_down_pods_of_this_release(rendered, variant):
    """One template per stage kind and profile, each a strictly valid Pod whose container is `base` (the
    KubernetesPodOperator's base container name) and whose names are objects of this release."""
    docs = docs_of(rendered, variant)
    templates = pod_templates(docs)
    values = values_of(variant)["stagePods"]
    assert sorted(templates) == sorted(f"{kind}-{name}.yaml" for kind in ("preprocess", "detector")
                                       for name in values["profiles"][kind])
    existing = values_of(variant)["s3"]["existingSecret"]
    version = make_var("K8S_VERSION")
    for name, pod in templates.items():
        kubernetes_validate.validate(pod, version, strict=True)
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert container["name"] == "base" and pod["metadata"]["namespace"] == NAMESPACE, name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        # S3 settings only through the Secret; the one plain variable: the task log timestamps lines already
        assert container["env"] == [{"name": "ANSWERSHEET_LOG_TIMESTAMPS", "value": "0"}], name
        (secret,) = [e["secretRef"]["name"] for e in container["envFrom"]]
        assert secret == existing if existing else find(docs, "Secret", secret), name
        assert find(docs, "ServiceAccount", spec["serviceAccountName"]), name
        roads = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
        assert roads == ["answersheet-roads"] and find(docs, "ConfigMap", "answersheet-roads"), name
        gpu = [k for k in container["resources"]["limits"] if k.startswith("nvidia.com/")]
        assert bool(gpu) == name.startswith("detector-"), name


# --- RBAC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rbac_of_our_own(rendered, variant):
    """The official chart's pod-launcher Role already grants the worker pods and the triggerer what the
    KubernetesPodOperator needs; a second Role would grant the same again (tests/test_helm_airflow.py)."""
    kinds = {d["kind"] for d in docs_of(rendered, variant)}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_service_account_has_no_permissions(rendered, variant):
    docs = docs_of(rendered, variant)
    (sa,) = find(docs, "ServiceAccount", "answersheet-pipeline")
    assert sa["automountServiceAccountToken"] is False
    assert not find(docs, "RoleBinding") and not find(docs, "ClusterRoleBinding")


def test_airflow_api_secret(rendered, helm):
    """Static API keys for the official chart: generated (32 and 64 characters) unless given, kept across
    upgrades by the same lookup as the other generated credentials."""
    docs = docs_of(rendered, "default")
    keys = secret_values(find(docs, "Secret", "answersheet-airflow-api")[0])
    assert set(keys) == {"api-secret-key", "jwt-secret"}
    assert len(keys["api-secret-key"]) == 32 and len(keys["jwt-secret"]) == 64
    proc = subprocess.run([str(helm), "template", "x", str(CHART), "-n", NAMESPACE, "--show-only",
                           "templates/secret-airflow-api.yaml", "--set", "airflowApiSecret.secretKey=given-key",
                           "--set", "airflowApiSecret.jwtSecret=given-jwt"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert secret_values(yaml.safe_load(proc.stdout)) == {"api-secret-key": "given-key", "jwt-secret": "given-jwt"}
    template = (CHART / "templates" / "secret-airflow-api.yaml").read_text(encoding="utf-8")
    assert template.count('include "answersheet.credential"') == 2


# --- credentials ------------------------------------------------------------------------------------

CREDENTIAL_KEY = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|_KEY$)", re.IGNORECASE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_credentials_appear_only_in_secrets(rendered, variant):
    docs = docs_of(rendered, variant)
    credentials = {v for d in find(docs, "Secret") for k, v in secret_values(d).items()
                   if CREDENTIAL_KEY.search(k) or k.startswith("MINIO_ROOT")}
    given = values_of(variant)
    credentials |= {v for v in (given["s3"]["accessKeyId"], given["s3"]["secretAccessKey"],
                                given["minio"]["rootPassword"]) if v}
    credentials.discard("")
    if variant in ("default", "gpu-mig", "bare", "external-s3"):
        assert credentials, f"{variant}: expected rendered credentials to check"
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = json.dumps(doc)
        for value in credentials:
            assert value not in text, f"{variant}: a credential is written into {doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []):
            for env in container.get("env", []):
                if CREDENTIAL_KEY.search(env["name"]) or env["name"].startswith("MINIO_ROOT"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_external_keys_are_only_in_the_s3_secret(rendered):
    docs = docs_of(rendered, "external-s3")
    holders = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if "AKIATESTEXTERNALKEY01" in json.dumps(d)]
    assert holders == ["Secret/answersheet-s3"]
    s3 = secret_values(find(docs, "Secret", "answersheet-s3")[0])
    assert s3 == {"AWS_DEFAULT_REGION": "ap-northeast-2", "AWS_ENDPOINT_URL": "https://s3.example.com",
                  "AWS_ACCESS_KEY_ID": "AKIATESTEXTERNALKEY01",
                  "AWS_SECRET_ACCESS_KEY": "test-external-secret-access-key-0123456789"}
    conn = json.loads(secret_values(find(docs, "Secret", "answersheet-airflow-connections")[0])
                      ["AIRFLOW_CONN_AWS_DEFAULT"])
    assert conn == {"conn_type": "aws", "extra": {"endpoint_url": "https://s3.example.com",
                                                  "region_name": "ap-northeast-2"}}


def test_bundled_minio_wiring(rendered):
    docs = docs_of(rendered, "default")
    endpoint = "http://answersheet-minio.airflow.svc.cluster.local:9000"
    s3 = secret_values(find(docs, "Secret", "answersheet-s3")[0])
    assert s3["AWS_ENDPOINT_URL"] == endpoint and s3["AWS_ACCESS_KEY_ID"] == "answersheet-stages"
    assert len(s3["AWS_SECRET_ACCESS_KEY"]) == 40
    root = secret_values(find(docs, "Secret", "answersheet-minio")[0])
    assert root["MINIO_ROOT_PASSWORD"] != s3["AWS_SECRET_ACCESS_KEY"]  # the pipeline is not MinIO's root
    conn = json.loads(secret_values(find(docs, "Secret", "answersheet-airflow-connections")[0])
                      ["AIRFLOW_CONN_AWS_DEFAULT"])
    assert conn["extra"]["endpoint_url"] == endpoint
    (svc,) = find(docs, "Service", "answersheet-minio")
    (sts,) = find(docs, "StatefulSet", "answersheet-minio")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    (job,) = find(docs, "Job", "answersheet-minio-bucket-init")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    env = {e["name"]: e for e in pod_spec(job)["containers"][0]["env"]}
    assert env["BUCKETS"]["value"] == "answersheet"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "answersheet-s3",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}


def test_bucket_init_covers_every_roads_bucket(rendered):
    docs = docs_of(rendered, "gpu-mig")
    (job,) = find(docs, "Job", "answersheet-minio-bucket-init")
    env = {e["name"]: e.get("value") for e in pod_spec(job)["containers"][0]["env"]}
    assert env["BUCKETS"] == "answersheet answersheet-archive"
    policy = json.loads(find(docs, "ConfigMap", "answersheet-minio-bucket-init")[0]["data"]["policy.json"])
    assert policy["Statement"][0]["Resource"] == [
        "arn:aws:s3:::answersheet", "arn:aws:s3:::answersheet/*",
        "arn:aws:s3:::answersheet-archive", "arn:aws:s3:::answersheet-archive/*"]


def test_network_policies(rendered):
    docs = docs_of(rendered, "gpu-mig")
    (minio,) = find(docs, "NetworkPolicy", "answersheet-minio")
    assert minio["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "answersheet-minio"
    peers = minio["spec"]["ingress"][0]["from"]
    assert {"podSelector": {}} in peers and len(peers) == 2
    (stage,) = find(docs, "NetworkPolicy", "answersheet-stage-pods")
    assert stage["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in stage["spec"]
    # selects the stage pods exactly as the DAGs label them
    sys.path.insert(0, str(REPO / "dags"))
    try:
        from answersheet_dagkit.pods import pod_labels
    finally:
        sys.path.remove(str(REPO / "dags"))
    labels = pod_labels("daewang_pangyo", "detect", "2026-11-02")
    selector = stage["spec"]["podSelector"]
    assert selector["matchLabels"].items() <= labels.items()
    assert all(e["key"] in labels for e in selector["matchExpressions"])


# --- the deployed roads file ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployed_roads_file_is_the_source_and_valid_for_the_stages_and_the_dags(rendered, variant, tmp_path,
                                                                                monkeypatch):
    """The chart deploys the roads file byte for byte (it no longer rewrites `defaults.kubernetes`); both
    sides load every road, and every pod profile a road names is a template of this release."""
    from answersheet.config import load_road, read_roads_file

    docs = docs_of(rendered, variant)
    path = deployed_roads(docs, tmp_path)
    source = ROADS_FILE if variant != "bare" else None
    if source:
        assert path.read_bytes() == source.read_bytes()
    roads = read_roads_file(path)
    for raw in roads:
        load_road(path, raw["id"])
    templates = tmp_path / "pod-templates"
    templates.mkdir()
    for name, pod in pod_templates(docs).items():
        (templates / name).write_text(yaml.safe_dump(pod), encoding="utf-8")
    monkeypatch.syspath_prepend(str(REPO / "dags"))
    monkeypatch.delenv("ANSWERSHEET_EXECUTION_MODE", raising=False)
    monkeypatch.setenv("ANSWERSHEET_POD_TEMPLATES", str(templates))
    from answersheet_dagkit.roads import load_roads, pod_template_path

    specs, errors = load_roads(path)
    assert errors == [] and len(specs) == len(roads)
    for spec in specs:
        for kind, profile in spec["kubernetes"]["pod_profile"].items():
            assert pod_template_path(kind, profile).is_file()
