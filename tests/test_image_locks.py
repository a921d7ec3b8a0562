"""requirements/lock.py: each image's lock resolves with pip's own resolver for the image's Python (3.12 for
the detector's Ubuntu 24.04 base, 3.11 for preprocess), wheels only, and is complete: what CI's `locks` job
runs (`python requirements/lock.py check`). Needs the package index (~10 s per image, metadata only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "requirements"))
import lock  # noqa: E402  (requirements/lock.py)

sys.path.remove(str(REPO / "requirements"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def index_reachable():
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pip"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"package index unreachable: {probe.stderr.strip()[-200:]}")


@pytest.mark.parametrize("image", sorted(lock.IMAGES))
def test_lock_resolves_for_the_image_python_and_is_complete(image):
    assert lock.check(image) == []


def test_a_stale_lock_is_reported(tmp_path):
    """The check is not vacuous: a pin dropped, a version changed and an unneeded pin are all named."""
    pins = lock.read_pins(lock.lock_path("preprocess"))
    pins.pop("six")
    pins["jmespath"] = "1.0.1"
    pins["colorama"] = "0.4.6"
    path = tmp_path / "preprocess-constraints.txt"
    path.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    problems = lock.check("preprocess", path)
    assert any(p.startswith(f"{path.name}: six ") and "needed but not pinned" in p for p in problems), problems
    assert any("colorama==0.4.6 is pinned but not needed" in p for p in problems), problems
    assert not any("jmespath" in p for p in problems)  # an older jmespath still satisfies botocore: no problem


def test_a_pin_without_a_wheel_for_the_image_python_fails(tmp_path):
    """A pin with no wheel for the image (PyYAML 5.3.1 has no manylinux wheels) is refused with pip's own
    error, naming the image and its Python: what a lock resolved for another Python runs into."""
    pins = lock.read_pins(lock.lock_path("preprocess"))
    pins["pyyaml"] = "5.3.1"
    path = tmp_path / "preprocess-constraints.txt"
    path.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    (problem,) = lock.check("preprocess", path)
    assert problem.startswith("preprocess: pip cannot resolve for Python 3.11:") and "pyyaml" in problem.lower()
