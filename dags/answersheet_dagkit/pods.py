"""KubernetesPodOperator arguments for a stage pod: image, resources, security, volumes, GPU scheduling."""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import Configuration
from kubernetes.client import models as k8s
from kubernetes.config import ConfigException

from answersheet_dagkit.commands import LOG_TIMESTAMPS_ENV, POD_CONFIG_PATH
from answersheet_dagkit.lineage import record_answer_sheet

SCRATCH = "/scratch"
CONFIG_DIR = POD_CONFIG_PATH.rsplit("/", 1)[0]
CONFIG_KEY = POD_CONFIG_PATH.rsplit("/", 1)[1]
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
LABEL_PREFIX = "answersheet.io"
# A read-only root filesystem: everything that caches or writes config goes to the scratch emptyDir.
SCRATCH_ENV = {
    "TMPDIR": SCRATCH,
    "HOME": SCRATCH,
    "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
    "XDG_CONFIG_HOME": f"{SCRATCH}/.config",
    "YOLOV5_CONFIG_DIR": f"{SCRATCH}/.config/Ultralytics",
    "MPLCONFIGDIR": f"{SCRATCH}/.config/matplotlib",
    "ANSWERSHEET_CONFIG": POD_CONFIG_PATH,
    LOG_TIMESTAMPS_ENV: "0",  # the task log (KubernetesPodOperator get_logs) timestamps each line
}
NO_CLUSTER = ("answersheet: error: no Kubernetes cluster configured for the stage pods ({reason}); to run the "
              "stages as local subprocesses instead, set ANSWERSHEET_EXECUTION_MODE=local")

# One Configuration shared by every model object: by default each object builds its own, which costs
# ~0.3 ms under Airflow's many loggers and was 70% of the DAG file's parse time (bench/dag_parse.py).
_K8S_CONFIG = Configuration()


def _obj(model, **fields):
    """A kubernetes.client model object that shares _K8S_CONFIG."""
    return model(local_vars_configuration=_K8S_CONFIG, **fields)


def image_ref(image: dict[str, str]) -> str:
    """repository@digest when a digest is pinned, else repository:tag."""
    if image["digest"]:
        return f"{image['repository']}@{image['digest']}"
    return f"{image['repository']}:{image['tag']}"


def pod_labels(road: str, stage: str, date: str, shard: int | None = None) -> dict[str, str]:
    """Labels for `kubectl get pods -l answersheet.io/road=...` (date is templated)."""
    labels = {
        "app.kubernetes.io/name": "answersheet",
        "app.kubernetes.io/component": stage,
        f"{LABEL_PREFIX}/road": road,
        f"{LABEL_PREFIX}/date": date,
        f"{LABEL_PREFIX}/stage": stage,
    }
    if shard is not None:
        labels[f"{LABEL_PREFIX}/shard"] = str(shard)
    return labels


def _container_security_context() -> k8s.V1SecurityContext:
    return _obj(
        k8s.V1SecurityContext,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=_obj(k8s.V1Capabilities, drop=["ALL"]),
        seccomp_profile=_obj(k8s.V1SeccompProfile, type="RuntimeDefault"),
    )


def _pod_security_context(uid: int) -> k8s.V1PodSecurityContext:
    return _obj(
        k8s.V1PodSecurityContext,
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
        seccomp_profile=_obj(k8s.V1SeccompProfile, type="RuntimeDefault"),
    )


def _gpu_scheduling(gpu: dict[str, Any]) -> dict[str, Any]:
    """Node affinity on the GPU product label, tolerations and runtime class for the detector pod."""
    out: dict[str, Any] = {
        "tolerations": [
            _obj(k8s.V1Toleration, key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
                 effect=t.get("effect") or None, toleration_seconds=t.get("toleration_seconds"))
            for t in gpu["tolerations"]
        ],
        "runtime_class_name": gpu["runtime_class"] or None,
    }
    if gpu["products"]:
        product_in = _obj(k8s.V1NodeSelectorRequirement, key=GPU_PRODUCT_LABEL, operator="In",
                          values=list(gpu["products"]))
        required = _obj(k8s.V1NodeSelector,
                        node_selector_terms=[_obj(k8s.V1NodeSelectorTerm, match_expressions=[product_in])])
        out["affinity"] = _obj(k8s.V1Affinity, node_affinity=_obj(
            k8s.V1NodeAffinity, required_during_scheduling_ignored_during_execution=required))
    return out


