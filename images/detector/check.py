"""Build-time checks of the detector image that mean something without a GPU.

The old check (`CUDAExecutionProvider in get_available_providers()`, `torch.version.cuda` non-empty)
passed for an image whose ONNX Runtime was built for CUDA 12 on a CUDA 13 stack: the provider list is
fixed in the wheel and torch's CUDA version at compile time, so neither looks at the libraries. These
checks do: the CUDA version torch was built with equals the base image's, ONNX Runtime is the GPU wheel
built for the same CUDA major, and the dynamic loader resolves every library its CUDA provider links
(only the driver's libcuda.so.1 may be missing, it comes from the node at run time).

Runs three ways:
- in the Dockerfile (`--image`): everything must pass (only `read-only` needs `docker run`), the build fails
  otherwise; no check skips in the image;
- in CI on the built image: `docker run --read-only --user 10001:10001 ... --image --read-only`;
- in the test suite against the development venv (no flag): checks that need the image report `skip`
  with the reason; `--ort-dir` points the ONNX Runtime checks at an unpacked onnxruntime-gpu wheel.

Prints one line per check (`ok`, `FAIL`, `skip`), or JSON with --json; exit status 1 when one failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_UID = 10001
# The only library the CUDA provider may leave unresolved: the driver's, mounted from the node.
DRIVER_LIBRARIES = {"libcuda.so.1"}
# Loaded with dlopen by ONNX Runtime's CUDA provider (not in its ELF needs): cuDNN 9 for convolutions.
DLOPENED = ("libcudnn.so.9",)
# Packages the PyTorch base image provides and the image must use as they are (not a second copy).
BASE_PACKAGES = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
# `pip check` lines expected from the lock: roboflow's opencv-python-headless is left out on purpose.
KNOWN_UNMET = re.compile(r"^roboflow [^ ]+ requires opencv-python-headless")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")


@dataclass
class Result:
    name: str
    status: str  # ok | fail | skip
    message: str


class Skip(Exception):
    """The check needs the image (or a GPU wheel) and does not apply here."""


class Failed(Exception):
    """The check ran and found a problem."""


@dataclass
class Context:
    cuda: str  # expected torch CUDA version, major.minor (the base image tag's)
    image: bool
    read_only: bool
    ort_dir: Path | None
    lock: Path | None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def public(version: str) -> str:
    """2.14.1+cu130 -> 2.14.1: the local label names the index, not the release."""
    return version.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def nvidia_library_dirs() -> list[Path]:
    """lib folders of the nvidia-* wheels on sys.path (nvidia/cu13/lib, nvidia/cudnn/lib, ...), where
    torch finds cuBLAS/cuDNN and where onnxruntime.preload_dlls() looks."""
    dirs: list[Path] = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            dirs += sorted(p for p in base.glob("*/lib") if p.is_dir() and p not in dirs)
    return dirs


def ort_package_dir(ctx: Context) -> Path:
    if ctx.ort_dir:
        return ctx.ort_dir
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise Failed("onnxruntime is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def ort_build_info(ort_dir: Path) -> dict[str, str]:
    """package_name, __version__ and cuda_version from onnxruntime/capi/build_and_package_info.py, read
    as text so that an unpacked wheel can be inspected without importing a second onnxruntime."""
    path = ort_dir / "capi" / "build_and_package_info.py"
    if not path.is_file():
        raise Failed(f"{path}: missing")
    return dict(re.findall(r"^(\w+) = '([^']*)'$", path.read_text(encoding="utf-8"), re.M))


def ldd_missing(library: Path, library_path: list[Path] | None) -> list[str]:
    """Sonames `ldd` cannot resolve for `library`; LD_LIBRARY_PATH is `library_path` when given, else unset
    (only the loader's own configuration, /etc/ld.so.conf.d, counts)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if library_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(map(str, library_path))
    ldd = shutil.which("ldd")
    if ldd is None:
        raise Failed("ldd not found (libc-bin)")
    proc = subprocess.run([ldd, str(library)], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise Failed(f"ldd {library.name}: {(proc.stderr or proc.stdout).strip()[:200]}")
    return sorted(m.group(1) for m in re.finditer(r"^\s*(\S+) => not found", proc.stdout, re.M))


# --- the checks ------------------------------------------------------------------------------------------


def check_torch_cuda(ctx: Context) -> str:
    import torch

    built = torch.version.cuda
    if not built:
        raise Failed(f"torch {torch.__version__} is a CPU build")
    if major_minor(built) != ctx.cuda:
        raise Failed(f"torch {torch.__version__} is built for CUDA {built}, the base image is CUDA {ctx.cuda}")
    where = Path(torch.__file__).resolve()
    if ctx.image and where.is_relative_to(Path(sys.prefix).resolve()):
        raise Failed(f"torch imported from {where}: pip installed a second torch into the venv instead of "
                     "using the base image's")
    return f"torch {torch.__version__} built for CUDA {built} (from {where.parent})"


def check_base_packages(ctx: Context) -> str:
    if not ctx.image:
        raise Skip("no base image here: the development venv installs torch and the nvidia wheels itself")
    own = [Path(p) for p in sys.path if p.startswith(sys.prefix) and p.endswith("-packages")]
    copies = sorted(f"{d.metadata['Name']} {d.version}" for d in metadata.distributions(path=[str(p) for p in own])
                    if BASE_PACKAGES.match(canonical(d.metadata["Name"])))
    if copies:
        raise Failed(f"installed into the venv although the base image provides them: {', '.join(copies)} "
                     "(the base image's versions differ from requirements/detector-constraints.txt)")
    return "torch, torchvision and the nvidia CUDA wheels are the base image's"


def check_ort_build(ctx: Context) -> str:
    import torch

    info = ort_build_info(ort_package_dir(ctx))
    if info.get("package_name") != "onnxruntime-gpu":
        message = f"onnxruntime {info.get('__version__')} is the CPU wheel ({info.get('package_name')})"
        if ctx.image:
            raise Failed(message)
        raise Skip(message + " in this venv; pass --ort-dir to check an unpacked onnxruntime-gpu wheel")
    ort_cuda = info.get("cuda_version", "")
    torch_major = (torch.version.cuda or "?").split(".")[0]
    if ort_cuda.split(".")[0] != torch_major:
        raise Failed(f"onnxruntime-gpu {info['__version__']} is built for CUDA {ort_cuda}, torch for CUDA "
                     f"{torch.version.cuda}: its CUDA provider would fail to load and run on the CPU")
    return f"onnxruntime-gpu {info['__version__']} built for CUDA {ort_cuda}, torch for CUDA {torch.version.cuda}"


def check_ort_links(ctx: Context) -> str:
    ort_dir = ort_package_dir(ctx)
    provider = ort_dir / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.is_file():
        message = f"{provider.name} not in {ort_dir} (CPU wheel)"
        if ctx.image:
            raise Failed(message)
        raise Skip(message + "; pass --ort-dir to check an unpacked onnxruntime-gpu wheel")
    dirs = nvidia_library_dirs()
    if not dirs:
        raise Failed("no nvidia-* wheel library folders on sys.path (nvidia/*/lib)")
    notes = []
    for label, path in (("nvidia wheel folders", dirs), ("the loader's configuration", None)):
        if path is None and not ctx.image:
            continue  # the development venv registers nothing with ldconfig
        missing = sorted(set(ldd_missing(provider, path)) - DRIVER_LIBRARIES)
        if missing:
            raise Failed(f"{provider.name}: {', '.join(missing)} not found with {label} "
                         f"({', '.join(map(str, dirs))})")
        notes.append(label)
    absent = [lib for lib in DLOPENED if not any((d / lib).exists() for d in dirs)]
    if absent:
        raise Failed(f"{', '.join(absent)} (loaded by the CUDA provider at run time) not in "
                     f"{', '.join(map(str, dirs))}")
    tensorrt = ort_dir / "capi" / "libonnxruntime_providers_tensorrt.so"
    if tensorrt.is_file():
        trt_missing = sorted(set(ldd_missing(tensorrt, dirs)) - DRIVER_LIBRARIES)
        if trt_missing:
            notes.append(f"TensorRT provider not usable here ({', '.join(trt_missing)} missing): do not request it")
    return f"{provider.name} resolves everything but {', '.join(sorted(DRIVER_LIBRARIES))} with " + "; ".join(notes)


def check_opencv(ctx: Context) -> str:
    installed = []
    for name in OPENCV_DISTRIBUTIONS:
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 1:
        return installed[0]
    message = f"{len(installed)} OpenCV distributions write cv2: {', '.join(installed) or 'none'}"
    if len(installed) > 1 and not ctx.image:
        raise Skip(message + " (the development venv installs yolov5's whole dependency tree; the image "
                   "installs requirements/detector-constraints.txt, which has one)")
    raise Failed(message)


def check_imports(ctx: Context) -> str:
    modules = ("onnxruntime", "openvino", "yolov5.models.common", "yolov5.models.yolo", "answersheet.cli",
               "answersheet.detector.checkpoint", "answersheet.detector.openvino_backend")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import error fails the image
            raise Failed(f"import {module}: {type(exc).__name__}: {exc}") from None
    return "imports " + ", ".join(modules)


def check_cli_version(ctx: Context) -> str:
    exe = Path(sys.prefix) / "bin" / "answersheet"
    if not exe.exists():
        exe = Path(shutil.which("answersheet") or "answersheet")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    version = metadata.version("answersheet")
    if proc.returncode != 0 or version not in proc.stdout + proc.stderr:
        raise Failed(f"`{exe} --version` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    uid = os.getuid()
    if ctx.image and uid != IMAGE_UID:
        raise Failed(f"running as uid {uid}, the image's user is {IMAGE_UID}")
    return f"`answersheet --version` -> {proc.stdout.strip()} as uid {uid}"


def check_read_only(ctx: Context) -> str:
    if not ctx.read_only:
        raise Skip("needs `docker run --read-only` (pass --read-only there)")
    if not os.statvfs("/").f_flag & os.ST_RDONLY:
        raise Failed("/ is writable: run the container with --read-only")
    scratch = Path(os.environ.get("TMPDIR", "/scratch"))
    probe = scratch / f".check-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise Failed(f"{scratch} not writable on a read-only root: {exc}") from None
    return f"root filesystem read-only, {scratch} writable"


def check_pins(ctx: Context) -> str:
    if not ctx.image:
        raise Skip("the development venv follows requirements/constraints.txt (Python 3.11), not the image lock")
    if ctx.lock is None or not ctx.lock.is_file():
        raise Failed(f"lock file {ctx.lock} missing")
    from packaging.version import Version

    wrong = []
    for name, pinned in read_lock(ctx.lock).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing")
            continue
        if Version(public(have)) != Version(pinned):
            wrong.append(f"{name} {have} != {pinned}")
    if wrong:
        raise Failed(f"not as locked in {ctx.lock.name}: {', '.join(wrong)}")
    unmet = [line for line in subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                                             text=True, timeout=300).stdout.splitlines()
             if line.strip() and not KNOWN_UNMET.match(line) and "No broken requirements" not in line]
    locked = set(read_lock(ctx.lock))
    ours = [line for line in unmet if canonical(line.split(" ", 1)[0]) in locked]
    if ours:
        raise Failed(f"pip check: {'; '.join(ours)}")
    return f"every package as locked in {ctx.lock.name}; pip check clean but for roboflow's left-out OpenCV"


CHECKS: dict[str, Callable[[Context], str]] = {
    "torch-cuda": check_torch_cuda,
    "base-packages": check_base_packages,
    "ort-build": check_ort_build,
    "ort-links": check_ort_links,
    "opencv": check_opencv,
    "imports": check_imports,
    "cli-version": check_cli_version,
    "read-only": check_read_only,
    "pins": check_pins,
}


def run(ctx: Context, only: list[str] | None = None) -> list[Result]:
    results = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            results.append(Result(name, "ok", check(ctx)))
        except Skip as exc:
            results.append(Result(name, "skip", str(exc)))
        except Failed as exc:
            results.append(Result(name, "fail", str(exc)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Checks of the answersheet detector image (no GPU needed).")
    parser.add_argument("--cuda", default="", help="the base image's CUDA version, major.minor (e.g. 13.0)")
    parser.add_argument("--image", action="store_true", help="inside the image: every check must pass")
    parser.add_argument("--read-only", action="store_true", help="the container runs with --read-only")
    parser.add_argument("--ort-dir", type=Path, help="onnxruntime package folder to inspect (an unpacked wheel)")
    parser.add_argument("--lock", type=Path, help="the image's lock (requirements/detector-constraints.txt)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--only", action="append", choices=sorted(CHECKS), help="run only this check (repeatable)")
    parser.add_argument("--nvidia-lib-dirs", action="store_true",
                        help="only print the nvidia wheel library folders, one a line (for ld.so.conf.d)")
    args = parser.parse_args(argv)
    if args.nvidia_lib_dirs:
        print("\n".join(map(str, nvidia_library_dirs())))
        return 0
    if not args.cuda:
        parser.error("--cuda is required")
    ctx = Context(cuda=major_minor(args.cuda), image=args.image, read_only=args.read_only, ort_dir=args.ort_dir,
                  lock=args.lock)
    results = run(ctx, args.only)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        for r in results:
            print(f"{'FAIL' if r.status == 'fail' else r.status:4} {r.name}: {r.message}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
