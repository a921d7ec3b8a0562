"""The DAG side of the roads file: each road checked against roads.schema.json (roadsfile, shared with the stage
CLI) and turned into what the DAG factory needs (`id`, `schedule`, `kubernetes`, `detect.shards`).

Stdlib + yaml + jsonschema only (no Airflow, no `answersheet`): a road's problem is a RoadConfigError naming
the road and the key, in the same words as the stage CLI (the same code builds them). Checks only the DAG side
needs (the kubernetes section, the execution mode, the cron expression in the factory) live here.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from answersheet_dagkit.roadsfile import RoadsFileError, check_road, deep_merge, read_roads, schema_defaults
from answersheet_dagkit.roadsfile import fail as _fail

MODES = ("kubernetes", "local")
MODE_ENV = "ANSWERSHEET_EXECUTION_MODE"
ROADS_FILE_ENV = "ANSWERSHEET_ROADS_FILE"
RoadConfigError = RoadsFileError

# The `kubernetes:` section: built-in defaults, overridden by the roads file's defaults and the road.
# Keep in sync with helm/ (the names of the ServiceAccount, Secret and ConfigMap it creates).
KUBERNETES_DEFAULTS: dict[str, Any] = {
    "mode": "kubernetes",
    "namespace": "airflow",
    "service_account": "answersheet-pipeline",
    "s3_secret": "answersheet-s3",
    "roads_config_map": "answersheet-roads",
    "image_pull_secrets": [],
    "deferrable": False,
    "startup_timeout_seconds": 1200,
    "schedule_timeout_seconds": 1800,
    "scratch_size": "50Gi",
    "run_as_user": 10001,
    "push_summary": True,
    "images": {
        "preprocess": {"repository": "ghcr.io/answersheet/answersheet-preprocess", "tag": "0.1.0",
                       "digest": "", "pull_policy": "IfNotPresent"},
        "detector": {"repository": "ghcr.io/answersheet/answersheet-detector", "tag": "0.1.0",
                     "digest": "", "pull_policy": "IfNotPresent"},
    },
    "resources": {
        "preprocess": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "detector": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
    },
    "gpu": {
        "count": 1,
        "resource": "nvidia.com/gpu",
        "products": ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB",
                     "NVIDIA-A100-80GB-PCIe"],
        "runtime_class": "",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
IMAGE_KEYS = ("repository", "tag", "digest", "pull_policy")
RESOURCE_KEYS = ("requests", "limits")
GPU_KEYS = ("count", "resource", "products", "runtime_class", "tolerations")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "toleration_seconds")

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY_RE = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[mkMGTPE]|u|n)?$")
RESOURCE_NAME_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REPOSITORY_RE = re.compile(r"^[a-z0-9]+([._:/-][a-z0-9]+)*$")


@dataclass(frozen=True)
class Schedule:
    """When a road's DAG runs."""

    timezone: str
    cron: str | None
    process_date: str  # previous_run | run_day (factory.timetable_for)
    start_date: dt.date
    catchup: bool
    max_active_runs: int
    retries: int
    retry_delay_minutes: float
    max_retry_delay_minutes: float


@dataclass(frozen=True)
class RoadSpec:
    """What the DAG factory needs to know about one road (validated)."""

    id: str
    name: str
    bucket: str
    shards: int
    schedule: Schedule
    kubernetes: dict[str, Any]  # KUBERNETES_DEFAULTS merged with the file, validated; mode resolved

    @property
    def dag_id(self) -> str:
        return f"answersheet_{self.id}"


def roads_file_path(dags_dir: Path) -> Path:
    """$ANSWERSHEET_ROADS_FILE, else roads.yaml next to the DAG file."""
    return Path(os.environ.get(ROADS_FILE_ENV) or Path(dags_dir) / "roads.yaml")


