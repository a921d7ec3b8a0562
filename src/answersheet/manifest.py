"""Stage manifests: the only proof a stage finished. Removed first, written last.

This module owns the whole protocol, so every stage behaves the same:

- `inputs_digest`: what the stage read (upstream outputs, the settings that change *its* output,
  model, package version). A stage whose manifest has the same inputs digest may skip...
- `current`: ...but only when its outputs are verifiably still there: one paginated listing of the
  prefix they live under, every key present with the size and ETag recorded at commit. A deleted or
  replaced object makes the stage redo its work (and so restore it) instead of skipping.
- `commit`: writes the manifest last with `outputs` (key -> sha256), `stored` ([size, ETag] of each
  output in key order — no second copy of 200k keys — from one listing taken right after the outputs
  were written, which also proves they all landed),
  `upstream` (each upstream manifest read and the `outputs_digest` it had), and the outputs digest
  as S3 metadata, so a downstream check is one HEAD, not a GET of a manifest that can be 40 MB.
- `check_upstream`: the digest chain. A stage refuses an upstream manifest that was built from
  outputs that are no longer the current ones (a re-ingested day whose detect labels are the old
  photos'), with one line naming the stages to re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Mapping
from typing import Any

from answersheet import __version__
from answersheet.errors import AnswersheetError
from answersheet.storage import Store

log = logging.getLogger(__name__)

STAGES = ("ingest", "detect", "preprocess", "datasheet")
DIGEST_METADATA = "outputs-digest"  # x-amz-meta-outputs-digest on every manifest object


def digest_of(*parts: Any) -> str:
    """sha256 of the canonical JSON of parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def outputs_digest(outputs: dict[str, str]) -> str:
    """One digest for a stage's outputs (key -> sha256), independent of run time."""
    return digest_of(sorted(outputs.items()))


def inputs_digest(*parts: Any) -> str:
    """Digest of a stage's inputs, always including the package version."""
    return digest_of(__version__, *parts)


def _listing_prefix(keys: list[str]) -> str:
    """The deepest folder ('…/') holding every key: the one prefix a single listing must cover."""
    common = posixpath.commonprefix(keys)
    return common[: common.rfind("/") + 1]


def missing_outputs(store: Store, existing: Mapping[str, Any]) -> list[str]:
    """Output keys of a manifest that are not in storage as committed (absent, or another size/ETag).

    One paginated listing under the prefix recorded at commit; no per-object HEADs (a 200k-image day
    is 200 list pages). A manifest without the record (written before it existed) counts as unverifiable:
    all its outputs are reported, so the stage redoes them.
    """
    keys = sorted(existing.get("outputs") or {})
    stored = existing.get("stored")
    if not keys:
        return []
    if not isinstance(stored, list) or len(stored) != len(keys):
        return keys
    prefix = existing.get("listing_prefix") or _listing_prefix(keys)
    listed = {o.key: [o.size, o.etag] for o in store.list(prefix)}
    return [k for k, want in zip(keys, stored, strict=True) if listed.get(k) != list(want)]


def current(store: Store, key: str, digest: str, force: bool) -> dict | None:
    """The existing manifest when it proves this exact work is already done (and not --force).

    Done means: same inputs digest, and every output still in storage as committed.
    """
    if force:
        return None
    existing = store.get_json(key)
    if not existing or existing.get("inputs_digest") != digest:
        return None
    missing = missing_outputs(store, existing)
    if missing:
        log.warning("redo: %s lists %d output(s) that are missing or changed in storage (e.g. %s)",
                    store.uri(key), len(missing), store.uri(missing[0]))
        return None
    log.info("skip: %s is current (inputs digest %s…); use --force to redo", store.uri(key), digest[:12])
    return existing


def begin(store: Store, key: str) -> float:
    """Invalidate the stage's manifest before any output is written; returns the start time."""
    store.delete([key])
    return time.monotonic()


