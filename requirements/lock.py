"""Per-image lock files: pip resolves each image's packages for the image's own Python and platform.

requirements/constraints.txt pins the development venv (`make install`, Python 3.11). The images run
their own Pythons (the detector's PyTorch base ships Ubuntu 24.04's Python 3.12), so each image gets a
lock, requirements/<image>-constraints.txt, resolved by pip's own resolver (`pip install --dry-run
--report`) for that Python, only wheels (the images have no compilers) and the image's glibc. The
development pins are passed as constraints, so every package the venv also has keeps the version
`make test` runs wherever a wheel for the image's Python exists.

    python requirements/lock.py write detector   # re-resolve and rewrite requirements/detector-constraints.txt
    python requirements/lock.py check detector   # CI: the lock still resolves, complete and unchanged

A full resolution takes ~25 s (PyPI metadata only, nothing is downloaded but the wheels' metadata).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV_CONSTRAINTS = REPO / "requirements" / "constraints.txt"


@dataclass(frozen=True)
class Image:
    """What one image installs and where it runs."""

    python: str  # the base image's Python, major.minor
    glibc: tuple[int, int]  # the base image's glibc: newest manylinux tag its pip accepts
    requirements: tuple[str, ...] = ()  # requirement files (repository paths) besides the package's own deps
    # Packages resolved but left out of the lock, with the reason (the image installs the lock --no-deps).
    exclude: dict[str, str] = field(default_factory=dict)


IMAGES = {
    # pytorch/pytorch:*-cuda13.0-cudnn9-runtime: Ubuntu 24.04, Python 3.12, glibc 2.39.
    "detector": Image(
        python="3.12", glibc=(2, 39), requirements=("images/detector/requirements.txt",),
        exclude={"opencv-python-headless": "roboflow (a yolov5 dependency, used only to download training sets) "
                 "asks for it, yolov5 for opencv-python: both wheels write the same cv2 package, so the one "
                 "installed last silently replaces the other; the image keeps opencv-python only"}),
    # python:3.11.*-slim-bookworm: Debian 12, glibc 2.36.
    "preprocess": Image(python="3.11", glibc=(2, 36)),
}


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(image: str) -> Path:
    return REPO / "requirements" / f"{image}-constraints.txt"


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a requirements/constraints file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def core_dependencies() -> list[str]:
    """The package's own dependencies (pyproject [project].dependencies): every image installs the package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"])


def platform_args(glibc: tuple[int, int]) -> list[str]:
    """--platform for every manylinux tag up to the image's glibc: pip does not widen a given tag itself
    (nvidia-cudnn-cu13 ships manylinux_2_27 only, nvidia-nccl-cu13 manylinux_2_18)."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(5, minor + 1)]
    tags += ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    return [arg for tag in tags for arg in ("--platform", tag)]


def resolve(image: str, constraints: Path, pip: list[str] | None = None) -> dict[str, str]:
    """{canonical name: version} pip would install into `image` under `constraints`; RuntimeError with
    pip's own last error lines when it cannot resolve."""
    spec = IMAGES[image]
    pip = pip or [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "--python-version", spec.python, "--only-binary=:all:", *platform_args(spec.glibc),
               "--target", str(Path(tmp) / "target"), "-c", str(constraints), *core_dependencies()]
        for req in spec.requirements:
            cmd += ["-r", str(REPO / req)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or \
                proc.stderr.strip().splitlines()[-3:]
            raise RuntimeError(f"{image}: pip cannot resolve for Python {spec.python}: {' | '.join(errors)}")
        data = json.loads(report.read_text(encoding="utf-8"))
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in data["install"]}


def lock_text(image: str, pins: dict[str, str]) -> str:
    spec = IMAGES[image]
    head = [f"# Lock of the {image} image: Python {spec.python}, manylinux up to glibc "
            f"{spec.glibc[0]}.{spec.glibc[1]}, wheels only.",
            f"# Generated by `python requirements/lock.py write {image}` (`make constraints`); CI checks it",
            "# with `python requirements/lock.py check`. Do not edit by hand."]
    head += [f"# Left out: {name}: {why}" for name, why in spec.exclude.items()]
    return "\n".join(head + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def without_excluded(image: str, resolved: dict[str, str]) -> dict[str, str]:
    spec = IMAGES[image]
    stale = [name for name in spec.exclude if name not in resolved]
    if stale:
        raise RuntimeError(f"{image}: excluded {stale} no longer resolved: drop them from IMAGES in {__file__}")
    return {name: version for name, version in resolved.items() if name not in spec.exclude}


def write(image: str) -> Path:
    pins = without_excluded(image, resolve(image, DEV_CONSTRAINTS))
    path = lock_path(image)
    path.write_text(lock_text(image, pins), encoding="utf-8")
    return path


def check(image: str, path: Path | None = None) -> list[str]:
    """Problems with the image's lock (the committed one unless `path`); empty: it resolves for the image's
    Python, and pip, constrained by it, installs exactly the lock: nothing missing, nothing else."""
    path = path or lock_path(image)
    if not path.is_file():
        return [f"{path}: missing: run `python requirements/lock.py write {image}`"]
    locked = read_pins(path)
    try:
        resolved = without_excluded(image, resolve(image, path))
    except RuntimeError as exc:
        return [str(exc)]
    problems = [f"{path.name}: {name}=={version} is pinned but not needed any more"
                for name, version in sorted(locked.items()) if name not in resolved]
    problems += [f"{path.name}: {name} {version} is needed but not pinned"
                 for name, version in sorted(resolved.items()) if name not in locked]
    problems += [f"{path.name}: {name}=={locked[name]} resolves to {version}"
                 for name, version in sorted(resolved.items()) if name in locked and locked[name] != version]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("images", nargs="*", default=sorted(IMAGES), help=f"default: all of {sorted(IMAGES)}")
    args = parser.parse_args(argv)
    failed = False
    for image in args.images:
        if image not in IMAGES:
            parser.error(f"{image}: unknown image (known: {', '.join(sorted(IMAGES))})")
        if args.action == "write":
            try:
                print(f"{image}: wrote {write(image).relative_to(REPO)}")
            except RuntimeError as exc:
                print(f"lock: error: {exc}", file=sys.stderr)
                failed = True
            continue
        problems = check(image)
        for problem in problems:
            print(f"lock: error: {problem}", file=sys.stderr)
        if not problems:
            print(f"{image}: {lock_path(image).relative_to(REPO)} resolves for Python {IMAGES[image].python} "
                  "and is complete")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