def _volumes(kube: dict[str, Any]) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """The scratch emptyDir (TMPDIR; the root filesystem is read-only) and the roads ConfigMap, read-only."""
    scratch = _obj(k8s.V1EmptyDirVolumeSource, size_limit=kube["scratch_size"])
    roads = _obj(k8s.V1ConfigMapVolumeSource, name=kube["roads_config_map"],
                 items=[_obj(k8s.V1KeyToPath, key=CONFIG_KEY, path=CONFIG_KEY)])
    volumes = [_obj(k8s.V1Volume, name="scratch", empty_dir=scratch),
               _obj(k8s.V1Volume, name="roads", config_map=roads)]
    mounts = [_obj(k8s.V1VolumeMount, name="scratch", mount_path=SCRATCH),
              _obj(k8s.V1VolumeMount, name="roads", mount_path=CONFIG_DIR, read_only=True)]
    return volumes, mounts


def pod_operator_kwargs(kube: dict[str, Any], stage: str) -> dict[str, Any]:
    """Everything but the task id, arguments and labels, for one stage's KubernetesPodOperator."""
    role = "detector" if stage == "detect" else "preprocess"
    image = kube["images"][role]
    requests = dict(kube["resources"][role]["requests"])
    limits = dict(kube["resources"][role]["limits"])
    if role == "detector":
        limits[kube["gpu"]["resource"]] = str(kube["gpu"]["count"])
    volumes, mounts = _volumes(kube)
    secret = _obj(k8s.V1SecretEnvSource, name=kube["s3_secret"])
    kwargs: dict[str, Any] = {
        "namespace": kube["namespace"],
        "name": f"answersheet-{stage}",
        "image": image_ref(image),
        "image_pull_policy": image["pull_policy"],
        "image_pull_secrets": [_obj(k8s.V1LocalObjectReference, name=n) for n in kube["image_pull_secrets"]],
        "service_account_name": kube["service_account"],
        "automount_service_account_token": False,
        "container_resources": _obj(k8s.V1ResourceRequirements, requests=requests or None, limits=limits or None),
        "env_vars": [_obj(k8s.V1EnvVar, name=k, value=v) for k, v in SCRATCH_ENV.items()],
        "env_from": [_obj(k8s.V1EnvFromSource, secret_ref=secret)],  # S3 credentials: never literal values
        "security_context": _pod_security_context(kube["run_as_user"]),
        "container_security_context": _container_security_context(),
        "xcom_sidecar_container_security_context": _container_security_context(),
        "volumes": volumes,
        "volume_mounts": mounts,
        "on_finish_action": "delete_succeeded_pod",  # failed pods stay for `kubectl logs/describe`
        "startup_timeout_seconds": kube["startup_timeout_seconds"],
        "schedule_timeout_seconds": kube["schedule_timeout_seconds"],
        "get_logs": True,
        "log_events_on_failure": True,
        "deferrable": kube["deferrable"],
        "do_xcom_push": kube["push_summary"],
    }
    if role == "detector":
        kwargs.update(_gpu_scheduling(kube["gpu"]))
    return kwargs


class AnswersheetPodOperator(KubernetesPodOperator):
    """KubernetesPodOperator that fails at once, without retries, when no cluster is configured, and that
    puts the day on the asset event of its Asset outlets (the datasheet task; lineage.record_answer_sheet).

    Without a cluster (no in-cluster service account, no kubeconfig, no `kubernetes_default` connection) the
    plain operator raises the kubernetes client's ConfigException on every try: `airflow dags test` on a
    laptop then sat out the retry delays (5, 10 ... minutes) printing "No tasks to run". Retrying cannot
    help a missing configuration, so that one case is an AirflowFailException with one line that names the fix.
    """

    def _require_cluster(self) -> None:
        try:
            self.hook.api_client  # noqa: B018 - loads in-cluster config, the connection or the kubeconfig (cached)
        except ConfigException as exc:
            raise AirflowFailException(NO_CLUSTER.format(reason=str(exc).strip().rstrip("."))) from None

    def _command(self) -> list[str]:
        return [*(self.cmds or []), *(self.arguments or [])]

    def execute(self, context: Any) -> Any:
        self._require_cluster()
        result = super().execute(context)
        if not self.deferrable:
            record_answer_sheet(context, self.outlets, self._command(), result)
        return result

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        result = super().trigger_reentry(context, event)  # raises TaskDeferred while the pod still runs
        record_answer_sheet(context, self.outlets, self._command(), result)
        return result