def upstream(manifests: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The `upstream` record of a stage that read these manifests (key -> manifest)."""
    return [{"stage": m.get("stage", "?"), "key": k, "outputs_digest": m.get("outputs_digest", "")}
            for k, m in sorted(manifests.items())]


def published_digest(store: Store, key: str) -> str | None:
    """The outputs digest of the manifest at key now (one HEAD), or None if there is no manifest."""
    meta = store.head_metadata(key)
    if meta is None:
        return None
    if DIGEST_METADATA in meta:
        return meta[DIGEST_METADATA]
    body = store.get_json(key) or {}  # a manifest written without the metadata
    return body.get("outputs_digest")


def _rerun(from_stage: str, to_stage: str) -> str:
    """'detect' / 'detect and preprocess': the stages after from_stage up to to_stage."""
    if from_stage not in STAGES or to_stage not in STAGES:
        return to_stage
    between = list(STAGES[STAGES.index(from_stage) + 1 : STAGES.index(to_stage) + 1]) or [to_stage]
    return between[0] if len(between) == 1 else f"{', '.join(between[:-1])} and {between[-1]}"


def check_upstream(store: Store, key: str, consumed: Mapping[str, Any], expect: list[str],
                   known: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Refuse a manifest (`consumed`, at key) built from other upstream outputs than the current ones.

    `expect`: the upstream manifest keys it must have recorded; `known`: upstream manifests the caller
    already holds (key -> manifest); the others are checked by one HEAD each.
    """
    stage = consumed.get("stage", "?")
    records = consumed.get("upstream")
    recorded_keys = {r.get("key") for r in records} if isinstance(records, list) else set()
    unrecorded = [k for k in expect if k not in recorded_keys]
    if unrecorded:
        raise AnswersheetError(f"{store.uri(key)}: has no record of the {store.uri(unrecorded[0])} outputs it was "
                               f"built from (written by an older version); re-run {stage} for this day")
    for rec in records if isinstance(records, list) else []:
        up_key, up_stage, recorded = rec.get("key", ""), rec.get("stage", "?"), rec.get("outputs_digest")
        if known and up_key in known:
            now = known[up_key].get("outputs_digest")
        else:
            now = published_digest(store, up_key)
        if now is None:
            raise AnswersheetError(f"{store.uri(key)} was built from {store.uri(up_key)}, which is gone; "
                                   f"re-run {up_stage}, then {_rerun(up_stage, stage)}, for this day")
        if now != recorded:
            raise AnswersheetError(
                f"{store.uri(key)} was built from an older {up_stage} (outputs {str(recorded)[:12]}…, now "
                f"{now[:12]}…); re-run {_rerun(up_stage, stage)} for this day"
            )


def commit(store: Store, key: str, stage: str, digest: str, outputs: dict[str, str],
           counts: dict[str, Any], started: float, upstream: list[dict[str, str]] | None = None,
           **extra: Any) -> dict:
    """Record what is in storage now and write the manifest last; returns it.

    Raises if an output is not in storage right after being written (nothing would prove it later).
    """
    prefix = _listing_prefix(sorted(outputs)) if outputs else ""
    listed = {o.key: [o.size, o.etag] for o in store.list(prefix)} if outputs else {}
    absent = sorted(set(outputs) - set(listed))
    if absent:
        raise AnswersheetError(f"{store.uri(absent[0])}: written by {stage} but not in storage ({len(absent)} "
                               f"output(s) absent); a concurrent run may have removed it — re-run {stage}")
    done_digest = outputs_digest(outputs)
    manifest = {
        "stage": stage,
        "version": __version__,
        "inputs_digest": digest,
        "outputs_digest": done_digest,
        "outputs": dict(sorted(outputs.items())),
        "listing_prefix": prefix,
        "stored": [listed[k] for k in sorted(outputs)],
        "upstream": upstream or [],
        "counts": counts,
        "seconds": round(time.monotonic() - started, 3),
        **extra,
    }
    store.put_json(key, manifest, metadata={DIGEST_METADATA: done_digest})
    log.info("%s: committed %s", stage, store.uri(key))
    return manifest


def require(store: Store, key: str, what: str) -> dict:
    """Read an upstream manifest, or fail naming the missing stage."""
    manifest = store.get_json(key)
    if manifest is None:
        raise AnswersheetError(f"{store.uri(key)}: missing — run the {what} stage for this day first")
    return manifest
