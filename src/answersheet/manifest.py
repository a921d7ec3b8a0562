"""Stage manifests: the only proof a stage finished. Removed first, written last.

A manifest records `inputs_digest` (what the stage read: upstream outputs, config, model, version)
and `outputs` (key -> sha256). A stage whose inputs_digest matches its existing manifest skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from answersheet import __version__
from answersheet.errors import AnswersheetError
from answersheet.storage import Store

log = logging.getLogger(__name__)


def digest_of(*parts: Any) -> str:
    """sha256 of the canonical JSON of parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def outputs_digest(outputs: dict[str, str]) -> str:
    """One digest for a stage's outputs (key -> sha256), independent of run time."""
    return digest_of(sorted(outputs.items()))


def inputs_digest(*parts: Any) -> str:
    """Digest of a stage's inputs, always including the package version."""
    return digest_of(__version__, *parts)


def current(store: Store, key: str, digest: str, force: bool) -> dict | None:
    """The existing manifest when it proves this exact work is already done (and not --force)."""
    if force:
        return None
    existing = store.get_json(key)
    if existing and existing.get("inputs_digest") == digest:
        log.info("skip: %s is current (inputs digest %s…); use --force to redo", store.uri(key), digest[:12])
        return existing
    return None


def begin(store: Store, key: str) -> float:
    """Invalidate the stage's manifest before any output is written; returns the start time."""
    store.delete([key])
    return time.monotonic()


def commit(store: Store, key: str, stage: str, digest: str, outputs: dict[str, str],
           counts: dict[str, Any], started: float, **extra: Any) -> dict:
    """Write the manifest last; returns it."""
    manifest = {
        "stage": stage,
        "version": __version__,
        "inputs_digest": digest,
        "outputs_digest": outputs_digest(outputs),
        "outputs": dict(sorted(outputs.items())),
        "counts": counts,
        "seconds": round(time.monotonic() - started, 3),
        **extra,
    }
    store.put_json(key, manifest)
    log.info("%s: committed %s", stage, store.uri(key))
    return manifest


def require(store: Store, key: str, what: str) -> dict:
    """Read an upstream manifest, or fail naming the missing stage."""
    manifest = store.get_json(key)
    if manifest is None:
        raise AnswersheetError(f"{store.uri(key)}: missing — run the {what} stage for this day first")
    return manifest
