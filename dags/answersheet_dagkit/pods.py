"""KubernetesPodOperator arguments for a stage pod: the chart's pod template plus the task's own settings.

The pod's cluster shape (image, resources, GPU scheduling, security contexts, volumes, ServiceAccount, the S3
Secret) is the Helm chart's pod template `<kind>-<profile>.yaml` (helm/answersheet `stagePods`), merged by
the operator under what the task adds: command line, labels, name (PodGenerator.reconcile_pods; the
template's container is `base`, the operator's base container name).
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import Configuration
from kubernetes.client import models as k8s
from kubernetes.config import ConfigException

from answersheet_dagkit.commands import LOG_TIMESTAMPS_ENV
from answersheet_dagkit.lineage import record_answer_sheet
from answersheet_dagkit.settings import pod_template_path

LABEL_PREFIX = "answersheet.io"
NO_CLUSTER = ("answersheet: error: no Kubernetes cluster configured for the stage pods ({reason}); to run the "
              "stages as local subprocesses instead, set ANSWERSHEET_EXECUTION_MODE=local")

# One Configuration shared by every model object: by default each object builds its own, which costs
# ~0.3 ms under Airflow's many loggers and was 70% of the DAG file's parse time (bench/dag_parse.py).
_K8S_CONFIG = Configuration()


def _obj(model, **fields):
    """A kubernetes.client model object that shares _K8S_CONFIG."""
    return model(local_vars_configuration=_K8S_CONFIG, **fields)


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


def _sidecar_security_context() -> k8s.V1SecurityContext:
    """The XCom sidecar's container securityContext: the operator adds the sidecar after merging the template,
    so the template cannot lock it down (the pod-level context, non-root, comes from the template)."""
    return _obj(
        k8s.V1SecurityContext,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=_obj(k8s.V1Capabilities, drop=["ALL"]),
        seccomp_profile=_obj(k8s.V1SeccompProfile, type="RuntimeDefault"),
    )


def pod_operator_kwargs(kube: dict[str, Any], stage: str) -> dict[str, Any]:
    """Everything but the task id, arguments and labels, for one stage's KubernetesPodOperator."""
    kind = "detector" if stage == "detect" else "preprocess"
    return {
        "name": f"answersheet-{stage}",
        "pod_template_file": str(pod_template_path(kind, kube["pod_profile"][kind])),
        "base_container_name": "base",  # the template's container
        # the task log (KubernetesPodOperator get_logs) timestamps each line already
        "env_vars": [_obj(k8s.V1EnvVar, name=LOG_TIMESTAMPS_ENV, value="0")],
        "xcom_sidecar_container_security_context": _sidecar_security_context(),
        "on_finish_action": "delete_succeeded_pod",  # failed pods stay for `kubectl logs/describe`
        "startup_timeout_seconds": kube["startup_timeout_seconds"],
        "schedule_timeout_seconds": kube["schedule_timeout_seconds"],
        "get_logs": True,
        "log_events_on_failure": True,
        "deferrable": kube["deferrable"],
        "do_xcom_push": kube["push_summary"],
    }


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
            self.hook.api_client  # type: ignore[attr-defined]  # noqa: B018 - loads in-cluster config, the connection or the kubeconfig (cached)
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
