"""images/detector/check.py, the detector image's build-time checks, run the way the test suite can: against
the development venv (built like the image from the same pins: CUDA 13.0 torch and its nvidia wheels) and,
for ONNX Runtime, against the real onnxruntime-gpu wheel of the image's lock, unpacked. A CUDA 12 build of
onnxruntime-gpu, the mismatch that made the GPU image silently run ONNX on the CPU, must fail them.

The in-image parts (the base's own torch, every pin as locked, uid 10001, read-only root) run in the
Dockerfile and in CI (`docker run --read-only`); here they report `skip` with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "images" / "detector" / "check.py"
sys.path.insert(0, str(REPO / "requirements"))
import lock  # noqa: E402  (requirements/lock.py)

sys.path.remove(str(REPO / "requirements"))

# onnxruntime-gpu 1.22.0 is built for CUDA 12.x: the previous image's kind of mismatch.
CUDA12_ORT = "1.22.0"


def base_cuda() -> str:
    """CUDA_VERSION of the detector Dockerfile (the base image tag's CUDA)."""
    text = (REPO / "images/detector/Dockerfile").read_text(encoding="utf-8")
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG CUDA_VERSION="))


def run_check(*args: str) -> tuple[int, dict[str, dict], str]:
    """(exit status, {check name: {status, message}}, stderr) of check.py in this venv, our sources first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(CHECK), "--json", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    results = {r["name"]: r for r in json.loads(proc.stdout)} if proc.stdout.strip() else {}
    return proc.returncode, results, proc.stderr


def test_checks_pass_on_the_development_venv():
    code, results, stderr = run_check("--cuda", base_cuda())
    assert code == 0, (results, stderr)
    assert results["torch-cuda"]["status"] == "ok"  # the venv's torch is the same CUDA 13.0 build
    assert f"CUDA {base_cuda()}" in results["torch-cuda"]["message"]
    assert results["imports"]["status"] == "ok"
    assert results["cli-version"]["status"] == "ok"
    assert "answersheet 0.1.0" in results["cli-version"]["message"]
    # What needs the image says so instead of passing.
    for name in ("base-packages", "pins", "read-only"):
        assert results[name]["status"] == "skip" and results[name]["message"], name


def test_a_torch_for_another_cuda_fails():
    code, results, _ = run_check("--cuda", "12.6", "--only", "torch-cuda")
    assert code == 1
    assert results["torch-cuda"]["status"] == "fail"
    assert "the base image is CUDA 12.6" in results["torch-cuda"]["message"]


def test_image_mode_skips_nothing():
    """In the image (--image) what only skips here must pass: the venv's own torch and nvidia wheels, the CPU
    onnxruntime, two OpenCV wheels, uid 0 and no lock all fail it."""
    code, results, _ = run_check("--cuda", base_cuda(), "--image")
    assert code == 1
    assert results["torch-cuda"]["status"] == "fail" and "second torch" in results["torch-cuda"]["message"]
    assert results["base-packages"]["status"] == "fail" and "nvidia-cublas" in results["base-packages"]["message"]
    for name in ("ort-build", "ort-links", "opencv", "cli-version", "pins"):
        assert results[name]["status"] == "fail", name
    assert results["read-only"]["status"] == "skip"  # needs `docker run --read-only`, checked in CI


def test_nvidia_library_dirs_are_the_wheels_of_the_cuda_stack():
    proc = subprocess.run([sys.executable, str(CHECK), "--nvidia-lib-dirs"], capture_output=True, text=True,
                          timeout=60)
    dirs = [Path(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and dirs
    names = {p.name for d in dirs for p in d.iterdir()}
    assert {"libcublas.so.13", "libcudart.so.13", "libcudnn.so.9"} <= names


def pip_download(tmp: Path, version: str) -> Path:
    """The onnxruntime-gpu wheel the image installs (cp312, manylinux), unpacked to the files the checks
    read: the provider libraries and the build info. Skips only when the package index is unreachable."""
    spec = lock.IMAGES["detector"]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
                           "--python-version", spec.python, "--only-binary=:all:", *lock.platform_args(spec.glibc),
                           f"onnxruntime-gpu=={version}"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pip"], capture_output=True,
                               text=True, timeout=120)
        if probe.returncode != 0:
            pytest.skip(f"package index unreachable: {probe.stderr.strip()[-200:]}")
        pytest.fail(f"pip download onnxruntime-gpu=={version}: {proc.stderr.strip()[-500:]}")
    (wheel,) = tmp.glob("onnxruntime_gpu-*.whl")
    out = tmp / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith("onnxruntime/capi/") and (
                    "libonnxruntime_providers_" in member or member.endswith("build_and_package_info.py")):
                zf.extract(member, out)
    wheel.unlink()
    return out / "onnxruntime"


@pytest.mark.slow
def test_the_locked_onnxruntime_gpu_links_against_the_cuda_wheels(tmp_path):
    """The image's onnxruntime-gpu (requirements/detector-constraints.txt), not the venv's CPU wheel: built
    for CUDA 13 like torch, and its CUDA provider resolves every library but the driver with the nvidia
    wheels torch uses (downloads the ~250 MB wheel, ~10 s)."""
    version = lock.read_pins(lock.lock_path("detector"))["onnxruntime-gpu"]
    ort_dir = pip_download(tmp_path, version)
    code, results, stderr = run_check("--cuda", base_cuda(), "--ort-dir", str(ort_dir), "--only", "ort-build",
                                      "--only", "ort-links")
    assert code == 0, (results, stderr)
    assert results["ort-build"]["status"] == "ok"
    assert f"onnxruntime-gpu {version} built for CUDA 13." in results["ort-build"]["message"]
    assert results["ort-links"]["status"] == "ok"
    assert "resolves everything but libcuda.so.1" in results["ort-links"]["message"]
    # The wheel lists TensorRT among its providers, but TensorRT is not installed: reported, not requested.
    assert "TensorRT provider not usable here (libnvinfer.so.10" in results["ort-links"]["message"]


@pytest.mark.slow
def test_a_cuda12_onnxruntime_gpu_is_caught(tmp_path):
    """Regression: onnxruntime-gpu built for CUDA 12 next to CUDA 13 torch passed the old build check
    (`CUDAExecutionProvider` listed, `torch.version.cuda` non-empty) and ran on the CPU in the cluster."""
    ort_dir = pip_download(tmp_path, CUDA12_ORT)
    code, results, _ = run_check("--cuda", base_cuda(), "--ort-dir", str(ort_dir), "--only", "ort-build",
                                 "--only", "ort-links")
    assert code == 1
    assert results["ort-build"]["status"] == "fail"
    assert "built for CUDA 12." in results["ort-build"]["message"]
    assert results["ort-links"]["status"] == "fail"
    assert "libcublas.so.12" in results["ort-links"]["message"] and "not found" in results["ort-links"]["message"]
