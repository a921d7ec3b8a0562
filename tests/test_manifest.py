"""The manifest protocol every stage goes through (issue 8 items 1 and 2), on a real S3 server: a stage
skips only when its outputs are still there as committed, and refuses upstream manifests built from
outputs that are no longer the current ones."""

from __future__ import annotations

import time

import pytest

from answersheet import manifest
from answersheet.errors import AnswersheetError

PREFIX = "work/r/20261102/"


def _commit(store, stage: str, outputs: dict[str, bytes], upstream=None) -> dict:
    key = f"{PREFIX}{stage}/manifest.json"
    digests = {k: store.put(k, v) for k, v in outputs.items()}
    return manifest.commit(store, key, stage, "d-" + stage, digests, {}, time.monotonic(), upstream=upstream)


def test_item2_skip_only_when_outputs_are_there_as_committed(store):
    outputs = {f"{PREFIX}ingest/images/{i}.jpg": f"image {i}".encode() for i in range(3)}
    m = _commit(store, "ingest", outputs)
    key = f"{PREFIX}ingest/manifest.json"
    assert m["listing_prefix"] == f"{PREFIX}ingest/images/" and len(m["stored"]) == 3
    assert manifest.current(store, key, "d-ingest", force=False) is not None
    assert manifest.current(store, key, "other", force=False) is None
    assert manifest.current(store, key, "d-ingest", force=True) is None
    victim = sorted(outputs)[1]
    store.put(victim, b"image X")  # same size, other bytes: the ETag differs
    assert manifest.missing_outputs(store, store.get_json(key)) == [victim]
    assert manifest.current(store, key, "d-ingest", force=False) is None
    store.delete([victim])
    assert manifest.missing_outputs(store, store.get_json(key)) == [victim]


def test_item2_manifest_without_a_storage_record_is_redone(store):
    _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"a"})
    key = f"{PREFIX}ingest/manifest.json"
    old = store.get_json(key)
    del old["stored"]
    store.put_json(key, old)
    assert manifest.current(store, key, "d-ingest", force=False) is None


def test_item2_commit_refuses_an_output_that_is_not_in_storage(store):
    with pytest.raises(AnswersheetError, match=r"ingest/images/b.jpg: written by ingest but not in storage"):
        manifest.commit(store, f"{PREFIX}ingest/manifest.json", "ingest", "d", {f"{PREFIX}ingest/images/b.jpg": "0"},
                        {}, time.monotonic())
    assert store.get_json(f"{PREFIX}ingest/manifest.json") is None


def test_item1_digest_chain(store):
    ingest_key = f"{PREFIX}ingest/manifest.json"
    ingest = _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"a"})
    assert manifest.published_digest(store, ingest_key) == ingest["outputs_digest"]  # one HEAD
    detect = _commit(store, "detect", {f"{PREFIX}detect/labels/a.txt": b"0 .5 .5 .1 .1\n"},
                     upstream=manifest.upstream({ingest_key: ingest}))
    detect_key = f"{PREFIX}detect/manifest.json"
    manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])
    manifest.check_upstream(store, detect_key, detect, expect=[ingest_key], known={ingest_key: ingest})

    _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"new a"})  # re-ingested: other photo
    with pytest.raises(AnswersheetError) as err:
        manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])
    assert str(err.value).startswith(f"{store.uri(detect_key)} was built from an older ingest (outputs ")
    assert str(err.value).endswith("re-run detect for this day")

    with pytest.raises(AnswersheetError, match="has no record of the .* re-run detect for this day"):
        manifest.check_upstream(store, detect_key, {**detect, "upstream": []}, expect=[ingest_key])
    store.delete([ingest_key])
    with pytest.raises(AnswersheetError, match="which is gone; re-run ingest, then detect, for this day"):
        manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])


def test_item1_rerun_names_every_stage_between():
    assert manifest._rerun("ingest", "detect") == "detect"
    assert manifest._rerun("ingest", "preprocess") == "detect and preprocess"
    assert manifest._rerun("ingest", "datasheet") == "detect, preprocess and datasheet"
