"""The stage pod's operator and arguments: the chart's pod template (helm/answersheet `stagePods`: image,
resources, GPU scheduling, security contexts, volumes, ServiceAccount, the S3 Secret) under what the task
adds (command line, labels, name; the template's container is `base`, the operator's base container)."""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.config import ConfigException

from answersheet_dagkit.lineage import record_answer_sheet
from answersheet_dagkit.roads import pod_template_path

NO_CLUSTER = ("answersheet: error: no Kubernetes cluster configured for the stage pods ({reason}); to run the "
              "stages as local subprocesses instead, set ANSWERSHEET_EXECUTION_MODE=local")
# The operator adds the XCom sidecar after merging the template, so the template cannot lock it down. A dict
# (camelCase, serialised as is) instead of kubernetes.client models: each model object builds its own
# client Configuration, which was 70 % of the DAG file's parse time (bench/dag_parse.py).
SIDECAR_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_labels(road: str, stage: str, date: str, shard: int | None = None) -> dict[str, str]:
    """Labels for `kubectl get pods -l answersheet.io/road=...` (date is templated)."""
    labels = {"app.kubernetes.io/name": "answersheet", "app.kubernetes.io/component": stage,
              "answersheet.io/road": road, "answersheet.io/date": date, "answersheet.io/stage": stage}
    return labels if shard is None else {**labels, "answersheet.io/shard": str(shard)}


def pod_operator_kwargs(kube: dict[str, Any], stage: str) -> dict[str, Any]:
    """Everything but the task id, arguments and labels, for one stage's KubernetesPodOperator."""
    kind = "detector" if stage == "detect" else "preprocess"
    return {
        "name": f"answersheet-{stage}",
        "pod_template_file": str(pod_template_path(kind, kube["pod_profile"][kind])),
        "base_container_name": "base",
        "xcom_sidecar_container_security_context": SIDECAR_SECURITY_CONTEXT,
        "on_finish_action": "delete_succeeded_pod",  # failed pods stay for `kubectl logs/describe`
        "startup_timeout_seconds": kube["startup_timeout_seconds"],
        "schedule_timeout_seconds": kube["schedule_timeout_seconds"],
        "get_logs": True,
        "log_events_on_failure": True,
        "deferrable": kube["deferrable"],
        "do_xcom_push": kube["push_summary"],
    }


class AnswersheetPodOperator(KubernetesPodOperator):
    """KubernetesPodOperator that fails at once, without retries, when no cluster is configured (retrying cannot
    fix a missing configuration: dags/README.md "No cluster"), and puts the day on its Asset outlets' event."""

    def _require_cluster(self) -> None:
        try:
            self.hook.api_client  # type: ignore[attr-defined]  # noqa: B018 - loads in-cluster config, the connection or the kubeconfig (cached)
        except ConfigException as exc:
            raise AirflowFailException(NO_CLUSTER.format(reason=str(exc).strip().rstrip("."))) from None

    def execute(self, context: Any) -> Any:
        self._require_cluster()
        result = super().execute(context)
        if not self.deferrable:
            record_answer_sheet(context, self.outlets, [*self.cmds, *self.arguments], result)
        return result

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        result = super().trigger_reentry(context, event)  # raises TaskDeferred while the pod still runs
        record_answer_sheet(context, self.outlets, [*self.cmds, *self.arguments], result)
        return result