def _mapping(road: str, key: str, value: Any, allowed: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise _fail(road, key, f"must be a mapping, got {value!r}")
    for k in value:
        if allowed is not None and k not in allowed:
            raise _fail(road, f"{key}.{k}", f"unknown key (allowed: {', '.join(allowed)})")
    return value


def _int(road: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _fail(road, key, f"must be an integer {bounds}, got {value!r}")
    return value


def _bool(road: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(road, key, f"must be true or false, got {value!r}")
    return value


def _name(road: str, key: str, value: Any, pattern: re.Pattern = DNS_SUBDOMAIN_RE, empty_ok: bool = False) -> str:
    if empty_ok and value in ("", None):
        return ""
    if not isinstance(value, str) or len(value) > 253 or not pattern.match(value):
        raise _fail(road, key, f"must be a Kubernetes name (lowercase letters, digits, '-', '.'), got {value!r}")
    return value


def _quantity(road: str, key: str, value: Any) -> str:
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not QUANTITY_RE.match(text):
        raise _fail(road, key, f"must be a Kubernetes quantity such as 500m, 2, 4Gi, got {value!r}")
    return text


def validate_schedule(raw: dict) -> Schedule:
    """The schema-checked `schedule` section with the schema's defaults (the cron expression itself is checked
    by Airflow's timetable in the factory)."""
    s = {**schema_defaults("schedule"), **raw}
    return Schedule(
        timezone=s["timezone"], cron=s["cron"].strip() if s["cron"] else None, process_date=s["process_date"],
        start_date=dt.date.fromisoformat(s["start_date"]), catchup=s["catchup"],
        max_active_runs=s["max_active_runs"], retries=s["retries"],
        retry_delay_minutes=float(s["retry_delay_minutes"]),
        max_retry_delay_minutes=float(s["max_retry_delay_minutes"]),
    )


def _validate_image(road: str, key: str, raw: Any) -> dict:
    img = _mapping(road, key, raw, IMAGE_KEYS)
    repo = img.get("repository")
    if not isinstance(repo, str) or not REPOSITORY_RE.match(repo):
        raise _fail(road, f"{key}.repository", f"must be an image repository such as ghcr.io/org/name, got {repo!r}")
    tag, digest = img.get("tag") or "", img.get("digest") or ""
    if not isinstance(tag, str) or (tag and not TAG_RE.match(tag)):
        raise _fail(road, f"{key}.tag", f"must be a string image tag (quote numbers in YAML), got {tag!r}")
    if not isinstance(digest, str) or (digest and not DIGEST_RE.match(digest)):
        raise _fail(road, f"{key}.digest", f"must be empty or sha256:<64 hex digits>, got {digest!r}")
    if not tag and not digest:
        raise _fail(road, key, "needs a tag or a digest")
    policy = img.get("pull_policy", "IfNotPresent")
    if policy not in ("Always", "IfNotPresent", "Never"):
        raise _fail(road, f"{key}.pull_policy", f"must be Always, IfNotPresent or Never, got {policy!r}")
    return {"repository": repo, "tag": tag, "digest": digest, "pull_policy": policy}


def _validate_resources(road: str, key: str, raw: Any) -> dict:
    res = _mapping(road, key, raw, RESOURCE_KEYS)
    out = {}
    for part in RESOURCE_KEYS:
        amounts = _mapping(road, f"{key}.{part}", res.get(part) or {})
        for name in amounts:
            if not isinstance(name, str) or not RESOURCE_NAME_RE.match(name):
                raise _fail(road, f"{key}.{part}.{name}", "not a resource name")
        out[part] = {name: _quantity(road, f"{key}.{part}.{name}", v) for name, v in amounts.items()}
    return out


def _validate_toleration(road: str, key: str, raw: Any) -> dict:
    tol = _mapping(road, key, raw, TOLERATION_KEYS)
    if tol.get("operator", "Equal") not in ("Exists", "Equal"):
        raise _fail(road, f"{key}.operator", f"must be Exists or Equal, got {tol.get('operator')!r}")
    if tol.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise _fail(road, f"{key}.effect", f"must be NoSchedule, PreferNoSchedule or NoExecute, got {tol['effect']!r}")
    for k in ("key", "value"):
        if k in tol and not isinstance(tol[k], str):
            raise _fail(road, f"{key}.{k}", f"must be a string, got {tol[k]!r}")
    if "toleration_seconds" in tol:
        _int(road, f"{key}.toleration_seconds", tol["toleration_seconds"], 0)
    return dict(tol)


def validate_kubernetes(road: str, raw: Any, mode_env: str | None = None) -> dict:
    """The `kubernetes` section merged over KUBERNETES_DEFAULTS; `mode` resolved with $ANSWERSHEET_EXECUTION_MODE."""
    given = _mapping(road, "kubernetes", raw if raw is not None else {}, tuple(KUBERNETES_DEFAULTS))
    k = deep_merge(KUBERNETES_DEFAULTS, given)
    mode = mode_env or k["mode"]
    if mode not in MODES:
        where = f"${MODE_ENV}" if mode_env else "kubernetes.mode"
        raise _fail(road, where, f"must be one of {MODES}, got {mode!r}")
    for key in ("namespace",):
        _name(road, f"kubernetes.{key}", k[key], DNS_LABEL_RE)
    for key in ("service_account", "s3_secret", "roads_config_map"):
        _name(road, f"kubernetes.{key}", k[key])
    secrets = k["image_pull_secrets"]
    if not isinstance(secrets, list):
        raise _fail(road, "kubernetes.image_pull_secrets", f"must be a list of Secret names, got {secrets!r}")
    for i, name in enumerate(secrets):
        _name(road, f"kubernetes.image_pull_secrets[{i}]", name)
    images = _mapping(road, "kubernetes.images", k["images"], ("preprocess", "detector"))
    resources = _mapping(road, "kubernetes.resources", k["resources"], ("preprocess", "detector"))
    gpu = _mapping(road, "kubernetes.gpu", k["gpu"], GPU_KEYS)
    products = gpu["products"] or []
    if not isinstance(products, list) or not all(isinstance(p, str) and p for p in products):
        raise _fail(road, "kubernetes.gpu.products", f"must be a list of GPU product names, got {products!r}")
    tolerations = gpu["tolerations"] or []
    if not isinstance(tolerations, list):
        raise _fail(road, "kubernetes.gpu.tolerations", f"must be a list, got {tolerations!r}")
    resource = gpu["resource"]
    if not isinstance(resource, str) or "/" not in resource or not RESOURCE_NAME_RE.match(resource):
        raise _fail(road, "kubernetes.gpu.resource",
                    f"must be an extended resource such as nvidia.com/gpu or nvidia.com/mig-1g.10gb, got {resource!r}")
    return {
        "mode": mode,
        "namespace": k["namespace"],
        "service_account": k["service_account"],
        "s3_secret": k["s3_secret"],
        "roads_config_map": k["roads_config_map"],
        "image_pull_secrets": list(secrets),
        "deferrable": _bool(road, "kubernetes.deferrable", k["deferrable"]),
        "startup_timeout_seconds": _int(road, "kubernetes.startup_timeout_seconds", k["startup_timeout_seconds"], 1),
        "schedule_timeout_seconds": _int(road, "kubernetes.schedule_timeout_seconds",
                                         k["schedule_timeout_seconds"], 1),
        "scratch_size": _quantity(road, "kubernetes.scratch_size", k["scratch_size"]),
        "run_as_user": _int(road, "kubernetes.run_as_user", k["run_as_user"], 1),
        "push_summary": _bool(road, "kubernetes.push_summary", k["push_summary"]),
        "images": {name: _validate_image(road, f"kubernetes.images.{name}", images.get(name))
                   for name in ("preprocess", "detector")},
        "resources": {name: _validate_resources(road, f"kubernetes.resources.{name}", resources.get(name) or {})
                      for name in ("preprocess", "detector")},
        "gpu": {
            "count": _int(road, "kubernetes.gpu.count", gpu["count"], 1, 16),
            "resource": resource,
            "products": list(products),
            "runtime_class": _name(road, "kubernetes.gpu.runtime_class", gpu["runtime_class"], empty_ok=True),
            "tolerations": [_validate_toleration(road, f"kubernetes.gpu.tolerations[{i}]", t)
                            for i, t in enumerate(tolerations)],
        },
    }


def validate_road(raw: dict, mode_env: str | None = None) -> RoadSpec:
    """One merged road mapping -> RoadSpec, or RoadConfigError naming the road and the key."""
    check_road(raw)
    road = raw["id"]
    return RoadSpec(
        id=road, name=raw.get("name", road), bucket=raw.get("bucket", "answersheet"),
        shards=raw["detect"].get("shards", 1), schedule=validate_schedule(raw["schedule"]),
        kubernetes=validate_kubernetes(road, raw.get("kubernetes"), mode_env),
    )


def load_roads(path: Path) -> tuple[list[RoadSpec], list[str]]:
    """Every valid road of the file, and one error line per invalid road (the others still load)."""
    mode_env = os.environ.get(MODE_ENV) or None
    raws = read_roads(path)
    counts: dict[Any, int] = {}
    for raw in raws:
        counts[raw.get("id")] = counts.get(raw.get("id"), 0) + 1
    specs, errors = [], []
    for raw in raws:
        if counts[raw.get("id")] > 1:
            errors.append(f"road {raw.get('id')!r}: key 'id': defined {counts[raw.get('id')]} times")
            continue
        try:
            specs.append(validate_road(raw, mode_env))
        except RoadConfigError as exc:
            errors.append(str(exc))
    return specs, list(dict.fromkeys(errors))
